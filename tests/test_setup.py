"""scripts/setup.sh, run against a stand-in venv whose pip records what it is asked to install."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO


def _stand_in(tmp_path, *, version="3.11.7", torch=False, venv=True):
    """A repo holding setup.sh, and a Python of `version` (as .venv's, or as $PYTHON where venv=False) whose pip
    records what it is asked to install."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts")
    log = tmp_path / "pip.log"
    log.touch()
    old = tuple(map(int, version.split("."))) < (3, 11)
    python = (f'#!/bin/sh\n[ "$1" = --version ] && echo "Python {version}" && exit 0\n'
              f'case "$2" in "import torch") exit {0 if torch else 1};; *version_info*) exit {int(old)};; esac\n')
    bin_dir = repo / ".venv" / "bin" if venv else tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(python + "exit 0\n")
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    for tool in ("python", "pip"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX", "PYTHON")}
    return repo, log, bin_dir, env


@pytest.mark.parametrize("index", [None, "https://download.pytorch.org/whl/cpu"])
def test_setup_installs_torch_first_then_the_package(tmp_path, index):
    """A bare torch requirement on a machine without torch pulls several GB of CUDA packages: torch goes in first,
    as TORCH_SPEC (from TORCH_INDEX alone, where set), and only then the package, whose range it satisfies."""
    repo, log, _, env = _stand_in(tmp_path)  # no torch yet
    if index:
        env["TORCH_INDEX"] = index
    subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, check=True, capture_output=True)
    torch, package = log.read_text().splitlines()
    assert torch == ("install -q " + (f"--index-url {index} " if index else "") + "torch==2.13.0")
    assert package == "install -q -e .[dev,sweep]"


def test_setup_refuses_an_old_python_before_installing_anything(tmp_path):
    """On Python 3.10 PyPI's torch==2.13.0 is a CUDA build of several GB, and pip refuses the package (requires-python
    >= 3.11) only after fetching it: the interpreter is checked first, an existing .venv's too, since it is kept."""
    repo, log, _, env = _stand_in(tmp_path, version="3.10.13")
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert ".venv has Python 3.10.13" in proc.stderr and "rm -r .venv" in proc.stderr
    assert log.read_text() == ""


def test_setup_refuses_an_old_python_named_by_PYTHON(tmp_path):
    repo, log, bin_dir, env = _stand_in(tmp_path, version="3.10.13", venv=False)
    env["PYTHON"] = str(bin_dir / "python")
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "is Python 3.10.13; worldmodel needs Python >= 3.11" in proc.stderr
    assert not (repo / ".venv").exists() and log.read_text() == ""


@pytest.mark.parametrize("chosen", [{}, {"TORCH_SPEC": "torch==2.11.0"}, {"TORCH_INDEX": "https://example.org/cu"}])
def test_setup_installs_a_chosen_torch_where_venv_has_one(tmp_path, chosen):
    """README: set TORCH_SPEC (or TORCH_INDEX) to choose another torch; a rerun over a .venv that already has torch
    keeps it unless one was chosen."""
    repo, log, _, env = _stand_in(tmp_path, torch=True)
    env.update(chosen)
    subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], env=env, check=True, capture_output=True)
    lines = log.read_text().splitlines()
    if not chosen:
        assert lines == ["install -q -e .[dev,sweep]"]
    else:
        index = chosen.get("TORCH_INDEX")
        spec = chosen.get("TORCH_SPEC", "torch==2.13.0")
        assert lines == ["install -q " + (f"--index-url {index} " if index else "") + spec, "install -q -e .[dev,sweep]"]
