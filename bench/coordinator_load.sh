#!/usr/bin/env bash
# The coordinator under load: the release `coordinator` binary against 1,024 simulated workers on
# loopback (heartbeats every second, a train shard per worker every 20 s epoch, evaluation
# statistics from every worker every 30 s, training losses every second and a checkpoint commit
# every minute from rank 0). Prints RPC latency p50/p99 per RPC and the coordinator's CPU and
# memory. Usage: bench/coordinator_load.sh [--workers N] [--seconds S] [...] (see
# tests/bench/coordinator_load.rs). The simulated workers share the machine with the coordinator.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p mtl-coordinator -p mtl-tests --bins
ulimit -n "$(ulimit -Hn)" # two sockets per simulated worker
exec ./target/release/coordinator-load --coordinator ./target/release/coordinator "$@"
