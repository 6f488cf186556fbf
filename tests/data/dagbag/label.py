#!/usr/bin/env python3
"""Label Airflow's own example DAG files with what Airflow's DagBag loads from each.

Run with the Python of a throwaway virtualenv that has exactly one Airflow release installed
(`python -m venv v && v/bin/pip install apache-airflow==X.Y.Z`). The labels, not Airflow, are
committed as test data (tests/data/dagbag/apache-airflow-X.Y.Z.json); the miner's real-data
test compares its output with them.

Usage: label.py OUT.json

For every file under the installed `airflow` package that matches the miner's default globs
(`**/example_*.py`, `**/example_dags/**`), it records the dag_ids DagBag loads (default
settings: safe mode on, examples off) and the import error, if any.
"""
import fnmatch
import json
import os
import sys
import tempfile

os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp())
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

import airflow  # noqa: E402
from airflow.models.dagbag import DagBag  # noqa: E402
from airflow.utils import db  # noqa: E402

GLOBS = ["*/example_*.py", "*/example_dags/*"]


def main():
    # Some example DAGs read the metadata database while they are parsed.
    db.initdb()
    site = os.path.dirname(os.path.dirname(airflow.__file__))
    base = os.path.join(site, "airflow")
    labels = {}
    for dirpath, _, names in os.walk(base):
        for name in names:
            if not name.endswith(".py"):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, site).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(rel, g) for g in GLOBS):
                continue
            bag = DagBag(dag_folder=full, include_examples=False)
            err = bag.import_errors.get(full)
            labels[rel] = {
                "dag_ids": sorted(bag.dag_ids),
                "import_error": err.strip().splitlines()[-1] if err else None,
            }
    out = {
        "package": "apache-airflow",
        "version": airflow.__version__,
        "python": sys.version.split()[0],
        "files": dict(sorted(labels.items())),
    }
    # Airflow logs to stdout, so the labels go to a file.
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
