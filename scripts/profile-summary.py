#!/usr/bin/env python3
"""Groups the per-op profile of `fuselora bench --profile --json FILE` runs into the parts of a step
(frozen GEMMs, attention, LoRA GEMMs, element-wise, LM head, optimizer, memsets) and prints one
Markdown table with a column per run: device milliseconds per step, and TFLOP/s where counted.

usage: scripts/profile-summary.py LABEL=RUN.json [LABEL=RUN.json ...]
"""
import json
import re
import sys


def part(name, lora_rank=16):
    if name.startswith("attention_forward"):
        return "attention forward (incl. recompute)"
    if name.startswith("attention_backward"):
        return "attention backward"
    if name.startswith("lora_dy_products"):
        return "LoRA GEMMs (rank 16)"
    if name.startswith("gemm"):
        m, n, k = map(int, re.match(r"gemm (\d+)x(\d+)x(\d+)", name).groups())
        if lora_rank in (m, n, k):
            return "LoRA GEMMs (rank 16)"
        if 32000 in (m, n, k) or 49152 in (m, n, k) or 151936 in (m, n, k) or 152064 in (m, n, k):
            return "LM head GEMMs"
        return "frozen-weight GEMMs"
    if name.startswith("softmax_cross_entropy"):
        return "LM head GEMMs"
    if name.startswith("idle "):
        return "idle between ops (waits for copies, launches)"
    if name == "memset":
        return "memsets"
    if name.startswith(("adamw", "sum_squares", "all_finite")):
        return "optimizer, norms"
    return "element-wise (norms, RoPE, SwiGLU, residual, casts, other)"


runs = []
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    r = json.load(open(path))
    groups = {}
    for op in r["profile"]:
        g = groups.setdefault(part(op["name"]), [0.0, 0.0])
        g[0] += op["ms"]
        g[1] += op["flops"]
    runs.append((label, r, groups))
order = sorted({g for _, _, gs in runs for g in gs}, key=lambda g: -max(gs.get(g, [0])[0] for _, _, gs in runs))
print("| part of the step | " + " | ".join(label for label, _, _ in runs) + " |")
print("| --- |" + " --- |" * len(runs))
for g in order:
    cells = []
    for _, _, gs in runs:
        ms, fl = gs.get(g, [0.0, 0.0])
        cells.append(f"{ms:.1f} ms" + (f" ({fl / ms / 1e9:.0f} TFLOP/s)" if fl > 0 and ms > 0 else ""))
    print(f"| {g} | " + " | ".join(cells) + " |")
print("| **step (median, unprofiled)** | " + " | ".join(f"**{r['median_step_s'] * 1e3:.1f} ms**" for _, r, _ in runs) + " |")
print("| tokens/s | " + " | ".join(f"{r['tokens_per_s']:,.0f}" for _, r, _ in runs) + " |")
