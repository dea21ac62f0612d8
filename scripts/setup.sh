#!/usr/bin/env bash
# Creates the project-local LibTorch: a virtual environment with the pinned torch wheel, and
# the `.libtorch` link that .cargo/config.toml points the build at. Idempotent: seconds when done.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV=.venv
PYTHON=${PYTHON:-python3}

# Installs NAME==VERSION into the venv once: a stamp file per package and version, so a version
# change reinstalls only that package and a set-up that is done takes seconds.
install_once() {
    local name=$1 version=$2 size=${3:-}
    local stamp="$VENV/.$name-$version.installed"
    [[ -f $stamp ]] && return
    echo "setup: installing $name==$version into $VENV$size..."
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$name==$version"
    touch "$stamp"
}

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
install_once torch "$TORCH_VERSION" " (about 2.5 GB, once)"
# TensorBoard: its reader checks the coordinator's event files in the tests, and it is how
# a run is watched (`tensorboard --logdir runs/JOB/tb`).
install_once tensorboard 2.21.0
# Kubernetes schemas for tests/deploy.rs (deploy/k8s/check.py): the package bundles them and
# works offline.
install_once kubernetes-validate 1.37.0
# The CUDA runtime headers' `crt/` part (headers only, 130 KB), which the torch wheel's CUDA
# runtime package leaves out: the shim's CUDA graphs (worker/shim/cuda_graph.cpp) include them.
install_once nvidia-cuda-crt 13.0.88

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -d "$site/torch/lib" ]]; then
    echo "setup: $site/torch/lib is missing; delete $VENV and run again" >&2
    exit 1
fi
ln -sfn "$site/torch" .libtorch
