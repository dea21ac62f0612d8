#!/usr/bin/env bash
# Our training step against PyTorch's on the same GPU (issue 10, "On a GPU machine"): the same
# multi-task network (bench/gpu_compare.toml; bench/torch_reference.py is the replica with the same
# layers and parameter names), the same batch and image size, batches pre-loaded on the device.
# Rows, per size (batch 64 at 128 px, batch 128 at 224 px):
#   ours fp32 / bf16 / bf16+cl    `worker bench-step` (train.precision, train.channels_last)
#   ours bf16(+cl)+graphs         the same with train.cuda_graphs (on CUDA only)
#   torch eager fp32              the replica, eager (PyTorch's defaults: tf32 convolutions)
#   torch eager bf16+cl           autocast(bfloat16) + channels_last
#   torch compile bf16+cl         the same with torch.compile of forward, targets and losses
# ms/step is the mean over the timed steps (warm-up excluded; the clock stops after the device
# finished); "vs compile" = compile's ms / this row's ms (above 1: faster than torch.compile).
# Then ours end to end: `worker train --standalone` on generated PNG files (decode, augmentation,
# loader and copies included), images/s over the logged intervals after the first.
#
# On a GPU machine (no Rust, no network; the torch 2.11 venv's python):
#   WORKER=./worker PYTHON=python3 bench/gpu_compare.sh
# Check it end to end on a CPU machine (tiny model, batch 4 at 32 px, a few steps):
#   DEVICE=cpu TINY=1 WORKER=target/debug/worker PYTHON=.venv/bin/python bench/gpu_compare.sh
# Knobs: WARMUP, STEPS (timed), E2E_STEPS, SIZES ("BATCHxPX ..."), TIMEOUT (seconds per run).
set -u
cd "$(dirname "$0")/.."
W=${WORKER:-./target/release/worker}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
TINY=${TINY:-0}
TIMEOUT=${TIMEOUT:-600}
REF=bench/torch_reference.py
JOB=bench/gpu_compare.toml
for f in "$W" "$REF" "$JOB"; do [[ -e $f ]] || { echo "gpu_compare: $f is missing" >&2; exit 1; }; done
TL=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib || exit 1
export LD_LIBRARY_PATH=$TL:${LD_LIBRARY_PATH:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ $TINY == 1 ]]; then
    SIZES=${SIZES:-4x32}; WARMUP=${WARMUP:-2}; STEPS=${STEPS:-3}; E2E_STEPS=${E2E_STEPS:-6}; N=64
    MODEL=(--set model.backbone=tiny --set model.fpn_channels=32 --set data.loader_threads=2)
else
    SIZES=${SIZES:-64x128 128x224}; WARMUP=${WARMUP:-20}; STEPS=${STEPS:-100}; E2E_STEPS=${E2E_STEPS:-200}; N=4096
    MODEL=()
fi
TORCH_DEVICE=${DEVICE%%:*}; [[ $DEVICE == cuda:* ]] && TORCH_DEVICE=$DEVICE
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi ($DEVICE)"
"$PY" -c 'import torch; print("torch", torch.__version__)'
RESULTS=$tmp/results.jsonl
: > "$RESULTS"

# run NAME SIZE CMD...: runs CMD, records its last JSON line under NAME (null when it failed).
run() {
    local name=$1 size=$2; shift 2
    echo "== $size $name" >&2
    local line
    line=$(timeout "$TIMEOUT" "$@" 2> "$tmp/err" | grep '^{' | tail -1)
    if [[ -z $line ]]; then
        echo "   failed: $(tail -3 "$tmp/err")" >&2
        line=null
    fi
    echo "{\"row\": \"$name\", \"size\": \"$size\", \"result\": $line}" >> "$RESULTS"
}

