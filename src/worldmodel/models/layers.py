"""A GRU run over a whole sequence with the state reset where an episode starts, with a hand-written backward pass.

Windows may span an episode boundary (see replay.py), so the recurrent state must be zeroed at the rows marked
`first`. The fused `nn.GRU` cannot do that, and stepping `nn.GRUCell` under autograd records ~25 small ops per step
and computes the weight gradients one step at a time: on a CPU that loop was about 40% of the default model's
update (2.8 of 6.3 ms at batch 32 x 16).

`gru_sequence` computes exactly the same function with the same `nn.GRUCell` parameters (so checkpoints and the
step-by-step imagination path are unchanged), but:
* the input projections of all steps are one matmul, and nothing is recorded per step;
* the forward loop is 8 ops per step and the backward loop 5: the gate derivatives that do not depend on the incoming
  gradient are computed for a block of steps at once before it;
* the forward pass keeps only what backward needs (the gates, the state each step started from, the n part of the
  hidden projection), and the backward pass runs in blocks of steps, each block's weight gradients one matmul, with
  block-sized buffers (BLOCK_BYTES) that are reused. The two passes used to allocate five 48 MB buffers an update at
  batch 256 x 64 x 256; glibc gives any allocation over 32 MB back to the kernel when it is freed, so each came back
  as freshly zeroed pages on every update, about a fifth of the update's time (README, "Speed").
On CUDA, where launching those ops costs more than running them, the two loops are each one Triton kernel when
fused_gru.py supports the case (fp32, hidden size 16, 32 or 64). Under torch.compile it falls back to the GRUCell
loop: Inductor fuses that loop itself (compiling through this Function measured slower). Under autocast
(trainer.precision=bf16) it runs in autocast's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from worldmodel.models import fused_gru

#: Size of the backward pass's per-block buffers on the host. One block spans the whole window at small sizes (batch
#: 32 x 16 x 32 needs 200 KB), so there the pass is a single block.
BLOCK_BYTES = 4 << 20


class _ResetGRU(torch.autograd.Function):
    """Time-major: x [T, B, F], keep [T, B, 1] (0 where the state resets before step t), h0 [B, H] -> states [T, B, H]."""

    @staticmethod
    def forward(ctx, x, keep, h0, w_ih, w_hh, b_ih, b_hh):
        T, B, F = x.shape
        H = w_hh.shape[1]
        # Each step's input projections, overwritten in place by its gates r, z and n (what backward needs).
        gates = torch.addmm(b_ih, x.reshape(T * B, F), w_ih.t()).view(T, B, 3, H)
        hp = x.new_empty(T, B, H)  # state each step starts from (after the reset)
        gh_n = x.new_empty(T, B, H)  # n part of the hidden projection: the only part backward needs
        states = x.new_empty(T, B, H)
        args = (gates, keep, h0, w_hh, b_hh, hp, gh_n, states)
        ctx.fused = fused_gru.supports(x, h0, H) and fused_gru.forward(*args)
        if not ctx.fused:
            _forward_loop(*args)
        ctx.save_for_backward(x, keep, w_ih, w_hh, hp, gh_n, gates)
        return states

    @staticmethod
    def backward(ctx, d_states):
        x, keep, w_ih, w_hh, hp, gh_n, gates = ctx.saved_tensors
        T, B, F = x.shape
        H = w_hh.shape[1]
        dx = torch.empty_like(x)
        d_w_ih, d_w_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
        d_b_ih, d_b_hh = w_ih.new_zeros(3 * H), w_hh.new_zeros(3 * H)
        # The kernel's forward pass saved what the loop's does: if its backward cannot run, the loop's can.
        grads = fused_gru.backward(gates, hp, gh_n, keep, d_states, w_hh) if ctx.fused else None
        if grads is not None:
            dgh, dgi, carry = grads
            _hidden_grads(hp, dgh.view(T * B, 3 * H), d_w_hh, d_b_hh)
            _input_grads(x, dgi.view(T * B, 3 * H), w_ih, dx, d_w_ih, d_b_ih)
            return dx, None, carry, d_w_ih, d_w_hh, d_b_ih, d_b_hh
        carry = torch.zeros_like(hp[0])  # dL/d(state before step t), flowing backwards in time
        # Blocks on the host only: there a freed sequence-sized buffer goes back to the kernel (see above). A GPU's
        # caching allocator keeps its memory, so one block spares it the launches of the others.
        block = max(1, BLOCK_BYTES // (B * 3 * H * x.element_size())) if x.device.type == "cpu" else T
        for end in range(T, 0, -block):
            s = slice(max(0, end - block), end)
            carry = _backward_block(x[s], keep[s], hp[s], gh_n[s], gates[s], d_states[s], carry, w_ih, w_hh,
                                    dx[s], d_w_ih, d_w_hh, d_b_ih, d_b_hh)  # fmt: skip
        return dx, None, carry, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def _forward_loop(gates, keep, h0, w_hh, b_hh, hp, gh_n, states) -> None:
    """The forward recurrence, one step at a time: fused_gru.forward's function (see there for the arguments)."""
    B, H = h0.shape
    gh = gates.new_empty(B, 3, H)  # one step's hidden projection, reused by every step
    gh_rz, gh_n_step, gh_flat = gh[:, :2], gh[:, 2], gh.view(B, 3 * H)
    # Views of every step made up front: indexing inside the loop would cost more than the math at small sizes.
    steps = zip(gates[:, :, :2].unbind(0), gates[:, :, 0].unbind(0), gates[:, :, 1].unbind(0),
                gates[:, :, 2].unbind(0), keep.unbind(0), hp.unbind(0), gh_n.unbind(0), states.unbind(0))  # fmt: skip
    h, w_hh_t = h0, w_hh.t()
    for rz_t, r_t, z_t, n_t, keep_t, hp_t, gh_n_t, out in steps:
        torch.mul(h, keep_t, out=hp_t)
        torch.addmm(b_hh, hp_t, w_hh_t, out=gh_flat)
        rz_t.add_(gh_rz).sigmoid_()
        gh_n_t.copy_(gh_n_step)
        n_t.addcmul_(r_t, gh_n_t).tanh_()
        h = torch.lerp(n_t, hp_t, z_t, out=out)  # (1 - z) * n + z * h


