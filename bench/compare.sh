#!/usr/bin/env bash
# Ours against PyTorch on this machine, side by side in one run: training images/s of the same
# multi-task network (bench/torch_reference.py is the replica; same layers, parameter names,
# losses, optimizer, batch, image size and thread count) for one CPU worker vs PyTorch eager and
# two CPU workers (coordinator + 2 `worker run`) vs PyTorch DDP over gloo (2 processes), for the
# tiny model (bench/throughput.toml) and the ResNet-18-width model (bench/cpu_multitask.toml);
# then ring all-reduce bus bandwidth (`worker collective-bench`) vs torch.distributed gloo
# all_reduce, 2 and 3 processes, 4-256 MiB. Every row alternates ours and PyTorch for ROUNDS
# rounds (which goes first alternates too) and reports medians, the ratio ours/PyTorch (above 1
# means ours is faster) and the peak RSS of each process (/usr/bin/time).
#
# Ours trains from PNG files (decode + augmentation in a loader thread, included in its
# images/s); the replica trains on pre-made batches in memory. Threads: one worker and PyTorch
# eager get OMP_NUM_THREADS = cores; with two processes each gets cores / 2.
#
# Usage: bench/compare.sh [ROWS...]   rows: tiny1 tiny2 r18-1 r18-2 ring (default: all)
#   ROUNDS=3  TIMEOUT=300  WORKER=./target/release/worker  COORDINATOR=./target/release/coordinator
#   OURS_SET="comm.overlap=false ..."   extra `--set KEY=VALUE` for our side only (an ablation)
# Needs a release build and the project venv (.venv, scripts/setup.sh). Results: a table on
# stdout; raw lines in runs/bench-compare/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORKER:-./target/release/worker}
C=${COORDINATOR:-./target/release/coordinator}
PY=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-3}
TIMEOUT=${TIMEOUT:-300}   # seconds a run may take; a run past it is recorded as null
CORES=${CORES:-$(nproc)}
HALF=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
ROWS=("${@:-tiny1 tiny2 r18-1 r18-2 ring}")
ROWS=(${ROWS[*]})
OURS=()
for kv in ${OURS_SET:-}; do OURS+=(--set "$kv"); done
[[ -n ${OURS_SET:-} ]] && echo "compare: ours with --set $OURS_SET" >&2
OUT=runs/bench-compare
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
for f in "$W" "$C" "$PY"; do [[ -x $f ]] || { echo "compare: $f is missing (cargo build --release; scripts/setup.sh)" >&2; exit 1; }; done

# Per model: job file, data overrides, warm-up steps, timed steps, log interval (= warm-up: the
# first logged interval is the warm-up, the later ones are timed).
model_args() {
    case $1 in
    tiny) JOB=bench/throughput.toml; WARM=20; TIMED=60
          DATA=(--set data.train=$OUT/data-tiny) ;;
    r18)  JOB=bench/cpu_multitask.toml; WARM=5; TIMED=20
          DATA=(--set data.train=$OUT/data-r18 --set data.synthetic_n=1024 --set data.synthetic_val_fraction=0.02) ;;
    esac
    STEPS=(--set train.steps=$((WARM + TIMED)) --set train.log_every_steps=$WARM --set train.eval_every_steps=0
           --set train.warmup_steps=0)
}

record() { echo "$1" >> "$RESULTS"; }
rss() { local v; v=$(grep -o '^[0-9]*$' "$tmp/rss.$1" 2>/dev/null | tail -1); echo "${v:-null}"; }

# Images/s over the logged intervals after the first: images / total seconds (each interval
# holds the same number of images, so that is the harmonic mean of the logged rates).
timed_rate() {
    grep -o 'images_per_s="\?[0-9.]*' | grep -o '[0-9.]*$' | tail -n +2 \
        | awk '{ s += 1 / $1; n++ } END { if (n) printf "%.2f", n / s; else print "null" }'
}

ours_1() { # model
    model_args "$1"
    rm -rf "$tmp/ckpt"
    OMP_NUM_THREADS=$CORES timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.w0" \
        "$W" train --standalone --config "$JOB" "${DATA[@]}" "${STEPS[@]}" ${OURS[@]+"${OURS[@]}"} \
        --set checkpoint.dir="$tmp/ckpt" 2> "$tmp/ours.log" > /dev/null || true
    local rate; rate=$(timed_rate < "$tmp/ours.log")
    record "{\"row\":\"$1 1 worker\",\"side\":\"ours\",\"images_per_s\":$rate,\"rss_kb\":[$(rss w0)],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
}

