#!/usr/bin/env bash
# One-machine quickstart: installs nats-server (and Rust if missing), builds dagfleet, starts
# the stack (`dagfleet up`) and runs a pipeline spec on it, showing progress until it ends.
#   bash deploy/quickstart.sh [SPEC.toml]      (default: examples/noop.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC="${1:-examples/noop.toml}"

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v nats-server >/dev/null; then
  if command -v apt-get >/dev/null; then
    sudo_if_needed apt-get update -qq && sudo_if_needed apt-get install -y -qq nats-server >/dev/null
  elif command -v brew >/dev/null; then brew install nats-server
  else echo "install nats-server (https://docs.nats.io) and run again" >&2; exit 1; fi
fi
if ! command -v cargo >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
cargo build --release -p dagfleet
BIN="${CARGO_TARGET_DIR:-target}/release/dagfleet"
exec "$BIN" up --run "$SPEC"
