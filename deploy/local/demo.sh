#!/usr/bin/env bash
# Local demo: builds the release binaries, starts a coordinator and two CPU workers on
# loopback, waits for the job to finish and prints the coordinator's final summary, which ends
# with the untrained and the trained model's validation metrics side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --workspace --bins --locked
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/mtl-demo.XXXXXX")
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$run_dir"; }
trap cleanup EXIT

# A fresh state database per run: on the same one, a finished job stays finished. The job
# token the coordinator generates lands next to it, in $run_dir/token, before the address file.
./target/release/coordinator serve --config deploy/local/demo.toml --addr-file "$run_dir/addr" \
    --set server.state_db="$run_dir/state.db" &
coordinator=$!
pids+=("$coordinator")
for _ in $(seq 100); do [[ -s "$run_dir/addr" ]] && break; sleep 0.1; done
[[ -s "$run_dir/addr" ]] || { echo "demo: coordinator did not start" >&2; exit 1; }
url="http://$(cat "$run_dir/addr")"
echo "demo: coordinator at $url; 2 workers train deploy/local/demo.toml (about 2 minutes on 2 idle cores)"

# Two workers share this machine's cores: one LibTorch thread each (unless set otherwise)
# instead of each spinning up a thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for i in 0 1; do
    ./target/release/worker run --coordinator "$url" --token-file "$run_dir/token" --worker-id "demo-worker-$i" --device cpu \
        2> >(sed "s/^/[worker $i] /" >&2) &
    pids+=("$!")
done
status=0
wait "$coordinator" || status=$?
for pid in "${pids[@]:1}"; do wait "$pid" || status=$?; done
exit $status
