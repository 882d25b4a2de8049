#!/usr/bin/env python3
"""Checks a `fuselora export-gguf` file against its source Hugging Face folder with llama.cpp's own
Python package (gguf 0.19: `pip install gguf numpy`), independently of fuselora's Rust code:

- every tensor of the folder is in the file under llama.cpp's name, q_proj/k_proj rows permuted as
  convert_hf_to_gguf.py permutes them, in the type TYPE gives it (vectors: F32; f32 … q5_1: every
  matrix alike, F16 where rows are not whole blocks; the K mixes: llama-quantize's choice, re-derived
  below from llama-quant.cpp);
- its bytes equal `gguf.quants.quantize` of the source, for every type gguf-py can quantize; gguf-py
  0.19 has no quantizer for Q4_K/Q5_K/Q6_K (their bytes are checked against llama.cpp's C reference
  by kquant.rs's fixture test), so for those gguf-py's dequantization of the file must equal, bit for
  bit, fuselora's (OURS.safetensors: each K tensor's f32 values, flat, by GGUF name);
- dequantized, every tensor is within its type's error of the source;
- the metadata llama.cpp needs is there and agrees with TYPE, config.json and the tokenizer files.

Usage: scripts/check-gguf-export.py FILE.gguf MODEL_DIR TYPE [OURS.safetensors]
       (TYPE: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_s q4_k_m q5_k_s q5_k_m q6_k)
Prints one line per tensor type and exits 1 on the first mismatch.
"""

import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

# llama.cpp's file types: TYPE → (general.file_type, the type of most matrices).
FILE_TYPES = {"f32": (0, T.F32), "f16": (1, T.F16), "bf16": (32, T.BF16), "q8_0": (7, T.Q8_0),
              "q4_0": (2, T.Q4_0), "q4_1": (3, T.Q4_1), "q5_0": (8, T.Q5_0), "q5_1": (9, T.Q5_1),
              "q4_k_s": (14, T.Q4_K), "q4_k_m": (15, T.Q4_K), "q5_k_s": (16, T.Q5_K),
              "q5_k_m": (17, T.Q5_K), "q6_k": (18, T.Q6_K)}
# llama-quant.cpp tensor_type_fallback: a K type on rows that are not whole super-blocks.
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

# Largest error of one value relative to its block's largest magnitude (the step of the grid, plus
# the f16 rounding of the scales); float types: relative to the value itself.
BLOCK_ERROR = {T.Q8_0: 0.51 / 127 + 2e-3, T.Q4_0: 1.01 / 8 + 2e-3, T.Q5_0: 1.01 / 16 + 2e-3,
               T.Q4_1: 2 * 0.51 / 15 + 4e-3, T.Q5_1: 2 * 0.51 / 31 + 4e-3}
FLOAT_ERROR = {T.F32: 0.0, T.F16: 2.0 ** -11, T.BF16: 2.0 ** -8}
# K types: a tensor's RMS error relative to its RMS (export_gguf.rs's Gaussian test model measures
# 0.072, 0.036, 0.018).
K_RMS_ERROR = {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}


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


def use_more_bits(layer, n_layers):
    """llama-quant.cpp: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def expected_type(type_name, name, shape, n_layers, tied, seventy_b):
    """The type of tensor `name` (Hugging Face `shape`) in a file of type `type_name`."""
    base = FILE_TYPES[type_name][1]
    row = shape[-1]
    if len(shape) == 1:
        return T.F32
    if base not in K_FALLBACK:
        return base if row % gguf.GGML_QUANT_SIZES[base][0] == 0 else T.F16
    # llama-quant.cpp llama_tensor_get_type, the arms a dense llama model reaches without an imatrix.
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        want = T.Q6_K if row % 256 == 0 else T.Q8_0
    else:
        want = base
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        more_bits = type_name in ("q4_k_m", "q5_k_m") and layer is not None and use_more_bits(layer, n_layers)
        if "attn_v.weight" in name:
            if more_bits:
                want = T.Q6_K
            elif type_name == "q4_k_s" and layer < 4:
                want = T.Q5_K
            if seventy_b and want == T.Q4_K:
                want = T.Q5_K
        elif "ffn_down" in name:
            if more_bits:
                want = T.Q6_K
            elif type_name == "q4_k_s" and layer < n_layers // 8:
                want = T.Q5_K
    for t in (want, K_FALLBACK.get(want)):
        if t is not None and row % gguf.GGML_QUANT_SIZES[t][0] == 0:
            return t
    return T.F16


def field(reader, key):
    f = reader.get_field(key)
    if f is None:
        fail(f"metadata {key} is missing")
    return f.contents()


def main():
    path, model, type_name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    ours = read_safetensors(Path(sys.argv[4])) if len(sys.argv) > 4 else {}
    file_type, base_type = FILE_TYPES[type_name]
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
        "general.file_type": file_type,
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
    if base_type not in (T.F32, T.F16, T.BF16) and field(reader, "general.quantization_version") != 2:
        fail("general.quantization_version is not 2")
    tied = config.get("tie_word_embeddings", False)
    n_layers = config["num_hidden_layers"]
    seventy_b = n_layers == 80 and heads != kv_heads
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
        want_type = expected_type(type_name, name, x.shape, n_layers, "output.weight" not in tensors, seventy_b)
        if t.tensor_type != want_type:
            fail(f"{name} is {t.tensor_type.name}, expected {want_type.name}")
        got = np.asarray(t.data)
        back = gguf.quants.dequantize(got, want_type).reshape(x.shape)
        if want_type in K_RMS_ERROR:
            if name not in ours:
                fail(f"{name} ({want_type.name}): no dequantization of it in {sys.argv[4:]}")
            if back.tobytes() != ours[name].tobytes():
                fail(f"{name} ({want_type.name}): gguf-py dequantizes it otherwise than fuselora")
        else:
            want = gguf.quants.quantize(x, want_type)
            if got.tobytes() != np.ascontiguousarray(want).tobytes():
                fail(f"{name} ({want_type.name}) differs from gguf.quants.quantize")
        if want_type in K_RMS_ERROR:
            rms = float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2)))
            ratio = rms / K_RMS_ERROR[want_type]
        elif want_type in BLOCK_ERROR:
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
        how = ("decoded by gguf-py exactly as by fuselora" if T[name] in K_RMS_ERROR
               else "bit-exact with gguf.quants.quantize")
        print(f"{name}: {count} tensors {how}, worst error {ratio:.3f} of the bound")
    print(f"OK: {len(tensors)} tensors, {len(reader.fields)} metadata keys")


if __name__ == "__main__":
    main()
