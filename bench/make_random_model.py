"""Writes a randomly initialised Qwen2.5-shaped model (bf16 safetensors, config.json and a
byte-level tokenizer.json) for speed benchmarks: random weights of the real shape run at the
same speed as the real ones. Needs torch, transformers and tokenizers; downloads nothing.

    python bench/make_random_model.py 1.5b /root/qwen-1.5b
"""
import json
import sys

import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960),
}


def main(shape: str, out: str) -> None:
    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True,
                      **SHAPES[shape])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes fields candle-style loaders expect elsewhere; make them explicit.
    with open(f"{out}/config.json") as f:
        c = json.load(f)
    c["model_type"] = "qwen2"
    c["rope_theta"] = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 1e6)
    c["sliding_window"] = c.get("sliding_window") or 32768
    with open(f"{out}/config.json", "w") as f:
        json.dump(c, f, indent=1)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), cfg.vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(f"{out}/tokenizer.json")
    with open(f"{out}/tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<x151643>"}, f)
    print(f"wrote {shape} to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
