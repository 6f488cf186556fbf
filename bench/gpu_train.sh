#!/usr/bin/env bash
# One device call: `dagfleet bench train` beside Hugging Face PEFT (bench/peft_train.py) on
# the same GPU, for the Qwen2.5 0.5B and 1.5B shapes (random bf16 weights), seq 2048,
# micro-batch 2, LoRA r = 16 on all seven linear layers, activation (gradient)
# checkpointing on both sides. Expects the CUDA binary at $BIN (deploy/build-cuda.sh, carried
# xz-compressed). Logs under $OUT.
#   bash bench/gpu_train.sh [shapes] [what]      what: dagfleet peft nockpt
set -uo pipefail
SHAPES="${1:-0.5b 1.5b}"
WHAT="${2:-dagfleet peft}"
STEPS="${STEPS:-10}"
SEQ="${SEQ:-2048}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
BIN="${BIN:-/root/dagfleet}"
export PYTHONUNBUFFERED=1
L=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/gpu.txt"
for s in $SHAPES; do
  for w in $WHAT; do
    # Device memory as the driver sees it, sampled while the run lasts.
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) > "$OUT/mem-$s-$w.txt" &
    SAMPLER=$!
    case $w in
      dagfleet) DAGFLEET_TRAINER__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn timeout 500 "$BIN" bench train \
          --shape "qwen2.5-$s" --seq "$SEQ" --micro-batch 2 --r 16 --steps "$STEPS" --json 2>&1 | tee "$OUT/dagfleet-$s.txt" ;;
      nockpt) DAGFLEET_TRAINER__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn timeout 500 "$BIN" bench train \
          --shape "qwen2.5-$s" --seq "$SEQ" --micro-batch 2 --r 16 --steps "$STEPS" --no-checkpointing --json 2>&1 | tee "$OUT/nockpt-$s.txt" ;;
      peft) timeout 500 python3 bench/peft_train.py "$s" --seq "$SEQ" --micro-batch 2 --r 16 --steps "$STEPS" 2>&1 \
          | grep -v -i warn | tee "$OUT/peft-$s.txt" ;;
    esac
    kill $SAMPLER 2>/dev/null
    echo "nvidia-smi peak MiB ($s $w): $(sort -n "$OUT/mem-$s-$w.txt" | tail -1)" | tee -a "$OUT/peaks.txt"
  done
done
grep -h '^| ' "$OUT"/dagfleet-*.txt "$OUT"/nockpt-*.txt "$OUT"/peft-*.txt 2>/dev/null | grep -v -- '---' | sort -u
cat "$OUT/peaks.txt"
