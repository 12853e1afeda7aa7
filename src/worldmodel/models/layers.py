"""A GRU run over a whole sequence with the state reset where an episode starts, with a hand-written backward pass.

Windows may span an episode boundary (see replay.py), so the recurrent state must be zeroed at the rows marked
`first`. The fused `nn.GRU` cannot do that, and stepping `nn.GRUCell` under autograd records ~25 small ops per step
and computes the weight gradients one step at a time: on a CPU that loop was about 40% of the default model's
update (2.8 of 6.3 ms at batch 32 x 16).

`gru_sequence` computes exactly the same function with the same `nn.GRUCell` parameters (so checkpoints and the
step-by-step imagination path are unchanged), but:
* the input projections of all steps are one matmul, and so are all four weight/bias gradients in the backward pass;
* the forward loop is 7 ops per step, the backward loop 5 (the gate derivatives that do not depend on the incoming
  gradient are computed for all steps at once before it), and nothing is recorded per step.
Under torch.compile or autocast it falls back to the GRUCell loop: Inductor fuses that loop itself (compiling through
this Function measured slower), and autocast's per-op casting rules are the GRUCell's.
"""

from __future__ import annotations

import torch
from torch import nn


class _ResetGRU(torch.autograd.Function):
    """Time-major: x [T, B, F], keep [T, B, 1] (0 where the state resets before step t), h0 [B, H] -> states [T, B, H]."""

    @staticmethod
    def forward(ctx, x, keep, h0, w_ih, w_hh, b_ih, b_hh):
        T, B, F = x.shape
        H = w_hh.shape[1]
        gi = torch.addmm(b_ih, x.reshape(T * B, F), w_ih.t()).view(T, B, 3, H)
        hp = x.new_empty(T, B, H)  # state each step starts from (after the reset)
        gh = x.new_empty(T, B, 3, H)  # hidden projections; the n part is needed by the backward pass
        rz = x.new_empty(T, B, 2, H)  # reset and update gates
        n = x.new_empty(T, B, H)  # candidate state
        states = x.new_empty(T, B, H)
        # Views of every step made up front: indexing inside the loop would cost more than the math at small sizes.
        steps = zip(gi[:, :, :2].unbind(0), gi[:, :, 2].unbind(0), keep.unbind(0), hp.unbind(0),
                    gh.view(T, B, 3 * H).unbind(0), gh[:, :, :2].unbind(0), gh[:, :, 2].unbind(0), rz.unbind(0),
                    rz[:, :, 0].unbind(0), rz[:, :, 1].unbind(0), n.unbind(0), states.unbind(0))  # fmt: skip
        h, w_hh_t = h0, w_hh.t()
        for gi_rz, gi_n, keep_t, hp_t, gh_t, gh_rz, gh_n, rz_t, r_t, z_t, n_t, out in steps:
            torch.mul(h, keep_t, out=hp_t)
            torch.addmm(b_hh, hp_t, w_hh_t, out=gh_t)
            torch.sigmoid(gi_rz + gh_rz, out=rz_t)
            torch.tanh(torch.addcmul(gi_n, r_t, gh_n), out=n_t)
            h = torch.lerp(n_t, hp_t, z_t, out=out)  # (1 - z) * n + z * h
        ctx.save_for_backward(x, keep, w_ih, w_hh, hp, gh, rz, n)
        return states

    @staticmethod
    def backward(ctx, d_states):
        x, keep, w_ih, w_hh, hp, gh, rz, n = ctx.saved_tensors
        T, B, F = x.shape
        H = w_hh.shape[1]
        r, z = rz[:, :, 0], rz[:, :, 1]
        # dL/dgh_t = dL/dh_t * dgh_dh[t]: the factors that do not depend on the incoming gradient, for all steps at
        # once, written in place (at large sizes these elementwise passes cost as much as the loop's matmuls).
        # d(pre-activation of n)/dh = (1 - z)(1 - n^2); r's and z's pre-activations follow by the chain rule.
        one_minus_z = torch.rsub(z, 1)
        dn = torch.addcmul(torch.ones_like(n), n, n, value=-1).mul_(one_minus_z)
        dgh_dh = torch.empty_like(gh)
        torch.mul(dn, gh[:, :, 2], out=dgh_dh[:, :, 0]).mul_(torch.addcmul(r, r, r, value=-1))  # * r (1 - r)
        torch.sub(hp, n, out=dgh_dh[:, :, 1]).mul_(z).mul_(one_minus_z)
        torch.mul(dn, r, out=dgh_dh[:, :, 2])
        dgh = torch.empty_like(gh)  # gradient of the hidden projection at each step
        dh_all = torch.empty_like(hp)
        carry = torch.zeros_like(hp[0])
        steps = zip(d_states.unbind(0), dh_all.unbind(0), dgh.unbind(0), dgh.view(T, B, 3 * H).unbind(0),
                    dgh_dh.unbind(0), z.unbind(0), keep.unbind(0))  # fmt: skip
        for d_t, dh_t, dgh_t, dgh_row, dgh_dh_t, z_t, keep_t in reversed(list(steps)):
            dh = torch.add(d_t, carry, out=dh_t)
            torch.mul(dh.unsqueeze(1), dgh_dh_t, out=dgh_t)
            carry = torch.addmm(dh * z_t, dgh_row, w_hh).mul_(keep_t)
        dgh_flat = dgh.view(T * B, 3 * H)
        d_w_hh, d_b_hh = dgh_flat.t() @ hp.view(T * B, H), dgh_flat.sum(0)
        # The input projection's gradient equals the hidden one's except in the n part, where r does not scale it:
        # dgh becomes it in place, once the hidden weights' gradients have been read from it.
        torch.mul(dh_all, dn, out=dgh[:, :, 2])
        dgi = dgh_flat
        dx = (dgi @ w_ih).view(T, B, F)
        d_w_ih = dgi.t() @ x.reshape(T * B, F)
        return dx, None, carry, d_w_ih, d_w_hh, dgi.sum(0), d_b_hh


def gru_sequence(cell: nn.GRUCell, x: torch.Tensor, first: torch.Tensor, h0: torch.Tensor | None = None):
    """Runs `cell` over x [B, T, F], zeroing the state before every step where first [B, T] is set.

    Returns (states [B, T, H], last state [B, H]), the same values (up to float rounding) and gradients as
    stepping `cell` in a Python loop.
    """
    if h0 is None:
        h0 = x.new_zeros(first.shape[0], cell.hidden_size)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or cell.bias is False:
        return gru_cell_loop(cell, x, first, h0)
    keep = (~first.bool()).t().unsqueeze(-1).to(x.dtype)
    states = _ResetGRU.apply(x.transpose(0, 1).contiguous(), keep, h0, cell.weight_ih, cell.weight_hh, cell.bias_ih,
                             cell.bias_hh)  # fmt: skip
    return states.transpose(0, 1), states[-1]


def gru_cell_loop(cell: nn.GRUCell, x: torch.Tensor, first: torch.Tensor, h0: torch.Tensor):
    """gru_sequence's function computed by stepping `cell` under autograd: its fallback, and the benchmark's baseline."""
    keep = (~first.bool()).unsqueeze(-1).to(x.dtype)
    h, states = h0, []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h * keep[:, t])
        states.append(h)
    return torch.stack(states, dim=1), h
