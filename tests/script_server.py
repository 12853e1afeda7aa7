"""Runs `scripts/*.py` for the tests as forks of one process that has imported their heavy modules once.

A script run the tests start takes 8-10 s on a 2-core machine, and about 6 s of that is imports: torch (~3 s),
torch._dynamo (~2.5 s, imported by the optimizer's first call) and matplotlib (~1 s, for the figures). The suite
starts well over a hundred such runs. A fork of this process starts with those modules imported, and is otherwise the
run `python scripts/NAME.py ARGS` makes: its own process and pid, the request's working directory, environment, argv
and sys.path[0], stdin from /dev/null, stdout and stderr to the files the client names, and the exit code Python would
give (a SystemExit's code, 1 after a traceback, -2 after an uncaught KeyboardInterrupt, -N when killed by signal N);
it ends as the interpreter does (threads joined, exit hooks, __main__'s objects freed). One difference is left: the
client reads the output files once the fork has exited, where a fresh run's pipes would also wait for a detached
grandchild still holding them. This process only imports before forking: it starts no thread and runs no torch op,
Hydra app or env, so each fork starts as a fresh interpreter would. What a fork shares that fresh interpreters would
not (the hash seed, numpy's and `random`'s unseeded global state, environment variables read at import) is why
tests/conftest.py starts a fresh interpreter for a run whose environment differs from this process's, or that asks for
one (`fresh=True`, as the same-seed test does). On a machine with CUDA every run is fresh: an import here might
initialize CUDA, which a fork cannot then use.

Protocol: one JSON request per line on stdin ({"script", "args", "cwd", "env", "stdout", "stderr"}), answered on
stdout by {"pid": N} once forked and {"returncode": N} once the fork has ended.
"""

from __future__ import annotations

import atexit
import builtins
import gc
import importlib.machinery
import json
import multiprocessing.process
import os
import signal
import sys
import threading
import types

# What the scripts import, and what their first update and first figure import (the costly part).
import hydra  # noqa: F401
import matplotlib.backends.backend_agg  # noqa: F401
import matplotlib.figure  # noqa: F401
import torch
import torch._dynamo  # noqa: F401
import worldmodel.checkpoint  # noqa: F401
import worldmodel.cli  # noqa: F401
import worldmodel.dataset  # noqa: F401
import worldmodel.evaluation  # noqa: F401
import worldmodel.logger  # noqa: F401
import worldmodel.trainer  # noqa: F401
import worldmodel.vector  # noqa: F401


# A fork may use CUDA only where its parent never initialized it (conftest.py keeps runs on CUDA machines fresh too).
assert not torch.cuda.is_initialized()


def _exit_code(stop: SystemExit) -> int:
    """What Python's own exit makes of a SystemExit: None is 0, an int its low byte, anything else is printed and 1."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        # exit() takes a C long (a larger int exits as -1) and the system keeps its low 8 bits.
        return stop.code & 0xFF if -(2**63) <= stop.code < 2**63 else 255
    print(stop.code, file=sys.stderr)
    return 1


def _main_module(script: str) -> types.ModuleType:
    """A `__main__` as `python script.py` makes it, left in sys.modules until the end (exit hooks pickle by it)."""
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=script, __cached__=None, __builtins__=builtins, __annotations__={},
                         __loader__=importlib.machinery.SourceFileLoader("__main__", script))  # fmt: skip
    sys.modules["__main__"] = main
    return main


def _child(request: dict) -> None:
    code = 1
    interrupted = False
    try:
        os.chdir(request["cwd"])
        multiprocessing.process.ORIGINAL_DIR = os.path.abspath(request["cwd"])  # what its import would have read
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):  # fmt: skip
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        script = request["script"]
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(script)  # as `python script.py` sets it
        main = _main_module(script)
        try:
            try:
                with open(script, "rb") as source:
                    compiled = compile(source.read(), script, "exec", dont_inherit=True)
            except OSError as missing:
                print(f"{sys.executable}: can't open file {script!r}: [Errno {missing.errno}] {missing.strerror}",
                      file=sys.stderr, flush=True)  # fmt: skip
                os._exit(2)
            exec(compiled, main.__dict__)
            code = 0
        except SystemExit as stop:
            code = _exit_code(stop)
        except BaseException as error:
            # The interpreter's own report: sys.excepthook (the script may set it), the script's frames only.
            error.with_traceback(error.__traceback__.tb_next)  # (none left for a SyntaxError, as Python gives)
            sys.excepthook(type(error), error, error.__traceback__)
            interrupted = isinstance(error, KeyboardInterrupt)
        # As the interpreter ends: non-daemon threads joined and threading's exit hooks (a joblib sweep's loky
        # executor stops its workers there), then atexit's handlers, then __main__'s objects finalized (a file
        # left open is flushed).
        threading._shutdown()
        atexit._run_exitfuncs()
        main.__dict__.clear()
        gc.collect()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if interrupted:  # an uncaught KeyboardInterrupt ends Python by SIGINT (exit code -2, 130 in a shell)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
