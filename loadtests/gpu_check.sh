#!/usr/bin/env bash
# Every GPU question of issue 19 in one bounded run on a lent NVIDIA machine (one H200, 16
# cores, python3 with torch but without the service's web packages, no internet):
#
#   make gpu-wheels                  # here: the missing packages as wheels in .whl/
#   bash loadtests/gpu_check.sh      # there, with .whl carried along; OUT=out/gpu
#   bash loadtests/gpu_check.sh --dry-run   # anywhere: CPU, tiny models, about a minute
#
# Steps, each under its own timeout and all inside GPU_CHECK_BUDGET_S (400 s, ~7 minutes
# with the summary); a failing step is recorded and the next one runs:
#   wheels      .whl/*.whl into /tmp/site, put first on PYTHONPATH
#   nvidia-smi  the card, driver, clocks (again after the load)
#   env         Python, torch, CUDA, cuDNN, driver; the service imports
#   tests       the tests marked gpu, every file that has one, named by file
#   parity      fp16 and bf16 against fp32, ViT-B/32 and ViT-L/14 at real size
#   syncs       host syncs per image and text batch (torch's sync-debug mode)
#   oom         an image batch that cannot fit, through the backend's OOM path, and after
#   raw         eager fp16 images/s at batch 1..1024 and texts/s at 64..1024
#   graphs, preprocess, graphs_l14   loadtests/bench_gpu_parts.py (CUDA graphs, decoding)
#   service     the server under load from two client processes (loadtests/gpu_load.py),
#               as configured and again with CLIP_PREPROCESS=device CLIP_CUDA_GRAPHS=true
#   goal        issue 18's goal, open loop: the real model on CLIP_PROCESSES=4 (or
#               GPU_GOAL_PROCESSES) with JPEGs decoded on the device and CUDA graphs,
#               Poisson arrivals of 5,000 images/s (64 a request, multipart and JSON) and
#               20,000 texts/s; each phase PASS when all is answered with p99 <= 100 ms
#               (~100 s; alone: GPU_CHECK_STEPS=env,goal)
#   processes   the serving layer's own ceiling (loadtests/ceiling.py, null engine) with
#               CLIP_PROCESSES=1, 4 and 8: multipart images and 64-text requests (~150 s)
#
# At most 8 files land in $OUT, no folders: summary.md (printed at the end too), log.txt
# (everything printed), nvidia-smi.txt, tests.txt, probe.json, parts.json, service.json,
# server.log. Exit status 0 when every step passed or was skipped, else 1.
#
# PY picks the interpreter (python3). GPU_SERVER_ENV adds server settings to the service
# step, e.g. GPU_SERVER_ENV="CLIP_MAX_WAIT_MS=2 CLIP_STREAMS=2". GPU_CHECK_STEPS runs only
# the steps it names, and the wheels (a rerun): GPU_CHECK_STEPS=env,service.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-out/gpu}
PY=${PY:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-400}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUT"
rm -f "$OUT"/{summary.md,log.txt,nvidia-smi.txt,tests.txt,probe.json,parts.json,service.json,server.log}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/log.txt") 2>&1
TEE=$!
T0=$SECONDS
echo "gpu_check: $(date -u +%FT%TZ), dry run $DRY, budget ${BUDGET_S}s, $(nproc) cores, $($PY --version 2>&1)"

# step NAME CAP COMMAND...: COMMAND under `timeout`, at most CAP seconds and what the
# budget has left; its status, exit code and seconds go to steps.tsv.
step() {
    local name=$1 cap=$2
    shift 2
    if [[ $name != wheels && -n ${GPU_CHECK_STEPS:-} && ,$GPU_CHECK_STEPS, != *,$name,* ]]; then
        skip "$name" "not in GPU_CHECK_STEPS"
        return
    fi
    local left=$((BUDGET_S - (SECONDS - T0) - 5))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        skip "$name" "out of time (budget ${BUDGET_S}s)"
        return
    fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - T0))s): $*"
    local start=$SECONDS rc status note=""
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$WORK/step.out"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    if [[ $status != ok ]]; then # its last words, for the summary
        note=$(grep -v '^\s*$' "$WORK/step.out" | tail -1 | tr '\t|' '  ' | cut -c1-200)
    fi
    echo "=== $name: $status (exit $rc, $((SECONDS - start))s)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$note" >>"$WORK/steps.tsv"
}

