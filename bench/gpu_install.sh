#!/usr/bin/env bash
# The air-gapped installer on a CUDA machine (the lent H200): install.sh --gpu builds llama-cpp-python
# with CUDA from the bundle's sdist, the installed service answers, and llama.cpp runs on the GPU.
#
# The bundle is built here (appliance bundle --no-prebuilt-llama) and split into parts of 52 MB, one per
# ignored folder .gpu/install/pN/ (a call carries at most 64 MiB); the machine keeps /tmp between calls.
#   part      copy the carried part(s) into /tmp/gi
#   install   join the parts, verify and install with --gpu --no-systemd, then report
#   report    serve the installed prefix, chat, and record the run (bench/results.py) in $OUT/results/gpu_install/runs/:
#             copy that folder into bench/results/gpu_install/runs/ and run `python -m bench.results`
# BENCH_COMMIT names the commit the bundle was built from (the machine's copy of the tree has no git).
set -euo pipefail
stage=${1:?usage: bench/gpu_install.sh part|install|report}
work=/tmp/gi
mkdir -p "$work"

case "$stage" in
part)
    cp .gpu/install/p*/bundle.tar.part* "$work/"
    ls -la "$work"
    ;;
install)
    : "${OUT:?}"
    cat "$work"/bundle.tar.part* > "$work/bundle.tar"
    tar xf "$work/bundle.tar" -C "$work"
    bundle=$(ls -d "$work"/appliance-*/)
    start=$(date +%s)
    sh "$bundle/install.sh" --gpu --no-systemd --prefix "$work/prefix" > "$work/install.log" 2>&1 || {
        tail -n 60 "$work/install.log"; cp "$work/install.log" "$OUT/"; exit 1; }
    echo "$(( $(date +%s) - start ))" > "$work/install.seconds"
    exec bash "$0" report
    ;;
report)
    report=$work/report.md
    venv=$work/prefix/venv
    APPLIANCE_HOME=$work/prefix/data "$venv/bin/appliance" serve --port 8099 > "$work/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do curl -sf http://127.0.0.1:8099/readyz > /dev/null && break; sleep 1; done
    for i in 1 2 3; do
        curl -sf http://127.0.0.1:8099/v1/chat/completions -H 'Content-Type: application/json' \
            -d '{"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 64, "temperature": 0}' \
            > "$work/chat$i.json"
    done
    curl -sf http://127.0.0.1:8099/v1/models > "$work/models.json"
    gpu_apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader || true)
    kill "$pid"; wait "$pid" || true
    rows=$(APPLIANCE_HOME=$work/prefix/data "$venv/bin/appliance" logs --json -n 3)
    {
        echo "# The air-gapped installer with --gpu on an H200 ($(date -u +%Y-%m-%d))"
        echo
        echo "\`install.sh --gpu --no-systemd\` from a bundle built by \`appliance bundle --no-prebuilt-llama\`"
        echo "(llama-cpp-python compiled on the box from the bundled sdist), run by \`bench/gpu_install.sh\`."
        echo
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
        echo "- install (verify, venv, CUDA build of llama-cpp-python, model, config): $(cat "$work/install.seconds") s"
        echo "- llama-cpp-python build: $(grep -o 'building llama-cpp-python.*' "$work/install.log" | head -n 1 || echo 'see install.log')"
        echo "- the runner's GPU use while serving: ${gpu_apps:-none seen}"
        echo "- what the service reports of its engine (GET /v1/models): $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["data"][0]["appliance"])' "$work/models.json")"
        echo "- the answer: $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["choices"][0]["message"]["content"][:200])' "$work/chat1.json")"
        echo "- the log rows (status, completion tokens, tokens/s):"
        echo "$rows" | python3 -c 'import json, sys
for r in json.load(sys.stdin): print("  - status %s, %s tokens, %.0f tok/s" % (r["status"], r["completion_tokens"], r["tokens_per_s"]))'
        echo
        echo "install.sh's output, the end:"
        echo '```'
        tail -n 15 "$work/install.log"
        echo '```'
    } > "$report"
    cp "$work/install.log" "$work/serve.log" "${OUT:?}/"  # to read there, not to commit
    cat "$report"
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    python3 -m bench.results --root "$OUT/results" record gpu_install --report "$report" --input "$work/bundle.tar" \
        --command "bench/gpu_install.sh part, install, report" \
        --about "The air-gapped installer with --gpu on a lent GPU machine: offline CUDA build, the service on the GPU" \
        --goal "install.sh --gpu builds llama.cpp with CUDA offline and the installed service serves (issue 15)" \
        --figure "install in $(cat "$work/install.seconds") s on $gpu; the runner's GPU use: ${gpu_apps:-none seen}"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
