"""The peer of `dagfleet bench infer`: Hugging Face transformers `generate` on the same GPU and
shapes (a model directory from make_random_model.py), prompts of N random tokens, exactly M
new tokens, greedy. Prints one Markdown row per batch size, like `dagfleet bench infer`.

    python bench/hf_generate.py /root/qwen-1.5b --batches 1,8,32,128,256 --prompt 256 --new 256
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--dollars-per-hour", type=float, default=2.5)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    print(f"HF transformers generate, {a.model}, bf16, prompt {a.prompt}, new {a.new}\n")
    print("| batch | TTFT ms | decode tok/s per stream | aggregate tok/s | wall s | peak GiB | $ / M tokens |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(1000, 60000, (b, a.prompt), generator=g).cuda()
            mask = torch.ones_like(ids)
            kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            ttft = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw))
            wall = timed(lambda: model.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, **kw))
            decode = max(wall - ttft, 1e-9)
            per = (a.new - 1) / decode
            agg = b * a.new / wall
            peak = torch.cuda.max_memory_allocated() / 2**30
            usd = a.dollars_per_hour / (agg * 3600) * 1e6
            print(f"| {b} | {ttft*1000:.1f} | {per:.1f} | {agg:.0f} | {wall:.2f} | {peak:.1f} | {usd:.3f} |", flush=True)


if __name__ == "__main__":
    main()
