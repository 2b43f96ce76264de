#!/usr/bin/env bash
# Issue #5 on one lent GPU: distil the student again, then export it to INT4 packages with the
# project's own exporter (`appliance export`, run as `python -m distill.export_cli`) for the arm and gpu targets, and return the reports; or
# export SmolLM2 itself (the smollm2 stage, for the roundings that need a GPU).
#
#   distill/scripts/gpu_export_student.sh distill   # call 2: teacher samples (GEN_SECONDS) + distil STEPS steps
#   distill/scripts/gpu_export_student.sh export    # call 3, same warm machine: export + measure, reports to $OUT
#   distill/scripts/gpu_export_student.sh rounding  # call 4: GGUF types x rounding (bench/gguf_rounding.py)
#   distill/scripts/gpu_export_student.sh smollm2   # SmolLM2 itself (bench/export_smollm2.py), no student needed
#
# The teacher GGUF (92 MB) is over one call's 64 MiB, so a first call carries .carry/teacher.part_a and copies it
# to runs/ (git-ignored; kept on a warm machine):  mkdir -p runs && cp .carry/teacher.part_a runs/
# The 'distill' call carries .carry3/ = teacher.part_b, the gguf and llama-cpp-python wheels and site/ (pure
# Python packages: diskcache, which llama_cpp needs and the device lacks; click, which it has). Add /.carry3/ to
# .git/info/exclude. Each stage fits one 10-minute call (on an H200 on 2026-11-27: distil 315-359 s; export RTN + GPTQ 270-353 s,
# QAT alone about 400 s; rounding about 100 s; smollm2 with qat, one target, 430-460 s); the student
# lives in runs/student/run/student/ between them, so the calls must follow within the machine's 30 s.
# TARGETS (default "arm gpu") and ALGORITHMS (default "rtn gptq"; qat too, and hqq and imatrix for the one format
# each takes) pick the targets and rounding of the export and smollm2 stages, ARM_GGUF_QUANT (e.g. Q4_0) the arm GGUF's type if not the profile's. For a
# variant of the export stage, FORMAT (onnx|gguf) limits the formats, EXTRA adds export options (e.g. "--qat-steps
# 1000") and TAG names its packages and reports apart (packages/<algorithm><TAG>). TYPES and ROUNDINGS
# (default "Q4_0 IQ4_NL Q4_K_M", "rtn imatrix") the rounding stage's.
# Same generation/training settings as gpu_run_generated.sh (the distillation of bench/results/distill/runs/2026-11-27-e17686a/generated.md),
# without the CE-only baseline. Measurements (perplexity, agreement, speed, RSS) run on the device's CPU with
# THREADS threads: speed and RSS are the lent machine's, not an edge box's.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGE=${1:?usage: $0 distill|export|rounding}
GEN_N=${GEN_N:-16384}; GEN_SECONDS=${GEN_SECONDS:-150}; STEPS=${STEPS:-1000}; THREADS=${THREADS:-8}; ALGORITHMS=${ALGORITHMS:-rtn gptq}
TARGETS=${TARGETS:-arm gpu}; FORMAT=${FORMAT:-both}; EXTRA=${EXTRA:-}; TAG=${TAG:-}
TYPES=${TYPES:-Q4_0 IQ4_NL Q4_K_M}; ROUNDINGS=${ROUNDINGS:-rtn imatrix}; ARM_GGUF_QUANT=${ARM_GGUF_QUANT:-}
BUDGET=${BUDGET:-570}  # seconds this call may spend (a command may run 600)
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
W=runs/student; SITE=runs/site; RUN=$W/run; STUDENT=$RUN/student
mkdir -p "$W" "$OUT"
export PYTHONPATH=$PWD/$SITE:$PWD
log() { echo "== $* ($(elapsed) s in)"; }

