#!/usr/bin/env bash
# Creates the project-local LibTorch: a virtual environment with the pinned torch wheel, and
# the `.libtorch` link that .cargo/config.toml points the build at. Idempotent: seconds when done.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV=.venv
STAMP="$VENV/.torch-$TORCH_VERSION.installed"
PYTHON=${PYTHON:-python3}

if [[ ! -f "$STAMP" ]]; then
    echo "setup: installing torch==$TORCH_VERSION into $VENV (about 2.5 GB, once)..."
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    touch "$STAMP"
fi

# TensorBoard: its reader checks the coordinator's event files in the tests, and it is how
# a run is watched (`tensorboard --logdir runs/JOB/tb`).
TENSORBOARD_VERSION=2.21.0
TB_STAMP="$VENV/.tensorboard-$TENSORBOARD_VERSION.installed"
if [[ ! -f "$TB_STAMP" ]]; then
    echo "setup: installing tensorboard==$TENSORBOARD_VERSION into $VENV..."
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "tensorboard==$TENSORBOARD_VERSION"
    touch "$TB_STAMP"
fi

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -d "$site/torch/lib" ]]; then
    echo "setup: $site/torch/lib is missing; delete $VENV and run again" >&2
    exit 1
fi
ln -sfn "$site/torch" .libtorch

# Kubernetes schemas for tests/deploy.rs (deploy/k8s/check.py): the package bundles them and
# works offline. A separate stamp, so a version change reinstalls only this.
K8S_VALIDATE_VERSION=1.37.0
K8S_STAMP="$VENV/.kubernetes-validate-$K8S_VALIDATE_VERSION.installed"
if [[ ! -f "$K8S_STAMP" ]]; then
    echo "setup: installing kubernetes-validate==$K8S_VALIDATE_VERSION into $VENV..."
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$K8S_VALIDATE_VERSION"
    touch "$K8S_STAMP"
fi
