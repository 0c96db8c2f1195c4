#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment and print its python.
#
# Sourced-free: run as `python=$(scripts/setup_env.sh)`. Progress goes to stderr.
# - EASE_VENV: where the venv lives (default: .venv in the repository root).
# - TORCH_SPEC: the torch requirement to install first (default: torch==2.13.0). On a
#   machine without CUDA this must resolve to a CPU build; installing it before the
#   package keeps pip from resolving a plain "torch" into gigabytes of CUDA wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EASE_VENV:-$root/.venv}"
python_bin="${PYTHON:-python3}"
stamp="$venv/.ease-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv" >&2
  "$python_bin" -m venv "$venv" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    spec="${TORCH_SPEC:-torch==2.13.0}"
    echo "[setup] installing $spec" >&2
    "${pip[@]}" "$spec" >&2
  fi
  echo "[setup] installing ease with its test and plot extras" >&2
  "${pip[@]}" -e "$root[test,plots]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
