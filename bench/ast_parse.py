#!/usr/bin/env python3
"""Peer for `dagfleet bench judge`: parse the same corpus with Python's own `ast.parse` in one
process, one core, the same number of passes; prints files/s as JSON.

Usage: ast_parse.py CORPUS.jsonl PASSES
"""
import ast
import json
import sys
import time


def main():
    corpus, passes = sys.argv[1], int(sys.argv[2])
    with open(corpus) as f:
        sources = [json.loads(line)["content"] for line in f if line.strip()]
    ok = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        for s in sources:
            try:
                ast.parse(s)
                ok += 1
            except SyntaxError:
                pass
    dt = time.perf_counter() - t0
    print(json.dumps({"files": len(sources) * passes, "seconds": dt, "files_per_s": len(sources) * passes / dt, "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
