#!/usr/bin/env python3
"""Which CUDA and NCCL versions a fuselora binary can run with, read from the library functions it
calls. cudarc resolves each function by name (dlsym) on first call, so the names of the functions the
binary uses are string constants in it; cudarc's bindings mark each function with the versions whose
headers declare it (#[cfg(any(feature = "cuda-12040", ...))]). A binary built against CUDA 13.0
bindings still runs on a 12.x library when every function it calls exists in 12.x.

Usage: scripts/cuda-symbols.py BINARY [--require-cuda 12040]
Prints the oldest CUDA version that declares every CUDA function used (driver, cuBLAS, cuBLASLt, NVRTC) and the
oldest NCCL; with --require-cuda, exits 1 (naming the functions) when that version lacks one.
"""
import argparse
import glob
import os
import re
import sys

FN = re.compile(r'(?:#\[cfg\(any\(([^\]]*)\)\)\]\n)?pub unsafe fn (\w+)\(')


def cudarc_src():
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    hits = sorted(glob.glob(os.path.join(home, "registry/src/*/cudarc-0.19.*/src")))
    if not hits:
        sys.exit("error: cudarc 0.19 sources not found under $CARGO_HOME/registry/src (run cargo fetch)")
    return hits[-1]


def declared(path, prefix):
    """function name -> set of versions declaring it (None: every version)."""
    text = open(path).read()
    out = {}
    for cfg, name in FN.findall(text):
        versions = None
        if cfg:
            versions = {int(v) for v in re.findall(rf'"{prefix}-(\d+)"', cfg)}
        if name in out and out[name] is not None and versions is not None:
            out[name] |= versions
        elif name not in out:
            out[name] = versions
        else:
            out[name] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--require-cuda", type=int, help="e.g. 12040 for CUDA 12.4")
    args = ap.parse_args()
    data = open(args.binary, "rb").read()
    src = cudarc_src()
    families = {
        "cuda": [
            "driver/sys/mod.rs",
            "cublas/sys/mod.rs",
            "cublaslt/sys/mod.rs",
            "nvrtc/sys/mod.rs",
        ],
        "nccl": ["nccl/sys/mod.rs"],
    }
    failed = False
    for prefix, files in families.items():
        table = {}
        for f in files:
            table.update(declared(os.path.join(src, f), prefix))
        used = sorted(n for n in table if n.encode() in data)
        if prefix == "cuda" and "cuInit" not in used:
            sys.exit(f"error: {args.binary} calls no CUDA function (cuInit): not a --features cuda build?")
        restricted = {n: table[n] for n in used if table[n] is not None}
        all_versions = sorted({v for vs in table.values() if vs for v in vs})
        oldest = next(
            (v for v in all_versions if all(v in vs for vs in restricted.values())), None
        )
        if not restricted:
            oldest = f"every version cudarc binds ({min(all_versions)}+)"
        print(f"{prefix}: {len(used)} functions used; oldest version declaring all: {oldest}")
        for n, vs in sorted(restricted.items()):
            print(f"  {n}: from {min(vs)}")
        if prefix == "cuda" and args.require_cuda:
            missing = [n for n, vs in restricted.items() if args.require_cuda not in vs]
            if missing:
                print(f"error: CUDA {args.require_cuda} lacks {', '.join(missing)}", file=sys.stderr)
                failed = True
    sys.exit(1 if failed else 0)


main()
