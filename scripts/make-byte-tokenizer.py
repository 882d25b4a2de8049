#!/usr/bin/env python3
"""Writes tests/fixtures/byte-tokenizer: a byte-level BPE tokenizer with no merges (one token per
byte) and three ChatML special tokens, 259 ids in all, so it fits the tiny fixture models' vocabulary
of 320. It lets tests train the tiny models on real text through the real tokenizer code path."""
import json
import pathlib

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "byte-tokenizer"
out.mkdir(parents=True, exist_ok=True)


def bytes_to_unicode():
    # GPT-2's reversible byte → printable character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
table = bytes_to_unicode()
vocab = {s: i for i, s in enumerate(specials)}
for b in range(256):
    vocab[table[b]] = len(specials) + b
added = [
    {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    for i, s in enumerate(specials)
]
tokenizer = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": added,
    "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [],
    },
}
chat_template = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
config = {
    "add_bos_token": False,
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "model_max_length": 256,
    "chat_template": chat_template,
    "tokenizer_class": "GPT2Tokenizer",
}
(out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1))
(out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
print(f"wrote {out}")
