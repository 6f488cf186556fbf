#!/usr/bin/env bash
# Builds `dagfleet` with the CUDA backend on a machine without a GPU or a CUDA install, as
# ../shared/gpu/BUILD.md describes (tested with candle 0.11.1):
#  1. nvcc 13.0 from PyPI (the GPU machines' driver is CUDA 13.0; newer PTX may not load);
#  2. candle-core's `cuda` feature asks cudarc for `dynamic-linking` (-lcuda -lcublas at link
#     time); a build-time copy of candle-core from the cargo registry, with that one feature
#     name changed to `dynamic-loading`, is patched in, so the binary loads CUDA at run time
#     and runs on any box with a driver. No third-party source is committed;
#  3. candle-kernels asks the linker for cudart: a one-line linker script points it at the
#     static library.
# Output: target-cuda/release/dagfleet (stripped). Env: CUDA_COMPUTE_CAP (default 90 = H100/H200),
# DAGFLEET_CUDA_TARGET (cargo target dir, default ~/.cache/dagfleet-cuda-target).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}"
VENV="$CACHE/dagfleet-cuda"
HOME_DIR="$CACHE/dagfleet-cuda-home"
PATCH="$CACHE/dagfleet-cuda-patch"
TARGET="${DAGFLEET_CUDA_TARGET:-$CACHE/dagfleet-cuda-target}"

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if ! [ -x "$HOME_DIR/bin/nvcc" ]; then
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  S=$("$VENV/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
  mkdir -p "$HOME_DIR"
  for d in bin include lib nvvm; do ln -sfn "$S/$d" "$HOME_DIR/$d"; done
  ln -sfn "$S/lib" "$HOME_DIR/lib64"
fi
export CUDA_HOME="$HOME_DIR" CUDA_PATH="$HOME_DIR" PATH="$HOME_DIR/bin:$PATH"
nvcc --version | tail -2

# 2. candle-core with cudarc's dynamic loading.
VER=$(cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c 'import json,sys; print([p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="candle-core"][0])')
SRC=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-"$VER" | head -1)
if [ ! -f "$PATCH/candle-core/.patched-$VER" ]; then
  rm -rf "$PATCH/candle-core"; mkdir -p "$PATCH"; cp -r "$SRC" "$PATCH/candle-core"
  sed -i 's/"dynamic-linking"/"dynamic-loading"/g' "$PATCH/candle-core/Cargo.toml"
  grep -q dynamic-loading "$PATCH/candle-core/Cargo.toml"
  touch "$PATCH/candle-core/.patched-$VER"
fi

# 3. cudart from the static library.
mkdir -p "$PATCH/link"
echo "INPUT($HOME_DIR/lib/libcudart_static.a)" > "$PATCH/link/libcudart.so"

# The patch rewrites Cargo.lock's candle-core entry; keep the committed lock file as it was.
cp Cargo.lock "$PATCH/Cargo.lock.orig"
trap 'cp "$PATCH/Cargo.lock.orig" Cargo.lock' EXIT

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$PATCH/link"
cargo build --release -p dagfleet --features cuda \
  --config "patch.crates-io.candle-core.path=\"$PATCH/candle-core\"" \
  --target-dir "$TARGET"
mkdir -p target-cuda/release
cp "$TARGET/release/dagfleet" target-cuda/release/dagfleet
strip target-cuda/release/dagfleet
ls -la target-cuda/release/dagfleet
