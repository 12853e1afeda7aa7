"""scripts/setup.sh, run against a stand-in venv whose pip records what it is asked to install."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO


@pytest.mark.parametrize("index", [None, "https://download.pytorch.org/whl/cpu"])
def test_setup_installs_torch_first_then_the_package(tmp_path, index):
    """A bare torch requirement on a machine without torch pulls several GB of CUDA packages: torch goes in first,
    as TORCH_SPEC (from TORCH_INDEX alone, where set), and only then the package, whose range it satisfies."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    log = tmp_path / "pip.log"
    (venv / "python").write_text('#!/bin/sh\n[ "$2" = "import torch" ] && exit 1\nexit 0\n')  # no torch yet
    (venv / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    for tool in ("python", "pip"):
        (venv / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX")}
    if index:
        env["TORCH_INDEX"] = index
    subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, check=True, capture_output=True)
    torch, package = log.read_text().splitlines()
    assert torch == ("install -q " + (f"--index-url {index} " if index else "") + "torch==2.13.0")
    assert package == "install -q -e .[dev,sweep]"
