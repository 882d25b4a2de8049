#!/usr/bin/env python3
"""Writes a random Hugging Face folder with the shape of a `fuselora bench` preset (bf16 weights,
normal(0, 0.02), norms 1), sharded safetensors with an index, and a given tokenizer folder's files, so
that `fuselora train` can run at exactly the bench's shape (scripts/train-vs-bench.sh).
The weights are drawn on the GPU when there is one (a 7B folder takes seconds, mostly the disk).

usage: make-random-model.py OUT_DIR --preset llama2-7b|mistral-7b|llama-1b --tokenizer DIR
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    "llama2-7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, max_position_embeddings=32768),
    "llama-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                     intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=2048),
}

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--preset", required=True, choices=sorted(PRESETS))
p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (ids below the vocab size)")
p.add_argument("--layers-per-shard", type=int, default=4)
a = p.parse_args()

cfg = dict(PRESETS[a.preset], torch_dtype="bfloat16", tie_word_embeddings=False, bos_token_id=1,
           eos_token_id=2, hidden_act="silu")
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
device = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator(device=device).manual_seed(0)
h, inter, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
d = h // heads


def rand(*shape):
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()


def layer(i):
    pre = f"model.layers.{i}."
    return {
        pre + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        pre + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        pre + "self_attn.q_proj.weight": rand(heads * d, h),
        pre + "self_attn.k_proj.weight": rand(kv * d, h),
        pre + "self_attn.v_proj.weight": rand(kv * d, h),
        pre + "self_attn.o_proj.weight": rand(h, heads * d),
        pre + "mlp.gate_proj.weight": rand(inter, h),
        pre + "mlp.up_proj.weight": rand(inter, h),
        pre + "mlp.down_proj.weight": rand(h, inter),
    }


n = cfg["num_hidden_layers"]
groups = [list(range(s, min(s + a.layers_per_shard, n))) for s in range(0, n, a.layers_per_shard)]
shards = len(groups) + 1
weight_map = {}
for k, g in enumerate(groups):
    tensors = {}
    for i in g:
        tensors.update(layer(i))
    name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    weight_map.update({t: name for t in tensors})
ends = {
    "model.embed_tokens.weight": rand(cfg["vocab_size"], h),
    "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    "lm_head.weight": rand(cfg["vocab_size"], h),
}
name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
save_file(ends, str(out / name), metadata={"format": "pt"})
weight_map.update({t: name for t in ends})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
(out / "config.json").write_text(json.dumps(cfg, indent=1))
for f in Path(a.tokenizer).iterdir():
    if f.is_file() and f.name != "config.json":
        shutil.copy(f, out / f.name)
print(f"wrote a random {a.preset} folder to {out} ({len(weight_map)} tensors, {shards} shards)")
