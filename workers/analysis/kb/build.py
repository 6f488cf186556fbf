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
    # Providers at the release current when the index was first built.
    "apache-airflow-providers-standard==1.21.0",
    "apache-airflow-providers-common-sql==2.4.0",
    "apache-airflow-providers-amazon==9.39.0",
    "apache-airflow-providers-google==22.8.0",
    "apache-airflow-providers-cncf-kubernetes==10.25.0",
    "apache-airflow-providers-docker==4.6.1",
    "apache-airflow-providers-http==6.3.0",
    "apache-airflow-providers-postgres==7.1.1",
    "apache-airflow-providers-mysql==6.7.1",
    "apache-airflow-providers-sqlite==4.3.4",
    "apache-airflow-providers-ssh==7.0.1",
    "apache-airflow-providers-sftp==7.0.0",
    "apache-airflow-providers-slack==9.11.1",
    "apache-airflow-providers-snowflake==6.20.0",
    "apache-airflow-providers-databricks==7.23.0",
    "apache-airflow-providers-microsoft-azure==15.2.1",
    "apache-airflow-providers-celery==3.26.0",
    "apache-airflow-providers-smtp==3.2.0",
    "apache-airflow-providers-dbt-cloud==4.11.1",
    "apache-airflow-providers-apache-spark==6.3.4",
    "apache-airflow-providers-openlineage==2.20.3",
    # The releases DAGs for Airflow 2.10 import (tests/airflow-env.sh's eval set, the last
    # provider releases of early 2025 to support 2.10): modules and constructor arguments
    # that later releases renamed or dropped still exist there.
    *(
        "apache-airflow-providers-" + p
        for p in """google==12.0.0 amazon==9.2.0 microsoft-azure==11.1.0 snowflake==6.0.0
        databricks==7.0.0 cncf-kubernetes==10.1.0 docker==4.0.0 postgres==6.0.0 ssh==4.0.0
        sftp==5.0.0 slack==9.0.0 dbt-cloud==4.0.0 mongo==5.0.0 redis==4.0.0
        elasticsearch==6.0.0 celery==3.10.0 apache-kafka==1.7.0 trino==6.0.0 oracle==4.0.0
        microsoft-mssql==4.0.0 airbyte==5.0.0 datadog==3.8.0 github==2.8.0 sendgrid==4.0.0
        salesforce==5.9.0 opsgenie==5.7.0 pagerduty==4.0.0 tableau==5.0.0 papermill==3.9.0
        jenkins==4.0.0 asana==2.8.0 telegram==4.7.0 common-sql==1.29.0 http==5.5.0
        common-compat==1.9.0 common-io==1.6.5 fab==1.5.3 ftp==3.13.3 imap==3.9.4
        smtp==2.3.2 sqlite==4.1.3""".split()
    ),
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


