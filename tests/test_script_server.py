"""tests/script_server.py: a script run forked from it is what a fresh `python script.py` gives, to the test."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import run_script

PROBE = """
import atexit, os, sys, threading, time
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()  # as loky's executor threads
print(repr(sys.argv[1:]), os.path.basename(sys.argv[0]), sys.path[0] == os.path.dirname(sys.argv[0]))
print(os.getcwd(), __name__, os.path.basename(__file__), os.environ.get("WM_PROBE"), repr(sys.stdin.read()))
print("to stderr", file=sys.stderr)
{ending}
"""


@pytest.mark.parametrize(
    "ending, code, said",
    [
        ("", 0, ""),
        ("sys.exit(3)", 3, ""),
        ("sys.exit('stopped: a message')", 1, "stopped: a message"),
        ("raise ValueError('a bug')", 1, "ValueError: a bug"),
        ("import signal; os.kill(os.getpid(), signal.SIGKILL)", -9, ""),
    ],
)
def test_a_forked_run_gives_what_a_fresh_interpreter_gives(tmp_path, ending, code, said):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(ending=ending))
    work = tmp_path / "work"
    work.mkdir()
    runs = {fresh: run_script(str(script), ["a b", "--x=1"], cwd=work, fresh=fresh) for fresh in (True, False)}
    for proc in runs.values():
        assert proc.returncode == code, proc.stderr
        assert said in proc.stderr and "to stderr" in proc.stderr
        if code != -9:  # a killed process joins no thread and runs no exit handler
            assert "thread joined\natexit ran\n" in proc.stdout
    assert runs[True].stdout == runs[False].stdout
    assert runs[False].stdout.startswith(f"['a b', '--x=1'] probe.py True\n{work} __main__ probe.py None ''\n")
    if said.startswith("ValueError"):
        assert runs[False].stderr.count("Traceback") == 1


def test_a_run_past_its_timeout_is_killed_and_the_next_run_is_served(tmp_path):
    script = tmp_path / "sleeps.py"
    script.write_text("import time; print('started', flush=True); time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired) as late:
        run_script(str(script), [], timeout=3)
    assert late.value.output == "started\n"
    script.write_text("print('next')")
    assert run_script(str(script), []).stdout == "next\n"


def test_a_run_in_another_environment_gets_a_fresh_interpreter(tmp_path):
    """A variable read at import (say OMP_NUM_THREADS, by torch) would be read too late by a fork."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys; print(os.environ.get('WM_PROBE'), 'torch' in sys.modules)")
    assert run_script(str(script), []).stdout == "None True\n"  # forked: the server had imported torch
    assert run_script(str(script), [], env_vars={"WM_PROBE": "x"}).stdout == "x False\n"
    assert run_script(str(script), [], fresh=True).stdout == "None False\n"


def test_on_a_machine_with_cuda_every_run_gets_a_fresh_interpreter(tmp_path, monkeypatch):
    """The server's imports might initialize CUDA there, and a fork of a process that has cannot use it."""
    script = tmp_path / "probe.py"
    script.write_text("import sys; print('torch' in sys.modules)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_script(str(script), []).stdout == "False\n"


@pytest.mark.parametrize(
    "source",
    [
        "raise KeyboardInterrupt",  # Python ends by SIGINT: exit code -2 (130 in a shell)
        "import sys; sys.exit(2**31)",  # exit() keeps the low 8 bits: 0
        "def f():\n    raise ValueError('deep')\nf()",  # the script's frames only
        "import sys\nsys.excepthook = lambda t, v, tb: print('hook:', v, file=sys.stderr)\nraise ValueError('x')",
        "x = (",  # a SyntaxError: no traceback
        "import atexit, pickle\nclass C: ...\natexit.register(lambda: print(len(pickle.dumps(C())) > 0))",
        "f = open('left_open', 'w')\nf.write('data')\ndef g(): return f",  # flushed as the interpreter ends
    ],
)
def test_a_forked_run_ends_as_a_fresh_interpreter_ends(tmp_path, source):
    script = tmp_path / "probe.py"
    script.write_text(source)
    ends = {}
    for fresh in (True, False):
        work = tmp_path / f"work_{fresh}"
        work.mkdir()
        proc = run_script(str(script), [], cwd=work, fresh=fresh)
        ends[fresh] = proc.returncode, proc.stdout, proc.stderr, {p.name: p.read_text() for p in work.iterdir()}
    assert ends[False] == ends[True]
