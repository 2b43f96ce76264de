#!/usr/bin/env bash
# Does one KV stream per slot (kv_unified off, what the runner uses so that a batched greedy answer is
# bit-identical to the same request alone) cost decode speed against one unified KV cache? llama.cpp's
# own llama-batched-bench, both ways, alternated, same model and threads: the ceiling either server can
# reach, without HTTP. Records a run in bench/results/kv_streams/runs/ (bench/results.py).
#   bench/kv_streams.sh [REPEATS]     (needs bench/build_llama_server.sh's build)
set -euo pipefail
repeats=${1:-3}
bin=${LLAMA_BIN:-$HOME/.cache/appliance-bench/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
model=$(.venv/bin/python -c 'from models import find_model; print(find_model("smollm2").path)')
threads=$(.venv/bin/python -c 'from appliance.config import default_threads; print(default_threads())')
raw=$(mktemp)
for run in $(seq "$repeats"); do
    for kv in --no-kv-unified --kv-unified; do
        # Slots of 4096 tokens each, as the service's default; 64-token prompts, 128 generated.
        "$bin/llama-batched-bench" -m "$model" -c $((16 * 4096)) -b 512 -ub 512 -npp 64 -ntg 128 -npl 1,4,8,16 \
            -t "$threads" $kv 2>/dev/null | sed -n "s/^|/$kv |/p" | grep -E '^[^|]+\| +[0-9]' >> "$raw"
    done
done
.venv/bin/python - "$raw" "$repeats" "$threads" "$model" "$bin" <<'EOF'
import statistics, sys
from bench.common import machine
from bench.results import record
raw, repeats, threads, model, bin_ = sys.argv[1:]
speeds = {"--no-kv-unified": {}, "--kv-unified": {}}  # kv -> parallel -> [decode tok/s]
for line in open(raw):
    cells = [c.strip() for c in line.split("|")]
    kv, pl, s_tg = cells[0], int(cells[3]), float(cells[8])  # | PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG |
    speeds[kv].setdefault(pl, []).append(s_tg)
lines = ["# One KV stream per slot against one unified KV cache (llama-batched-bench)", "",
         f"`bench/kv_streams.sh {repeats}` on {machine()['cpu']}, SmolLM2-135M Q4_1, {threads} threads, 64-token "
         "prompts, 128 generated per sequence, slots of 4,096 tokens; decode tok/s over all sequences, median of "
         f"{repeats} alternated runs.", "",
         "| sequences | per-slot streams (the runner's) | unified | per-slot / unified |", "|---|---|---|---|"]
ratios = {}
for pl in sorted(speeds["--no-kv-unified"]):
    split, unified = (statistics.median(speeds[k][pl]) for k in ("--no-kv-unified", "--kv-unified"))
    ratios[pl] = split / unified
    lines.append(f"| {pl} | {split:.1f} | {unified:.1f} | {split / unified:.2f} |")
figure = (f"per-slot streams / unified: {' / '.join(f'{r:.2f}x' for r in ratios.values())} at "
          f"{' / '.join(map(str, ratios))} sequences")
run = record("kv_streams", about="One KV stream per slot against one unified KV cache, in llama-batched-bench",
             goal="none: does the runner's per-slot KV cost decode speed?", figure=figure,
             command=f"bench/kv_streams.sh {repeats}", report="\n".join(lines) + "\n",
             data={"threads": int(threads), "repeats": int(repeats), "decode_tok_s": speeds},
             inputs=[model, f"{bin_}/llama-batched-bench"])
print((run / "report.md").read_text())
EOF
rm -f "$raw"
