#!/usr/bin/env python3
"""Checks a `fuselora export-gguf` file against its source Hugging Face folder with llama.cpp's own
Python package (gguf 0.19: `pip install gguf numpy`), independently of fuselora's Rust code:

- every tensor of the folder is in the file under llama.cpp's name, q_proj/k_proj rows permuted as
  convert_hf_to_gguf.py permutes them, and its bytes equal `gguf.quants.quantize` of the source
  (vectors: F32; matrices whose rows are not whole blocks: F16);
- dequantized, every tensor is within its type's error of the source;
- the metadata llama.cpp needs is there and agrees with config.json and the tokenizer files.

Usage: scripts/check-gguf-export.py FILE.gguf MODEL_DIR TYPE     (TYPE: f32 f16 bf16 q8_0 q4_0 ...)
Prints one line per tensor type and exits 1 on the first mismatch.
"""

import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
         "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}

# Largest error of one value relative to its block's largest magnitude (the step of the grid, plus
# the f16 rounding of the scales); float types: relative to the value itself.
BLOCK_ERROR = {T.Q8_0: 0.51 / 127 + 2e-3, T.Q4_0: 1.01 / 8 + 2e-3, T.Q5_0: 1.01 / 16 + 2e-3,
               T.Q4_1: 2 * 0.51 / 15 + 4e-3, T.Q5_1: 2 * 0.51 / 31 + 4e-3}
FLOAT_ERROR = {T.F32: 0.0, T.F16: 2.0 ** -11, T.BF16: 2.0 ** -8}


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def read_safetensors(path):
    """name → f32 array (F32, F16, BF16), without the safetensors package."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = np.frombuffer(data[a:b], dtype=np.uint8)
        if info["dtype"] == "F32":
            x = buf.view("<f4")
        elif info["dtype"] == "F16":
            x = buf.view("<f2").astype(np.float32)
        elif info["dtype"] == "BF16":
            x = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            fail(f"{path}: tensor {name} has dtype {info['dtype']}")
        out[name] = x.reshape(info["shape"])
    return out


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    parts = hf.split(".")
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{layer[module]}.weight"


def field(reader, key):
    f = reader.get_field(key)
    if f is None:
        fail(f"metadata {key} is missing")
    return f.contents()


def main():
    path, model, type_name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    qtype = TYPES[type_name]
    config = json.loads((model / "config.json").read_text())
    source = {}
    for f in sorted(model.glob("*.safetensors")):
        source.update(read_safetensors(f))
    reader = gguf.GGUFReader(str(path))

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    expect = {
        "general.architecture": "llama",
        "general.type": "model",
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": config["vocab_size"],
        "llama.context_length": config.get("max_position_embeddings", 2048),
        "tokenizer.ggml.model": "gpt2",
    }
    for key, want in expect.items():
        if field(reader, key) != want:
            fail(f"metadata {key} is {field(reader, key)!r}, config says {want!r}")
    eps = field(reader, "llama.attention.layer_norm_rms_epsilon")
    if np.float32(eps) != np.float32(config.get("rms_norm_eps", 1e-6)):
        fail(f"rms eps {eps}")
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if np.float32(field(reader, "llama.rope.freq_base")) != np.float32(theta):
        fail("llama.rope.freq_base differs from config.json")

    tok = json.loads((model / "tokenizer.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    n_vocab = source["model.embed_tokens.weight"].shape[0]
    if len(tokens) != n_vocab or len(types) != n_vocab:
        fail(f"{len(tokens)} tokens / {len(types)} types for {n_vocab} embedding rows")
    added_ids = {a["id"] for a in tok["added_tokens"]}
    for text, i in tok["model"]["vocab"].items():
        if tokens[i] != text or (types[i] != 1 and i not in added_ids):
            fail(f"token {i} is {tokens[i]!r} (type {types[i]}), tokenizer.json has {text!r}")
    for added in tok["added_tokens"]:
        if tokens[added["id"]] != added["content"] or types[added["id"]] != (3 if added["special"] else 4):
            fail(f"added token {added}")
    want_merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    if merges != want_merges:
        fail("tokenizer.ggml.merges differ from tokenizer.json")
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    template = tok_config.get("chat_template")
    if template is not None and field(reader, "tokenizer.chat_template") != template:
        fail("tokenizer.chat_template differs from tokenizer_config.json")
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    for key, name in [("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")]:
        text = tok_config.get(key)
        text = text["content"] if isinstance(text, dict) else text
        if text is not None and field(reader, f"tokenizer.ggml.{name}_token_id") != vocab[text]:
            fail(f"tokenizer.ggml.{name}_token_id is not the id of {text!r}")

    tensors = {t.name: t for t in reader.tensors}
    tied = config.get("tie_word_embeddings", False)
    wanted = {gguf_name(n) for n in source if not (tied and n == "lm_head.weight")}
    if set(tensors) != wanted:
        fail(f"tensors differ: extra {set(tensors) - wanted}, missing {wanted - set(tensors)}")
    worst = {}
    for hf, x in source.items():
        if tied and hf == "lm_head.weight":
            continue
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            x = permute(x, heads)
        elif name.endswith("attn_k.weight"):
            x = permute(x, kv_heads)
        x = np.ascontiguousarray(x, dtype=np.float32)
        t = tensors[name]
        if x.ndim == 1:
            want_type = T.F32
        elif x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
            want_type = T.F16
        else:
            want_type = qtype
        if t.tensor_type != want_type:
            fail(f"{name} is {t.tensor_type.name}, expected {want_type.name}")
        want = gguf.quants.quantize(x, want_type)
        got = np.asarray(t.data)
        if got.tobytes() != np.ascontiguousarray(want).tobytes():
            fail(f"{name} ({want_type.name}) differs from gguf.quants.quantize")
        back = gguf.quants.dequantize(got, want_type).reshape(x.shape)
        if want_type in BLOCK_ERROR:
            blocks = x.reshape(-1, 32)
            bound = BLOCK_ERROR[want_type] * np.abs(blocks).max(axis=1, keepdims=True)
            err = np.abs(back.reshape(-1, 32) - blocks)
            ratio = float((err / np.where(bound == 0, 1, bound)).max())
        else:
            finite = np.abs(x) < 60000
            err = np.abs(back - x)[finite]
            bound = FLOAT_ERROR[want_type] * np.abs(x)[finite] + 2.0 ** -24
            ratio = float((err / bound).max()) if want_type != T.F32 else float(err.max())
        if ratio > 1.0 and want_type != T.F32 or want_type == T.F32 and ratio != 0.0:
            fail(f"{name}: dequantized error {ratio:.3f} of its bound")
        worst[want_type.name] = max(worst.get(want_type.name, 0.0), ratio)
    for name, ratio in sorted(worst.items()):
        count = sum(1 for t in tensors.values() if t.tensor_type.name == name)
        print(f"{name}: {count} tensors bit-exact with gguf.quants.quantize, worst error {ratio:.3f} of the bound")
    print(f"OK: {len(tensors)} tensors, {len(reader.fields)} metadata keys")


if __name__ == "__main__":
    main()
