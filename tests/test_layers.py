"""gru_sequence: the hand-written GRU with episode resets computes what stepping nn.GRUCell computes, forward and
backward, for any pattern of reset flags."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from worldmodel.models import layers
from worldmodel.models.layers import _ResetGRU, gru_sequence


def cell_loop(cell: nn.GRUCell, x: torch.Tensor, first: torch.Tensor, h0: torch.Tensor):
    """The reference: one GRUCell step per time step under autograd, the state zeroed where `first` is set."""
    h, states = h0, []
    for t in range(x.shape[1]):
        h = cell(x[:, t], torch.where(first[:, t, None], torch.zeros_like(h), h))
        states.append(h)
    return torch.stack(states, dim=1), h


def case(batch, steps, features, hidden, first_p, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cell = nn.GRUCell(features, hidden).to(dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    x = torch.randn(batch, steps, features, generator=g, dtype=dtype)
    first = torch.rand(batch, steps, generator=g) < first_p
    h0 = torch.randn(batch, hidden, generator=g, dtype=dtype)
    return cell.to(device), x.to(device).requires_grad_(), first.to(device), h0.to(device).requires_grad_()


def values_and_grads(fn, cell, x, first, h0, seed=0):
    states, last = fn(cell, x, first, h0)
    g = torch.Generator().manual_seed(seed)
    # A random linear function of every state and of the last one, so every output's gradient path is exercised;
    # drawn in float32 whatever the dtype, so that a float64 reference has the same objective.
    weights = [torch.randn(t.shape, generator=g).to(t.dtype).to(t.device) for t in (states, last)]
    objective = (states * weights[0]).sum() + (last * weights[1]).sum()
    grads = torch.autograd.grad(objective, [x, h0, *cell.parameters()])
    return (states.detach(), last.detach(), *grads)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 9),
    features=st.integers(1, 6),
    hidden=st.integers(1, 6),
    first_p=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    block=st.sampled_from([1, 2, 3, None]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_grucell_loop_forward_and_backward(batch, steps, features, hidden, first_p, block, seed):
    """`block` steps per backward block (None: the default, one block at these sizes), so the carry between blocks
    and the gradients summed over them are checked too."""
    cell, x, first, h0 = case(batch, steps, features, hidden, first_p, seed)
    expected = values_and_grads(cell_loop, cell, x, first, h0, seed)
    block_bytes = layers.BLOCK_BYTES if block is None else block * batch * 3 * hidden * x.element_size()
    with mock.patch.object(layers, "BLOCK_BYTES", block_bytes):
        got = values_and_grads(gru_sequence, cell, x, first, h0, seed)
    for name, a, b in zip(["states", "last", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} differs from the GRUCell loop")


def test_gradcheck():
    """Finite differences agree with the hand-written backward pass (float64)."""
    cell, x, first, h0 = case(3, 5, 4, 3, 0.3, seed=7)
    first[:, 0] = False  # so h0's gradient is not zero everywhere
    keep = (~first).t().unsqueeze(-1).double()
    x_tm = x.detach().transpose(0, 1).contiguous().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _ResetGRU.apply(a[0], keep, *a[1:]), (x_tm, h0, *cell.parameters()))


def test_reset_cuts_all_dependence_on_earlier_steps():
    cell, x, first, h0 = case(2, 6, 3, 4, 0.0, seed=3, dtype=torch.float32)
    first[:, 3] = True
    states, _ = gru_sequence(cell, x, first, h0)
    states[:, 3:].sum().backward()
    assert x.grad[:, :3].abs().max() == 0 and h0.grad.abs().max() == 0
    assert x.grad[:, 3:].abs().max() > 0


def test_no_initial_state_means_zeros():
    cell, x, first, h0 = case(2, 4, 3, 4, 0.0, seed=5, dtype=torch.float32)
    a, _ = gru_sequence(cell, x, first)
    b, _ = gru_sequence(cell, x, first, torch.zeros_like(h0))
    torch.testing.assert_close(a, b)


def assert_reset_gru_is_the_cell_loop(cell, x, first, h0, autocast: bool = False):
    """gru_sequence (time-major: the model's layout) against the GRUCell loop in fp32, values and the gradients of x
    and the weights. With autocast (bf16) it must run _ResetGRU in bf16, as GRUCell's ops would, and the fp32 weights
    get fp32 gradients within 5% of the fp32 loop's; in fp32 the two agree to float rounding."""
    expected, _ = cell_loop(cell, x, first, h0)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *cell.parameters()])
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        got, _ = gru_sequence(cell, x.transpose(0, 1), first.t(), h0, time_major=True)
    assert got.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert type(got.grad_fn).__name__ == "_ResetGRUBackward"
    tol = {"rtol": 0.05, "atol": 0.05} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got.transpose(0, 1).float(), expected, **tol)
    grads = torch.autograd.grad(got.float().square().sum(), [x, *cell.parameters()])
    for name, g, e in zip(["x", "w_ih", "w_hh", "b_ih", "b_hh"], grads, expected_grads):
        assert g.dtype == torch.float32, name
        atol = 0.05 * float(e.abs().max()) if autocast else 1e-5
        torch.testing.assert_close(g, e, rtol=tol["rtol"], atol=atol, msg=name)


