#!/usr/bin/env python3
"""The Hugging Face + PEFT baseline for `fuselora bench`: the same preset shape with random
weights, LoRA r=16 alpha=16 on all seven projections, gradient checkpointing (non-reentrant;
off with --no-checkpointing), SDPA attention, torch.optim.AdamW on the LoRA weights, random
tokens as input and labels. On the GPU (the default) the weights are bf16 under bf16 autocast;
with --device cpu everything is f32 on torch's CPU threads (torch.get_num_threads(), i.e. the
cores; set OMP_NUM_THREADS to change it), like `fuselora bench --backend cpu`.
Prints tokens/s, median step time and peak memory (torch.cuda.max_memory_allocated, weights
included; on the CPU the process's peak resident memory), and writes them as JSON with --json.

With --quantize nf4 (QLoRA): the seven projections of every layer become bitsandbytes Linear4bit
(NF4, blocksize 64, double quant unless --double-quant false, bf16 compute), what
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16) builds at load; the peak is counted from after quantizing.
Needs bitsandbytes (scripts/fetch-bitsandbytes-wheel.sh unpacks it into .whl/bnb for a machine without
network: PYTHONPATH=.whl/bnb); without it the run prints why it skipped and exits 0.

usage: bench-hf-peft.py [--preset llama2-7b] [--batch 2 --seq 2048 --warmup 2 --steps 10]
                        [--device cuda|cpu] [--no-checkpointing]
                        [--quantize none|nf4 --double-quant true|false] [--json FILE]
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

PRESETS = {
    "llama2-7b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "mistral-7b": (MistralConfig, MistralForCausalLM, dict(hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                   sliding_window=4096)),
    "qwen2.5-7b": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                   rope_theta=1000000.0, use_sliding_window=False)),
    "qwen3-8b": (Qwen3Config, Qwen3ForCausalLM, dict(hidden_size=4096, intermediate_size=12288,
                 num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=151936, rope_theta=1000000.0, use_sliding_window=False)),
    "llama-1b": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)),
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     tie_word_embeddings=True, rope_theta=100000.0)),
}

p = argparse.ArgumentParser()
p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
p.add_argument("--batch", type=int, default=2)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
p.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="QLoRA: NF4 projections")
p.add_argument("--double-quant", default="true", choices=["true", "false"], help="with --quantize nf4")
p.add_argument("--json")
a = p.parse_args()
if a.quantize == "nf4":
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("skipped: --quantize nf4 needs bitsandbytes, which is not installed; run "
              "scripts/fetch-bitsandbytes-wheel.sh where there is network, carry .whl/ here and "
              "`pip install --no-deps .whl/bitsandbytes-*.whl`")
        sys.exit(0)
gpu = a.device == "cuda"


def sync():
    if gpu:
        torch.cuda.synchronize()

cfg_cls, model_cls, kw = PRESETS[a.preset]
cfg = cfg_cls(max_position_embeddings=max(a.seq, 4096), rms_norm_eps=1e-5, **kw)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16 if gpu else torch.float32)
with torch.device(a.device):
    model = model_cls(cfg)
torch.set_default_dtype(torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_projections(model, double_quant):
    """Each projection to bnb Linear4bit, one at a time (Params4bit quantizes on .to(cuda), as
    transformers' loader does), so the bf16 copies are freed as we go."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in targets:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                             compress_statistics=double_quant,
                                             quant_type="nf4").to("cuda")
                setattr(parent, name, q)
                del lin


if a.quantize == "nf4":
    quantize_projections(model, a.double_quant == "true")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
if not a.no_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.config.use_cache = False
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
for q in model.parameters():
    if q.requires_grad:
        q.data = q.data.float()
model.train()
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device)
times = []
for i in range(a.warmup + a.steps):
    sync()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    if i >= a.warmup:
        times.append(time.perf_counter() - t0)
tokens = a.batch * a.seq
peak = (torch.cuda.max_memory_allocated() if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
res = {
    "preset": a.preset, "batch": a.batch, "seq": a.seq, "steps": a.steps, "device": a.device,
    "checkpointing": not a.no_checkpointing, "threads": torch.get_num_threads(),
    "quantize": a.quantize, "double_quant": a.quantize == "nf4" and a.double_quant == "true",
    "median_step_s": statistics.median(times), "tokens_per_s": tokens * len(times) / sum(times),
    "peak_memory_bytes": peak, "loss": loss.item(), "torch": torch.__version__,
}
if gpu:
    res["reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
if a.quantize == "nf4":
    res["bitsandbytes"] = bnb.__version__
print(f"hf+peft {a.preset} on {a.device} ({res['threads']} threads) batch {a.batch} seq {a.seq}"
      f"{' no-ckpt' if a.no_checkpointing else ''}{' nf4' if a.quantize == 'nf4' else ''}: "
      f"{res['tokens_per_s']:.0f} tokens/s, "
      f"median step {res['median_step_s']:.4f} s, peak {res['peak_memory_bytes'] / 2**30:.2f} GiB")
if a.json:
    open(a.json, "w").write(json.dumps(res, indent=2))
