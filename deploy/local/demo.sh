#!/usr/bin/env bash
# Local demo: builds the release binaries, then one command runs the job on this machine: the
# coordinator serves deploy/local/demo.toml and starts two CPU workers against itself on
# loopback (--local-workers; their output comes prefixed `[worker i]`). When the job is over
# it prints its final summary, which ends with the untrained and the trained model's
# validation metrics side by side. Ctrl-C stops the coordinator and its workers.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --workspace --bins --locked
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/mtl-demo.XXXXXX")
trap 'rm -rf "$run_dir"' EXIT

# A fresh state database per run: on the same one, a finished job stays finished. The job
# token the coordinator generates lands next to it, in $run_dir/token, and reaches the workers
# in their environment. On CPU each worker gets cores/2 LibTorch threads (unless
# OMP_NUM_THREADS is set) instead of each starting a thread per core.
echo "demo: 2 CPU workers train deploy/local/demo.toml (about 2 minutes on 2 idle cores)"
./target/release/coordinator serve --config deploy/local/demo.toml --set server.state_db="$run_dir/state.db" \
    --local-workers 2 --local-device cpu
