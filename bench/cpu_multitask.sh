#!/usr/bin/env bash
# The multi-task CPU benchmark: bench/cpu_multitask.toml (ResNet-18 width, 128 px, synthetic
# data) trained with all three tasks, then with each task alone (the single-task baselines),
# each scored on the held-out split; prints every run's metrics, training time and the
# multi-task delta (mean relative change of accuracy, AP50 and mIoU over the baselines).
# Usage: bench/cpu_multitask.sh [multi|cls|det|seg ...]  (default: all four; `multi-uncertainty`,
# `multi-dwa`, ... train all tasks with that weighting.strategy). Needs a release
# build (cargo build --release). Results: runs/bench-multitask/<run>.{json,log}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench-multitask
mkdir -p "$out"
runs=("$@")
[[ ${#runs[@]} -gt 0 ]] || runs=(multi cls det seg)
for run in "${runs[@]}"; do
    sets=()
    case $run in
        multi) off=() ;;
        multi-*) off=(); sets=(--set "weighting.strategy=${run#multi-}") ;;
        cls) off=(detection segmentation) ;;
        det) off=(classification segmentation) ;;
        seg) off=(classification detection) ;;
        *) echo "unknown run '$run' (multi, multi-<weighting strategy>, cls, det or seg)" >&2; exit 2 ;;
    esac
    for task in "${off[@]}"; do sets+=(--set "tasks.$task=false"); done
    echo "== $run: $(date -u +%FT%TZ)" >&2
    start=$(date +%s)
    # Each run starts from scratch: its own, emptied checkpoint directory.
    rm -rf "$out/$run.checkpoints"
    sets+=(--set "checkpoint.dir=$out/$run.checkpoints")
    ./target/release/worker train --standalone --config bench/cpu_multitask.toml "${sets[@]}" --json \
        > "$out/$run.json" 2> >(tee "$out/$run.log" | grep --line-buffered -E 'step=|evaluated' >&2)
    echo "   $run: $(( $(date +%s) - start )) s wall, $(grep -o 'train_seconds="[0-9.]*"' "$out/$run.log")" >&2
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(run):
    """A run's metrics; {} when it has not finished (or failed: see its .log)."""
    try:
        return json.load(open(os.path.join(out, f"{run}.json")))
    except (OSError, ValueError):
        return {}
keys = {"accuracy": "cls", "AP50": "det", "AP": "det", "mIoU": "seg"}
alone = {key: load(run).get(key) for key, run in keys.items()}
fmt = lambda v: "-" if v is None else f"{v:.4f}"
print(f"{'run':18} " + " ".join(f"{k:>16}" for k in keys))
print(f"{'alone':18} " + " ".join(f"{fmt(alone[k]):>16}" for k in keys))
for path in sorted(glob.glob(os.path.join(out, "multi*.json")), key=lambda p: (not p.endswith("multi.json"), p)):
    run = os.path.basename(path)[:-5]
    multi = load(run)
    change = {k: (multi[k] - alone[k]) / alone[k] for k in keys if multi.get(k) is not None and alone[k]}
    cells = [fmt(multi.get(k)) + (f" ({100 * change[k]:+.1f}%)" if k in change else "") for k in keys]
    print(f"{run:18} " + " ".join(f"{c:>16}" for c in cells))
    for det in ("AP50", "AP"):
        if all(k in change for k in ("accuracy", det, "mIoU")):
            delta = sum(change[k] for k in ("accuracy", det, "mIoU")) / 3
            print(f"{'':18} multi-task delta over accuracy, {det}, mIoU: {100 * delta:+.2f}%")
PY
