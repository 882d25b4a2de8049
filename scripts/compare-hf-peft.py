#!/usr/bin/env python3
"""Replays a fuselora run through transformers + PEFT and compares the loss curves.

The fuselora run must use `train.dump_batches = true` and `train.log_steps = 1`: it then wrote
OUTPUT/batches.jsonl (the exact micro-batches of every step), OUTPUT/adapter-init/ (the step-0
LoRA adapter) and OUTPUT/metrics.jsonl (loss and learning rate of every step). This script loads
the same base model and the step-0 adapter into PEFT, feeds the same micro-batches, computes the
same loss (token mean over every micro-batch of the step, next-token targets within each
document), clips by global norm and takes torch.optim.AdamW steps at the learning rate fuselora
logged, then prints both curves and the largest relative difference.

usage: compare-hf-peft.py --model DIR --run OUTPUT [--other OUTPUT2 ...] [--dtype float32|bfloat16]
       [--max-grad-norm 1.0 --weight-decay 0 --betas 0.9 0.999 --eps 1e-8] [--json FILE]
`--other` adds more fuselora runs of the same batches (e.g. the CPU f32 run) to the comparison.
"""
import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def step_losses(run):
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run) / "metrics.jsonl") if "loss" in r}


def targets_of(ids, labels, docs, seq_len):
    """fuselora's next_token_targets: position i predicts labels[i+1] inside the same row and document."""
    n = len(ids)
    doc_of = [-1] * n
    for r, lens in enumerate(docs):
        start = r * seq_len
        for d, length in enumerate(lens):
            for i in range(start, start + length):
                doc_of[i] = (r, d)
            start += length
    t = [-100] * n
    for i in range(n - 1):
        if (i + 1) % seq_len != 0 and doc_of[i + 1] == doc_of[i] and doc_of[i] != -1:
            t[i] = labels[i + 1]
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--other", action="append", default=[])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--json")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    base = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype, attn_implementation="sdpa").to(dev)
    model = PeftModel.from_pretrained(base, str(Path(a.run) / "adapter-init"), is_trainable=True)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.data = q.data.float()
    opt = torch.optim.AdamW(params, lr=0.0, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay)
    lrs = {r["step"]: r["lr"] for r in read_jsonl(Path(a.run) / "metrics.jsonl") if "lr" in r}
    ours = step_losses(a.run)
    hf = {}
    for rec in read_jsonl(Path(a.run) / "batches.jsonl"):
        step = rec["step"]
        micro = []
        for b in rec["micro"]:
            rows, t = len(b["docs"]), b["seq_len"]
            ids = torch.tensor(b["ids"], device=dev).view(rows, t)
            mask = torch.zeros(rows, t, dtype=torch.long, device=dev)
            for r, lens in enumerate(b["docs"]):
                mask[r, : sum(lens)] = 1
            tg = torch.tensor(targets_of(b["ids"], b["labels"], b["docs"], t), device=dev).view(rows, t)
            # An epoch's last packed micro-batch is padded with empty rows: they carry no target.
            real = torch.tensor([sum(lens) > 0 for lens in b["docs"]], device=dev)
            micro.append((ids[real], mask[real], tg[real]))
        n_targets = sum(int((tg != -100).sum()) for _, _, tg in micro)
        opt.zero_grad(set_to_none=True)
        nll = 0.0
        for ids, mask, tg in micro:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]), tg.view(-1), ignore_index=-100, reduction="sum"
            )
            nll += loss.item()
            (loss / max(n_targets, 1)).backward()
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lrs[step]
        opt.step()
        hf[step] = nll / max(n_targets, 1)
    runs = {"fuselora": ours}
    for o in a.other:
        runs[f"fuselora:{o}"] = step_losses(o)
    report = {"hf_dtype": a.dtype, "steps": len(hf), "max_rel_diff": {}, "final": {"hf": hf[max(hf)]}}
    print(f"{'step':>5} {'hf+peft':>10} " + " ".join(f"{k[:24]:>24}" for k in runs))
    for s in sorted(hf):
        if s % 10 == 0 or s == 1:
            print(f"{s:5d} {hf[s]:10.5f} " + " ".join(f"{r.get(s, float('nan')):24.5f}" for r in runs.values()))
    for name, r in runs.items():
        diffs = [abs(r[s] - hf[s]) / abs(hf[s]) for s in hf if s in r]
        report["max_rel_diff"][name] = max(diffs)
        report["final"][name] = r[max(r)]
        print(f"{name}: max relative difference to hf+peft over {len(diffs)} steps = {max(diffs):.4%}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