torch_1() {
    model_args "$1"
    local json
    json=$(OMP_NUM_THREADS=$CORES timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.t0" \
        "$PY" bench/torch_reference.py train --config "$JOB" "${STEPS[@]}" --threads "$CORES" \
        --warmup-steps "$WARM" --steps "$TIMED" 2> "$tmp/torch.log") || true
    local rate; rate=$(echo "$json" | grep -o '"images_per_s": [0-9.]*' | grep -o '[0-9.]*$' || true)
    record "{\"row\":\"$1 1 worker\",\"side\":\"pytorch\",\"images_per_s\":${rate:-null},\"rss_kb\":[$(rss t0)],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
}

ours_2() {
    model_args "$1"
    rm -f "$tmp/addr"
    timeout "$TIMEOUT" "$C" serve --config "$JOB" "${DATA[@]}" "${STEPS[@]}" ${OURS[@]+"${OURS[@]}"} \
        --set rendezvous.min_workers=2 --set train.batch_size=16 --set server.state_db="$tmp/state-$RANDOM.db" \
        --set server.metrics_file="$tmp/metrics.jsonl" --set checkpoint.dir="$tmp/ckpt-$RANDOM" \
        --addr-file "$tmp/addr" > "$tmp/coord.log" 2>&1 &
    local coord=$!
    pids+=("$coord")
    for _ in $(seq 200); do [[ -s "$tmp/addr" ]] && break; sleep 0.05; done
    local ws=()
    for i in 0 1; do
        OMP_NUM_THREADS=$HALF timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.w$i" "$W" run --coordinator "http://$(cat "$tmp/addr")" \
            --token-file "$(dirname "$tmp/state.db")/token" --worker-id "w$i" 2> "$tmp/w$i.log" &
        ws+=("$!")
    done
    wait "${ws[@]}" "$coord" || true
    local rate; rate=$(timed_rate < "$tmp/coord.log")
    record "{\"row\":\"$1 2 workers\",\"side\":\"ours\",\"images_per_s\":$rate,\"rss_kb\":[$(rss w0),$(rss w1)],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
}

torch_2() {
    model_args "$1"
    local port=$((20000 + RANDOM % 20000)) ps=()
    for r in 0 1; do
        RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=$HALF \
            timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.t$r" "$PY" bench/torch_reference.py train --config "$JOB" \
            "${STEPS[@]}" --threads "$HALF" --set train.batch_size=16 --warmup-steps "$WARM" --steps "$TIMED" \
            > "$tmp/torch$r.out" 2> "$tmp/torch$r.log" &
        ps+=("$!")
    done
    wait "${ps[@]}" || true
    local rate; rate=$(grep -o '"images_per_s": [0-9.]*' "$tmp/torch0.out" | grep -o '[0-9.]*$' || true)
    record "{\"row\":\"$1 2 workers\",\"side\":\"pytorch\",\"images_per_s\":${rate:-null},\"rss_kb\":[$(rss t0),$(rss t1)],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
}

ours_ring() { # world size
    local n=$1 base=$((40000 + RANDOM % 10000)) ps=()
    local peers; peers=$(seq -s, -f "127.0.0.1:%g" "$base" "$((base + n - 1))")
    for r in $(seq 1 $((n - 1))); do
        timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.r$r" "$W" collective-bench --rank "$r" --peers "$peers" \
            --sizes-mib 4,16,64,256 --iterations 5 > /dev/null &
        ps+=("$!")
    done
    timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.r0" "$W" collective-bench --rank 0 --peers "$peers" \
        --sizes-mib 4,16,64,256 --iterations 5 > "$tmp/ring.out"
    wait "${ps[@]}"
    local r; r=$(for i in $(seq 0 $((n - 1))); do rss "r$i"; done | paste -sd,)
    while read -r line; do
        record "{\"row\":\"all-reduce $n processes\",\"side\":\"ours\",\"result\":$line,\"rss_kb\":[$r],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
    done < <(grep '^{' "$tmp/ring.out" || true)
}

torch_ring() {
    local n=$1 port=$((20000 + RANDOM % 20000)) ps=()
    for r in $(seq 0 $((n - 1))); do
        RANK=$r WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 \
            timeout "$TIMEOUT" /usr/bin/time -f %M -o "$tmp/rss.g$r" "$PY" bench/torch_reference.py allreduce \
            --sizes-mib 4,16,64,256 --iterations 5 > "$tmp/gloo$r.out" 2> "$tmp/gloo$r.log" &
        ps+=("$!")
    done
    wait "${ps[@]}"
    local r; r=$(for i in $(seq 0 $((n - 1))); do rss "g$i"; done | paste -sd,)
    while read -r line; do
        record "{\"row\":\"all-reduce $n processes\",\"side\":\"pytorch\",\"result\":$line,\"rss_kb\":[$r],\"load\":\"$(cut -d' ' -f1 /proc/loadavg)\"}"
    done < <(grep '^{' "$tmp/gloo0.out" || true)
}

run_row() { # row, side
    case $1 in
    tiny1) "${2}_1" tiny ;;
    tiny2) "${2}_2" tiny ;;
    r18-1) "${2}_1" r18 ;;
    r18-2) "${2}_2" r18 ;;
    ring) "${2}_ring" 2; "${2}_ring" 3 ;;
    *) echo "compare: unknown row $1 (tiny1 tiny2 r18-1 r18-2 ring)" >&2; exit 2 ;;
    esac
}

