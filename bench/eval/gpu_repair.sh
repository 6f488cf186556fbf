#!/usr/bin/env bash
# One device call: the repair loop of issue 14 measured on the original project's development
# prompts. `dagfleet up --run` with one stage, `infer` with `repair = $REPAIR`: each prompt's
# single-shot answer, and beside it the agent's (the static judge's findings sent back to the
# same engine as repair turns, batched with everything else), from the same model on one GPU.
# DagBag judging happens afterwards where Airflow is installed:
#   dagfleet judge --rows --dagbag --airflow-version 2.10 generations.jsonl
# Needs $MODEL (a staged GGUF), $BIN (the CUDA build), $NATS (a nats-server binary).
#   bash bench/eval/gpu_repair.sh PROMPTS.jsonl
# On one H200 with Qwen2.5-Coder-0.5B (2026-12-04) REPAIR=2 MAX_TOKENS=1024 took 369 s;
# REPAIR=2 with 1,536 tokens did not finish within 500 s.
# Knobs: REPAIR (2), MAX_TOKENS (1024), RUN_TIMEOUT (s, 540), DEVICE (cuda; `cpu` for a smoke
# run), W (work dir, /root/repair), OUT (where repair.tgz goes).
set -uo pipefail
FINAL="${OUT:-/tmp/out}"; mkdir -p "$FINAL"
W="${W:-/root/repair}"
DEVICE="${DEVICE:-cuda}"; NATS_PORT="${NATS_PORT:-4223}"
BIN="${BIN:-/root/dagfleet}"; NATS="${NATS:-/root/nats-server}"; MODEL="${MODEL:-/root/qwen05.gguf}"
L=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"
PROMPTS="$(readlink -f "${1:?PROMPTS}")"
rm -rf "$W"; mkdir -p "$W/out"; cd "$W" || exit 1
cat > dagfleet.toml <<TOML
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
[inference]
device = "$DEVICE"
[inference.engine]
max_batch = 128
[up]
roles = ["inference"]
TOML
cat > spec.toml <<TOML
name = "repair-eval"
stages = ["infer"]
[models.base]
provider = "file"
model = "$MODEL"
[infer]
prompts = "$PROMPTS"
max_tokens = ${MAX_TOKENS:-1024}
repair = ${REPAIR:-2}
batch_rows = 194
[limits]
deadline = "1h"
TOML
"$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$W/nats" > nats.log 2>&1 < /dev/null &
sleep 1
T0=$(date +%s)
timeout -k 10 "${RUN_TIMEOUT:-540}" "$BIN" --config dagfleet.toml up --run spec.toml > up.log 2>&1 < /dev/null
echo "up exit $? after $(( $(date +%s) - T0 )) s" | tee out/run.txt
grep -v "will be retried" up.log | tail -30 >> out/run.txt
R=$(ls -d .dagfleet/artifacts/runs/*/ | head -1)
cat "$R"infer/*/generations.jsonl > out/generations.jsonl 2>/dev/null
cat "$R"infer/*/summary.json > out/summaries.json 2>/dev/null
cp "$R/manifest.json" spec.toml out/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv > out/gpu.txt 2>&1
wc -l out/generations.jsonl
cat out/summaries.json | head -40
tar czf "$FINAL/repair.tgz" -C "$W" out
ls -la "$FINAL"
