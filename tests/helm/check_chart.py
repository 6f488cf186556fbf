#!/usr/bin/env python3
"""Render helm/dagfleet with Helm's SDK and validate every manifest against the Kubernetes
schemas, for the default values and for a full production-like set of values.

Usage: check_chart.py CHART_DIR DAGFLEET_BIN

Exits non-zero with a message naming the manifest and the violation. The rendered dagfleet
config (the ConfigMap's dagfleet.toml) is also fed to `dagfleet config`, so a key the binary
does not know fails here rather than in a pod.
"""
import os
import subprocess
import sys
import tempfile

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - message for a missing setup step
    sys.exit(f"missing Python package ({e}); run: pip install -r tests/helm/requirements.txt")

K8S_VERSIONS = ["1.29", "1.33"]

FULL = {
    "nats": {
        "url": "nats://nats.messaging:4222",
        "auth": {"existingSecret": "nats-auth"},
    },
    "store": {
        "url": "s3://models/dagfleet",
        "endpoint": "http://minio.storage:9000",
        "allowHttp": True,
        "credentials": {"existingSecret": "s3-creds"},
    },
    "llm": {"existingSecret": "llm-keys"},
    "config": '[log]\nformat = "json"\n\n[queues.stages.train]\nack_wait = "10m"\nmax_attempts = 20\nbackoff = ["30s", "5m"]\n\n[worker]\nheartbeat_every = "10s"\n',
    "workers": {r: {"enabled": True} for r in ["miner", "synthesizer", "judge", "trainer", "inference", "noop"]},
}


def fail(msg):
    sys.exit(f"chart check failed: {msg}")


def render(chart, values, name):
    try:
        out = chart.render(values, name=name, namespace="dagfleet", is_install=True)
    except Exception as e:  # HelmRenderError and friends
        fail(f"render with {name}: {e}")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate(docs, label):
    for version in K8S_VERSIONS:
        for path, doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{label}: {path} ({doc.get('kind')}) is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def check_config(docs, dagfleet_bin, label):
    cms = [d for _, d in docs if d["kind"] == "ConfigMap"]
    if len(cms) != 1:
        fail(f"{label}: expected one ConfigMap, found {len(cms)}")
    toml_text = cms[0]["data"]["dagfleet.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGFLEET_")}
    r = subprocess.run([dagfleet_bin, "--config", f.name, "config"], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if r.returncode != 0:
        fail(f"{label}: dagfleet rejects the rendered config: {r.stderr.strip()}")


def hardened(docs, label):
    """Every pod: RuntimeDefault seccomp, no service-account token, non-root, no privilege
    escalation; the ServiceAccount mounts no token either."""
    for _, d in docs:
        if d["kind"] == "ServiceAccount" and d.get("automountServiceAccountToken") is not False:
            fail(f"{label}: the ServiceAccount mounts its token")
        if d["kind"] != "Deployment":
            continue
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        if spec.get("automountServiceAccountToken") is not False:
            fail(f"{label}: {name} mounts a service-account token")
        psc = spec.get("securityContext", {})
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault" or not psc.get("runAsNonRoot"):
            fail(f"{label}: {name} pod security context is {psc}")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(f"{label}: {name}/{c['name']} security context is {sc}")
    pols = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    if len(pols) != 1 or pols[0]["spec"].get("ingress") != [] or "Ingress" not in pols[0]["spec"]["policyTypes"]:
        fail(f"{label}: expected one NetworkPolicy denying ingress, found {pols}")


def main():
    chart_dir, dagfleet_bin = sys.argv[1], sys.argv[2]
    lint = helm.lint(chart_dir, strict=True)
    # Helm severities: 1 info, 2 warning, 3 error.
    problems = list(lint.get("errors") or []) + [m for m in lint.get("messages", []) if int(m.get("severity", 0)) >= 2]
    if problems:
        fail(f"helm lint: {problems}")
    chart = helm.Chart.load(chart_dir)

    default = render(chart, None, "dagfleet")
    validate(default, "default values")
    check_config(default, dagfleet_bin, "default values")
    kinds = sorted(d["kind"] for _, d in default)
    if kinds != ["ConfigMap", "Deployment", "NetworkPolicy", "ServiceAccount"]:
        fail(f"default values render {kinds}")
    hardened(default, "default values")

    full = render(chart, FULL, "prod")
    validate(full, "full values")
    check_config(full, dagfleet_bin, "full values")
    deps = {d["metadata"]["labels"].get("dagfleet.dev/role", "coordinator"): d for _, d in full if d["kind"] == "Deployment"}
    expected = {"coordinator", "miner", "synthesizer", "judge", "trainer", "inference", "noop"}
    if set(deps) != expected:
        fail(f"full values: deployments {sorted(deps)}, expected {sorted(expected)}")
    for role in ["trainer", "inference"]:
        spec = deps[role]["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if c["resources"]["limits"].get("nvidia.com/gpu") != 1:
            fail(f"{role} requests no GPU")
        if "cuda" not in c["image"]:
            fail(f"{role} does not use the CUDA image: {c['image']}")
        if not spec.get("tolerations") or not spec.get("nodeSelector"):
            fail(f"{role} has no GPU tolerations/nodeSelector")
    for role, d in deps.items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        for secret_env in ["DAGFLEET_NATS__PASSWORD", "AWS_SECRET_ACCESS_KEY"]:
            ref = env.get(secret_env, {}).get("valueFrom", {}).get("secretKeyRef")
            if not ref:
                fail(f"{role}: {secret_env} must come from a Secret reference")
        if role in ("synthesizer", "judge") and "ANTHROPIC_API_KEY" not in env:
            fail(f"{role}: LLM keys are not passed")
        if role in ("miner", "trainer") and "ANTHROPIC_API_KEY" in env:
            fail(f"{role}: gets LLM keys it does not need")
    hardened(full, "full values")

    # One NATS identity per role, and a config kept in a Secret.
    per_role = dict(FULL, nats={"url": "nats://nats:4222", "auth": {"existingSecret": "nats-users", "perRole": True}},
                    configSecret="dagfleet-config", networkPolicy={"enabled": True, "egress": [{"to": [{"namespaceSelector": {}}]}]})
    pr = render(chart, per_role, "perrole")
    validate(pr, "per-role values")
    if any(d["kind"] == "ConfigMap" for _, d in pr):
        fail("per-role values: the config is in a Secret, yet a ConfigMap was rendered")
    for _, d in pr:
        if d["kind"] == "NetworkPolicy" and "Egress" not in d["spec"]["policyTypes"]:
            fail("per-role values: egress rules given but the policy does not restrict egress")
        if d["kind"] != "Deployment":
            continue
        who = d["metadata"]["labels"].get("dagfleet.dev/role", "coordinator")
        spec = d["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        if vols["config"].get("secret", {}).get("secretName") != "dagfleet-config":
            fail(f"per-role values: {who} does not mount its config from the Secret: {vols['config']}")
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        if env.get("DAGFLEET_NATS__USER", {}).get("value") != who:
            fail(f"per-role values: {who} connects as {env.get('DAGFLEET_NATS__USER')}")
        ref = env.get("DAGFLEET_NATS__PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref != {"name": "nats-users", "key": f"{who}-password"}:
            fail(f"per-role values: {who}'s password comes from {ref}")

    # No literal secret values anywhere in the rendered manifests.
    for _, d in full:
        if d["kind"] == "Secret":
            fail("the chart must reference Secrets, not create them with values")
    print(f"chart ok: {len(default)} default manifests, {len(full)} full manifests, Kubernetes {', '.join(K8S_VERSIONS)}")


if __name__ == "__main__":
    main()
