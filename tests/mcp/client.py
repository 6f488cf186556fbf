#!/usr/bin/env python3
"""Drives `dagfleet mcp` with the official MCP Python SDK (`mcp` on PyPI) as the client, over
stdio and over streamable HTTP: lists the tools, calls each one, reads the knowledge-base
resources, and checks the errors (bad arguments, a model server that is down).

Usage: client.py DAGFLEET_BIN MODEL_SERVER_URL DEAD_URL HTTP_PORT
Prints `mcp ok` and exits 0 when every check holds; otherwise exits 1 naming the check.
"""
import asyncio
import json
import subprocess
import sys
import time

from mcp import Client, StdioServerParameters

VALID = """from datetime import datetime
from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG("hello", start_date=datetime(2024, 1, 1), schedule="@daily", catchup=False) as dag:
    BashOperator(task_id="say", bash_command="echo hello")
"""
BROKEN = """from airflow import DAG
from airflow.operators.magic import MagicOperator

with DAG("broken") as dag:
    MagicOperator(task_id="t")
"""


def check(cond, what):
    if not cond:
        sys.exit(f"mcp check failed: {what}")


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def exercise(client, with_model):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    check({"generate_dag", "validate_dag", "explain_findings", "list_models"} <= set(tools), f"tools: {sorted(tools)}")
    check("code" in json.dumps(tools["validate_dag"].input_schema if hasattr(tools["validate_dag"], "input_schema") else tools["validate_dag"].inputSchema), "validate_dag's schema names `code`")

    r = await client.call_tool("validate_dag", {"code": VALID})
    check(not r.is_error if hasattr(r, "is_error") else not r.isError, f"validate_dag errored: {text(r)}")
    v = json.loads(text(r))
    check(v["valid"] is True, f"a valid DAG was judged invalid: {v}")
    check(v["static"]["dag_ids"] == ["hello"], f"dag ids: {v['static']['dag_ids']}")

    r = await client.call_tool("validate_dag", {"code": "```python\n" + BROKEN + "```", "airflow_version": "2.10"})
    v = json.loads(text(r))
    check(v["valid"] is False, "a DAG importing a module no release ships was judged valid")
    check(any(f["category"] == "HALLUCINATED_MODULE" for f in v["static"]["findings"]), f"findings: {v['static']['findings']}")

    r = await client.call_tool("explain_findings", {"code": BROKEN, "categories": ["wrong_argument"]})
    e = json.loads(text(r))["explanations"]
    check(any(x["category"] == "HALLUCINATED_MODULE" and x["fix"] for x in e), f"explanations: {e}")
    check(any(x["category"] == "WRONG_ARGUMENT" for x in e), "category explained by name")

    # Errors: arguments that break the schema, values out of range, an unknown category.
    bad = None
    try:
        r = await client.call_tool("validate_dag", {"airflow_version": "2.10"})
        bad = r
    except Exception as ex:  # a JSON-RPC error is also a refusal
        bad = ex
    check(bad is not None and (isinstance(bad, Exception) or (getattr(bad, "is_error", None) or getattr(bad, "isError", None))), f"missing `code` accepted: {bad}")
    r = await client.call_tool("validate_dag", {"code": VALID, "airflow_version": "9.9"})
    check((getattr(r, "is_error", None) or getattr(r, "isError", None)) and "9.9" in text(r), f"bad version: {text(r)}")
    r = await client.call_tool("explain_findings", {"categories": ["NOT_A_THING"]})
    check((getattr(r, "is_error", None) or getattr(r, "isError", None)) and "NOT_A_THING" in text(r), f"unknown category: {text(r)}")

    res = await client.list_resources()
    uris = [str(x.uri) for x in res.resources]
    check("airflow-kb://wheels" in uris, f"resources: {uris}")
    w = await client.read_resource("airflow-kb://wheels")
    check("apache_airflow" in w.contents[0].text or "apache-airflow" in w.contents[0].text, "wheels list")
    m = await client.read_resource("airflow-kb://module/airflow.operators.bash")
    check("BashOperator" in json.loads(m.contents[0].text)["names"], "module resource names BashOperator")
    try:
        await client.read_resource("airflow-kb://module/airflow.operators.magic")
        check(False, "a module that does not exist was served")
    except Exception as ex:
        check("airflow.operators.magic" in str(ex), f"missing module error: {ex}")

    r = await client.call_tool("list_models", {})
    if with_model:
        check(json.loads(text(r))["models"], f"list_models: {text(r)}")
        r = await client.call_tool("generate_dag", {"instruction": "Write an Airflow DAG that runs one bash task daily.", "max_attempts": 2, "max_tokens": 96})
        check(not (getattr(r, "is_error", None) or getattr(r, "isError", None)), f"generate_dag: {text(r)}")
        g = json.loads(text(r))
        check(1 <= len(g["attempts"]) <= 2 and "dag" in g and isinstance(g["valid"], bool), f"generate_dag result: {g}")
        r = await client.call_tool("generate_dag", {"instruction": "x", "max_attempts": 9})
        check((getattr(r, "is_error", None) or getattr(r, "isError", None)) and "max_attempts" in text(r), f"max_attempts 9: {text(r)}")
    else:
        # The model server is down: a tool error that says so, not a crash.
        check((getattr(r, "is_error", None) or getattr(r, "isError", None)) and "not answering" in text(r), f"list_models with the server down: {text(r)}")
        r = await client.call_tool("generate_dag", {"instruction": "Write a DAG."})
        check((getattr(r, "is_error", None) or getattr(r, "isError", None)) and "no model server" in text(r), f"generate_dag with the server down: {text(r)}")


async def main():
    binary, url, dead, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    async with Client(StdioServerParameters(command=binary, args=["mcp", "--url", url])) as c:
        await exercise(c, with_model=True)
    async with Client(StdioServerParameters(command=binary, args=["mcp", "--url", dead])) as c:
        await exercise(c, with_model=False)
    http = subprocess.Popen([binary, "mcp", "--http", f"127.0.0.1:{port}", "--url", url], stderr=subprocess.PIPE)
    try:
        import socket
        for _ in range(150):
            if http.poll() is not None:
                sys.exit(f"mcp check failed: `dagfleet mcp --http` exited: {http.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            sys.exit("mcp check failed: the HTTP server never listened")
        async with Client(f"http://127.0.0.1:{port}/mcp") as c:
            await exercise(c, with_model=True)
    finally:
        http.terminate()
        http.wait(10)
    print("mcp ok")


asyncio.run(main())
