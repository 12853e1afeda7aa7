#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its test tools and the sweep plugins (README, Sweeps).
# Torch goes in first, from TORCH_SPEC (default: the CPU build these machines carry locally), because a bare
# `torch` requirement on a machine without torch pulls several GB of CUDA packages. Elsewhere PyPI's Linux wheel of
# that version is a CUDA build too: TORCH_INDEX=https://download.pytorch.org/whl/cpu takes PyTorch's CPU wheels.
# pyproject.toml only asks for a range that this build satisfies, so the editable install below adds no other torch
# (the dev extra's Triton is for tests/test_fused_gru.py, which runs the GRU's CUDA kernels under Triton's CPU
# interpreter).
# GPU users: skip this script and `pip install -e ".[dev,sweep]"` into an environment with your CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_CHOSEN=${TORCH_SPEC:+1}${TORCH_INDEX:+1}  # set by the caller: install torch even where .venv already has one
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}  # pip's --index-url for torch alone, if set

# pyproject.toml's requires-python, checked before anything is installed: on another Python, pip would fetch torch
# (a CUDA build of several GB from PyPI) and only then refuse the package. An existing .venv is checked too, since
# it is kept as it is.
NEEDS_PY='import sys; sys.exit(sys.version_info < (3, 11))'
if [ -x .venv/bin/python ]; then
    if ! .venv/bin/python -c "$NEEDS_PY"; then
        echo "error: .venv has $(.venv/bin/python --version 2>&1); worldmodel needs Python >= 3.11." \
            "Remove it (rm -r .venv) and rerun with PYTHON=<a Python 3.11 interpreter>." >&2
        exit 1
    fi
else
    if ! command -v "$PYTHON" >/dev/null; then
        echo "error: no $PYTHON found; rerun with PYTHON=<a Python 3.11 interpreter>." >&2
        exit 1
    fi
    if ! "$PYTHON" -c "$NEEDS_PY"; then
        echo "error: $PYTHON is $("$PYTHON" --version 2>&1); worldmodel needs Python >= 3.11." \
            "Rerun with PYTHON=<a Python 3.11 interpreter>, e.g. PYTHON=python3.11 bash scripts/setup.sh." >&2
        exit 1
    fi
    "$PYTHON" -m venv .venv
fi
if [ -n "$TORCH_CHOSEN" ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e ".[dev,sweep]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
.venv/bin/python -c "import torch, worldmodel; print(f'worldmodel ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
