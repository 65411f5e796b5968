#!/usr/bin/env bash
# Every GPU benchmark in one call, within BUDGET seconds (default 450: under 8 minutes with start-up),
# tables into benchmarks/results/ (or $RESULTS). Written for one H100/H200; NOT YET RUN on a GPU (the
# session that wrote it had none), so the per-step estimates below are guesses to be corrected by the
# first run's log (each step prints its wall time).
#
# From a fresh copy of the repository on the device machine (torch and Lightning there, no Hydra):
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux2014_x86_64 -d .whl \
#                  hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
#                (antlr4-python3-runtime has no wheel on PyPI: build one here with
#                 `pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3`; it is pure Python)
#   data (optional; the steps that need it are skipped without it), outside git, carried:
#                python ../shared/data/cifar10_dev_batches.py .data/cifar10_dev
#                cp -r ../shared/data/fashion_mnist .data/fashion_mnist
#   the call:    run(command="bash benchmarks/gpu_all.sh", carry=[".whl", ".data"], timeout_s=540)
#
# Steps, in priority order (a step starts only if its estimate fits in the time left, and is killed at
# its own limit): overhead MLP, EMA-update microbenchmark, overhead ResNet-18, speedrun CIFAR-10 (dev
# split), ablation (one seed). Every step writes its .md/.csv under $RESULTS; this script concatenates
# them into $RESULTS/gpu_all.md, and copies everything to $OUT when that is set (the device tool).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-450}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_all.log"
: > "$LOG"
say() { echo "[gpu_all $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || say "wheel install failed"
  else
    say "no Hydra and no .whl/: the ablation step (Hydra configs) will be skipped"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$LOG" || { say "no CUDA: stopping"; exit 1; }

# step NAME ESTIMATE_S LIMIT_S COMMAND...: run it if ESTIMATE_S fits in what is left of BUDGET
step() {
  local name=$1 est=$2 limit=$3; shift 3
  local left=$((BUDGET - SECONDS))
  if (( est > left )); then say "SKIP $name: needs ~${est}s, ${left}s left"; return; fi
  (( limit > left )) && limit=$left
  say "START $name (estimate ${est}s, limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "END $name rc=$rc in $((SECONDS - t0))s"
}

step overhead_mlp 140 190 python3 benchmarks/overhead.py --full --device cuda --models mlp --repeats 3 --timed-steps 300 \
  --configs lightning,raw,lr_schedule,ema,early_stopping,update_ratio,l1,divergence_guard,mixup,cutmix,cutout,stack,lightning_ema
step ema_update 40 80 python3 benchmarks/ema_update.py --device cuda
step overhead_resnet 130 170 python3 benchmarks/overhead.py --full --device cuda --models resnet --repeats 3 \
  --timed-steps 200 --configs lightning,raw,lr_schedule,ema,l1,mixup,cutout,early_stopping,stack,lightning_ema
if [ -d .data/cifar10_dev ]; then
  step speedrun 120 150 python3 benchmarks/speedrun.py --full --device cuda --data-dir .data/cifar10_dev --runs 3
else
  say "SKIP speedrun: no .data/cifar10_dev (see the header)"
fi
if [ -d .data/fashion_mnist ] && python3 -c "import hydra" 2>/dev/null; then
  step ablation 100 130 python3 benchmarks/ablation.py --full --device cuda --seeds 1 --data-dir .data/fashion_mnist \
    --name full_s0
else
  say "SKIP ablation: needs .data/fashion_mnist and Hydra"
fi

{ for f in "$RESULTS"/*cuda*.md "$RESULTS"/ema_update*.md "$RESULTS"/speedrun_full*.md "$RESULTS"/ablation_full*.md; do
    [ -f "$f" ] && { echo "## $(basename "$f")"; echo; cat "$f"; echo; }
  done; } > "$RESULTS/gpu_all.md" 2>/dev/null
say "done in ${SECONDS}s; tables: $RESULTS/gpu_all.md"
if [ -n "${OUT:-}" ]; then cp -r "$RESULTS"/. "$OUT"/; fi
