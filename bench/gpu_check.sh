#!/usr/bin/env bash
# GPU check for the NCCL backend, run on a GPU machine with no Rust and no network: the torch 2.11
# venv is plain `python3`, and this folder holds the (stripped) lib test executable, built with
#   cargo test -p mtl-worker --release --lib --no-run
# and copied from target/release/deps/mtl_worker-<hash> to ./mtl_worker-test.
set -u
cd "$(dirname "$0")"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL:${LD_LIBRARY_PATH:-}
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())'
# --nocapture shows the two-process outcome; NCCL_DEBUG=WARN shows NCCL's own reasons. The
# abort-on-timeout test runs last so that, should an abort ever hang, the other results still show.
T=./mtl_worker-test
export MTL_REQUIRE_CUDA=1 NCCL_DEBUG=WARN
# train.cuda_graphs (never run on a GPU before this script): a captured step against eager steps,
# and the learning rate as a device tensor that its replays read.
for t in train::graph::tests::a_captured_step_trains_as_eager_steps_do_on_cuda \
         optim::tests::a_learning_rate_tensor_updates_as_its_value; do
  timeout 120 "$T" "$t" --exact --test-threads=1 --nocapture
  echo "== $t: exit status $?"
done
for t in world_of_one_reduces_broadcasts_and_barriers_on_cuda two_processes_share_one_gpu \
         setup_times_out_and_aborts_when_a_rank_never_joins; do
  timeout 70 "$T" "collective::nccl::tests::$t" --exact --test-threads=1 --nocapture
  echo "== $t: exit status $?"
done
timeout 30 "$T" collective::nccl --test-threads=1 --skip two_process --skip _on_cuda --skip setup_times_out
echo "== remaining nccl tests: exit status $?"
