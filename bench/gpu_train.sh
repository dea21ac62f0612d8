#!/usr/bin/env bash
# GPU checks and throughput, run on a GPU machine with no Rust and no network (torch 2.11 venv as
# plain `python3`). This folder must hold the release `worker` and `coordinator` binaries and
# gpu.toml. Prints: CUDA standalone training throughput (tiny and ResNet-18 widths, 128 px,
# batch 64), NCCL through `worker run` with a world of one, and two workers on one GPU.
set -u
cd "$(dirname "$0")"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL:${LD_LIBRARY_PATH:-}
export RUST_LOG=info
DEVICE=${DEVICE:-cuda:0}
STEPS=${STEPS:-120}
N=${N:-4096}
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
./worker gen-data shapes --out /tmp/mtl-gpu-shapes --n $N --size 128 --seed 3 2>&1 | tail -1

for backbone in ${BACKBONES-tiny resnet18}; do
  for precision in ${PRECISIONS-fp32 bf16}; do
    echo "== standalone $DEVICE, backbone $backbone, $precision"
    rm -rf /tmp/mtl-gpu-checkpoints
    timeout 150 ./worker train --standalone --config gpu.toml --device $DEVICE --set model.backbone=$backbone \
        --set checkpoint.dir=/tmp/mtl-gpu-checkpoints \
        --set train.steps=$STEPS --set data.synthetic_n=$N --set train.precision=$precision --json 2>&1 \
        | grep -E "images_per_s|^\{|error" | sed -E 's/^.*(step=[0-9]+ images_per_s="?[0-9.]+"?).*$/\1/'
    echo "== exit ${PIPESTATUS[0]}"
  done
done

echo "== worker run on cuda:0 through the coordinator (NCCL, world of one)"
rm -f /tmp/addr
./coordinator serve --config gpu.toml --set rendezvous.min_workers=1 --set train.steps=40 \
    --set model.backbone=tiny --set data.synthetic_n=$N --addr-file /tmp/addr > /tmp/coord.log 2>&1 &
for _ in $(seq 100); do [[ -s /tmp/addr ]] && break; sleep 0.1; done
timeout 120 ./worker run --coordinator "http://$(cat /tmp/addr)" --device $DEVICE --worker-id gpu0 2>&1 \
    | grep -E "nccl|NCCL|error|joined" | head -5
echo "== worker exit ${PIPESTATUS[0]}"
wait
grep -E "evaluation|finished|images_per_s" /tmp/coord.log | tail -3
tail -8 /tmp/coord.log

echo "== two workers on the one GPU (NCCL refuses two ranks per GPU: expect a clear error)"
rm -f /tmp/addr
./coordinator serve --config gpu.toml --set rendezvous.min_workers=2 --set train.steps=5 --set train.warmup_steps=0 \
    --set model.backbone=tiny --set data.synthetic_n=$N --addr-file /tmp/addr > /tmp/coord2.log 2>&1 &
for _ in $(seq 100); do [[ -s /tmp/addr ]] && break; sleep 0.1; done
for i in 0 1; do
  timeout 60 ./worker run --coordinator "http://$(cat /tmp/addr)" --device $DEVICE --worker-id g$i > /tmp/w$i.log 2>&1 &
done
wait
tail -n 2 /tmp/w0.log /tmp/w1.log; tail -n 3 /tmp/coord2.log
