#!/usr/bin/env bash
# One worker task of deploy/slurm/mtl.sbatch (run by srun, once per GPU): device from the
# task's local id, peers reach it on this node's host name (or MTL_PEER_HOST, e.g. the address
# on the fast network). The token file and coordinator address come from the environment.
set -euo pipefail
MTL_BIN=${MTL_BIN:-${MTL_HOME:?}/target/release}
node=${SLURMD_NODENAME:-$(hostname)}
local_id=${SLURM_LOCALID:?not a Slurm task}
peer_host=${MTL_PEER_HOST:-$(hostname)}
# Workers' ids order their ranks: node, then local id (zero-padded so gpu10 sorts after gpu9).
exec "$MTL_BIN/worker" run \
    --coordinator "$MTL_COORDINATOR" \
    --token-file "$MTL_TOKEN_FILE" \
    --worker-id "$(printf '%s-gpu%02d' "$node" "$local_id")" \
    --device "cuda:$local_id" \
    --peer-addr "$peer_host:0"
