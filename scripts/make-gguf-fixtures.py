#!/usr/bin/env python3
"""Builds the small GGUF files that test `fuselora import-gguf` (tests/fixtures/gguf/).

Everything here is computed by llama.cpp's own Python package (`pip install gguf numpy`), independently
of fuselora's Rust code:

- types.gguf: one tensor of each ggml type fuselora dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
  Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), metadata of every GGUF value type (incl. arrays of
  numbers and of strings), and a custom alignment of 64. types.expected.safetensors holds
  `gguf.quants.dequantize` of each tensor (f32, shape in numpy order = Hugging Face order).
- unsupported-type.gguf: the tiny model's metadata and one IQ2_XXS tensor, a type fuselora does not
  dequantize.
- tiny-llama.gguf: a 1-layer LlamaForCausalLM (hidden 8, 2 heads, 1 KV head) with a byte-level BPE
  vocabulary, its Q and K rows permuted as llama.cpp's convert_hf_to_gguf.py does; the unpermuted Hugging
  Face tensors are in tiny-llama.expected.safetensors.
- tiny-qwen2.gguf / tiny-qwen3.gguf: the same sizes as `qwen2` (q/k/v biases, tied head) and `qwen3`
  (per-head q/k norms, head_dim 6 != 8/2, separate head) files with the Qwen pre-tokenizer (`qwen2`);
  llama.cpp does not permute Qwen's Q/K rows. Hugging Face tensors in tiny-qwen{2,3}.expected.safetensors.

Run from the repository root: python3 scripts/make-gguf-fixtures.py
"""

import json
import struct
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

OUT = Path("tests/fixtures/gguf")
RNG = np.random.default_rng(20250207)


def write_safetensors(path, tensors):
    """Minimal safetensors writer (little-endian f32), so the script needs only gguf + numpy."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_gguf(path, metadata, tensors, alignment=None, arch="llama"):
    """metadata: [(key, value, vtype, sub_type)]; tensors: [(name, array, raw_dtype or None)]."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub_type in metadata:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, array, raw_dtype in tensors:
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# K-quant blocks: (bytes per block, byte offsets of their f16 super-block scales d and dmin).
K_QUANTS = {
    T.Q2_K: (84, [80, 82]),
    T.Q3_K: (110, [108]),
    T.Q4_K: (144, [0, 2]),
    T.Q5_K: (176, [0, 2]),
    T.Q6_K: (210, [208]),
}


def random_k_blocks(qtype, n_blocks):
    """gguf-py has no quantizer for K-quants: random bytes with finite f16 super-block scales."""
    size, scale_offsets = K_QUANTS[qtype]
    blocks = RNG.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at in scale_offsets:
        scale = RNG.uniform(0.001, 0.01, size=(n_blocks, 1)).astype(np.float16)
        blocks[:, at:at + 2] = scale.view(np.uint8)
    return blocks


def types_file():
    metadata = [
        ("test.u8", 200, V.UINT8, None),
        ("test.i8", -100, V.INT8, None),
        ("test.u16", 60000, V.UINT16, None),
        ("test.i16", -30000, V.INT16, None),
        ("test.u32", 4000000000, V.UINT32, None),
        ("test.i32", -2000000000, V.INT32, None),
        ("test.f32", 0.15625, V.FLOAT32, None),
        ("test.bool", True, V.BOOL, None),
        ("test.string", "héllo, wörld", V.STRING, None),
        ("test.u64", 18000000000000000000, V.UINT64, None),
        ("test.i64", -9000000000000000000, V.INT64, None),
        ("test.f64", -2.5e-300, V.FLOAT64, None),
        ("test.array_i32", [1, -2, 3], V.ARRAY, V.INT32),
        ("test.array_f32", [0.5, -1.25], V.ARRAY, V.FLOAT32),
        ("test.array_string", ["a", "", "ünï"], V.ARRAY, V.STRING),
    ]
    tensors, expected = [], {}
    for name, qtype, shape in [
        ("f32", T.F32, (3, 5)),
        ("f16", T.F16, (2, 7)),
        ("bf16", T.BF16, (2, 9)),
        ("q8_0", T.Q8_0, (3, 64)),
        ("q4_0", T.Q4_0, (3, 64)),
        ("q4_1", T.Q4_1, (3, 64)),
        ("q5_0", T.Q5_0, (2, 64)),
        ("q5_1", T.Q5_1, (2, 64)),
    ]:
        values = RNG.normal(0.0, 1.0, size=shape).astype(np.float32)
        stored = gguf.quants.quantize(values, qtype)
        raw = qtype if qtype not in (T.F32, T.F16) else None
        tensors.append((name, stored, raw))
        expected[name] = gguf.quants.dequantize(stored, qtype)
    for qtype in K_QUANTS:
        blocks = random_k_blocks(qtype, 2)
        tensors.append((qtype.name.lower(), blocks, qtype))
        expected[qtype.name.lower()] = gguf.quants.dequantize(blocks, qtype)
    write_gguf(OUT / "types.gguf", metadata, tensors, alignment=64)
    write_safetensors(OUT / "types.expected.safetensors", expected)


def unsupported_file():
    """The tiny model's metadata, so that an import gets as far as the IQ2_XXS tensor."""
    metadata, _ = tiny_llama_metadata()
    blocks = RNG.integers(0, 256, size=(1, 66), dtype=np.uint8)
    write_gguf(OUT / "unsupported-type.gguf", metadata, [("blk.0.attn_q.weight", blocks, T.IQ2_XXS)])


