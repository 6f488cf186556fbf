"""Compares dagfleet's last-position logits (from `dagfleet bench logits`) with HF
transformers on the same model directory and tokens, by relative L2 error.

    python bench/check_logits.py MODEL_DIR dagfleet-logits.f32 1,2,3,...
"""
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

model_dir, path, toks = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
ours = np.fromfile(path, dtype="<f4")
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
with torch.inference_mode():
    ref = m(torch.tensor([toks]).cuda()).logits[0, -1].float().cpu().numpy()
rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
top_ours, top_ref = np.argsort(-ours)[:5], np.argsort(-ref)[:5]
print(f"relative L2 error vs HF fp32: {rel:.2e}; top-5 ours {top_ours.tolist()} ref {top_ref.tolist()}")
sys.exit(0 if rel < 5e-2 and np.isfinite(ours).all() else 1)
