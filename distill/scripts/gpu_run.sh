#!/usr/bin/env bash
# The real run on a lent 2-GPU machine, in one command (see bench/results/distill/runs/2026-11-27-e17686a/notes.md).
# Expects runs/teacher.part_a (sent by an earlier call) and .carry2/{teacher.part_b, corpus.tar.xz, gguf-*.whl}.
# Order: a short 1-GPU probe sizes the real run to the time left; the real 1-GPU run (student + baseline);
# then the same config on 2 GPUs through accelerate launch. Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BUDGET=${BUDGET:-560}     # seconds this whole script may take
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
W=runs/gpu; mkdir -p "$W" "$OUT/real" "$OUT/gpu2"
T=$W/SmolLM2-135M-Instruct.Q4_1.gguf
cat runs/teacher.part_a .carry2/teacher.part_b > "$T" || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $T" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --target "$W/site" .carry2/gguf-*.whl && export PYTHONPATH=$W/site
tar -C "$W" -xJf .carry2/corpus.tar.xz
nvidia-smi -L
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.device_count())"
COMMON=(--config distill/configs/smollm2.toml --teacher "$T" --data "$W/corpus" --data-cache "$W/data")

echo "== probe: 1 GPU, 30 steps (tokenizes the corpus once for all runs) =="
timeout 200 python3 -m distill train "${COMMON[@]}" --out-dir "$W/probe1" --max-steps 30 --warmup-steps 5 --eval-every 0 --checkpoint-every 0 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -15
TOKS=$(python3 -c "import json; print(json.load(open('$W/probe1/history.json'))['runs']['student']['throughput']['tokens_per_s'])")
# Baseline steps cost ~0.6 of a distillation step (no teacher, no KL); keep 170 s for load, eval and the 2-GPU run.
STEPS=$(python3 -c "print(max(200, int(($(left) - 170) * 0.85 / 1.6 * $TOKS / (32 * 512)) // 50 * 50))")
echo "== real run: 1 GPU, $STEPS steps, student + baseline (probe: $TOKS tok/s, $(left) s left) =="
timeout $(( $(left) - 100 )) python3 -m distill train "${COMMON[@]}" --out-dir "$W/real" --max-steps "$STEPS" --baseline 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -30
cp "$W/real"/report.* "$OUT/real/" 2>/dev/null
echo "== 2 GPUs via accelerate launch, same config, 40 steps ($(left) s left) =="
timeout $(( $(left) - 5 )) python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  -m distill train "${COMMON[@]}" --out-dir "$W/gpu2" --max-steps 40 --warmup-steps 5 --eval-every 0 --checkpoint-every 0 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -15
cp "$W/gpu2"/report.json "$W/gpu2"/report.md "$OUT/gpu2/" 2>/dev/null
cp "$W/probe1/history.json" "$OUT/real/probe1_history.json" 2>/dev/null
echo "done in $(( $(date +%s) - START )) s"
