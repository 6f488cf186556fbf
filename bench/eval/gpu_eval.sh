#!/usr/bin/env bash
# One device call: the model-quality evaluation of issue 13 on one GPU machine with
# `dagfleet up --run` (mine -> synthesize -> dataset -> train -> infer -> judge -> report):
#   - training DAGs: the DagBag-clean files bench/eval/prepare.sh wrote (a `dir` source
#     targeting Airflow 2.10.5; the GPU machine has no network);
#   - instructions from Qwen2.5-Coder-0.5B-Instruct served on the same GPU by `dagfleet serve`
#     (the best model that can be staged there), with `Airflow Version: 2.10.5` lines;
#   - the dataset stage holds out the evaluation's prompts (infer.prompts) and the DAGs they
#     were written from (dataset.held_out = test_dags.jsonl), and lists what it removed;
#   - a LoRA fine-tune of the same model, then generations of the base and of the fine-tune
#     (its adapter over the same base) for the 194 development prompts, judged statically.
# DagBag judging of the generations happens afterwards where Airflow is installed:
#   dagfleet judge --rows --dagbag OUT/generations.jsonl
# Needs $MODEL (the staged GGUF), $BIN (the CUDA build), $NATS (a nats-server binary).
#   bash bench/eval/gpu_eval.sh DAGS_DIR PROMPTS.jsonl HELD_OUT.jsonl
# A run cut off by the call's time limit continues in the next call (same warm machine):
#   RESUME=1 bash bench/eval/gpu_eval.sh
# Knobs: EPOCHS (3), VARIANTS (3 instructions per DAG), MAX_TOKENS (1536), FAILURES (0
# troubleshooting pairs per DAG), RUN_TIMEOUT (s), DEVICE (cuda; `cpu` for a smoke run here),
# W (work dir, /root/eval), OUT (where eval.tgz goes).
set -uo pipefail
# $OUT gets one archive (a device call brings back at most 8 files): eval.tgz.
FINAL="${OUT:-/tmp/out}"; mkdir -p "$FINAL"
W="${W:-/root/eval}"
OUT="$W-out"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"; NATS_PORT="${NATS_PORT:-4222}"; SERVE_PORT="${SERVE_PORT:-8088}"
BIN="${BIN:-/root/dagfleet}"; NATS="${NATS:-/root/nats-server}"; MODEL="${MODEL:-/root/qwen05.gguf}"
L=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$L:${LD_LIBRARY_PATH:-}"

collect() {
  cd "$W" || return
  R=$(ls -d .dagfleet/artifacts/runs/*/ | head -1)
  cp spec.toml dagfleet.toml "$OUT/"
  T=$(ls -d "$R"train/*/ 2>/dev/null | head -1)
  [ -n "$T" ] && cp "$T/report.md" "$T/loss.png" "$T/metrics.csv" "$T/train.json" "$OUT/" 2>/dev/null
  D=$(ls -d "$R"dataset/*/ 2>/dev/null | head -1)
  [ -n "$D" ] && { cp "$D/stats.json" "$D/held_out_removed.jsonl" "$OUT/" 2>/dev/null; head -c 4000 "$D/train.jsonl" > "$OUT/train-sample.jsonl"; }
  cat "$R"infer/*/*.jsonl > "$OUT/generations.jsonl" 2>/dev/null
  for J in "$R"judge/*/; do cat "$J/eval.jsonl"; done > "$OUT/eval-static.jsonl" 2>/dev/null
  P=$(ls -d "$R"report/*/ 2>/dev/null | head -1)
  [ -n "$P" ] && cp "$P/report.md" "$OUT/run-report.md" 2>/dev/null
  cp "$R/manifest.json" "$OUT/" 2>/dev/null
  tail -20 serve.log > "$OUT/serve-tail.txt"
  cat up.log up-resume.log 2>/dev/null | grep -v "will be retried" | tail -200 > "$OUT/up-tail.txt"
  wc -l "$OUT"/*.jsonl
  head -40 "$OUT/run-report.md" 2>/dev/null
  tar czf "$FINAL/eval.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
  ls -la "$FINAL"
}

# nats-server (JetStream state under $W/nats survives between calls on a warm machine) and
# the teacher; a device call's processes may end with it, so each call starts what is missing.
services() {
  # Each background process gets its own log as stdout: none may hold the caller's pipe.
  if ! pgrep -f "nats-server.*-sd $W/nats" >/dev/null; then
    "$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$W/nats" >> nats.log 2>&1 < /dev/null &
  fi
  if ! curl -sf 127.0.0.1:$SERVE_PORT/health >/dev/null; then
    # `serve` reads no provider settings; the teacher's API key is only for `up`.
    DAGFLEET_INFERENCE__DEVICE="$DEVICE" DAGFLEET_INFERENCE__ENGINE__MAX_BATCH=64 \
      "$BIN" serve "$MODEL" --addr 127.0.0.1:$SERVE_PORT >> serve.log 2>&1 < /dev/null &
  fi
  for _ in $(seq 1 240); do curl -sf 127.0.0.1:$SERVE_PORT/health >/dev/null && break; sleep 0.5; done
  if ! curl -sf 127.0.0.1:$SERVE_PORT/health >/dev/null; then
    echo "the teacher (dagfleet serve) did not come up:" | tee "$OUT/run.txt"
    tail -20 serve.log | tee -a "$OUT/run.txt"
    collect
    exit 1
  fi
}

if [ "${RESUME:-0}" = 1 ]; then
  cd "$W" || exit 1
  services
  RUN=$(basename "$(ls -d .dagfleet/artifacts/runs/*/ | head -1)")
  # A fleet left running by the last call (when the machine kept its processes) goes on.
  UP=$(pgrep -f 'dagfleet.toml up' | head -1)
  if [ -z "$UP" ]; then
    DAGFLEET_PROVIDERS__LOCAL__API_KEY=local "$BIN" --config dagfleet.toml up >> up-resume.log 2>&1 < /dev/null &
    UP=$!
  fi
  # `up` with no spec serves the fleet; the run goes on from its state in JetStream.
  timeout "${RUN_TIMEOUT:-540}" bash -c "until \"$BIN\" --config dagfleet.toml status $RUN --once 2>&1 | grep -qE '^run .*: (Done|Failed)'; do sleep 5; done"
  "$BIN" --config dagfleet.toml status "$RUN" --once 2>&1 | tail -20 | tee "$OUT/run.txt"
  kill "$UP" 2>/dev/null; wait "$UP" 2>/dev/null
  collect
  exit 0
