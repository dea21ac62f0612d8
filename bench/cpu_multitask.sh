#!/usr/bin/env bash
# The multi-task CPU benchmark: bench/cpu_multitask.toml (ResNet-18 width, 128 px, synthetic
# data) trained with all three tasks, then with each task alone (the single-task baselines),
# each scored on the held-out split; prints every run's metrics, training time and the
# multi-task delta (mean relative change of accuracy, AP50 and mIoU over the baselines).
# Usage: bench/cpu_multitask.sh [multi|cls|det|seg ...]  (default: all four). Needs a release
# build (cargo build --release). Results: runs/bench-multitask/<run>.{json,log}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench-multitask
mkdir -p "$out"
runs=("$@")
[[ ${#runs[@]} -gt 0 ]] || runs=(multi cls det seg)
for run in "${runs[@]}"; do
    case $run in
        multi) off=() ;;
        cls) off=(detection segmentation) ;;
        det) off=(classification segmentation) ;;
        seg) off=(classification detection) ;;
        *) echo "unknown run '$run' (multi, cls, det or seg)" >&2; exit 2 ;;
    esac
    sets=()
    for task in "${off[@]}"; do sets+=(--set "tasks.$task=false"); done
    echo "== $run: $(date -u +%FT%TZ)" >&2
    start=$(date +%s)
    ./target/release/worker train --standalone --config bench/cpu_multitask.toml "${sets[@]}" --json \
        > "$out/$run.json" 2> >(tee "$out/$run.log" | grep --line-buffered -E 'step=|evaluated' >&2)
    echo "   $run: $(( $(date +%s) - start )) s wall, $(grep -o 'train_seconds="[0-9.]*"' "$out/$run.log")" >&2
done
python3 - "$out" <<'PY'
import json, os, sys
def load(run):
    path = os.path.join(sys.argv[1], f"{run}.json")
    return json.load(open(path)) if os.path.exists(path) else {}
multi = load("multi")
rows = [("cls", "accuracy"), ("det", "AP50"), ("det", "AP"), ("seg", "mIoU")]
change = {}
print(f"{'metric':10} {'multi-task':>10} {'alone':>10} {'change':>8}")
for run, key in rows:
    m, a = multi.get(key), load(run).get(key)
    if m is not None and a:
        change[key] = (m - a) / a
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    shown = f"{100 * change[key]:+.1f}%" if key in change else ""
    print(f"{key:10} {fmt(m):>10} {fmt(a):>10} {shown:>8}")
for det in ("AP50", "AP"):
    keys = ("accuracy", det, "mIoU")
    if all(k in change for k in keys):
        delta = sum(change[k] for k in keys) / 3
        print(f"multi-task delta over accuracy, {det}, mIoU: {100 * delta:+.2f}%")
PY
