#!/usr/bin/env bash
# Training images/s: one standalone worker (batch 32) vs coordinator + 2 workers (batch 16 each).
# Needs a release build. Prints the images_per_s reported at each log step.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
echo "== 1 worker, batch 32"
./target/release/worker train --standalone --config bench/throughput.toml --set "checkpoint.dir=$dir/checkpoints" 2>&1 \
    | grep -o 'step=[0-9]* images_per_s="[0-9.]*"'
echo "== 2 workers, batch 16 each"
./target/release/coordinator serve --config bench/throughput.toml --set rendezvous.min_workers=2 \
    --set train.batch_size=16 --addr-file "$dir/addr" > "$dir/coord.log" 2>&1 &
for _ in $(seq 100); do [[ -s "$dir/addr" ]] && break; sleep 0.1; done
for i in 0 1; do ./target/release/worker run --coordinator "http://$(cat "$dir/addr")" --worker-id "w$i" 2>/dev/null & done
wait
grep -o 'step=[0-9]* epoch=[0-9]* values="[^"]*' "$dir/coord.log" | grep -o 'step=[0-9]*\|images_per_s=[0-9.]*' | paste - -
