#!/usr/bin/env bash
# Run the EASE comparison on the built-in corpus (sets up the virtual environment first
# when needed). Extra arguments go to `python -m ease.experiments`, e.g. --out runs/x.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$root/scripts/setup_env.sh")"
cd "$root"
exec "$python" -m ease.experiments "$@"