def dotted(expr):
    """`a.b.C` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Subscript):  # Generic[T], BaseOperator[...]
        return dotted(expr.value)
    if isinstance(expr, ast.Name):
        parts.append(expr.id)
        return ".".join(reversed(parts))
    return None


def import_map(tree, mod, is_pkg):
    """Name bound by an import at module level -> the full dotted path it refers to."""
    out = {}
    package = mod if is_pkg else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
    return out


def class_infos(tree, mod, imports):
    """Constructor signature and attributes of each top-level class.

    `params`: keyword names `__init__` accepts (its parameters, and names it reads out of its
    `**kwargs`: `kwargs.pop("x")`, `kwargs.get("x")`, `kwargs["x"]`, `"x" in kwargs`);
    `required`: parameters without a default; `varkw`: it takes `**kwargs`; `attrs`: methods,
    class-level names and `self.x` assignments; `open`: it defines `__getattr__`."""
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = []
        for b in node.bases:
            d = dotted(b)
            if d is None:
                continue
            head, _, rest = d.partition(".")
            if head in imports:
                d = imports[head] + ("." + rest if rest else "")
            elif any(isinstance(n, ast.ClassDef) and n.name == head for n in tree.body):
                d = f"{mod}.{d}"
            bases.append(d)
        info = {"bases": bases, "attrs": set(), "open": False}
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                info["attrs"].add(item.name)
                if item.name == "__getattr__":
                    info["open"] = True
                for n in ast.walk(item):
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" and isinstance(n.ctx, ast.Store):
                        info["attrs"].add(n.attr)
                if item.name == "__init__":
                    a = item.args
                    pos = a.posonlyargs + a.args
                    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
                    params, required = set(), set()
                    for arg, d in zip(pos[1:], defaults[1:]):
                        params.add(arg.arg)
                        if d is None:
                            required.add(arg.arg)
                    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
                        params.add(arg.arg)
                        if d is None:
                            required.add(arg.arg)
                    varkw = a.kwarg.arg if a.kwarg else None
                    if varkw:
                        for n in ast.walk(item):
                            key = None
                            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == varkw and n.func.attr in ("pop", "get", "setdefault") and n.args and isinstance(n.args[0], ast.Constant):
                                key = n.args[0].value
                            elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == varkw and isinstance(n.slice, ast.Constant):
                                key = n.slice.value
                            elif isinstance(n, ast.Compare) and len(n.comparators) == 1 and isinstance(n.comparators[0], ast.Name) and n.comparators[0].id == varkw and isinstance(n.left, ast.Constant):
                                key = n.left.value
                            if isinstance(key, str):
                                params.add(key)
                    info.update(init=True, params=params, required=required, varkw=bool(varkw))
            elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            info["attrs"].add(n.id)
        out[f"{mod}.{node.name}"] = info
    return out


def merge_class(kb_classes, path, info):
    """The same class in several releases: accept what any accepts, require what all require."""
    e = kb_classes.get(path)
    if e is None:
        kb_classes[path] = {k: (set(v) if isinstance(v, set) else v) for k, v in info.items()}
        return
    e["bases"] = sorted(set(e["bases"]) | set(info["bases"]))
    e["attrs"] |= info["attrs"]
    e["open"] |= info["open"]
    if info.get("init"):
        if e.get("init"):
            e["params"] |= info["params"]
            e["required"] &= info["required"]
            e["varkw"] |= info["varkw"]
        else:
            e.update(init=True, params=set(info["params"]), required=set(info["required"]), varkw=info["varkw"])


def scan_wheel(path, dist, kb, classes=None, reexports=None):
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
            if classes is not None:
                imports = import_map(tree, mod, name.endswith("__init__.py"))
                for cpath, info in class_infos(tree, mod, imports).items():
                    merge_class(classes, cpath, info)
                for alias, target in imports.items():
                    if target.startswith("airflow.") and alias in names:
                        reexports.setdefault(f"{mod}.{alias}", target)
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
    classes, reexports = {}, {}
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
                    scan_wheel(os.path.join(d, f), spec.split("==")[0], kb, classes, reexports)
                    wheels.append(f)
                    print(f"scanned {f}", file=sys.stderr)
    # Parents of every module exist as packages.
    for mod in list(kb):
        parts = mod.split(".")
        for i in range(1, len(parts)):
            kb.setdefault(".".join(parts[:i]), {"names": set(), "open": False, "dists": set(kb[mod]["dists"])})
    # Classes kept: operators, sensors, DAG and TaskGroup, and every class they derive from.
    def wanted(p):
        n = p.rpartition(".")[2]
        return n.endswith(("Operator", "Sensor")) or n in ("DAG", "TaskGroup")
    keep, todo = set(), [p for p in classes if wanted(p)]
    while todo:
        p = todo.pop()
        p = reexports.get(p, p)
        if p in keep or p not in classes:
            continue
        keep.add(p)
        todo.extend(classes[p]["bases"])
    def resolve(p, depth=0):
        return p if p in classes or depth > 8 or p not in reexports else resolve(reexports[p], depth + 1)
    data = {
        "classes": {
            p: {
                "bases": [resolve(b) for b in classes[p]["bases"]],
                "attrs": sorted(classes[p]["attrs"]),
                **({"open": True} if classes[p]["open"] else {}),
                **(
                    {"params": sorted(classes[p]["params"]), "required": sorted(classes[p]["required"]), "varkw": classes[p]["varkw"]}
                    if classes[p].get("init")
                    else {}
                ),
            }
            for p in sorted(keep)
        },
        # `module.Name` imported from elsewhere -> where it is defined, for names that lead to
        # a kept class.
        "reexports": {k: resolve(v) for k, v in sorted(reexports.items()) if resolve(v) in keep},
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
