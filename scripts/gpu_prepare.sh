#!/usr/bin/env bash
# What a GPU session carries to the device machine (docs/gpu.md section 5), made here, once, before the first
# device call. Both folders are ignored by git (.git/info/exclude) and named in the device call's `carry`:
#
#   .whl/    wheels the GPU image lacks: tyro and its needs (the aepo-lite command line); the image has torch,
#            numpy, tqdm, pyyaml, matplotlib, seaborn, but no tyro, gymnasium, mujoco or minari
#   .qgpo/   QGPO's code (thu-ml/CEP-energy-guided-diffusion) at one commit, exported from a git checkout or
#            mirror (--qgpo), with its commit in .qgpo/COMMIT: scripts/compare_qgpo.py times it beside ours
#
#   bash scripts/gpu_prepare.sh --qgpo /path/to/CEP-energy-guided-diffusion(.git)
#   bash scripts/gpu_prepare.sh            # the wheels only (the check then skips the QGPO comparison)
#
# scripts/gpu_check.sh installs .whl/*.whl into a temporary folder on the device when it finds them, and runs
# the QGPO comparison when it finds .qgpo/.
set -euo pipefail
cd "$(dirname "$0")/.."
QGPO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --qgpo) QGPO="${2:?--qgpo needs a path}"; shift 2 ;;
    *) echo "gpu_prepare: unknown argument '$1' (expected --qgpo PATH)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
for d in /.whl/ /.qgpo/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
# the versions this checkout's environment runs (pure-python wheels: any platform)
WHEELS=(tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing-extensions==4.16.0)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
echo "gpu_prepare: $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1))"
if [ -n "$QGPO" ]; then
  rm -rf .qgpo && mkdir -p .qgpo
  git --git-dir="$(git -C "$QGPO" rev-parse --absolute-git-dir)" archive HEAD | tar -x -C .qgpo
  git -C "$QGPO" rev-parse HEAD > .qgpo/COMMIT
  echo "gpu_prepare: QGPO's code at $(cat .qgpo/COMMIT) in .qgpo ($(du -sh .qgpo | cut -f1))"
fi
