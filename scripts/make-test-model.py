#!/usr/bin/env python3
"""Makes a small random LlamaForCausalLM folder for GPU checks: transformers' random init (seeded),
weights rounded to bf16 and stored as f32 (so bf16 and f32 runs start from identical weights), plus
the SmolLM2 tokenizer files (vocab 49152) from tests/fixtures/smollm2-tokenizer.

usage: make-test-model.py OUT_DIR [--hidden 256 --layers 4 --heads 4 --kv-heads 2 --inter 688]
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--kv-heads", type=int, default=2)
p.add_argument("--inter", type=int, default=688)
p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/smollm2-tokenizer"))
a = p.parse_args()

torch.manual_seed(0)
tok_dir = Path(a.tokenizer)
cfg = LlamaConfig(
    vocab_size=49152, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
    num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    initializer_range=0.02,
)
model = LlamaForCausalLM(cfg)
with torch.no_grad():
    for t in model.parameters():
        t.copy_(t.to(torch.bfloat16).to(torch.float32))
out = Path(a.out)
model.save_pretrained(out, safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(tok_dir / f, out / f)
print(f"wrote {out}: {sum(t.numel() for t in model.parameters())} parameters")
