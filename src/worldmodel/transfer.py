"""Moving host data into torch tensors on any device: what the ring's writes and the replay buffer's reads share.

To a GPU every copy goes through pinned memory without blocking (see to_device), so that collecting and sampling on
the host never wait for the update the GPU is running.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def copy_into(dest: torch.Tensor, index: slice | torch.Tensor, values: np.ndarray) -> None:
    """dest[index] = host `values`, converted to dest's dtype on the host. Rows given as a slice of a GPU table are
    copied straight from pinned memory into them, one transfer without a wait (see to_device)."""
    if isinstance(index, slice):
        source = as_tensor(values, dtype=dest.dtype)
        dest[index].copy_(source.pin_memory() if dest.device.type == "cuda" else source, non_blocking=True)
    else:
        dest[index] = to_device(values, dest.device, dest.dtype)


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (numpy or torch) as a tensor of `dtype` on `device`, converted on the host.

    To a GPU the copy goes through pinned memory without blocking: a copy from pageable memory makes the host wait
    for every kernel already queued, the update in flight, so each write and each sample would serialise collection
    and sampling with training. The caching host allocator keeps the pinned copy until its transfer is done."""
    tensor = as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def as_tensor(values, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.as_tensor, which refuses numpy views with a negative stride (a reversed view, such as reward-to-go
    computed as cumsum(r[::-1])[::-1]): those are copied first. Only writes that go through torch pay for the check,
    and only when it fails (numpy's own writes on the host take any strides)."""
    try:
        return torch.as_tensor(values, dtype=dtype)
    except ValueError:
        if not isinstance(values, np.ndarray):
            raise
        return torch.as_tensor(values.copy(), dtype=dtype)


def host_array(value, dtype=None) -> np.ndarray:
    """`value` (numpy, torch on any device, list or scalar) as a numpy array of `dtype`; numpy has no bfloat16, so a
    bfloat16 tensor goes through float32."""
    # Per-step writes call this for every column, so numpy arrays come first (torch.Tensor's isinstance is slow).
    if type(value) is not np.ndarray and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
    return np.asarray(value, dtype=dtype)
