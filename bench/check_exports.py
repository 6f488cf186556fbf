"""Loads a train job's exports with the reference tools and compares last-position logits
with dagfleet's own (from `dagfleet bench logits`), by relative L2 error:

  peft     the PEFT adapter, with Hugging Face peft, on the base that transformers reads
           from the same GGUF file the job trained on, against dagfleet's merged export;
  merged   the merged safetensors directory, with transformers, against the same;
  llama    each GGUF export, with llama.cpp (llama-cpp-python), against dagfleet's logits
           of that file, and a short greedy chat completion through its chat template;
  lora     the LoRA GGUF adapter, with llama.cpp over the base GGUF, against dagfleet's
           merged logits (the exact fine-tune), and the chat completion.

Each tool runs only where its Python package is importable, so the peft/transformers and
llama.cpp checks may run from different environments:

    python bench/check_exports.py peft   BASE.gguf OUT/adapter OUT/merged merged.f32 TOKENS
    python bench/check_exports.py llama  OUT/gguf/model-q8_0.gguf q8.f32 TOKENS
    python bench/check_exports.py lora   BASE.gguf OUT/gguf/model-lora-adapter.gguf merged.f32 TOKENS

TOKENS is a comma-separated list of token ids. Exits non-zero when a check fails.
"""
import os
import sys

import numpy as np


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def top(x, k=5):
    return np.argsort(-x)[:k].tolist()


def check_peft(base_gguf, adapter, merged, ours_path, toks):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = np.fromfile(ours_path, dtype="<f4")
    ids = torch.tensor([toks])

    def last(m):
        with torch.inference_mode():
            return m(ids).logits[0, -1].float().numpy()

    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(base_gguf)),
        gguf_file=os.path.basename(base_gguf),
        dtype=torch.float32,
    ).eval()
    l_base = last(base)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    l_peft = last(tuned)
    l_merged = last(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval())
    effect = rel(l_peft, l_base)
    e_peft, e_merged = rel(ours, l_peft), rel(ours, l_merged)
    print(f"adapter's effect on the base (peft vs base): {effect:.2e}")
    print(f"dagfleet merged vs peft(base GGUF + adapter): {e_peft:.2e}; top-5 ours {top(ours)} peft {top(l_peft)}")
    print(f"dagfleet merged vs transformers(merged/):     {e_merged:.2e}; top-5 transformers {top(l_merged)}")
    # The check means something only when the adapter moved the logits well beyond the error.
    return e_peft < 1e-2 and e_merged < 1e-2 and effect > 10 * max(e_peft, e_merged)


def check_llama(gguf, ours_path, toks, lora=None):
    from llama_cpp import Llama

    ours = np.fromfile(ours_path, dtype="<f4")
    extra = {"lora_path": lora} if lora else {}
    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, verbose=False, seed=0, **extra)
    llm.eval(toks)
    ref = np.array(llm.scores[len(toks) - 1], dtype=np.float32)
    e = rel(ours, ref)
    what = os.path.basename(gguf) + (f" + {os.path.basename(lora)}" if lora else "")
    print(f"{what}: dagfleet vs llama.cpp logits {e:.2e}; top-5 ours {top(ours)} llama.cpp {top(ref)}")
    ok = e < 5e-2 and top(ours, 1) == top(ref, 1)
    if lora:
        # Without the adapter, llama.cpp's base must sit much further from the fine-tune.
        plain = Llama(model_path=gguf, n_ctx=512, logits_all=True, verbose=False, seed=0)
        plain.eval(toks)
        base = np.array(plain.scores[len(toks) - 1], dtype=np.float32)
        effect = rel(base, ref)
        print(f"{what}: the adapter's effect in llama.cpp (base vs base + adapter) {effect:.2e}")
        ok = ok and effect > 3 * e
    llm.reset()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "Write an Airflow DAG that runs a bash command every day."}],
        max_tokens=48,
        temperature=0.0,
    )
    text = out["choices"][0]["message"]["content"]
    print(f"{what}: llama.cpp chat completion: {text!r}")
    return ok and len(text.strip()) > 0


def main(argv):
    what, args = argv[1], argv[2:]
    toks = [int(t) for t in args[-1].split(",")]
    if what == "peft":
        ok = check_peft(*args[:4], toks)
    elif what == "llama":
        ok = check_llama(*args[:2], toks)
    elif what == "lora":
        ok = check_llama(args[0], args[2], toks, lora=args[1])
    else:
        sys.exit(f"unknown check {what!r}: peft, llama or lora")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv)
