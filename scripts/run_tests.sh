#!/usr/bin/env bash
# Run the whole test suite (sets up the virtual environment first when needed).
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k rope -x
# The modules run on one worker per core (pytest-xdist, a module's tests on one worker,
# so module-scoped fixtures are built once); EASE_TEST_WORKERS=0 runs in this process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup_env.sh")"
cd "$root"
exec "$python" -m pytest -q -n "${EASE_TEST_WORKERS:-auto}" --dist loadfile "$@"
