#!/usr/bin/env bash
# Does one KV stream per slot (kv_unified off, what the runner uses so that a batched greedy answer is
# bit-identical to the same request alone) cost decode speed against one unified KV cache? llama.cpp's
# own llama-batched-bench, both ways, alternated, same model and threads: the ceiling either server can
# reach, without HTTP. Writes bench/results/kv_streams.md.
#   bench/kv_streams.sh [REPEATS]     (needs bench/build_llama_server.sh's build)
set -euo pipefail
repeats=${1:-3}
bin=${LLAMA_BIN:-$HOME/.cache/appliance-bench/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
model=$(.venv/bin/python -c 'from models import find_model; print(find_model("smollm2").path)')
threads=$(.venv/bin/python -c 'from appliance.config import default_threads; print(default_threads())')
out=bench/results/kv_streams.md
raw=$(mktemp)
for run in $(seq "$repeats"); do
    for kv in --no-kv-unified --kv-unified; do
        # Slots of 4096 tokens each, as the service's default; 64-token prompts, 128 generated.
        "$bin/llama-batched-bench" -m "$model" -c $((16 * 4096)) -b 512 -ub 512 -npp 64 -ntg 128 -npl 1,4,8,16 \
            -t "$threads" $kv 2>/dev/null | sed -n "s/^|/$kv |/p" | grep -E '^[^|]+\| +[0-9]' >> "$raw"
    done
done
.venv/bin/python - "$raw" "$out" "$repeats" "$threads" <<'EOF'
import statistics, sys
raw, out, repeats, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
speeds = {}  # (kv, parallel) -> [decode tok/s]
for line in open(raw):
    cells = [c.strip() for c in line.split("|")]
    kv, pl, s_tg = cells[0], int(cells[3]), float(cells[8])  # | PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG |
    speeds.setdefault((kv, pl), []).append(s_tg)
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
lines = ["# One KV stream per slot against one unified KV cache (llama-batched-bench)", "",
         f"`bench/kv_streams.sh {repeats}` on {cpu}, SmolLM2-135M Q4_1, {threads} threads, 64-token prompts, "
         "128 generated per sequence, slots of 4,096 tokens; decode tok/s over all sequences, median of "
         f"{repeats} alternated runs.", "",
         "| sequences | per-slot streams (the runner's) | unified | per-slot / unified |", "|---|---|---|---|"]
for pl in sorted({p for _, p in speeds}):
    split, unified = (statistics.median(speeds[(k, pl)]) for k in ("--no-kv-unified", "--kv-unified"))
    lines.append(f"| {pl} | {split:.1f} | {unified:.1f} | {split / unified:.2f} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -f "$raw"
