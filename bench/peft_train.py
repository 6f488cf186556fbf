"""The peer of `dagfleet bench train`: Hugging Face PEFT LoRA training steps on a randomly
initialised Qwen2.5-shaped model, bf16, gradient checkpointing, LoRA on all seven linear
layers, random token sequences with labels = input ids (every position a label), AdamW.
Prints tokens/s and peak GPU memory as a Markdown row and one JSON line.

    python bench/peft_train.py 0.5b --seq 2048 --micro-batch 2 --r 16 --steps 10

Downloads nothing: the weights are random (speed does not depend on their values).
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, **SHAPES[a.shape])
    cfg._attn_implementation = a.attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lcfg = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
        print(f"step {step}: {dt * 1e3:.1f} ms, loss {out.loss.item():.4f}", flush=True)
    times.sort()
    med = times[len(times) // 2]
    mean = sum(times) / len(times)
    tok = a.micro_batch * a.seq
    alloc = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    print("| model | seq | micro-batch | r | checkpointing | tok/s (median) | tok/s (mean) | ms/step | peak allocated | peak reserved |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| PEFT {a.shape} ({a.attn}) | {a.seq} | {a.micro_batch} | {a.r} | {not a.no_checkpointing} "
          f"| {tok / med:.0f} | {tok / mean:.0f} | {med * 1e3:.1f} | {alloc:.2f} GiB | {reserved:.2f} GiB |")
    print(json.dumps(dict(peer="peft", shape=a.shape, seq=a.seq, micro_batch=a.micro_batch, r=a.r,
                          checkpointing=not a.no_checkpointing, tokens_per_s_median=tok / med,
                          tokens_per_s_mean=tok / mean, ms_per_step_median=med * 1e3,
                          peak_allocated_gib=alloc, peak_reserved_gib=reserved,
                          torch=torch.__version__, gpu=torch.cuda.get_device_name())))


if __name__ == "__main__":
    main()
