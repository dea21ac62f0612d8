#!/usr/bin/env bash
# Ring all-reduce bus bandwidth on loopback: N worker processes, 4 to 256 MiB, f32.
# Usage: bench/ring_bandwidth.sh [WORLD_SIZES...]   (default: 2 3). Needs a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
W=./target/release/worker
for n in "${@:-2 3}"; do
  base=$((40000 + RANDOM % 10000))
  peers=$(seq -s, -f "127.0.0.1:%g" "$base" "$((base + n - 1))")
  for r in $(seq 1 $((n - 1))); do
    "$W" collective-bench --rank "$r" --peers "$peers" --sizes-mib 4,16,64,256 --iterations 5 &
  done
  "$W" collective-bench --rank 0 --peers "$peers" --sizes-mib 4,16,64,256 --iterations 5
  wait
done