skip() {
    echo "=== $1: SKIP ($2)"
    printf '%s\tSKIP\t-\t0\t%s\n' "$1" "$2" >>"$WORK/steps.tsv"
}

smi() {
    {
        echo "## $1"
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv
    } >>"$OUT/nvidia-smi.txt" 2>&1
}

export -f smi
export OUT PY WORK

if ((DRY)); then
    SIZE=(--dry-run)
    skip wheels "dry run: this Python has the packages"
    skip nvidia-smi "dry run: no GPU"
else
    SIZE=()
    if compgen -G ".whl/*.whl" >/dev/null; then
        step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        skip wheels "no .whl/*.whl: run make gpu-wheels here and carry .whl"
    fi
    step nvidia-smi 30 bash -c 'smi "before the run"'
fi

step env 60 "$PY" loadtests/gpu_probe.py env --json "$WORK/env.json" "${SIZE[@]}"

# Only the files with gpu-marked tests: collecting the whole suite would import reference
# packages (open_clip, schemathesis, ...) that the GPU machine does not have.
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'mark\.gpu\b' tests | sort)
echo "gpu-marked test files: ${GPU_TESTS[*]}"
step tests 120 bash -c '"$PY" -m pytest -v -rA -p no:cacheprovider -m gpu "$@" 2>&1 | tee "$OUT/tests.txt"' \
    tests "${GPU_TESTS[@]}"

step parity 60 "$PY" loadtests/gpu_probe.py parity --json "$WORK/parity.json" "${SIZE[@]}"
step syncs 45 "$PY" loadtests/gpu_probe.py syncs --json "$WORK/syncs.json" "${SIZE[@]}"
step oom 50 "$PY" loadtests/gpu_probe.py oom --json "$WORK/oom.json" "${SIZE[@]}"
step raw 80 "$PY" loadtests/gpu_probe.py raw --json "$WORK/raw.json" --budget-s 65 "${SIZE[@]}"

PARTS=loadtests/bench_gpu_parts.py
if [[ -f $PARTS ]]; then
    if ((DRY)); then
        step graphs 40 "$PY" "$PARTS" graphs --tiny --device cpu --dtype fp32 --batches 1,2 \
            --json "$WORK/graphs.json"
        step preprocess 40 "$PY" "$PARTS" preprocess --tiny --device cpu --threads 1,2 \
            --images 8 --json "$WORK/preprocess.json"
    else
        step graphs 75 "$PY" "$PARTS" graphs --model ViT-B-32 --device cuda --dtype fp16 \
            --batches 1,8,32,64,128,256,512,1024 --json "$WORK/graphs.json"
        step preprocess 60 "$PY" "$PARTS" preprocess --device cuda --threads 1,2,4,8,16 \
            --images 256 --json "$WORK/preprocess.json"
    fi
else
    skip graphs "$PARTS is missing"
    skip preprocess "$PARTS is missing"
fi

SERVER_ENV=()
for kv in ${GPU_SERVER_ENV:-}; do SERVER_ENV+=(--server-env "$kv"); done
# Three servers: the settings as given through every phase, then through the image phases
# with JPEGs decoded at reduced scale in the decode pool (fast/...), and with JPEGs decoded
# on the device and the image tower as CUDA graphs (device/...).
DEVICE_VARIANT=(--variant "fast:CLIP_PREPROCESS=fast"
                --variant "device:CLIP_PREPROCESS=device,CLIP_CUDA_GRAPHS=true"
                --variant-phases image64_multipart,image64_json)
if ((DRY)); then
    step service 90 "$PY" loadtests/gpu_load.py --json "$OUT/service.json" \
        --server-log "$OUT/server.log" --device cpu --dtype fp32 --images 4 --clients 2 \
        --image-concurrency 1 --text1-concurrency 2 --duration 1 --warmup 0.5 \
        --prepare-workers 2 --max-batch-size 16 "${SERVER_ENV[@]}" "${DEVICE_VARIANT[@]}"
else
    step service 200 "$PY" loadtests/gpu_load.py --json "$OUT/service.json" \
        --server-log "$OUT/server.log" --model ViT-B-32 --device cuda --dtype fp16 \
        --clients 2 --duration 8 --warmup 2 "${SERVER_ENV[@]}" "${DEVICE_VARIANT[@]}"
    step nvidia-smi-after 20 bash -c 'smi "after the load"'
fi

