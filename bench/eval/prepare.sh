#!/usr/bin/env bash
# Prepares the training DAGs of the model-quality evaluation (issue 13) on a CPU machine that
# reaches PyPI; the GPU machine that trains on them has no network.
#  1. `dagfleet mine bench/eval/mine.toml`: example DAGs of Airflow releases 1.10.15 to 2.10.5
#     and the example_dags/ of provider wheels (with the miner's cleaning and filters);
#  2. `dagfleet judge --rows --dagbag`: every mined file loaded by Airflow 2.10.5's DagBag with
#     the evaluation's providers (`bash tests/airflow-env.sh --providers eval 2.10`);
#  3. the DagBag-clean files are written to $OUT/dags/example_dags/, one file per DAG, for a
#     `dir` source with `airflow_version = "2.10.5"`.
# Decontamination against the evaluation's prompts and source DAGs happens in the pipeline's
# dataset stage (`dataset.held_out`, see bench/eval/gpu_eval.sh), which reports what it removed.
#   bash bench/eval/prepare.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="$(mkdir -p "${1:?OUT_DIR}" && cd "$1" && pwd)"
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/dagfleet}"
[ -x "$BIN" ] || cargo build --release -p dagfleet --no-default-features --features judge,miner
bash tests/airflow-env.sh --providers eval 2.10
echo "== mining"
"$BIN" mine bench/eval/mine.toml -o "$OUT/mined.jsonl"
echo "== DagBag over $(wc -l < "$OUT/mined.jsonl") mined files"
"$BIN" judge --rows --dagbag --airflow-version 2.10 "$OUT/mined.jsonl" > "$OUT/mined-judged.jsonl" 2> "$OUT/mined-judged.md" || true
cat "$OUT/mined-judged.md"
python3 - "$OUT" <<'PY'
import collections, json, os, re, sys
out = sys.argv[1]
mined = [json.loads(l) for l in open(os.path.join(out, "mined.jsonl"))]
judged = [json.loads(l) for l in open(os.path.join(out, "mined-judged.jsonl"))]
assert len(mined) == len(judged), (len(mined), len(judged))
d = os.path.join(out, "dags", "example_dags")
os.makedirs(d, exist_ok=True)
kept, why = 0, collections.Counter()
for m, j in zip(mined, judged):
    db = j.get("dagbag") or {}
    if not db.get("clean"):
        why[(db.get("error_class") or "?") + (":" + db["cause"] if db.get("cause") else "")] += 1
        continue
    name = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(m["path"])[:-3])
    if not name.startswith("example_"):
        name = "example_" + name
    with open(os.path.join(d, "%s_%s.py" % (name, m["sha256"][:8])), "w") as f:
        f.write(m["content"])
    kept += 1
summary = {"mined": len(mined), "dagbag_clean": kept, "dropped_by_class": dict(why.most_common())}
json.dump(summary, open(os.path.join(out, "prepare-summary.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
