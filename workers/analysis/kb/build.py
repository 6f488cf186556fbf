#!/usr/bin/env python3
"""Build the knowledge base of what Airflow really ships: every module under `airflow.` in
the released wheels of apache-airflow, apache-airflow-core (3.x) and apache-airflow-providers-*,
with the public names each defines, and the distribution each comes from.

Usage: build.py OUT.json.gz [PACKAGE==VERSION ...]   (defaults: PACKAGES below)

Wheels come from the package index with `pip download --no-deps`; module contents are read
with Python's `ast`, never imported. A module whose top level defines `__getattr__` resolves
names lazily and is marked open (any name may exist). Virtual modules that Airflow registers
with `add_deprecated_classes({...})` (e.g. `airflow.operators.bash_operator` in 2.x) are
recorded too, with the names they map.
"""
import ast
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGES = [
    "apache-airflow==2.6.3",
    "apache-airflow==2.10.5",
    "apache-airflow-core==3.0.6",
    "apache-airflow-core==3.3.2",
    "apache-airflow-task-sdk==1.3.2",
    # Providers at the release current when the index was built; the wheel names in the
    # output record the versions.
    "apache-airflow-providers-standard",
    "apache-airflow-providers-common-sql",
    "apache-airflow-providers-amazon",
    "apache-airflow-providers-google",
    "apache-airflow-providers-cncf-kubernetes",
    "apache-airflow-providers-docker",
    "apache-airflow-providers-http",
    "apache-airflow-providers-postgres",
    "apache-airflow-providers-mysql",
    "apache-airflow-providers-sqlite",
    "apache-airflow-providers-ssh",
    "apache-airflow-providers-sftp",
    "apache-airflow-providers-slack",
    "apache-airflow-providers-snowflake",
    "apache-airflow-providers-databricks",
    "apache-airflow-providers-microsoft-azure",
    "apache-airflow-providers-celery",
    "apache-airflow-providers-smtp",
    "apache-airflow-providers-dbt-cloud",
    "apache-airflow-providers-apache-spark",
    "apache-airflow-providers-openlineage",
]


def public_names(tree):
    """Top-level names of a module, and whether it resolves other names lazily.

    A module with `__getattr__` is open, unless it keeps its lazy names in a dict literal
    (`__lazy_imports = {"DAG": ...}`, as `airflow` and `airflow.models` do): then those keys
    are its names and it stays closed."""
    names, has_getattr, lazy = set(), False, None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if node.name == "__getattr__":
                has_getattr = True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
                        if "lazy_imports" in n.id and isinstance(node.value, ast.Dict):
                            lazy = (lazy or set()) | {
                                k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                            }
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name != "*":
                    names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, (ast.If, ast.Try)):
            sub = ast.Module(body=node.body + getattr(node, "orelse", []) + [h for hh in getattr(node, "handlers", []) for h in hh.body], type_ignores=[])
            n2, o2 = public_names(sub)
            names |= n2
            has_getattr |= o2
    if lazy is not None:
        return names | lazy, False
    return names, has_getattr


def deprecated_modules(tree, package):
    """`add_deprecated_classes({"bash_operator": {"BashOperator": "..."}}, __name__)`, with the
    dict given inline or through a module-level name."""
    dicts = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    dicts[t.id] = node.value
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "add_deprecated_classes":
            if not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Name):
                arg = dicts.get(arg.id)
            if not isinstance(arg, ast.Dict):
                continue
            try:
                d = ast.literal_eval(arg)
            except ValueError:
                continue
            for mod, mapping in d.items():
                out[f"{package}.{mod}"] = set(mapping) if isinstance(mapping, dict) else set()
    return out


def scan_wheel(path, dist, kb):
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith("airflow/") or not name.endswith(".py"):
                continue
            mod = name[:-3].replace("/", ".")
            if mod.endswith(".__init__"):
                mod = mod[: -len(".__init__")]
            try:
                tree = ast.parse(z.read(info).decode("utf-8", "replace"))
            except SyntaxError:
                continue
            names, is_open = public_names(tree)
            entry = kb.setdefault(mod, {"names": set(), "open": False, "dists": set()})
            entry["names"] |= names
            entry["open"] |= is_open
            entry["dists"].add(dist)
            for vmod, vnames in deprecated_modules(tree, mod).items():
                e = kb.setdefault(vmod, {"names": set(), "open": False, "dists": set()})
                e["names"] |= vnames
                e["dists"].add(dist)
                e["deprecated"] = True


def main():
    out = sys.argv[1]
    packages = sys.argv[2:] or PACKAGES
    kb = {}
    wheels = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in packages:
            d = os.path.join(tmp, spec.replace("=", "_"))
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", d, spec], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"skip {spec}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'pip failed'}", file=sys.stderr)
                continue
            for f in os.listdir(d):
                if f.endswith(".whl"):
                    scan_wheel(os.path.join(d, f), spec.split("==")[0], kb)
                    wheels.append(f)
                    print(f"scanned {f}", file=sys.stderr)
    # Parents of every module exist as packages.
    for mod in list(kb):
        parts = mod.split(".")
        for i in range(1, len(parts)):
            kb.setdefault(".".join(parts[:i]), {"names": set(), "open": False, "dists": set(kb[mod]["dists"])})
    data = {
        "wheels": sorted(wheels),
        "modules": {
            m: {
                "names": sorted(e["names"]),
                "open": e["open"],
                "dists": sorted(e["dists"]),
                **({"deprecated": True} if e.get("deprecated") else {}),
            }
            for m, e in sorted(kb.items())
        },
    }
    with gzip.open(out, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"{len(kb)} modules", file=sys.stderr)


if __name__ == "__main__":
    main()
