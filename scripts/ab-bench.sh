#!/usr/bin/env bash
# A/B of fuselora binaries on the GPU machine: scripts/bench-gpu.sh's runs (fuselora only, no
# baseline) for each binary in turn, ROUNDS times, interleaved (base, new, base, new, ...) so that
# the clocks' drift under the power cap falls on both alike; then one table of tokens/s per run
# and binary ("r1 / r2 ..."), with the peaks, and each binary's mean against the first one's.
# Compare binaries within one call only: machines differ by up to 1 %.
# usage: [ROUNDS=2] [ONLY="run ..."] [PROFILE=1] scripts/ab-bench.sh OUT_DIR NAME=BIN [NAME=BIN ...]
#   e.g. ONLY="llama2-7b-min-memory mistral-7b-min-memory" scripts/ab-bench.sh ab base=.carry/base new=.carry/new
set -uo pipefail
OUT=$1
shift
[ $# -ge 1 ] || { echo "usage: scripts/ab-bench.sh OUT_DIR NAME=BIN [NAME=BIN ...]" >&2; exit 2; }
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
ONLY=${ONLY:-"llama2-7b-min-memory mistral-7b-min-memory mistral-7b-qlora-min-memory"}
mkdir -p "$OUT"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for pair in "$@"; do
    name=${pair%%=*} bin=${pair#*=}
    [ -x "$bin" ] || { echo "no binary at $bin (from $pair)" >&2; exit 2; }
    HF=0 ONLY="$ONLY" "$SCRIPTS/bench-gpu.sh" "$bin" "$OUT/$name-$round" >/dev/null || exit $?
  done
done
python3 - "$OUT" "${ROUNDS:-2}" "$ONLY" "$@" <<'PY'
import json, pathlib, statistics, sys
out, rounds, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split()
names = [p.split("=", 1)[0] for p in sys.argv[4:]]
def result(name, rnd, run):
    p = out / f"{name}-{rnd}" / f"fuselora-{run}.json"
    return json.loads(p.read_text()) if p.exists() else None
print("| run | " + " | ".join(f"{n} tok/s (peak GiB)" for n in names) + " |")
print("| --- |" + " --- |" * len(names))
for run in runs:
    cells, means = [], []
    for n in names:
        rs = [result(n, k, run) for k in range(1, rounds + 1)]
        tps = [r["tokens_per_s"] for r in rs if r]
        peak = next((r["peak_memory_bytes"] / 2**30 for r in rs if r), None)
        means.append(statistics.mean(tps) if tps else None)
        text = " / ".join(f"{t:,.0f}" for t in tps) or "failed"
        if peak is not None:
            text += f" ({peak:.2f})"
        if means[-1] and means[0] and len(means) > 1:
            text += f", {100 * (means[-1] / means[0] - 1):+.1f} %"
        cells.append(text)
    print(f"| {run} | " + " | ".join(cells) + " |")
PY