def bytes_to_unicode():
    """GPT-2's reversible byte → printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def permute(weights, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


TINY = dict(hidden=8, heads=2, kv_heads=1, head_dim=4, inter=12)


def tiny_llama_metadata():
    hidden, heads, kv_heads, head_dim, inter = TINY.values()
    byte_chars = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [byte_chars[b] for b in range(256)]
    tokens += ["Ġt", "he", "Ġthe"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab = len(tokens)
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    metadata = [
        ("general.name", "tiny", V.STRING, None),
        ("llama.context_length", 128, V.UINT32, None),
        ("llama.embedding_length", hidden, V.UINT32, None),
        ("llama.block_count", 1, V.UINT32, None),
        ("llama.feed_forward_length", inter, V.UINT32, None),
        ("llama.rope.dimension_count", head_dim, V.UINT32, None),
        ("llama.attention.head_count", heads, V.UINT32, None),
        ("llama.attention.head_count_kv", kv_heads, V.UINT32, None),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32, None),
        ("llama.rope.freq_base", 50000.0, V.FLOAT32, None),
        ("llama.vocab_size", vocab, V.UINT32, None),
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", "smollm", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", ["Ġ t", "h e", "Ġt he"], V.ARRAY, V.STRING),
        ("tokenizer.ggml.bos_token_id", 1, V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None),
        ("tokenizer.ggml.unknown_token_id", 0, V.UINT32, None),
        ("tokenizer.ggml.padding_token_id", 2, V.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
        ("tokenizer.chat_template", template, V.STRING, None),
    ]
    return metadata, vocab


def tiny_llama_file():
    hidden, heads, kv_heads, head_dim, inter = TINY.values()
    metadata, vocab = tiny_llama_metadata()
    hf = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "model.layers.0.post_attention_layernorm.weight": (hidden,),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.0.mlp.up_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
        "model.norm.weight": (hidden,),
    }
    # Values exactly representable in bf16 (and f16), so the imported bf16 must equal them exactly.
    weights = {n: (RNG.integers(-64, 65, size=s) / 64.0).astype(np.float32) for n, s in hf.items()}
    gguf_names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    tensors = []
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = permute(w, heads, heads)
        elif name.endswith("k_proj.weight"):
            w = permute(w, heads, kv_heads)
        stored = w.astype(np.float16) if name.endswith("up_proj.weight") else w
        tensors.append((gguf_names[name], stored, None))
    write_gguf(OUT / "tiny-llama.gguf", metadata, tensors)
    write_safetensors(OUT / "tiny-llama.expected.safetensors", weights)


def tiny_qwen_file(arch):
    """A 1-layer `qwen2` or `qwen3` model; metadata keys carry the architecture's prefix."""
    hidden, heads, kv_heads, _, inter = TINY.values()
    head_dim = 6 if arch == "qwen3" else 4
    llama_metadata, vocab = tiny_llama_metadata()
    metadata = []
    for key, value, vtype, sub in llama_metadata:
        if key.startswith("llama."):
            key = arch + key[len("llama"):]
        if key == f"{arch}.rope.dimension_count":
            value = head_dim
        if key == "tokenizer.ggml.pre":
            value = "qwen2"
        metadata.append((key, value, vtype, sub))
    if arch == "qwen3":
        metadata.append(("qwen3.attention.key_length", head_dim, V.UINT32, None))
        metadata.append(("qwen3.attention.value_length", head_dim, V.UINT32, None))
    q, kv = heads * head_dim, kv_heads * head_dim
    hf = {
        "model.embed_tokens.weight": ("token_embd.weight", (vocab, hidden)),
        "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", (hidden,)),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", (q, hidden)),
        "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", (kv, hidden)),
        "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", (kv, hidden)),
        "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", (hidden, q)),
        "model.layers.0.post_attention_layernorm.weight": ("blk.0.ffn_norm.weight", (hidden,)),
        "model.layers.0.mlp.gate_proj.weight": ("blk.0.ffn_gate.weight", (inter, hidden)),
        "model.layers.0.mlp.up_proj.weight": ("blk.0.ffn_up.weight", (inter, hidden)),
        "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", (hidden, inter)),
        "model.norm.weight": ("output_norm.weight", (hidden,)),
    }
    if arch == "qwen2":
        for p, rows in [("q", q), ("k", kv), ("v", kv)]:
            hf[f"model.layers.0.self_attn.{p}_proj.bias"] = (f"blk.0.attn_{p}.bias", (rows,))
    else:
        for p in ["q", "k"]:
            hf[f"model.layers.0.self_attn.{p}_norm.weight"] = (f"blk.0.attn_{p}_norm.weight", (head_dim,))
        hf["lm_head.weight"] = ("output.weight", (vocab, hidden))
    weights = {n: (RNG.integers(-64, 65, size=s) / 64.0).astype(np.float32) for n, (_, s) in hf.items()}
    tensors = [(hf[n][0], w, None) for n, w in weights.items()]
    write_gguf(OUT / f"tiny-{arch}.gguf", metadata, tensors, arch=arch)
    write_safetensors(OUT / f"tiny-{arch}.expected.safetensors", weights)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    types_file()
    unsupported_file()
    tiny_llama_file()
    tiny_qwen_file("qwen2")
    tiny_qwen_file("qwen3")
    for p in sorted(OUT.iterdir()):
        print(f"{p}  {p.stat().st_size} bytes")
