#!/usr/bin/env python3
"""How well the static judge predicts what Airflow's DagBag loads, on model outputs.

Takes an infer stage's generations (JSONL rows with `id` and `output`), writes the code of each
(the first fenced block, else the whole reply) to OUT/files/<id>.py, labels every file with
Airflow's DagBag (tests/data/judge-corpus/label.py, run by AIRFLOW_PY: a Python with
apache-airflow installed), judges the same files with `dagfleet judge --json`, and prints the
confusion matrix with precision and recall of "valid" (a file DagBag loads with at least one
DAG and no import error), plus the disagreements by the judge's first finding.

Usage: judge_agreement.py GENERATIONS.jsonl OUT_DIR AIRFLOW_PY DAGFLEET_BIN [--airflow-version 2.10]
"""
import collections
import json
import os
import re
import subprocess
import sys

FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def code_of(reply):
    m = FENCE.search(reply)
    if m:
        return m.group(1)
    # An unclosed fence: the model was cut off inside it.
    i = reply.find("```")
    if i >= 0:
        rest = reply[i + 3 :]
        return rest.split("\n", 1)[1] if "\n" in rest else ""
    return reply


def main():
    gens, out, airflow_py, dagfleet = sys.argv[1:5]
    version = sys.argv[sys.argv.index("--airflow-version") + 1] if "--airflow-version" in sys.argv else "2.10"
    files = os.path.join(out, "files")
    os.makedirs(files, exist_ok=True)
    n = 0
    with open(gens) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            rid = re.sub(r"[^A-Za-z0-9_.-]", "_", str(row.get("id", n)))
            with open(os.path.join(files, f"{rid}.py"), "w") as g:
                g.write(code_of(row.get("output", "")))
            n += 1
    here = os.path.dirname(os.path.abspath(__file__))
    label = os.path.join(here, "..", "tests", "data", "judge-corpus", "label.py")
    labels_path = os.path.join(out, "dagbag.json")
    env = dict(os.environ, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    subprocess.run([airflow_py, label, files, labels_path], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labels = json.load(open(labels_path))["files"]
    judged = subprocess.run([dagfleet, "judge", "--json", "--airflow-version", version, files], capture_output=True, text=True)
    verdicts = {}
    for line in judged.stdout.splitlines():
        r = json.loads(line)
        verdicts[os.path.basename(r["path"])] = r
    m = collections.Counter()
    disagree = collections.Counter()
    rows = []
    for name, lab in sorted(labels.items()):
        v = verdicts[name]
        truth, said = lab["valid"], v.get("valid", False)
        m[(truth, said)] += 1
        first = next((f["category"] for f in v.get("findings", []) if f["severity"] == "error"), "NONE")
        if truth != said:
            disagree[(truth, said, first if said is False else (lab["import_error"] or "no DAG")[:70])] += 1
        rows.append({"file": name, "dagbag_valid": truth, "dagbag_error": lab["import_error"], "judge_valid": said, "judge_first_error": first})
    tp, fp, fn, tn = m[(True, True)], m[(False, True)], m[(True, False)], m[(False, False)]
    total = tp + fp + fn + tn
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    with open(os.path.join(out, "rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{total} outputs; DagBag (Airflow {json.load(open(labels_path))['airflow']}) loads {tp + fn}; the judge calls {tp + fp} valid")
    print()
    print("| | judge: valid | judge: invalid |")
    print("|---|---|---|")
    print(f"| DagBag: loads | {tp} | {fn} |")
    print(f"| DagBag: fails | {fp} | {tn} |")
    print()
    print(f"agreement {(tp + tn) / total:.1%}; precision of \"valid\" {precision:.1%}; recall of \"valid\" {recall:.1%}")
    if disagree:
        print()
        print("disagreements (DagBag, judge, why):")
        for (t, s, why), k in disagree.most_common():
            print(f"  {k} x DagBag {'loads' if t else 'fails'}, judge says {'valid' if s else 'invalid'}: {why}")


if __name__ == "__main__":
    main()
