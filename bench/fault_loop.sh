#!/usr/bin/env bash
# Runs the fault tests (tests/faults.rs, tests/collective_faults.rs, tests/recovery.rs,
# tests/durability.rs, tests/coordinator_restart.rs, tests/checkpoints.rs) N times in a row (default 20) and prints how many rounds passed.
# A flaky fault test shows here, not in one `make test`. Usage: bench/fault_loop.sh [N]
set -u
cd "$(dirname "$0")/.."
n="${1:-20}"
: "${LIBTORCH:=$PWD/.libtorch}"
export LIBTORCH
tests=(faults collective_faults recovery durability coordinator_restart checkpoints)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo build --workspace --bins --quiet || exit 1
cargo test -p mtl-tests "${args[@]}" --no-run --quiet || exit 1
pass=0
log="$(mktemp -d)/fault_loop"
mkdir -p "$log"
for i in $(seq 1 "$n"); do
    if cargo test -p mtl-tests "${args[@]}" --quiet >"$log/round-$i.log" 2>&1; then
        pass=$((pass + 1))
        echo "round $i/$n: pass"
    else
        echo "round $i/$n: FAIL (see $log/round-$i.log)"
    fi
done
echo "passed $pass of $n rounds"
[ "$pass" -eq "$n" ]
