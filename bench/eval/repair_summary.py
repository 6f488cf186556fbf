#!/usr/bin/env python3
"""Single-shot against repair-loop figures from an `infer.repair` run (bench/eval/gpu_repair.sh).

    python3 bench/eval/repair_summary.py PROMPTS.jsonl GENERATIONS.jsonl EVAL.jsonl [WALL_SECONDS]

GENERATIONS.jsonl is the infer stage's output (attempts, tokens); EVAL.jsonl is `dagfleet judge --rows [--dagbag] generations.jsonl` output (one row per
generation, with the static verdict and, with --dagbag, DagBag's). PROMPTS.jsonl (the
development prompts) says which prompts ask for an Airflow DAG (`is_airflow_prompt`).
Prints a Markdown table per prompt group: static-valid and DagBag-clean rates of the
single-shot rows and of the repaired rows, the extra tokens and the attempts the loop spent.
"""
import json
import sys
from collections import defaultdict


def main() -> None:
    prompts = {}
    for line in open(sys.argv[1]):
        if line.strip():
            p = json.loads(line)
            prompts[p["id"]] = p
    wall = float(sys.argv[4]) if len(sys.argv) > 4 else None
    gens = {}
    for line in open(sys.argv[2]):
        if line.strip():
            g = json.loads(line)
            gens[(g["model"], g["id"])] = g
    rows = []
    for line in open(sys.argv[3]):
        if line.strip():
            r = json.loads(line)
            g = gens.get((r["model"], r["id"]), {})
            for k in ("attempts", "attempts_valid", "best_attempt", "agent_seconds", "generated_tokens", "prompt_tokens"):
                if k in g:
                    r[k] = g[k]
            rows.append(r)
    groups = {
        "Airflow prompts": lambda i: prompts.get(i, {}).get("is_airflow_prompt", False),
        "all prompts": lambda i: True,
    }
    models = sorted({r["model"] for r in rows}, key=lambda m: (" + repair (" in m, m))
    print("| prompts | model | rows | static valid | DagBag clean | attempts (mean) | generated tokens / prompt | prompt tokens / prompt |")
    print("|---|---|---|---|---|---|---|---|")
    for gname, keep in groups.items():
        for m in models:
            rs = [r for r in rows if r["model"] == m and keep(r["id"])]
            if not rs:
                continue
            n = len(rs)
            valid = sum(1 for r in rs if r["verdict"]["valid"])
            db = [r["dagbag"] for r in rs if r.get("dagbag")]
            clean = sum(1 for d in db if d["clean"])
            att = sum(r.get("attempts", 1) for r in rs) / n
            gen = sum(r.get("generated_tokens", 0) for r in rs) / n
            pt = sum(r.get("prompt_tokens", 0) for r in rs) / n
            dbs = f"{clean}/{len(db)} ({100 * clean / len(db):.1f}%)" if db else "n/a"
            print(f"| {gname} | {m} | {n} | {valid}/{n} ({100 * valid / n:.1f}%) | {dbs} | {att:.2f} | {gen:.0f} | {pt:.0f} |")
    # Where the repaired rows came from: which attempt was best, and what the loop fixed.
    rep = [r for r in rows if " + repair (" in r["model"]]
    if rep:
        best = defaultdict(int)
        for r in rep:
            best[r.get("best_attempt", 1)] += 1
        fixed = sum(1 for r in rep if r.get("attempts_valid") and not r["attempts_valid"][0] and r["verdict"]["valid"])
        print()
        print(f"Repair rows: best attempt {dict(sorted(best.items()))}; static-invalid first answers made valid: {fixed} of {sum(1 for r in rep if r.get('attempts_valid') and not r['attempts_valid'][0])}.")
        secs = sorted(r.get("agent_seconds", 0) for r in rep)
        print(f"Repair-loop wall seconds per prompt (all prompts concurrent on one engine): median {secs[len(secs) // 2]:.0f}, max {secs[-1]:.0f}.")
    if wall:
        print(f"Run wall time: {wall:.0f} s for {len(rep) or len(rows)} prompts ({wall / max(1, len(rep) or len(rows)):.2f} s of the GPU per prompt).")


if __name__ == "__main__":
    main()
