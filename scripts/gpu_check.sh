#!/usr/bin/env bash
# The GPU check (docs/gpu.md): what a session with a GPU runs, in under 8 minutes on an H100-class device.
#
#   bash scripts/gpu_check.sh                      # on a machine with CUDA: writes figures/bench_cuda.{json,md}
#   bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/dry/bench_dry   # the dry run (tests): tiny, CPU
#
# Steps, each with its own time limit (a step that fails or runs out is recorded, the others still run):
#   eager     aepo-lite bench --quick (the full preset's sizes, guided batches 1 and 256)        <= 90 s
#   compiled  the same with --compile (CUDA graphs via torch.compile; skipped on the CPU)         <= 180 s
#   captured  the same with --capture (each training step one CUDA graph, training/captured.py)   <= 80 s
#   tests     the CUDA tests of tests/test_gpu_paths.py (captured == eager after 20 steps, ...)   <= 60 s
#             and the slow one (the rows Jacobian through a compiled module)
#   paths     scripts/gpu_paths.py: Jacobian loop/batched, TwinQ two MLPs/batched, eager/captured,
#             N seeds stacked / 1 seed (one step of each stage)                                 <= 60 s
#   seeds     scripts/seeds_timing.py: train_seeds for 5 seeds against train for 1, end to end (the full
#             preset's networks, 300 steps a stage, a synthetic dataset: no Minari needed), and the one
#             seed again with captured steps                                                     <= 90 s
#   qgpo      scripts/compare_qgpo.py --quick against QGPO's code in .qgpo/ (scripts/gpu_prepare.sh makes
#             it; skipped without it, and in the dry run): OUT's folder/compare_qgpo_cuda.{json,md}   <= 150 s
#   tf32      scripts/tf32_check.py: two toy tasks trained with TF32 off and on (CUDA only)           <= 120 s
# Steps run in that order of priority (eager, seeds, captured, paths, tests, qgpo, compiled, tf32) while the
# time budget (--budget, default 540 s) leaves room for a step's whole limit; a step that does not fit is
# recorded as skipped. After every step scripts/gpu_check.py gathers what is there into OUT.json and OUT.md
# (the device named by torch), so a call killed mid-way keeps the finished steps. Wheels in .whl/
# (scripts/gpu_prepare.sh: tyro, which the image lacks) are installed into a temporary folder first. The exit
# status is 0 only when every step that ran passed. Without CUDA (and without --device cpu) it stops at once,
# with one line.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
TINY=0
OUT=""
BUDGET=540
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT="${2:?--out needs a path without suffix}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    *) echo "gpu_check: unknown argument '$1' (expected --device cuda|cpu, --tiny, --out PATH, --budget SECONDS)" >&2
       exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" != cpu ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PY); run it on a machine with a GPU, or use --device cpu --tiny for the dry run" >&2
    exit 2
  fi
fi
if compgen -G ".whl/*.whl" > /dev/null; then  # scripts/gpu_prepare.sh: what the GPU image lacks
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
  PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$SITE:$PYTHONPATH" || echo "gpu_check: could not install .whl/*.whl; going on without" >&2
fi
if [ -z "$OUT" ]; then
  if [ "$DEVICE" = cpu ]; then OUT="${TMPDIR:-/tmp}/gpu_check_dry/bench_dry"; else OUT=figures/bench_cuda; fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
: > "$WORK/status.tsv"
FAILED=0

gather() {  # the steps finished so far, into OUT.json and OUT.md (once the eager bench, the base, is there)
  [ -f "$WORK/eager.json" ] && "$PY" scripts/gpu_check.py --work "$WORK" --out "$OUT" > "$WORK/gather.log" 2>&1
}

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to WORK/NAME.log, record its exit status
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  if [ $((SECONDS + limit)) -gt "$BUDGET" ]; then
    echo "gpu_check: $name skipped: its limit of ${limit} s does not fit the ${BUDGET} s budget (${SECONDS} s used)"
    echo "skipped: its limit of ${limit} s did not fit the budget of ${BUDGET} s" > "$WORK/$name.log"
    printf '%s\t%s\t%s\n' "$name" "-1" "0" >> "$WORK/status.tsv"
    return
  fi
  echo "gpu_check: $name ($*)"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "timed out after ${limit} s" >> "$WORK/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$WORK/status.tsv"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
  [ $rc -eq 0 ] || FAILED=1
  gather
}

if [ $TINY = 1 ]; then  # the dry run: every step's code path at the smallest cost (the tests run it)
  SIZE=(--tiny --methods aepo --sample-batches 1)
  PATHS=(--tiny --rounds 1 --min-time 0.001 --parts jacobian)
  SEEDS=(--tiny --seeds 2 --steps 3 --transitions 300)
  TESTS="cuda"; SLOW=""
else
  SIZE=(--quick --sample-batches 1 256)
  PATHS=(--rounds 3 --min-time 0.2)
  SEEDS=(--seeds 5 --steps 300)
  TESTS="cuda or compiled_module"; SLOW=1
fi
BENCH=("$PY" -m aepo_lite bench --device "$DEVICE" "${SIZE[@]}")
step eager 90 "${BENCH[@]}" --out "$WORK/eager.json"
step seeds 90 "$PY" scripts/seeds_timing.py --device "$DEVICE" "${SEEDS[@]}" --out "$WORK/seeds.json"
step captured 80 "${BENCH[@]}" --capture --out "$WORK/captured.json"
step paths 60 "$PY" scripts/gpu_paths.py --device "$DEVICE" "${PATHS[@]}" --out "$WORK/paths.json"
step tests 60 env AEPO_SLOW="$SLOW" "$PY" -m pytest -q -rP -p no:cacheprovider tests/test_gpu_paths.py -k "$TESTS"
if [ $TINY = 0 ] && [ -f .qgpo/COMMIT ]; then
  step qgpo 150 "$PY" scripts/compare_qgpo.py --qgpo .qgpo --qgpo-commit "$(cat .qgpo/COMMIT)" --device "$DEVICE" \
    --quick --out "$(dirname "$OUT")/compare_qgpo_cuda"
fi
if [ "$DEVICE" != cpu ]; then
  step compiled 180 "${BENCH[@]}" --compile --out "$WORK/compiled.json"
  step tf32 120 "$PY" scripts/tf32_check.py --device "$DEVICE" --out "$WORK/tf32.json"
fi
if ! "$PY" scripts/gpu_check.py --work "$WORK" --out "$OUT"; then
  echo "gpu_check: could not gather the results (the step logs are in $WORK)" >&2
  exit 1
fi
echo "gpu_check: step logs in $WORK"
[ $FAILED -eq 0 ] || { echo "gpu_check: some steps failed (see $OUT.md, table 'check')" >&2; exit 1; }