# Issue 18's goal end to end: the real model, several processes, device decoding, open
# loop at the goal's rates. CLIP_PREPARE_WORKERS is per process: 3 each leaves 4 of the
# 16 cores to the event loops and serving threads; the pools only read JPEG headers and
# decode base64 here (the JPEGs themselves are decoded on the device). The step's report
# and server log stay in $WORK (the 8 files are spoken for): the report reaches
# probe.json and summary.md, the log's tail log.txt when the step fails.
GOAL_ENV=(--server-env CLIP_PREPROCESS=device --server-env CLIP_CUDA_GRAPHS=true)
if ((DRY)); then
    step goal 90 bash -c '"$PY" loadtests/gpu_load.py --json "$WORK/goal.json" \
            --server-log "$WORK/goal-server.log" --device cpu --dtype fp32 --images 4 \
            --clients 2 --duration 1.5 --warmup 0.5 --prepare-workers 1 --max-batch-size 16 \
            --server-env CLIP_PROCESSES=2 "$@" --phases image64_multipart,text64 \
            --open image64_multipart=40 --open text64=80 --p99-ms 5000 \
            --max-lag-ms 1000 ||
        { tail -n 40 "$WORK/goal-server.log"; exit 1; }' goal "${GOAL_ENV[@]}"
else
    step goal 150 bash -c '"$PY" loadtests/gpu_load.py --json "$WORK/goal.json" \
            --server-log "$WORK/goal-server.log" --model ViT-B-32 --device cuda \
            --dtype fp16 --clients 4 --duration 8 --warmup 2 --prepare-workers 3 \
            --server-env CLIP_PROCESSES="${GPU_GOAL_PROCESSES:-4}" "$@" \
            --phases image64_multipart,image64_json,text64 --open image64_multipart=5000 \
            --open image64_json=5000 --open text64=20000 --p99-ms 100 ||
        { tail -n 40 "$WORK/goal-server.log"; exit 1; }' goal "${GOAL_ENV[@]}"
fi

# Several server processes on one port (CLIP_PROCESSES): the null engine's ceiling with 1,
# 4 and 8 processes, each run bounded; the tables land in log.txt, the reports in $WORK.
CEILING_PHASES=images-multipart/base64,texts64/base64
if ((DRY)); then
    step processes 90 "$PY" loadtests/ceiling.py --quick --processes 2 \
        --phases images-multipart/base64,texts16/base64 --json "$WORK/ceiling_p2.json"
else
    step processes 150 bash -c 'for n in 1 4 8; do
            echo "--- CLIP_PROCESSES=$n"
            timeout -k 5 48 "$PY" loadtests/ceiling.py --processes "$n" --phases "$1" \
                --clients 6 --image-concurrency 4 --text-concurrency 8 --warmup 1 \
                --duration 4 --json "$WORK/ceiling_p$n.json" || exit 1
        done' processes "$CEILING_PHASES"
fi

# Last and first to go when time is short: ViT-L/14 with graphs.
if [[ -f $PARTS ]] && ((!DRY)); then
    step graphs_l14 60 "$PY" "$PARTS" graphs --model ViT-L-14 --device cuda --dtype fp16 \
        --batches 1,8,32,64,128,256,512,1024 --json "$WORK/graphs_l14.json"
fi

# The summary: first a plain table from bash, then the full one if the reporter runs.
{
    echo "# GPU check (dry run $DRY), $(date -u +%FT%TZ), $((SECONDS - T0)) s"
    echo
    echo "| step | status | exit | s | note |"
    echo "|---|---|---:|---:|---|"
    while IFS=$'\t' read -r name status rc secs note; do
        echo "| $name | $status | $rc | $secs | $note |"
    done <"$WORK/steps.tsv"
} >"$OUT/summary.md"
timeout 30 "$PY" loadtests/gpu_report.py --steps "$WORK/steps.tsv" --work "$WORK" --out "$OUT" \
    --title "GPU check (dry run $DRY), $(date -u +%FT%TZ), $((SECONDS - T0)) s" ||
    echo "gpu_report.py failed: summary.md has the plain table only"
echo
cat "$OUT/summary.md"

failed=$(cut -f2 "$WORK/steps.tsv" | grep -cvE '^(ok|SKIP)$')
echo "gpu_check: $failed step(s) failed, $((SECONDS - T0)) s"
exec >&- 2>&-
wait "$TEE"
((failed == 0))