T=$W/SmolLM2-135M-Instruct.Q4_1.gguf
# The teacher (SmolLM2's published GGUF) and the packages the device lacks; needs .carry3 on the first call.
prepare() {
  if [ ! -f "$T" ]; then
    cat runs/teacher.part_a .carry3/teacher.part_b > "$T" || exit 1
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $T" | sha256sum -c || exit 1
  fi
  if [ ! -d "$SITE/llama_cpp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .carry3/*.whl || exit 1
    cp -r .carry3/site/. "$SITE"/ || exit 1
  fi
  python3 -c "import llama_cpp, gguf, click, torch, transformers, onnxruntime as o; print('llama_cpp', llama_cpp.__version__, 'gguf ok, torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', o.__version__)" || exit 1
  nvidia-smi -L
}

if [ "$STAGE" = smollm2 ]; then
  prepare
  log "bench.export_smollm2: $ALGORITHMS for $TARGETS"
  [ -d "$W/results" ] || cp -r bench/results "$W/results"  # the committed results: this run's rows merge in
  timeout $(( BUDGET - $(elapsed) )) python3 -m bench.export_smollm2 --published "$T" --algorithms $ALGORITHMS \
    --targets $TARGETS --work "$W/smollm2" --results "$W/results" --threads "$THREADS" 2>&1 \
    | grep -v -E "^writing |[0-9](it/s|s/it)|converting to|^llama_model_quantize" | tail -30
  (cd "$W/results/export_smollm2/runs" && tar -czf "$OUT/smollm2-results.tar.gz" "$(ls -t | head -1)")  # this run's folder
  log "done"
  exit 0
fi

if [ "$STAGE" = distill ]; then
  prepare
  COMMON=(--config distill/configs/smollm2.toml --teacher "$T" --out-dir "$RUN")
  log "sampling up to $GEN_N texts from the teacher for at most $GEN_SECONDS s"
  timeout "$GEN_SECONDS" python3 -m distill generate "${COMMON[@]}" --generate-n "$GEN_N" --gen-batch-size 1024 \
    --gen-max-new-tokens 256 2>&1 | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -4
  wc -l "$RUN/data/generated.jsonl"
  log "distil, $STEPS steps, 1 GPU"
  timeout $(( BUDGET - $(elapsed) )) python3 -m distill train "${COMMON[@]}" --max-steps "$STEPS" 2>&1 \
    | tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)" | tail -25
  mkdir -p "$OUT/distill"; cp "$RUN"/report.md "$RUN"/report.json "$OUT/distill/"
  ls -la "$STUDENT"
  log "done"
  exit 0
fi

[ -f "$STUDENT/config.json" ] || { echo "no student at $STUDENT: run the distill stage first on this machine"; exit 1; }
if [ "$STAGE" = rounding ]; then
  log "bench.gguf_rounding: $TYPES x $ROUNDINGS"
  timeout $(( BUDGET - $(elapsed) )) python3 -m bench.gguf_rounding "$STUDENT" --name student --types $TYPES \
    --algorithms $ROUNDINGS --work "$W/rounding" --results "$OUT/rounding" --threads "$THREADS" 2>&1 \
    | grep -v -E "^writing |[0-9](it/s|s/it)|converting to|^llama_model_quantize" | tail -25
  log "done"
  exit 0
fi
[ "$STAGE" = export ] || { echo "unknown stage $STAGE"; exit 2; }
P=$W/packages
lscpu | grep -E "^Model name|^CPU\(s\)"
# One export per target and algorithm: the fp32 source is measured, then each format is built and measured.
# GPTQ and the imatrix calibrate on the GPU; HQQ is ONNX-only, the imatrix GGUF-only.
for algorithm in $ALGORITHMS; do
  for target in $TARGETS; do
    fmt=$FORMAT
    [ "$algorithm" = hqq ] && fmt=onnx
    [ "$algorithm" = imatrix ] && fmt=gguf
    quant=(); [ "$target" = arm ] && [ -n "$ARM_GGUF_QUANT" ] && quant=(--gguf-quant "$ARM_GGUF_QUANT")
    [ $(( BUDGET - $(elapsed) )) -gt 90 ] || { log "no time left for $algorithm $target"; continue; }
    log "appliance export --target $target --format $fmt --algorithm $algorithm"
    timeout $(( BUDGET - $(elapsed) )) python3 -m distill.export_cli "$STUDENT" --target "$target" --format "$fmt" \
      --algorithm "$algorithm" "${quant[@]}" $EXTRA --out "$P/$algorithm$TAG" --name student --threads "$THREADS" 2>&1 \
      | grep -v -E "^writing |[0-9](it/s|s/it)|converting to|^llama_model_quantize" | tail -25
  done
done
# The reports only (never weights), in one archive: $OUT takes at most 8 files.
(cd "$P" && find . -name "report.*" | sort | tar -czf "$OUT/reports$TAG.tar.gz" -T -)
tar -tzf "$OUT/reports$TAG.tar.gz"
du -sh "$P"/*/* 2>/dev/null
log "done"
