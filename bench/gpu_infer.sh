#!/usr/bin/env bash
# One device call: the inference sweep of `dagfleet bench infer` beside HF transformers on
# the same GPU, for the Qwen2.5 0.5B and 1.5B shapes (random bf16 weights; plus Q4_K
# quantized on load). Expects the CUDA binary at $BIN (default target-cuda/release/dagfleet,
# built by deploy/build-cuda.sh and carried). What: check, paged (the paged attention kernel
# against the reference path), dagfleet, prefix (a shared 200-token prefix), q4k, hf. Writes logs under $OUT.
#   bash bench/gpu_infer.sh [shapes] [concurrency] [what]
set -uo pipefail
SHAPES="${1:-0.5b 1.5b}"
CONC="${2:-1,8,32,128,256}"
WHAT="${3:-dagfleet hf}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
L=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/gpu.txt"
BIN="${BIN:-target-cuda/release/dagfleet}"
for s in $SHAPES; do
  M=/root/qwen-$s
  [ -d "$M" ] || python3 bench/make_random_model.py "$s" "$M" >/dev/null
  for w in $WHAT; do
    # Peak GPU memory, sampled while the run lasts.
    ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done ) > "$OUT/mem-$s-$w.txt" &
    SAMPLER=$!
    case $w in
      check)
        T=$(python3 -c 'print(",".join(str(1000+i*37) for i in range(40)))')
        DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn $BIN bench logits --model "$M" --tokens "$T" --out /tmp/l.f32 2>&1 | tail -1
        python3 bench/check_logits.py "$M" /tmp/l.f32 "$T" 2>&1 | grep -v Warning | tee "$OUT/check-$s.txt" ;;
      paged) DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn timeout 300 $BIN bench paged --model "$M" 2>&1 | tee "$OUT/paged-$s.txt" ;;
      prefix) DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn timeout 300 $BIN bench infer --model "$M" --concurrency "$CONC" --shared-prefix 200 2>&1 | tee "$OUT/prefix-$s.txt" ;;
      dagfleet) DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_LOG__LEVEL=warn timeout 540 $BIN bench infer --model "$M" --concurrency "$CONC" 2>&1 | tee "$OUT/dagfleet-$s.txt" ;;
      q4k) DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_INFERENCE__QUANTIZE=q4k DAGFLEET_LOG__LEVEL=warn timeout 540 $BIN bench infer --model "$M" --concurrency "$CONC" 2>&1 | tee "$OUT/q4k-$s.txt" ;;
      hf) timeout 540 python3 bench/hf_generate.py "$M" --batches "$CONC" 2>&1 | grep -v Warning | tee "$OUT/hf-$s.txt" ;;
    esac
    kill $SAMPLER 2>/dev/null
    echo "peak MiB ($s $w): $(sort -n "$OUT/mem-$s-$w.txt" | tail -1)" | tee -a "$OUT/peaks.txt"
  done
done