for size in $SIZES; do
    b=${size%x*}; px=${size#*x}
    data=$tmp/data-$px
    SETS=(--set data.train=$data --set data.synthetic_n=$((TINY == 1 ? 32 : 4 * b)) --set data.synthetic_size=$px
          --set data.image_size=$px --set train.batch_size=$b "${MODEL[@]}")
    OURS=("$W" bench-step --config $JOB "${SETS[@]}" --device $DEVICE --warmup $WARMUP --steps $STEPS --json)
    TORCH=("$PY" $REF step --config $JOB "${SETS[@]}" --device $TORCH_DEVICE --warmup-steps $WARMUP --steps $STEPS)
    run "ours fp32" $size "${OURS[@]}" --set train.precision=fp32
    run "ours bf16" $size "${OURS[@]}" --set train.precision=bf16
    run "ours bf16+cl" $size "${OURS[@]}" --set train.precision=bf16 --set train.channels_last=true
    if [[ $DEVICE == cuda* ]]; then   # train.cuda_graphs: the step captured once, then replayed
        run "ours bf16+graphs" $size "${OURS[@]}" --set train.precision=bf16 --set train.cuda_graphs=true
        run "ours bf16+cl+graphs" $size "${OURS[@]}" --set train.precision=bf16 --set train.channels_last=true \
            --set train.cuda_graphs=true
    fi
    run "torch eager fp32" $size "${TORCH[@]}"
    run "torch eager bf16+cl" $size "${TORCH[@]}" --bf16 --channels-last
    run "torch compile bf16+cl" $size "${TORCH[@]}" --bf16 --channels-last --compile

    # Ours end to end from PNG files (the synthetic format writes them once, then reads them as
    # any dataset): images/s of the logged intervals after the first.
    log_every=$(( E2E_STEPS / 5 > 0 ? E2E_STEPS / 5 : 1 ))
    variants=(fp32 bf16); [[ $DEVICE == cuda* ]] && variants+=(bf16+graphs)
    for variant in "${variants[@]}"; do
        precision=${variant%%+*}; graphs=false; [[ $variant == *graphs ]] && graphs=true
        echo "== $size ours end to end $variant" >&2
        rm -rf $tmp/ckpt
        timeout "$TIMEOUT" "$W" train --standalone --config $JOB "${SETS[@]}" --device $DEVICE \
            --set data.train=$tmp/pngs-$px --set data.synthetic_n=$N \
            --set train.steps=$E2E_STEPS --set train.warmup_steps=$(( E2E_STEPS / 10 )) \
            --set train.log_every_steps=$log_every --set train.eval_every_steps=0 \
            --set train.precision=$precision --set train.cuda_graphs=$graphs \
            --set checkpoint.dir=$tmp/ckpt --json > /dev/null 2> "$tmp/e2e.log"
        rate=$(grep -o 'images_per_s="\?[0-9.]*' "$tmp/e2e.log" | grep -o '[0-9.]*$' | tail -n +2 \
               | "$PY" -c 'import sys; r=[float(x) for x in sys.stdin]; print(len(r)/sum(1/x for x in r) if r else "null")')
        [[ $rate == null ]] && echo "   failed: $(tail -3 "$tmp/e2e.log")" >&2
        echo "{\"row\": \"ours end to end $variant\", \"size\": \"$size\", \"result\": {\"images_per_s\": $rate}}" >> "$RESULTS"
    done
done

"$PY" - "$RESULTS" "$DEVICE" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nDevice {sys.argv[2]}; ms/step on pre-loaded batches, vs compile = torch.compile bf16+cl ms / row ms")
print(f"{'size':>8}  {'row':<24} {'ms/step':>9} {'images/s':>10} {'vs compile':>10}")
for size in dict.fromkeys(r["size"] for r in rows):
    these = [r for r in rows if r["size"] == size]
    compiled = next((r["result"] for r in these if r["row"] == "torch compile bf16+cl" and r["result"]), None)
    for r in these:
        res = r["result"] or {}
        ms, ips = res.get("ms_per_step"), res.get("images_per_s")
        ratio = compiled["ms_per_step"] / ms if compiled and ms else None
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
        print(f"{size:>8}  {r['row']:<24} {fmt(ms, '9.2f'):>9} {fmt(ips, '10.1f'):>10} {fmt(ratio, '10.2f'):>10}")
PY
