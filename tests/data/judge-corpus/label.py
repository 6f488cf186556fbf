#!/usr/bin/env python3
"""Label the judge's accuracy corpus with real Airflow: run once in a throwaway virtualenv
(`python3.11 -m venv v && v/bin/pip install apache-airflow==2.10.5`), commit labels.json.

A file is valid when Airflow's DagBag (default settings) loads at least one DAG from it and
records no import error. The import error's last line is kept, so a person can see why.

Usage: AIRFLOW_HOME=$(mktemp -d) v/bin/python label.py CORPUS_DIR OUT.json
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp())
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

import airflow  # noqa: E402
from airflow.models.dagbag import DagBag  # noqa: E402
from airflow.utils import db  # noqa: E402


def main():
    corpus, out = sys.argv[1], sys.argv[2]
    db.initdb()
    labels = {}
    for name in sorted(os.listdir(corpus)):
        if not name.endswith(".py") or name == "label.py":
            continue
        path = os.path.join(corpus, name)
        bag = DagBag(dag_folder=path, include_examples=False)
        err = bag.import_errors.get(path)
        labels[name] = {
            "valid": bool(bag.dag_ids) and not err,
            "dag_ids": sorted(bag.dag_ids),
            "import_error": err.strip().splitlines()[-1] if err else None,
        }
    with open(out, "w") as f:
        json.dump({"airflow": airflow.__version__, "files": labels}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
