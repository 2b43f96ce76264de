#!/usr/bin/env bash
# The real run on teacher-generated text (one lent GPU): sample texts from the teacher, then distil
# the student and train the CE-only baseline on them, same config as gpu_run.sh. Results go to $OUT.
# Expects runs/teacher.part_a (sent by an earlier call) and .carry2/{teacher.part_b, gguf-*.whl}.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GEN_N=${GEN_N:-16384}; GEN_SECONDS=${GEN_SECONDS:-150}; STEPS=${STEPS:-1000}
START=$(date +%s)
W=runs/gen; mkdir -p "$W" "$OUT/gen"
T=$W/SmolLM2-135M-Instruct.Q4_1.gguf
cat runs/teacher.part_a .carry2/teacher.part_b > "$T" || exit 1
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $T" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --target "$W/site" .carry2/gguf-*.whl && export PYTHONPATH=$W/site
nvidia-smi -L
COMMON=(--config distill/configs/smollm2.toml --teacher "$T" --out-dir "$W/run")
echo "== sampling up to $GEN_N texts from the teacher for at most $GEN_SECONDS s =="
timeout "$GEN_SECONDS" python3 -m distill generate "${COMMON[@]}" --generate-n "$GEN_N" --gen-batch-size 1024 --gen-max-new-tokens 256 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -4
wc -l "$W/run/data/generated.jsonl"
echo "== distil + baseline, $STEPS steps, 1 GPU ($(( $(date +%s) - START )) s in) =="
timeout $(( 560 - ($(date +%s) - START) )) python3 -m distill train "${COMMON[@]}" --max-steps "$STEPS" --baseline 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -25
cp "$W/run"/report.* "$OUT/gen/"
head -c 3000 "$W/run/data/generated.jsonl" > "$OUT/gen/generated_sample.jsonl"
echo "done in $(( $(date +%s) - START )) s"
