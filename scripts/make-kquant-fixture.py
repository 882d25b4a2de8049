#!/usr/bin/env python3
"""Builds tests/fixtures/gguf/kquant-reference.safetensors: seeded f32 super-blocks and their Q4_K,
Q5_K and Q6_K bytes as llama.cpp's own reference quantizers write them (ggml-quants.c
`quantize_row_q{4,5,6}_K_ref`, what llama-quantize runs without an importance matrix), so that
fuselora's K-quantizers (trainer/src/gguf/kquant.rs) are checked byte for byte against llama.cpp.
gguf-py 0.19 has no quantizer for the K types, only dequantizers.

The C reference is compiled from a llama.cpp source tree with scripts/kquant-reference.c, without
fused multiply-add (-ffp-contract=off; ggml-base is built for plain x86-64, which has none). The
llama.cpp sources ship in llama-cpp-python's source package:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # needs cmake on PATH
    tar xzf llama_cpp_python-0.3.36.tar.gz
    python3 scripts/make-kquant-fixture.py llama_cpp_python-0.3.36/vendor/llama.cpp/ggml

Needs a C compiler, numpy and gguf (for the dequantization self-check). Seeded: the file comes out
the same.
"""

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

OUT = Path("tests/fixtures/gguf/kquant-reference.safetensors")
HARNESS = Path(__file__).with_name("kquant-reference.c")
RNG = np.random.default_rng(20260312)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def super_blocks():
    """Super-blocks of 256 values that reach every branch of the reference quantizers."""
    blocks = [RNG.normal(0, 0.02, 256) for _ in range(8)]  # typical weights
    blocks += [RNG.standard_t(3, 256) * 0.02 for _ in range(4)]  # heavy tails
    for _ in range(4):  # a few outliers 20× the rest
        x = RNG.normal(0, 0.02, 256)
        x[RNG.choice(256, 3, replace=False)] *= 20
        blocks.append(x)
    # sub-blocks of scales 1 … 1e-4: small ones get 6-bit scales of 0 or 1
    blocks.append(np.concatenate([RNG.normal(0, 10.0 ** -(j % 5), 32) for j in range(8)]))
    blocks.append(np.abs(RNG.normal(0, 0.02, 256)) + 0.01)  # all positive: the offset stays 0
    blocks.append(-np.abs(RNG.normal(0, 0.02, 256)) - 0.01)  # all negative
    blocks.append(np.zeros(256))
    blocks.append(np.repeat([0.5, -0.25, 0.0, 1e-3, -2.0, 0.125, 3.0, -0.01], 32))  # constant sub-blocks
    tiny = RNG.normal(0, 1e-16, 256)  # Q6_K groups under GROUP_MAX_EPS (1e-15) beside larger ones
    tiny[128:] = RNG.normal(0, 1e-6, 128)
    blocks.append(tiny)
    blocks.append(RNG.integers(-16, 17, 256) / 2)  # halves: exact ties for the rounding
    bf16 = RNG.normal(0, 0.05, 256).astype(np.float32)  # what a bf16 checkpoint holds
    blocks.append((bf16.view(np.uint32) & 0xFFFF0000).view(np.float32))
    return np.stack(blocks).astype("<f4")


def reference(ggml, values):
    """Q4_K, Q5_K and Q6_K bytes of `values` from the compiled C reference."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "kquant-reference"
        subprocess.run(["cc", "-O2", "-ffp-contract=off", "-DGGML_COMMON_DECL_C",
                        f"-I{ggml}/include", f"-I{ggml}/src", "-o", str(exe), str(HARNESS),
                        f"{ggml}/src/ggml-quants.c", "-lm"], check=True)
        out = subprocess.run([str(exe)], input=values.tobytes(), capture_output=True, check=True).stdout
    n = values.shape[0]
    result, at = {}, 0
    for name, size in BLOCK_BYTES.items():
        result[name] = np.frombuffer(out[at:at + n * size], dtype=np.uint8).reshape(n, size)
        at += n * size
    assert at == len(out), f"{len(out)} bytes from the reference, expected {at}"
    return result


def write_safetensors(path, tensors):
    """Minimal safetensors writer (F32 and U8), so the script needs only gguf + numpy."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        dtype = {np.dtype("<f4"): "F32", np.dtype("u1"): "U8"}[array.dtype]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    ggml = Path(sys.argv[1])
    values = super_blocks()
    quantized = reference(ggml, values)
    for name, qtype in [("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K)]:
        back = gguf.quants.dequantize(quantized[name], qtype).reshape(values.shape)
        rms = float(np.sqrt(np.mean((back[:16] - values[:16]) ** 2)) / np.sqrt(np.mean(values[:16] ** 2)))
        print(f"{name}: RMS error of the 16 weight-like super-blocks {rms:.4f} of their RMS")
    write_safetensors(OUT, {"values": values, **quantized})
    print(f"wrote {OUT}: {values.shape[0]} super-blocks")


if __name__ == "__main__":
    main()
