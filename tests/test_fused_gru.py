"""fused_gru: the Triton kernels compute what stepping nn.GRUCell computes, forward and backward, with resets.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors). The
interpreter must be on before the kernels are defined, so that check runs in a fresh process. tests/test_cuda.py runs
the same check on a GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from test_layers import case, cell_loop, values_and_grads
from worldmodel.models import fused_gru, layers
from worldmodel.models.layers import gru_sequence

#: (batch, steps, features, hidden, share of steps that start an episode): the default model's window (batch 32 x 16,
#: latent 32, CartPole's 2 actions), a batch smaller than one program's tile, a batch that leaves a partial tile, every
#: supported hidden size, windows with no reset and with a reset at every step.
CASES = [(32, 16, 34, 32, 0.1), (5, 7, 3, 16, 0.5), (19, 4, 6, 64, 0.3), (17, 5, 8, 16, 0.0), (3, 6, 4, 32, 1.0)]


def assert_fused_is_the_cell_loop(batch, steps, features, hidden, first_p, device="cpu"):
    """gru_sequence through the kernels (the Python loops are patched to fail) against the GRUCell loop: states, last
    state, and the gradients of x, h0 and every weight under a random linear objective. Both run in fp32, and each
    is measured against the loop in fp64: the kernels must be about as exact as the loop (within 4x its error). A
    tolerance between the two fp32 results failed on some CPUs (w_ih, summed over 512 steps: 1.9e-5 apart, each
    about 2e-5 from the fp64 result), and a wrong formula is off by far more."""
    cell, x, first, h0 = case(batch, steps, features, hidden, first_p, seed=batch + steps, dtype=torch.float32,
                              device=device)  # fmt: skip
    assert fused_gru.supports(x.transpose(0, 1), h0, hidden)
    loop = values_and_grads(cell_loop, cell, x, first, h0, seed=1)
    exact = values_and_grads(cell_loop, copy.deepcopy(cell).double(), x.detach().double().requires_grad_(), first,
                             h0.detach().double().requires_grad_(), seed=1)  # fmt: skip
    refuse = mock.Mock(side_effect=AssertionError("the Python loop ran instead of the kernel"))
    with mock.patch.object(layers, "_forward_loop", refuse), mock.patch.object(layers, "_backward_block", refuse):
        got = values_and_grads(gru_sequence, cell, x, first, h0, seed=1)
    names = ["states", "last", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, fused, looped, truth in zip(names, got, loop, exact):
        error, loop_error = (float((v.double() - truth).abs().max()) for v in (fused, looped))
        assert error <= 4 * loop_error + 1e-6, f"{name}: {error:.2g} from fp64, the GRUCell loop {loop_error:.2g}"


def patch_the_interpreter() -> None:
    """Triton 3.6's interpreter (the version torch 2.11's CUDA build pins) takes a loop bound's value with int() on a
    one-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
    read the element instead. Triton 3.9 does the same itself."""
    import triton.runtime.interpreter as interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def interpreted(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python with Triton's interpreter on and this folder importable."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(fused_gru.triton is None, reason="Triton is not installed")
def test_the_kernels_under_the_interpreter_are_the_cell_loop():
    done = interpreted("import test_fused_gru as t\nt.patch_the_interpreter()\n"
                       "for c in t.CASES:\n    t.assert_fused_is_the_cell_loop(*c)\nprint('ok')")  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize(
    "why, x, h0, interpreted",
    [
        ("hidden size without a kernel", torch.zeros(4, 2, 3), torch.zeros(2, 12), True),
        ("bf16", torch.zeros(4, 2, 3, dtype=torch.bfloat16), torch.zeros(2, 32, dtype=torch.bfloat16), True),
        ("h0 in another dtype", torch.zeros(4, 2, 3), torch.zeros(2, 32, dtype=torch.float64), True),
        ("h0 of one row for two", torch.zeros(4, 2, 3), torch.zeros(1, 32), True),
        ("an empty window", torch.zeros(0, 2, 3), torch.zeros(2, 32), True),
        ("CPU tensor outside the interpreter", torch.zeros(4, 2, 3), torch.zeros(2, 32), False),
    ],
)
def test_cases_the_kernels_do_not_cover_take_the_loop(why, x, h0, interpreted):
    with mock.patch.object(fused_gru, "INTERPRETED", interpreted):
        assert not fused_gru.supports(x, h0, h0.shape[1]), why


def test_switched_off_the_kernels_are_not_used():
    done = interpreted("from worldmodel.models import fused_gru\nimport torch\n"
                       "x, h0 = torch.zeros(4, 2, 3), torch.zeros(2, 32)\nbefore = fused_gru.supports(x, h0, 32)\n"
                       "fused_gru.ENABLED = False\nprint(before, fused_gru.supports(x, h0, 32))")  # fmt: skip
    expected = "True False" if fused_gru.triton is not None else "False False"
    assert done.stdout.strip() == expected, done.stderr[-3000:]


class _Kernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, T, B, H=, BLOCK_B=)` calls `run(*args)`."""

    def __init__(self, run):
        self.run = run

    def __getitem__(self, grid):
        return lambda *args, H, BLOCK_B: self.run(*args[:-2])


def _fails(*args):
    raise RuntimeError("no kernel image is available for execution on the device")


@pytest.mark.skipif(fused_gru.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_a_kernel_triton_cannot_run_hands_over_to_the_loop_with_one_warning(failing, caplog):
    """A GPU that this Triton cannot build for must not end the run: the Python loop takes over, for the rest of the
    process, and the run's log says so once. The kernel that does run is stood in for by the loop's own step."""
    kernels = {"forward": _Kernel(layers._forward_loop), "backward": _Kernel(_fails)}
    if failing == "forward":
        kernels = {"forward": _Kernel(_fails), "backward": _Kernel(_fails)}
    cell, x, first, h0 = case(5, 6, 3, 16, 0.3, seed=4, dtype=torch.float32)
    expected = values_and_grads(cell_loop, cell, x, first, h0, seed=1)
    with mock.patch.multiple(fused_gru, INTERPRETED=True, ENABLED=True, _forward_kernel=kernels["forward"],
                             _backward_kernel=kernels["backward"]):  # fmt: skip
        got = values_and_grads(gru_sequence, cell, x, first, h0, seed=1)
        assert not fused_gru.ENABLED
        values_and_grads(gru_sequence, cell, x, first, h0, seed=1)  # no second warning
    for name, a, b in zip(["states", "last", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    warnings = [r.getMessage() for r in caplog.records if "Triton kernels failed" in r.getMessage()]
    assert len(warnings) == 1 and "no kernel image is available" in warnings[0]
