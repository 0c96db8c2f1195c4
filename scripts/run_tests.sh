#!/usr/bin/env bash
# Run the whole test suite (sets up the virtual environment first when needed).
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k rope -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup_env.sh")"
cd "$root"
exec "$python" -m pytest -q "$@"
