#!/usr/bin/env python3
"""Writes a copy of a dense Hugging Face folder whose seven projection weights per layer are replaced
by what 4-bit QLoRA computes with: bitsandbytes NF4 (blocksize 64, double quant) quantized and then
dequantized back to the folder's dtype, `W' = dequantize_4bit(quantize_4bit(W))`. A bf16 LoRA run on
this folder sees the same frozen weights as a `quantize = "nf4"` run on the original (fuselora's NF4
is bitwise bitsandbytes'), so the two loss curves differ only by how the weights are stored.
Needs torch with CUDA and bitsandbytes (scripts/fetch-bitsandbytes-wheel.sh on a machine without
network).

usage: nf4-roundtrip-model.py DENSE_DIR OUT_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
index = src / "model.safetensors.index.json"
shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
changed = 0
for shard in shards:
    tensors = load_file(str(src / shard))
    for name, w in tensors.items():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS:
            q, state = bnbf.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
            tensors[name] = bnbf.dequantize_4bit(q, state).to(w.dtype).cpu().contiguous()
            changed += 1
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
for f in src.iterdir():
    if f.is_file() and not f.name.endswith(".safetensors"):
        shutil.copy(f, out / f.name)
print(f"wrote {out}: {changed} projection weights NF4-round-tripped (bitsandbytes {bnbf.__name__})")
