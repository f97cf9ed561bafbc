#!/usr/bin/env bash
# Set up the project on a fresh machine (Python >= 3.11, no virtual environment yet) and run one job.
#
#   bash scripts/setup.sh run    # the main job: closed-form checks + guided-sampling demo -> figures/
#   bash scripts/setup.sh test   # the whole test suite, notebooks and browser test included, a worker a core
#   bash scripts/setup.sh lab    # open the course in JupyterLab
#
# The Makefile targets `make run`, `make test` and `make lab` call this script.
#
# torch is installed first, on its own, from AEPO_TORCH (default: "torch>=2.4"). On a Linux
# machine with an NVIDIA GPU, the default resolves to PyPI's CUDA build, which is what you want.
# A CPU-only machine can save gigabytes with a CPU build, e.g. AEPO_TORCH="torch==2.13.0" where a
# CPU wheel of that version is on the pip path (CI does exactly this, see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
case "$job" in run|test|lab) ;; *) echo "usage: bash scripts/setup.sh run|test|lab" >&2; exit 2 ;; esac

PYTHON="${PYTHON:-python3}"
VENV="${AEPO_VENV:-.venv}"
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: Python >= 3.11 is required, $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

if ! "$py" -c 'import torch' 2>/dev/null; then
  read -ra torch_spec <<< "${AEPO_TORCH:-torch>=2.4}"  # may carry pip options, e.g. --index-url URL
  echo "setup: installing ${torch_spec[*]}"
  "${pip[@]}" "${torch_spec[@]}"
fi

# Reinstall the package only when pyproject.toml changed since the last install.
stamp="$VENV/.aepo-lite-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing aepo-lite and its extras (course, rl, datasets, sweep, tensorboard, dev)"
  "${pip[@]}" -e ".[course,rl,datasets,sweep,tensorboard,dev]"
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"

case "$job" in
  run)
    aepo-lite demo --out figures
    ;;
  test)
    export AEPO_SCALE="${AEPO_SCALE:-smoke}"
    # One pytest worker a core (AEPO_TEST_WORKERS=0: none, in this process); tests that share a
    # cache run on one worker, in order (xdist_group in tests/conftest.py).
    python -m pytest -q -n "${AEPO_TEST_WORKERS:-auto}" --dist loadgroup
    ;;
  lab)
    aepo-lite lab
    ;;
esac
