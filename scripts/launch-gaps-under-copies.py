#!/usr/bin/env python3
"""Does traffic on the host link stretch the spacing between kernels, and do CUDA graphs avoid it?

The offloaded 7B step's kernels sit 3.0-3.6 µs apart where the same kernels without offload sit
1.6 µs apart (docs/benchmarks.md, session 27, call 1). One reading: the GPU fetches each launch's
commands from host memory over the same link that the checkpoint copies fill. A CUDA graph's
commands are uploaded to the device once, so a replay would not wait on the link. This measures
both, with torch (the launches are the driver's either way):

  a chain of N in-place element-wise kernels on one stream, while another stream copies
  device → host, host → device, both, or nothing (pinned buffers, copies queued to outlast the
  chain), launched three ways: "queued" (eager, queued behind a sleep kernel, so the host is ahead
  and the device's own spacing is what is timed), "live" (eager, no sleep: the device may fetch
  each launch as the host makes it; for the 2 µs kernels this times Python's launch rate), and
  "graph" (one replay of the chain captured as a CUDA graph).

Prints one JSON line per case and a table: µs per kernel; the difference between conditions is
the spacing the copies add (the kernels' own time is the same: the copies take ~1 % of HBM). A
queued case whose host took longer to launch the chain than the sleep lasted is flagged: it timed
the host.
Usage: python3 scripts/launch-gaps-under-copies.py [--ops 500] [--rounds 3] [--out FILE.json]
"""
import argparse
import json
import time

import torch

SLEEP_CYCLES = 20_000_000  # ~10 ms at 1.98 GHz: the host queues the chain behind it


def chain(x, ops):
    """`ops` in-place multiplies of x: one kernel each."""
    for _ in range(ops):
        x.mul_(1.0000001)


def start_copies(direction, host, dev, stream, repeats):
    """Queues `repeats` copies in `direction` ("none", "d2h", "h2d", "both") on `stream` (both:
    the second direction on its own stream, as the offload's copy and fetch streams)."""
    if direction in ("d2h", "both"):
        with torch.cuda.stream(stream[0]):
            for _ in range(repeats):
                host[0].copy_(dev[0], non_blocking=True)
    if direction in ("h2d", "both"):
        with torch.cuda.stream(stream[1]):
            for _ in range(repeats):
                dev[1].copy_(host[1], non_blocking=True)


def timed(run, direction, host, dev, copy_streams, repeats, sleep):
    """Device milliseconds of `run` on the current stream while the copies of `direction` go on
    (behind a sleep kernel where `sleep`), and the host's milliseconds to launch it."""
    torch.cuda.synchronize()
    start_copies(direction, host, dev, copy_streams, repeats)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep:
        torch.cuda._sleep(SLEEP_CYCLES)
    start.record()
    t0 = time.perf_counter()
    run()
    host_ms = 1000 * (time.perf_counter() - t0)
    end.record()
    torch.cuda.synchronize()  # every stream: the copies too
    return start.elapsed_time(end), host_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=500, help="kernels in the chain (at most 1000: "
                    "the driver blocks the host past about that many pending launches)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not 1 <= args.ops <= 1000 or args.rounds < 1:
        ap.error("--ops must be 1..1000 and --rounds at least 1")
    torch.cuda.init()
    mib = 1 << 20
    copy_bytes = 256 * mib
    host = [torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(copy_bytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
    copy_streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    # Two kernel sizes: ~2 µs (launch-bound, the small models) and ~20 µs (the 7B step's
    # element-wise kernels: 64 MiB through memory).
    sizes = {"small (64 K elements)": 1 << 16, "7B element-wise (16 M elements)": 1 << 24}
    rows = []
    for label, n in sizes.items():
        x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain(x, 3)  # warm the kernel
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            chain(x, args.ops)
        graph.replay()  # the first replay uploads the graph
        torch.cuda.synchronize()
        eager = lambda: chain(x, args.ops)  # noqa: E731
        runs = {"queued": (eager, True), "live": (eager, False), "graph": (graph.replay, True)}
        for r in range(args.rounds):
            for direction in ("none", "d2h", "h2d", "both"):
                for mode, (run, sleep) in runs.items():
                    # 24 copies of 256 MiB: ~110 ms at 55 GB/s, longer than sleep + chain.
                    ms, host_ms = timed(run, direction, host, dev, copy_streams, 24, sleep)
                    row = {
                        "kernels": label,
                        "round": r,
                        "copies": direction,
                        "mode": mode,
                        "ops": args.ops,
                        "ms": round(ms, 4),
                        "host_ms": round(host_ms, 3),
                        "us_per_kernel": round(1000 * ms / args.ops, 3),
                    }
                    if mode == "queued" and host_ms > 8.0:
                        row["warning"] = "the host launched slower than the sleep lasted: host-bound"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}: µs per kernel (median over rounds)")
    print("| kernels | mode | none | d2h | h2d | both |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in sizes:
        for mode in runs:
            cells = []
            for direction in ("none", "d2h", "h2d", "both"):
                v = sorted(
                    row["us_per_kernel"]
                    for row in rows
                    if (row["kernels"], row["mode"], row["copies"]) == (label, mode, direction)
                )
                cells.append(f"{v[len(v) // 2]:.2f}")
            print(f"| {label} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
