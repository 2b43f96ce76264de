#!/usr/bin/env bash
# Issue 28 on one lent GPU: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 1.12 GB) distilled into a 14-layer student,
# against a CE-only baseline of the same shape, data and steps; the student exported to INT4 ONNX and GGUF.
#
# The teacher is over one call's 64 MiB, so `python -m bench.distill_qwen2 prepare` splits it, with the corpus
# and the tools the device lacks, into .dq/c00 ... .dq/c18, and the calls follow each other on one warm machine
# (it is given back 30 s after a call; /tmp stays while it is held):
#
#   gpu_run_qwen2.sh part           # once per carry folder, carry [".dq/cNN"]: its files go to /tmp/dq
#   gpu_run_qwen2.sh start          # with the last folder: join, check, install, start the pipeline in the background
#   gpu_run_qwen2.sh wait SECONDS   # until the pipeline ends or SECONDS pass; its reports and log go to $OUT
#   gpu_run_qwen2.sh bring N [S]    # call N (0, 1, ...) of bringing the GGUF package back: 4 pieces of 15 MiB
#                                   # (what one call returns) to $OUT; join them here in order and check the
#                                   # manifest's sha256 before serving it; waits up to S s (500) for the package
#
# The pipeline runs detached (setsid) so that it can outlast one 10-minute call: teacher -> HF folder, samples
# from the teacher on coding prompts (GEN_SECONDS), a short probe that sizes the run to TRAIN_SECONDS, the
# student and the baseline (`distill train --baseline`), and, while the baseline trains, the exports of the
# student (GGUF with the importance matrix, ONNX with HQQ: the best rounding of each format on Qwen2.5-0.5B).
# STEPS skips the probe (an H100 distils at about 25k tokens/s here: 16k tokens a step).
set -uo pipefail
STAGE=${1:?usage: $0 part|start|wait SECONDS|bring N}
Q=${DQ:-/tmp/dq}  # DQ: elsewhere, for a dry run on this CPU
mkdir -p "$Q"
GEN_SECONDS=${GEN_SECONDS:-150}; TRAIN_SECONDS=${TRAIN_SECONDS:-420}; THREADS=${THREADS:-7}  # per export; the two run side by side
TEACHER_SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
CFG=distill/configs/qwen2.5-coder-1.5b.toml
T=$Q/teacher.gguf; TD=$Q/teacher-hf; RUN=$Q/run; P=$Q/packages
log() { echo "== $(date -u +%H:%M:%S) $*"; }
quiet() { tr "\r" "\n" | grep -v -E "[0-9](it/s|s/it)|^writing |converting to|^llama_model_quantize"; }

