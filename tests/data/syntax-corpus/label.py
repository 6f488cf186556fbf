#!/usr/bin/env python3
"""Label the syntax corpus with CPython's own compiler: `python3 label.py . labels.json`.

A file "compiles" when `compile(source_bytes, name, "exec")` accepts it (bytes, so the coding
line and UTF-8 rules apply as for an imported module). The error's class and message are kept.
The judge test re-runs this check where python3 is installed, so the labels cannot go stale.
"""
import json
import os
import sys
import warnings


def label(path):
    with open(path, "rb") as f:
        src = f.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(src, os.path.basename(path), "exec", dont_inherit=True)
        return {"compiles": True, "error": None}
    except (SyntaxError, ValueError) as e:
        return {"compiles": False, "error": f"{type(e).__name__}: {e.msg if isinstance(e, SyntaxError) else e}"}


def main():
    corpus, out = sys.argv[1], sys.argv[2]
    labels = {
        name: label(os.path.join(corpus, name))
        for name in sorted(os.listdir(corpus))
        if name.endswith(".py") and name != "label.py"
    }
    with open(out, "w") as f:
        json.dump({"python": sys.version.split()[0], "files": labels}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
