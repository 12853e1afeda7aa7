"""The GRU's recurrence over a whole window as two Triton kernels, forward and backward, for CUDA.

layers.py's `_ResetGRU` steps through the window in Python: 8 ops a step forward and 5 back, about 210 launches for
the default window of 16 steps. On a GPU those launches set the pace, not the arithmetic: on an H100 the loop's
forward + backward took 5.1 ms at batch 32 x 16 x 32, against 0.87 ms for cuDNN's `nn.GRU`, which cannot reset.
Here each program holds a tile of BLOCK_B rows' state and the hidden weights (3 H x H) in registers for the whole
window, so a step costs three small matmuls and some pointwise math, and no launch.

The kernels compute what the loop computes, into the same tensors. The forward kernel overwrites the input
projections with the gates r, z and n, and fills `hp`, `gh_n` and `states`. The backward kernel gives the gradients
of each step's hidden projection (`dgh`) and input projection (`dgi`), and of the initial state. The weight
gradients are then matmuls over the whole window, shared with the loop (layers.py).

Only fp32 (the matmuls in IEEE fp32, as cuBLAS runs them by default) and hidden sizes 16, 32 and 64 (the weights must
fit in registers). Anything else takes the loop. Under TRITON_INTERPRET=1 the kernels run on the CPU, which is how
tests/test_fused_gru.py checks them on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch comes without Triton: the loop in layers.py runs instead
    triton = None

log = logging.getLogger(__name__)

HIDDEN_SIZES = (16, 32, 64)
BLOCK_B = 16  # rows per program: tl.dot's smallest tile
#: Set False to run the Python loop on CUDA too (benchmarks/bench_updates.py measures one against the other). Set False
#: by the first launch that fails.
ENABLED = True
#: Whether the kernels below were defined for Triton's interpreter: Triton reads TRITON_INTERPRET once, here.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: torch.Tensor, h0: torch.Tensor, hidden: int) -> bool:
    """Whether the kernels can run the window x [T, B, F] from the state h0 [B, hidden]."""
    T, B = x.shape[:2]
    on_device = x.is_cuda or (x.device.type == "cpu" and INTERPRETED)
    return (ENABLED and triton is not None and on_device and x.dtype == torch.float32 and hidden in HIDDEN_SIZES
            and h0.dtype == x.dtype and tuple(h0.shape) == (B, hidden)
            and 0 < T * B * 3 * hidden < 2**31)  # fmt: skip  # the kernels index with int32


def forward(gates, keep, h0, w_hh, b_hh, hp, gh_n, states) -> bool:
    """gates [T, B, 3, H] (input projections in, gates out), keep [T, B, 1], h0 [B, H]; fills hp, gh_n, states.
    False when Triton could not build or launch the kernel: then nothing was written."""
    return _launch(_forward_kernel, gates, keep.contiguous(), h0.contiguous(), w_hh.contiguous(), b_hh.contiguous(),
                   hp, gh_n, states)  # fmt: skip


def backward(gates, hp, gh_n, keep, d_states, w_hh):
    """The forward pass's saved tensors and dL/dstates [T, B, H] -> (dgh, dgi) [T, B, 3, H] and dL/dh0 [B, H], or
    None when Triton could not build or launch the kernel."""
    dgh, dgi, d_h0 = torch.empty_like(gates), torch.empty_like(gates), torch.empty_like(hp[0])
    launched = _launch(_backward_kernel, gates, hp, gh_n, keep.contiguous(), d_states.contiguous(), w_hh.contiguous(),
                       dgh, dgi, d_h0)  # fmt: skip
    return (dgh, dgi, d_h0) if launched else None


def _launch(kernel, gates, *args) -> bool:
    """Runs `kernel` over the window of `gates` on their device (Triton launches on the current one: trainer.device=
    cuda:1 must not run on cuda:0). A failure to build or launch (a GPU this Triton does not support, an unwritable
    cache) switches the kernels off for the process, with one warning: the Python loop computes the same."""
    global ENABLED
    T, B, _, H = gates.shape
    try:
        with torch.cuda.device(gates.device) if gates.is_cuda else contextlib.nullcontext():
            kernel[(triton.cdiv(B, BLOCK_B),)](gates, *args, T, B, H=H, BLOCK_B=BLOCK_B)
    except Exception as err:  # noqa: BLE001  (whatever Triton raises, the loop can take over)
        ENABLED = False
        log.warning("The GRU's Triton kernels failed (%s: %s); it is stepped in Python from now on (the same "
                    "function, slower on a GPU).", type(err).__name__, err)  # fmt: skip
        return False
    return True


if triton is not None:

    @triton.jit
    def _tile(B, H: tl.constexpr, BLOCK_B: tl.constexpr):
        """This program's rows: their offsets in a [B, H] tensor, in a [B, 3, H] one (gate r's), and the row mask."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, H)
        return rows, rows[:, None] * H + cols[None, :], rows[:, None] * (3 * H) + cols[None, :], (rows < B)[:, None]

    @triton.jit
    def _tanh(x):
        return 2 * tl.sigmoid(2 * x) - 1

    @triton.jit
    def _forward_kernel(gates, keep, h0, w_hh, b_hh, hp_out, gh_n_out, states, T, B,
                        H: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
        rows, bh, bg, mask = _tile(B, H, BLOCK_B)
        cols = tl.arange(0, H)
        # Gate g's hidden weights transposed, [H_in, H_out]: element (k, j) is w_hh[g * H + j, k].
        wt = cols[None, :] * H + cols[:, None]
        w_r = tl.load(w_hh + wt)
        w_z = tl.load(w_hh + H * H + wt)
        w_n = tl.load(w_hh + 2 * H * H + wt)
        b_r = tl.load(b_hh + cols)[None, :]
        b_z = tl.load(b_hh + H + cols)[None, :]
        b_n = tl.load(b_hh + 2 * H + cols)[None, :]
        h = tl.load(h0 + bh, mask=mask, other=0.0)
        for t in range(T):
            hp = h * tl.load(keep + t * B + rows, mask=rows < B, other=0.0)[:, None]
            g = gates + t * B * 3 * H
            r = tl.sigmoid(tl.load(g + bg, mask=mask, other=0.0) + tl.dot(hp, w_r, input_precision="ieee") + b_r)
            z = tl.sigmoid(tl.load(g + H + bg, mask=mask, other=0.0) + tl.dot(hp, w_z, input_precision="ieee") + b_z)
            gh_n = tl.dot(hp, w_n, input_precision="ieee") + b_n
            n = _tanh(tl.load(g + 2 * H + bg, mask=mask, other=0.0) + r * gh_n)
            h = n + z * (hp - n)  # (1 - z) n + z hp, as torch.lerp computes it
            tl.store(g + bg, r, mask=mask)
            tl.store(g + H + bg, z, mask=mask)
            tl.store(g + 2 * H + bg, n, mask=mask)
            o = t * B * H + bh
            tl.store(hp_out + o, hp, mask=mask)
            tl.store(gh_n_out + o, gh_n, mask=mask)
            tl.store(states + o, h, mask=mask)

    @triton.jit
    def _backward_kernel(gates, hp_in, gh_n_in, keep, d_states, w_hh, dgh, dgi, d_h0, T, B,
                         H: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
        rows, bh, bg, mask = _tile(B, H, BLOCK_B)
        cols = tl.arange(0, H)
        # Gate g's hidden weights as stored, [H_out, H_in]: the state's gradient is the sum of dgh_g @ W_g.
        w = cols[:, None] * H + cols[None, :]
        w_r = tl.load(w_hh + w)
        w_z = tl.load(w_hh + H * H + w)
        w_n = tl.load(w_hh + 2 * H * H + w)
        carry = tl.zeros([BLOCK_B, H], dtype=tl.float32)  # dL/d(state before step t), flowing backwards in time
        for i in range(T):
            t = T - 1 - i
            g = t * B * 3 * H
            o = t * B * H + bh
            r = tl.load(gates + g + bg, mask=mask, other=0.0)
            z = tl.load(gates + g + H + bg, mask=mask, other=0.0)
            n = tl.load(gates + g + 2 * H + bg, mask=mask, other=0.0)
            dh = tl.load(d_states + o, mask=mask, other=0.0) + carry
            dn = dh * (1 - n * n) * (1 - z)  # dL/d(n's pre-activation)
            dr = dn * tl.load(gh_n_in + o, mask=mask, other=0.0) * r * (1 - r)
            dz = dh * (tl.load(hp_in + o, mask=mask, other=0.0) - n) * z * (1 - z)
            dgh_n = dn * r  # r scales the hidden projection's n part, not the input projection's
            tl.store(dgh + g + bg, dr, mask=mask)
            tl.store(dgh + g + H + bg, dz, mask=mask)
            tl.store(dgh + g + 2 * H + bg, dgh_n, mask=mask)
            tl.store(dgi + g + bg, dr, mask=mask)
            tl.store(dgi + g + H + bg, dz, mask=mask)
            tl.store(dgi + g + 2 * H + bg, dn, mask=mask)
            d_hp = dh * z + tl.dot(dr, w_r, input_precision="ieee") + tl.dot(dz, w_z, input_precision="ieee")
            d_hp += tl.dot(dgh_n, w_n, input_precision="ieee")
            carry = d_hp * tl.load(keep + t * B + rows, mask=rows < B, other=0.0)[:, None]
        tl.store(d_h0 + bh, carry, mask=mask)
