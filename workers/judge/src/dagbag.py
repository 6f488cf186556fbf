"""dagfleet's DagBag helper: loads DAG files with Airflow's own DagBag, one forked child
process per file, and answers on stdout, one JSON line per request.

Started by dagfleet's judge (workers/judge/src/dagbag.rs) with a private AIRFLOW_HOME and
sqlite database. Protocol:
  stdout, once: {"ready": true, "airflow": "2.10.5", "python": "3.11.7"}
  stdin:  {"id": 7, "path": "/tmp/.../7.py", "timeout": 30}
  stdout: {"id": 7, "dag_ids": [...], "tasks": {...}, "import_error": str|null,
           "status": "loaded" | "timeout" | "crashed", "seconds": 0.41}
Each child runs with no network (socket connects and name lookups raise), an address-space
limit, a CPU-time limit, and its stdout/stderr sent to /dev/null, so a DAG file that prints,
hangs, allocates without bound or calls the network cannot disturb the judge or leak data.
"""
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

HOME = os.environ["AIRFLOW_HOME"]
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(HOME, "dags")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = "sqlite:///" + os.path.join(HOME, "airflow.db")
os.environ["AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT"] = os.environ.get("DAGFLEET_DAGBAG_TIMEOUT", "30")
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "ERROR"
MEMORY = int(os.environ.get("DAGFLEET_DAGBAG_MEMORY", str(4 << 30)))

out = sys.stdout
# Anything Airflow or a DAG file prints goes to stderr, never into the protocol stream.
sys.stdout = sys.stderr

import airflow  # noqa: E402
from airflow.models.dagbag import DagBag  # noqa: E402
from airflow.utils import db  # noqa: E402

if not os.path.exists(os.path.join(HOME, "airflow.db")):
    db.initdb()


def say(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def no_network(*_a, **_k):
    raise OSError("network access is disabled while dagfleet's judge loads a DAG file")


def load(path):
    """Runs in the child: DagBag over one file, as `airflow dags list-import-errors` sees it."""
    import socket

    socket.socket.connect = no_network
    socket.socket.connect_ex = no_network
    socket.socket.sendto = no_network
    socket.create_connection = no_network
    socket.getaddrinfo = no_network
    bag = DagBag(dag_folder=path, include_examples=False)
    err = bag.import_errors.get(path)
    if err is None and bag.import_errors:
        err = next(iter(bag.import_errors.values()))
    return {
        "dag_ids": sorted(bag.dag_ids),
        "tasks": {d: len(bag.dags[d].tasks) for d in sorted(bag.dag_ids)},
        "import_error": err,
        "status": "loaded",
    }


def child(path, timeout, w):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.setsid()
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
        cpu = max(1, int(timeout))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        pass
    try:
        res = load(path)
    except BaseException:  # noqa: BLE001 - anything the file raised is its verdict
        res = {"dag_ids": [], "tasks": {}, "import_error": traceback.format_exc(), "status": "loaded"}
    data = json.dumps(res).encode()
    view = memoryview(data)
    while view:
        n = os.write(w, view)
        view = view[n:]
    os._exit(0)


def judge(req):
    path, timeout = req["path"], float(req.get("timeout", 30))
    start = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(path, timeout, w)
    os.close(w)
    chunks, status = [], None
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        ready, _, _ = select.select([r], [], [], left)
        if not ready:
            continue
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    if status == "timeout":
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    _, code = os.waitpid(pid, 0)
    res = None
    if status is None:
        try:
            res = json.loads(b"".join(chunks))
        except ValueError:
            status = "crashed"
    if res is None:
        sig = os.WTERMSIG(code) if os.WIFSIGNALED(code) else None
        res = {
            "dag_ids": [],
            "tasks": {},
            "import_error": None,
            "status": status,
            "signal": sig,
        }
    res["id"] = req["id"]
    res["seconds"] = round(time.monotonic() - start, 3)
    return res


say({"ready": True, "airflow": airflow.__version__, "python": sys.version.split()[0]})
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    try:
        req = json.loads(line)
    except ValueError as e:
        say({"id": None, "error": "request is not JSON: %s" % e})
        continue
    say(judge(req))