def _backward_block(x, keep, hp, gh_n, gates, d_states, carry, w_ih, w_hh, dx, d_w_ih, d_w_hh, d_b_ih, d_b_hh):
    """Backpropagates `carry` through one block of K steps (all tensors are the block's [K, ...] slices): writes dx,
    adds to the weight and bias gradients, and returns the carry into the step before the block."""
    K, B, F = x.shape
    H = w_hh.shape[1]
    r, z, n = gates[:, :, 0], gates[:, :, 1], gates[:, :, 2]
    # dL/dgh_t = dL/dh_t * dgh_dh[t]: the factors that do not depend on the incoming gradient, for the whole block.
    # d(pre-activation of n)/dh = (1 - z)(1 - n^2); r's and z's pre-activations follow by the chain rule.
    one_minus_z = torch.rsub(z, 1)
    dn = torch.addcmul(torch.ones_like(n), n, n, value=-1).mul_(one_minus_z)
    dgh_dh = x.new_empty(K, B, 3, H)
    torch.mul(dn, gh_n, out=dgh_dh[:, :, 0]).mul_(torch.addcmul(r, r, r, value=-1))  # * r (1 - r)
    torch.sub(hp, n, out=dgh_dh[:, :, 1]).mul_(z).mul_(one_minus_z)
    torch.mul(dn, r, out=dgh_dh[:, :, 2])
    dgh = torch.empty_like(dgh_dh)  # gradient of the hidden projection at each step
    dh_all = torch.empty_like(n)
    steps = zip(d_states.unbind(0), dh_all.unbind(0), dgh.unbind(0), dgh.view(K, B, 3 * H).unbind(0),
                dgh_dh.unbind(0), z.unbind(0), keep.unbind(0))  # fmt: skip
    for d_t, dh_t, dgh_t, dgh_row, dgh_dh_t, z_t, keep_t in reversed(list(steps)):
        dh = torch.add(d_t, carry, out=dh_t)
        torch.mul(dh.unsqueeze(1), dgh_dh_t, out=dgh_t)
        carry = torch.addmm(dh * z_t, dgh_row, w_hh).mul_(keep_t)
    dgh_flat = dgh.view(K * B, 3 * H)
    _hidden_grads(hp, dgh_flat, d_w_hh, d_b_hh)
    # The input projection's gradient equals the hidden one's except in the n part, where r does not scale it:
    # dgh becomes it in place, once the hidden weights' gradients have been read from it.
    torch.mul(dh_all, dn, out=dgh[:, :, 2])
    _input_grads(x, dgh_flat, w_ih, dx, d_w_ih, d_b_ih)
    return carry