fi

DAGS="$(cd "${1:?DAGS_DIR}" && pwd)"
PROMPTS="$(readlink -f "${2:?PROMPTS}")"
HELD="$(readlink -f "${3:?HELD_OUT}")"
EPOCHS="${EPOCHS:-3}"; MAX_TOKENS="${MAX_TOKENS:-1536}"
rm -rf "$W"; mkdir -p "$W"; cd "$W" || exit 1
ln -s "$DAGS" dags
cat > dagfleet.toml <<TOML
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
[providers.local]
kind = "openai"
base_url = "http://127.0.0.1:$SERVE_PORT"
concurrency = 64
timeout = "600s"
batch = false
[trainer]
device = "$DEVICE"
[inference]
device = "$DEVICE"
[inference.engine]
max_batch = 128
[up]
roles = ["miner", "synthesizer", "trainer", "inference", "judge"]
TOML
SYSTEM="You are an expert Apache Airflow developer. Generate complete, valid Airflow DAGs based on given requirements."
cat > spec.toml <<TOML
name = "airflow-eval"
stages = ["mine", "synthesize", "dataset", "train", "infer", "judge", "report"]
[[sources]]
kind = "dir"
path = "dags"
airflow_version = "2.10.5"
[models.teacher]
provider = "local"
model = "$(basename "$MODEL")"
[models.base]
provider = "file"
model = "$MODEL"
[synthesize]
variants = ${VARIANTS:-3}
chunk_rows = 100
max_tokens = 400
mode = "online"
failures_per_dag = ${FAILURES:-0}
[dataset]
seed = 42
splits = [0.9, 0.1, 0.0]
system_prompt = "$SYSTEM"
held_out = "$HELD"
[train]
r = 16
alpha = 32
lr = 2e-4
micro_batch = 2
grad_accum = 4
max_seq_len = 4096
epochs = $EPOCHS
warmup_steps = 10
eval_every = 20
checkpoint_every = 50
[infer]
prompts = "$PROMPTS"
max_tokens = $MAX_TOKENS
[judge]
airflow_version = "2.10"
[limits]
deadline = "2h"
TOML
services
# Output to a file, not a pipe: workers that outlive `up` must not keep this call open.
DAGFLEET_PROVIDERS__LOCAL__API_KEY=local timeout -k 10 "${RUN_TIMEOUT:-560}" \
  "$BIN" --config dagfleet.toml up --run spec.toml > up.log 2>&1 < /dev/null
grep -v "will be retried" up.log | tail -30 > "$OUT/run.txt"
RUN=$(basename "$(ls -d .dagfleet/artifacts/runs/*/ | head -1)")
"$BIN" --config dagfleet.toml status "$RUN" --once >> "$OUT/run.txt" 2>&1
cat "$OUT/run.txt"
collect