def test_autocast_runs_the_recurrence_in_its_dtype():
    assert_reset_gru_is_the_cell_loop(*case(3, 5, 4, 6, 0.3, seed=11, dtype=torch.float32), autocast=True)


@pytest.mark.parametrize("grad_of", ["states", "last"])
def test_float32_gradients_close_to_the_loop(grad_of):
    cell, x, first, h0 = case(8, 16, 10, 12, 0.1, seed=13, dtype=torch.float32)
    grads = []
    for fn in (cell_loop, gru_sequence):
        states, last = fn(cell, x, first, h0)
        out = states.square().sum() if grad_of == "states" else last.square().sum()
        grads.append(torch.autograd.grad(out, [x, *cell.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_time_major_is_the_same_function_in_the_other_layout(autocast):
    cell, x, first, _ = case(3, 5, 4, 6, 0.3, seed=17, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        states, last = gru_sequence(cell, x, first)
        states_tm, last_tm = gru_sequence(cell, x.transpose(0, 1), first.t(), time_major=True)
    assert states_tm.shape == (5, 3, 6)
    torch.testing.assert_close(states_tm.transpose(0, 1), states)
    torch.testing.assert_close(last_tm, last)


@pytest.mark.parametrize("time_major", [False, True])
def test_the_compiled_path_resets_where_first_is_set(time_major):
    """Under trainer.compile=true gru_sequence runs layers.gru_cell_loop: it must be the same function, values and
    gradients, with resets inside the windows, in either layout."""
    cell, x, first, h0 = case(3, 7, 4, 5, 0.0, seed=19)
    first[0, 2] = first[1, 4] = first[1, 5] = first[2, 0] = True
    expected = values_and_grads(gru_sequence, cell, x, first, h0)
    got = values_and_grads(layers.gru_cell_loop, cell, x, first, h0)
    for name, a, b in zip(["states", "last", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gru_cell_loop's {name} differs")

    def compiled(cell, x, first, h0):  # gru_sequence as torch.compile traces it
        with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            if not time_major:
                return gru_sequence(cell, x, first, h0)
            states, last = gru_sequence(cell, x.transpose(0, 1), first.t(), h0, time_major=True)
            return states.transpose(0, 1), last

    got = values_and_grads(compiled, cell, x, first, h0)
    for name, a, b in zip(["states", "last", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"compiled path's {name} differs")


def test_the_cell_loop_after_a_reset_is_a_fresh_start():
    """gru_cell_loop's states from a `first` row on are those of running the rest of the window from a zero state."""
    cell, x, first, h0 = case(2, 6, 3, 4, 0.0, seed=23)
    first[:, 3] = True
    with torch.no_grad():
        states, last = layers.gru_cell_loop(cell, x, first, h0)
        fresh, fresh_last = layers.gru_cell_loop(cell, x[:, 3:], first[:, 3:], torch.zeros_like(h0))
        carried, _ = layers.gru_cell_loop(cell, x, torch.zeros_like(first), h0)
    torch.testing.assert_close(states[:, 3:], fresh, rtol=0, atol=1e-12)
    torch.testing.assert_close(last, fresh_last, rtol=0, atol=1e-12)
    torch.testing.assert_close(states[:, :3], carried[:, :3], rtol=0, atol=0)
    assert not torch.allclose(states[:, 3:], carried[:, 3:])  # the history would have mattered


def test_a_cell_without_biases_runs_the_cell_loop():
    """An nn.GRUCell(bias=False) has no bias tensors for _ResetGRU: gru_sequence steps it instead, the same function."""
    g = torch.Generator().manual_seed(29)
    cell = nn.GRUCell(3, 4, bias=False).double()
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    first = torch.zeros(2, 5, dtype=torch.bool)
    first[0, 2] = True
    h0 = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    expected = values_and_grads(cell_loop, cell, x, first, h0)
    got = values_and_grads(gru_sequence, cell, x, first, h0)
    for name, a, b in zip(["states", "last", "x", "h0", "w_ih", "w_hh"], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
