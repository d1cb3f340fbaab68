#!/usr/bin/env bash
# GPU check: everything a machine with one CUDA GPU should run once, in at most 8 minutes, from the repo root.
#
#   bash tools/gpu_check.sh                    # on a GPU (default --device cuda)
#   bash tools/gpu_check.sh --device cpu       # dry run on the CPU: tiny sizes, about a minute
#   options: --out DIR (default gpu_check/<UTC timestamp>), --data_root DIR (an existing simulated set:
#            no simulation), --python PATH (default $PYTHON or python), --train_seconds N (bf16 run),
#            --fp32_seconds N (0: no fp32 run)
#
# Sections and their time limits on one GPU (each under `timeout`; the script goes on after a failure,
# reports it, and exits 1 at the end if any section failed):
#   0. device, torch / CUDA / cuDNN versions, GPU name                               seconds
#   1. python -m pytest -m cuda tests: the fast paths equal to the plain model on CUDA, bf16 and fp16
#      autocast training with the grad scaler, exact resume, NCCL DDP                  <= 120 s
#   2. simulated data: make_sim_dataset.py, 240 train / 8 validate / 4 test sequences  <= 40 s
#   3. python bench.py --device cuda --only_steps: the demo/long recipes' and the full-width (batch 12)
#      training iteration, fp32 and bf16, before vs after, the step as one CUDA graph, torch.compile'd,
#      where the time goes, and the roofline of the model's own convolutions against the GPU's measured
#      peaks; stopped by the limit, it keeps what it measured in DIR/bench.json (CPU dry run: only --help)
#                                                                                       <= 180 s
#   4. full-width training (train_fixed_prior.py defaults, batch 12) with --amp bf16,
#      stopped by SIGTERM; iterations/s from metrics.csv (start-up excluded) and the
#      projected time of the course's 180,000-iteration schedule        <= 300 s, or what is left
#   5. the same in fp32 (PyTorch's defaults: cuDNN convolutions may use TF32), only with
#      --fp32_seconds N and when at least 60 s of the 8-minute budget are left          <= N s
# At most 480 s in all: training gets what the sections before it left (at most 300 s; 140 s if every
# section before it runs to its limit). Figures: DIR/summary.txt (also printed); logs: DIR/*.log.
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda OUT="" DATA="" PY="${PYTHON:-python}" TRAIN_S="" FP32_S=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --data_root) DATA="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --train_seconds) TRAIN_S="$2"; shift 2 ;;
    --fp32_seconds) FP32_S="$2"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: --device cuda or cpu" >&2; exit 2 ;; esac

if [ "$DEVICE" = cuda ]; then
  T_TESTS=120 T_DATA=40 T_BENCH=180 T_TRAIN=${TRAIN_S:-300} T_FP32=${FP32_S:-0} BUDGET=480
  N_TRAIN=240 N_VAL=8 N_TEST=4 EPOCH_SIZE=100
  MODEL=()                                            # train_fixed_prior.py's defaults: the full width
  WORKERS=4
else  # dry run: tiny sizes, a few iterations
  T_TESTS=120 T_DATA=60 T_BENCH=60 T_TRAIN=${TRAIN_S:-90} T_FP32=${FP32_S:-90} BUDGET=600
  N_TRAIN=8 N_VAL=2 N_TEST=2 EPOCH_SIZE=3
  MODEL=(--base_channels 4 --rnn_size 16 --g_dim 8 --z_dim 4 --cond_embed_dim 4 --niter 3)
  WORKERS=0
fi
OUT="${OUT:-gpu_check/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=()

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
section() {  # section NAME LIMIT_S LOG -- command...: runs it under timeout, logs it, records the outcome
  # TIMEOUT_OPTS=--foreground: the signal goes to the command alone (training: its data workers then
  # stop with it instead of dying first), else to its whole process group
  local name="$1" limit="$2" log="$3"; shift 4
  local t0=$(date +%s) rc
  echo; echo "=== $name (limit ${limit} s) ==="
  timeout ${TIMEOUT_OPTS:-} -k 15 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then say "$name: ok (${dt} s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "$name: TIMED OUT after ${dt} s (log: $OUT/$log)"; FAILED+=("$name")
  else say "$name: FAILED, exit $rc (${dt} s, log: $OUT/$log)"; FAILED+=("$name"); fi
  return "$rc"
}

say "gpu_check --device $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import platform, sys, torch
dev = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, host {platform.processor() or platform.machine()}")
if dev == "cuda":
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available: run with --device cpu for the dry run")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("device: cpu (dry run: tiny sizes, figures are not GPU figures)")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

# 1. the CUDA tests (on the CPU they skip; the dry run checks they are collected)
section "cuda tests" "$T_TESTS" tests.log -- "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

# 2. simulated data
if [ -z "$DATA" ]; then
  DATA="$OUT/sim_data"
  section "simulated data" "$T_DATA" data.log -- "$PY" make_sim_dataset.py --data_root "$DATA" --n_train $N_TRAIN \
    --n_validate $N_VAL --n_test $N_TEST --workers "$(nproc)" --no_progress
fi

# 3. bench
if [ "$DEVICE" = cuda ]; then
  section "bench --only_steps" "$(( T_BENCH < $(left) ? T_BENCH : $(left) ))" bench.log -- \
    "$PY" bench.py --device cuda --only_steps --out "$OUT/bench.json"
else
  section "bench (dry run: --help only)" 60 bench.log -- "$PY" bench.py --help
fi

# 4-5. training, stopped by SIGTERM (it saves last.pth after the current iteration); speed from its own timing
train() {  # train LABEL LIMIT AMP
  local label="$1" limit="$2" amp="$3"
  TIMEOUT_OPTS=--foreground section "train $label" "$limit" "train_$label.log" -- "$PY" train_fixed_prior.py --data_root "$DATA" \
    --log_dir "$OUT/train_$label" --cache_dir "$OUT/cache" --device "$DEVICE" --amp "$amp" --batch_size 12 \
    --niter 100000 --epoch_size $EPOCH_SIZE --eval_every 100000 --plot_every 100000 --num_workers $WORKERS \
    --no_progress "${MODEL[@]}"
  # a stop by the time limit is the plan, not a failure
  if [ ${#FAILED[@]} -gt 0 ] && [ "${FAILED[-1]}" = "train $label" ] && grep -q "stopped at epoch\|^done:" "$OUT/train_$label.log"; then
    unset 'FAILED[-1]'; say "train $label: stopped by the time limit as planned"
  fi
  local run; run=$(ls -d "$OUT/train_$label"/*/ 2>/dev/null | head -1)
  if [ -n "$run" ]; then
    "$PY" tools/gpu_check_speed.py "$run" --label "$label (batch 12, $DEVICE)" --summary "$SUMMARY" || FAILED+=("speed $label")
  else
    say "train $label: no run directory"; FAILED+=("speed $label")
  fi
}
L=$(left); train bf16 "$(( T_TRAIN < L ? T_TRAIN : L ))" bf16
L=$(left)
if [ "$T_FP32" -gt 0 ] && [ "$L" -ge 60 ]; then train fp32 "$(( T_FP32 < L ? T_FP32 : L ))" off
else say "train fp32: skipped (${L} s of the budget left)"; fi

echo
say "total: $(( $(date +%s) - START )) s; figures in $SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then say "FAILED sections: ${FAILED[*]}"; exit 1; fi
say "all sections passed"
