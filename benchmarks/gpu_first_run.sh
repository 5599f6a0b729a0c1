#!/usr/bin/env bash
# The first run on a lent GPU (issue 21), under 8 minutes: the CUDA tests, `bench.py --only gpu`, and two epochs of
# the paper grid (`lvae train --grid fig3 --profile paper`, 60 models stacked, CUDA graphs on), everything written to
# $OUT (6 files: log.txt, env.txt, pytest.xml, bench-gpu.json, grid.json, grid-runs.tar.gz). benchmarks/README.md
# ("The first GPU run") says how to call it.
#
#   bash benchmarks/gpu_first_run.sh pack   # here, once: MNIST gzipped into .gpu-carry/ (ignored, ~11 MB)
#   run(command="bash benchmarks/gpu_first_run.sh", carry=[".gpu-carry"], timeout_s=540)   # on the GPU machine
#
# The GPU machine has no network: MNIST travels gzipped and is unpacked into a temporary $LVAE_DATA there. Its
# python3 holds a CUDA torch (and pytest); lvae runs from the working tree (PYTHONPATH), nothing is installed.
# Each step has its own time limit, and a failing step does not stop the others: all of them report.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$ROOT/.gpu-carry
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

if [ "${1:-}" = pack ]; then
  src=${LVAE_DATA:-$HOME/.cache/lvae}/mnist
  for f in $FILES; do
    [ -f "$src/$f" ] || { echo "no $src/$f: fetch MNIST first (lvae data mnist)" >&2; exit 1; }
  done
  mkdir -p "$CARRY/mnist"
  for f in $FILES; do gzip -9 -c "$src/$f" > "$CARRY/mnist/$f.gz"; done
  exclude=$(git -C "$ROOT" rev-parse --git-path info/exclude)
  case $exclude in /*) ;; *) exclude=$ROOT/$exclude ;; esac
  grep -qx '/.gpu-carry/' "$exclude" 2>/dev/null || echo '/.gpu-carry/' >> "$exclude"
  du -sh "$CARRY"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-first-run}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
export LVAE_DATA=$WORK/data PYTHONPATH=$ROOT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
exec > >(tee "$OUT/log.txt") 2>&1
cd "$ROOT" || exit 1
echo "== $(date -u +%FT%TZ) gpu_first_run: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
mkdir -p "$LVAE_DATA/mnist"
for f in $FILES; do
  gunzip -c "$CARRY/mnist/$f.gz" > "$LVAE_DATA/mnist/$f" || echo "MISSING $CARRY/mnist/$f.gz: run 'pack' here first"
done
{ nvidia-smi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git rev-parse HEAD; git status --short; } > "$OUT/env.txt" 2>&1
head -20 "$OUT/env.txt"

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - t0)) s"
}

# 1. the CUDA tests (tests/test_cuda_graph.py's real captures, the stand-in's checks) and the engine's CPU tests
step "CUDA tests" 120 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -rA --junitxml="$OUT/pytest.xml" \
  tests/test_cuda_graph.py tests/test_torch_floor.py tests/test_engine.py tests/test_optim.py
# 2. the GPU benchmark: whole MNIST epochs with the prefetch thread on, fp32 and bf16, eager and CUDA graph
step "bench.py --only gpu" 150 "$PY" benchmarks/bench.py --only gpu --quick --out "$OUT/bench-gpu.json"
# 3. two epochs of the paper grid (the whole Fig-3 grid, 3 seeds; L_5000 on 100 test images at the end)
t0=$SECONDS
echo "== lvae train --grid fig3 --profile paper --epochs 2 (limit 180s)"
timeout 180 "$PY" -m lvae.cli train --grid fig3 --profile paper --epochs 2 --eval-iw-subset 100 \
  --out "$WORK/results" --quiet > "$OUT/grid.json"
echo "== lvae train: exit $? after $((SECONDS - t0)) s; $(grep -c '"complete"' "$OUT/grid.json") runs complete"
tar czf "$OUT/grid-runs.tar.gz" -C "$WORK" --exclude='*.pt' results 2>/dev/null
echo "== done after $SECONDS s; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