take_part() { for f in .dq/c*/*; do [ -e "$f" ] && cp "$f" "$Q"/; done; }
# The tools come with the first part: installing and importing them at once shows a problem before the long haul.
install_tools() {
  [ -d "$Q/site/llama_cpp" ] && [ -d "$Q/converter" ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$Q/site" "$Q"/*.whl || return 1
  tar -C "$Q" -xzf "$Q/tools.tar.gz" && tar -C "$Q" -xJf "$Q/corpus.tar.xz"
}
check_imports() {
  PYTHONPATH=$Q/site:$PWD python3 -c "import llama_cpp, gguf, llguidance, torch, transformers, onnxruntime, appliance.cli, appliance.backends.llama_cpp, distill.export, distill.export_cli, distill.pipeline; print('llama_cpp', llama_cpp.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__)"
}

case $STAGE in
part)
  take_part
  if [ -f "$Q/tools.tar.gz" ] && [ ! -f "$Q/tools.ok" ]; then install_tools && check_imports && touch "$Q/tools.ok" || exit 1; nvidia-smi -L; fi
  echo "$(ls "$Q" | wc -l) files, $(du -sm "$Q" | cut -f1) MB in $Q"
  ;;
start)
  take_part
  cat $(ls "$Q"/teacher.[0-9]* | sort) > "$T" && rm "$Q"/teacher.[0-9]*
  echo "$TEACHER_SHA256  $T" | sha256sum -c || exit 1
  install_tools || exit 1
  rm -rf "$Q/src"; mkdir -p "$Q/src" && tar --exclude=./.dq --exclude=./.git -cf - . | tar -C "$Q/src" -xf -
  cd "$Q/src" && check_imports || exit 1
  nvidia-smi -L; lscpu | grep -E "^Model name|^CPU\(s\)"
  echo "corpus: $(find "$Q/corpus" -name '*.py' | wc -l) files, $(du -sm "$Q/corpus" | cut -f1) MB"
  setsid nohup bash distill/scripts/gpu_run_qwen2.sh pipeline > "$Q/pipeline.log" 2>&1 < /dev/null &
  sleep 20; cat "$Q/pipeline.log"
  ;;
pipeline)
  export PYTHONPATH=$Q/site:$Q/src LLAMA_CPP_CONVERTER=$Q/converter PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  START=$(date +%s)
  # Each step is skipped when its output exists, so a fixed script restarts where the last one stopped.
  log "teacher GGUF -> HF folder (fp32, dequantized by transformers)"
  python3 -c "import sys; from pathlib import Path; from bench.export_smollm2 import hf_from_gguf; hf_from_gguf(Path(sys.argv[2]), Path(sys.argv[1]))" "$T" "$TD" || exit 1
  # An H200 (139 GiB) takes twice the micro-batch of an H100 (80 GiB; 54 GiB used at 8 blocks): same 16k tokens a step.
  GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  [ "${GPU_MIB:-0}" -gt 100000 ] && EXTRA_FLAGS="--batch-size 16 --grad-accum 2 ${EXTRA_FLAGS:-}"
  COMMON=(--config "$CFG" --teacher "$TD" ${EXTRA_FLAGS:-})  # EXTRA_FLAGS: e.g. a tiny dry run's sizes
  log "teacher samples on coding prompts, at most $GEN_SECONDS s"
  [ -s "$RUN/data/generated.jsonl" ] || timeout "$GEN_SECONDS" python3 -m distill generate "${COMMON[@]}" --out-dir "$RUN" --generate-n 16384 2>&1 | quiet | tail -3
  log "$(wc -l < "$RUN/data/generated.jsonl") samples"
  DATA=(--data "[\"$Q/corpus\", \"$RUN/data/generated.jsonl\"]" --data-cache "$Q/blocks")
  if [ -z "${STEPS:-}" ]; then
    log "probe: 10 steps (tokenizes the data once for every run)"
    python3 -m distill train "${COMMON[@]}" "${DATA[@]}" --out-dir "$Q/probe" --max-steps 10 --warmup-steps 2 2>&1 | quiet | tail -6
    TOKS=$(python3 -c "import json; print(json.load(open('$Q/probe/history.json'))['runs']['student']['throughput']['tokens_per_s'])")
    rm -rf "$Q/probe/checkpoints"
    # A baseline step costs about 0.6 of a distillation step (no teacher forward, no KL).
    STEPS=$(python3 -c "print(max(50, int($TRAIN_SECONDS / 1.6 * $TOKS / (8 * 4 * 512)) // 10 * 10))")
  fi
  log "student + baseline, $STEPS steps each (probe: ${TOKS:-skipped, STEPS given} tok/s)"
  ( [ -n "${SKIP_EXPORTS:-}" ] && exit  # SKIP_EXPORTS: train and score only, when the lease is short
    while [ ! -f "$RUN/student/tokenizer_config.json" ]; do [ -f "$Q/train.ended" ] && exit; sleep 5; done; sleep 10
    log "export: GGUF (imatrix) and ONNX (HQQ) of the student, while the baseline trains"
    # Both judged on held-out real code (the run's own split), the importance matrix calibrated on training code.
    python3 -m bench.distill_qwen2 texts "$Q/corpus" --out "$Q/texts"
    TEXTS=(--held-out "$Q/texts/heldout.txt")
    timeout 600 python3 -m distill.export_cli "$RUN/student" --target cpu --format gguf --algorithm imatrix --out "$P/imatrix" --name student --threads "$THREADS" "${TEXTS[@]}" --calibration "$Q/texts/calibration.txt" > "$Q/export-gguf.log" 2>&1 &
    timeout 600 python3 -m distill.export_cli "$RUN/student" --target cpu --format onnx --algorithm hqq --out "$P/hqq" --name student --threads "$THREADS" "${TEXTS[@]}" > "$Q/export-onnx.log" 2>&1
    wait; for f in "$Q"/export-gguf.log "$Q"/export-onnx.log; do quiet < "$f" | tail -12; done
    log "exports ended" ) > "$Q/export.log" 2>&1 &
  python3 -m distill train "${COMMON[@]}" "${DATA[@]}" --out-dir "$RUN" --max-steps "$STEPS" --baseline 2>&1 | quiet | tail -30
  log "training ended; waiting for the exports"; touch "$Q/train.ended"
  wait
  cat "$Q/export.log"
  log "done in $(( $(date +%s) - START )) s"; touch "$Q/done"
  ;;
wait)
  LIMIT=${2:-540}; WAITED=0
  while [ ! -f "$Q/done" ] && [ "$WAITED" -lt "$LIMIT" ]; do sleep 10; WAITED=$(( WAITED + 10 )); done
  (cd "$Q" && tar -czf "$OUT/logs.tar.gz" $(ls pipeline.log export*.log 2>/dev/null))
  cp "$RUN"/report.md "$RUN"/report.json "$RUN"/history.json "$OUT/" 2>/dev/null
  [ -d "$P" ] && (cd "$P" && find . -name "report.*" -o -name "manifest.json" | sort | tar -czf "$OUT/packages.tar.gz" -T -)
  head -c 4000 "$RUN/data/generated.jsonl" > "$OUT/generated_sample.jsonl" 2>/dev/null
  quiet < "$Q/pipeline.log" | tail -40; for f in "$Q"/export-*.log; do [ -f "$f" ] && quiet < "$f" | tail -4; done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  ;;
bring)
  # Callable once the GGUF package is complete (its manifest is written last), while the ONNX export still runs.
  N=${2:?call number}; PKG=$P/imatrix/student-cpu-gguf; WAITED=0
  while [ ! -f "$PKG/manifest.json" ] && [ "$WAITED" -lt "${3:-500}" ]; do sleep 5; WAITED=$(( WAITED + 5 )); done
  G=$(ls "$PKG"/*.gguf | head -1) || { tail -5 "$Q/export-gguf.log"; exit 1; }
  [ -f "$Q/gguf.pieces" ] || { split -b 15M -d -a 3 "$G" "$Q/gguf.piece." && ls "$Q"/gguf.piece.* > "$Q/gguf.pieces"; }
  sed -n "$(( N * 4 + 1 )),$(( N * 4 + 4 ))p" "$Q/gguf.pieces" | xargs -r cp -t "$OUT/"  # a call returns about 64 MiB
  [ "$N" = 0 ] && cp "$PKG"/manifest.json "$PKG"/report.* "$OUT/" 2>/dev/null
  echo "$(basename "$G"): $(wc -l < "$Q/gguf.pieces") pieces, $(( ($(wc -l < "$Q/gguf.pieces") + 3) / 4 )) calls; this one: $(ls "$OUT" | tr '\n' ' ')"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