def _hidden_grads(hp, dgh, d_w_hh, d_b_hh) -> None:
    """Adds the hidden weights' and bias's gradients from dgh [K * B, 3H] and the states hp [K, B, H] they saw."""
    d_w_hh.addmm_(dgh.t(), hp.reshape(-1, hp.shape[-1]))
    d_b_hh += dgh.sum(0)


def _input_grads(x, dgi, w_ih, dx, d_w_ih, d_b_ih) -> None:
    """Writes dx [K, B, F] and adds the input weights' and bias's gradients, from dgi [K * B, 3H]."""
    x_flat = x.reshape(-1, x.shape[-1])
    torch.mm(dgi, w_ih, out=dx.view(x_flat.shape))
    d_w_ih.addmm_(dgi.t(), x_flat)
    d_b_ih += dgi.sum(0)


def gru_sequence(cell: nn.GRUCell, x: torch.Tensor, first: torch.Tensor, h0: torch.Tensor | None = None,
                 time_major: bool = False):  # fmt: skip
    """Runs `cell` over x [B, T, F], zeroing the state before every step where first [B, T] is set.

    Returns (states [B, T, H], last state [B, H]), the same values (up to float rounding) and gradients as
    stepping `cell` in a Python loop. With time_major, x is [T, B, F], first [T, B] and states [T, B, H]: a caller
    that keeps its activations time-major spares the copy of x and of the states into the other layout.
    """
    batch_dim = 1 if time_major else 0
    if h0 is None:
        h0 = x.new_zeros(first.shape[batch_dim], cell.hidden_size)
    if torch.compiler.is_compiling() or cell.bias is False:
        if not time_major:
            return gru_cell_loop(cell, x, first, h0)
        states, last = gru_cell_loop(cell, x.transpose(0, 1), first.transpose(0, 1), h0)
        return states.transpose(0, 1), last
    x_tm, first_tm = (x, first) if time_major else (x.transpose(0, 1), first.t())
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would run GRUCell's matmuls in its dtype, and so everything computed from them: here the same, with
        # the inputs and weights cast once per window. Gradients reach the fp32 weights through the casts, in fp32.
        dtype = torch.get_autocast_dtype(x.device.type)
        x_tm, h0, params = x_tm.to(dtype), h0.to(dtype), [p.to(dtype) for p in params]
    keep = (~first_tm.bool()).unsqueeze(-1).to(x_tm.dtype)
    with torch.autocast(x.device.type, enabled=False):  # all in one dtype already: no per-op casts inside
        states = _ResetGRU.apply(x_tm.contiguous(), keep, h0, *params)
    return (states if time_major else states.transpose(0, 1)), states[-1]


def gru_cell_loop(cell: nn.GRUCell, x: torch.Tensor, first: torch.Tensor, h0: torch.Tensor):
    """gru_sequence's function computed by stepping `cell` under autograd: its fallback, and the benchmark's baseline."""
    keep = (~first.bool()).unsqueeze(-1).to(x.dtype)
    h, states = h0, []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h * keep[:, t])
        states.append(h)
    return torch.stack(states, dim=1), h