echo "compare: $(date -u '+%F %T') UTC, $CORES cores, rounds $ROUNDS, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# Datasets and page cache first, outside the timing.
for row in "${ROWS[@]}"; do
    case $row in
    tiny*) model_args tiny ;;
    r18*) model_args r18 ;;
    *) continue ;;
    esac
    [[ -f ${DATA[1]#data.train=}/dataset.json ]] || "$W" train --standalone --config "$JOB" "${DATA[@]}" \
        --set train.steps=1 --set train.warmup_steps=0 --set checkpoint.dir="$tmp/warm-$RANDOM" \
        > /dev/null 2> "$tmp/warm.log" || { cat "$tmp/warm.log" >&2; exit 1; }
done
for round in $(seq 1 "$ROUNDS"); do
    for row in "${ROWS[@]}"; do
        if (( round % 2 )); then sides=(ours torch); else sides=(torch ours); fi
        for side in "${sides[@]}"; do
            echo "compare: round $round, $row, $side (load $(cut -d' ' -f1 /proc/loadavg))" >&2
            run_row "$row" "$side"
        done
    done
done
"$PY" - "$RESULTS" "$CORES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cores = int(sys.argv[2])
def med(xs):
    return statistics.median(xs) if xs else float("nan")
def rss(side):
    per = [max(k for k in r["rss_kb"] if k is not None) / 1024 for r in side if any(r["rss_kb"])]
    return f"{med(per):.0f}"
loads = [float(r["load"]) for r in rows]
print(f"load average (1 min) during the rows: {min(loads):.1f}-{max(loads):.1f}, median {med(loads):.1f}")
if med(loads) > cores + 1:
    print(f"warning: other work kept more than {cores} threads runnable; OpenMP teams that spin (PyTorch's and ours)"
          " lose most of their speed then, so these ratios say little (docs/PERFORMANCE.md)")
print(f"| row | ours | PyTorch | ours / PyTorch | rounds | peak RSS per process, MiB (ours / PyTorch) |")
print("|---|---:|---:|---:|---:|---:|")
names = list(dict.fromkeys(r["row"] for r in rows))
for name in names:
    ours = [r for r in rows if r["row"] == name and r["side"] == "ours"]
    theirs = [r for r in rows if r["row"] == name and r["side"] == "pytorch"]
    if "result" in (ours or theirs or [{}])[0]:
        for size in sorted({r["result"]["size_bytes"] for r in ours + theirs}):
            o = med([r["result"]["busbw_gbs"] for r in ours if r["result"]["size_bytes"] == size])
            t = med([r["result"]["busbw_gbs"] for r in theirs if r["result"]["size_bytes"] == size])
            n = len([r for r in ours if r["result"]["size_bytes"] == size])
            print(f"| {name}, {size >> 20} MiB, bus GB/s | {o:.2f} | {t:.2f} | **{o / t:.2f}x** | {n} | {rss(ours)} / {rss(theirs)} |")
    else:
        o = med([r["images_per_s"] for r in ours if r["images_per_s"] is not None])
        t = med([r["images_per_s"] for r in theirs if r["images_per_s"] is not None])
        print(f"| {name}, images/s | {o:.1f} | {t:.1f} | **{o / t:.2f}x** | {len(ours)} | {rss(ours)} / {rss(theirs)} |")
EOF
