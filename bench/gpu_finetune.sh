#!/usr/bin/env bash
# One device call: the whole Airflow pipeline (mine -> synthesize -> dataset -> train ->
# infer -> judge -> report) on one GPU machine with `dagfleet up --run`:
#   - real DAG files (mined from apache-airflow 2.10.5 and 2.6.3 on PyPI with `dagfleet mine`,
#     carried as a directory: the GPU machine has no network);
#   - instructions from Qwen2.5-Coder-0.5B-Instruct served on the GPU by `dagfleet serve`
#     as an OpenAI-compatible teacher;
#   - a LoRA fine-tune of the same model (dequantized from its Q4_K_M GGUF to bf16);
#   - generations of the base and of the fine-tune's q4_k_m export for the test split,
#     judged, and the report saying whether the fine-tune beat its base.
# Needs $MODEL (the staged GGUF), $BIN (the CUDA build) and $NATS (a nats-server binary).
# Copies the report, loss curve, metrics and dataset summary to $OUT.
#   bash bench/gpu_finetune.sh DAGS_DIR
set -uo pipefail
DAGS="$(cd "${1:?DAGS_DIR}" && pwd)"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
BIN="${BIN:-/root/dagfleet}"; NATS="${NATS:-/root/nats-server}"; MODEL="${MODEL:-/root/qwen05.gguf}"
L=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"
W=/root/ft; rm -rf "$W"; mkdir -p "$W"; cd "$W" || exit 1
ln -s "$DAGS" dags
"$NATS" -js -a 127.0.0.1 -p 4222 -sd "$W/nats" > nats.log 2>&1 &
DAGFLEET_INFERENCE__DEVICE=cuda DAGFLEET_INFERENCE__ENGINE__MAX_BATCH=64 \
  "$BIN" serve "$MODEL" --addr 127.0.0.1:8088 > serve.log 2>&1 &
for _ in $(seq 1 120); do curl -sf 127.0.0.1:8088/health >/dev/null && break; sleep 0.5; done
cat > dagfleet.toml <<TOML
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:8088"
concurrency = 64
timeout = "600s"
batch = false
[trainer]
device = "cuda"
[inference]
device = "cuda"
[up]
roles = ["miner", "synthesizer", "trainer", "inference", "judge"]
TOML
cat > spec.toml <<TOML
name = "airflow-gpu"
stages = ["mine", "synthesize", "dataset", "train", "infer", "judge", "report"]
[[sources]]
kind = "dir"
path = "dags"
[models.teacher]
provider = "local"
model = "$(basename "$MODEL")"
[models.base]
provider = "file"
model = "$MODEL"
[synthesize]
variants = 3
chunk_rows = 100
max_tokens = 320
mode = "online"
failures_per_dag = 1
[dataset]
seed = 42
splits = [0.8, 0.1, 0.1]
[train]
r = 16
alpha = 16
lr = 2e-4
micro_batch = 2
grad_accum = 2
max_seq_len = 4096
epochs = 3
warmup_steps = 5
eval_every = 5
checkpoint_every = 10
[infer]
max_tokens = 1024
[judge]
airflow_version = "2.10"
TOML
export DAGFLEET_PROVIDERS__LOCAL__API_KEY=local
time timeout 560 "$BIN" --config dagfleet.toml up --run spec.toml 2>&1 | tail -40 | tee "$OUT/run.txt"
R=$(ls -d .dagfleet/artifacts/runs/*/ | head -1)
T=$(ls -d "$R"train/*/ | head -1)
cp "$T/report.md" "$T/loss.png" "$T/metrics.csv" "$T/train.json" "$OUT/" 2>/dev/null
D=$(ls -d "$R"dataset/*/ | head -1)
cat "$D"/*.json > "$OUT/dataset.json" 2>/dev/null
head -c 3000 "$D/train.jsonl" > "$OUT/train-sample.jsonl" 2>/dev/null
P=$(ls -d "$R"report/*/ | head -1)
cp "$P/report.md" "$OUT/run-report.md" 2>/dev/null; cp "$P/report.json" "$OUT/run-report.json" 2>/dev/null
ls -la "$T" "$T/gguf" | tee -a "$OUT/run.txt"
cat "$T/report.md"; cat "$P/report.md"
