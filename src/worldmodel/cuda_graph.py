"""GraphedUpdate: the whole training update (loss, backward, clipping, Adam) replayed as one CUDA graph.

At small sizes (the default trainer's batch 32 x 16) an update is a few hundred tiny kernels, and on a GPU the host's
time to launch them, not the GPU's time to run them, sets the pace. A CUDA graph records the kernels of one update
once; each later update is a copy of the batch into the graph's input tensors and one launch.

Recording needs what the update already guarantees (trainer.py): no host-device synchronisation inside it (no
read-backs; tests/test_cuda.py checks this under torch's sync debug mode), fixed shapes, and state that keeps its
memory from one update to the next: parameters and Adam's moments are updated in place, and fused Adam keeps its
step counts on the device. The graph records the kernels, not the values, so a replay computes what an eager update
would from the same inputs and the same state; random draws (the rssm's noise, the ensemble's bootstrap indices)
continue the CUDA generator's stream as an eager update would.

The first `warmup` calls run eagerly, on the side stream the capture then uses (torch's recipe: lazy initialisations,
Adam's state among them, must happen before recording). Every call, eager, recorded or replayed, is exactly one
update, so a run's curve does not change shape, and a resumed run (state loaded before the first update) records its
graph over the loaded state.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, replace
from typing import Callable

import torch

WARMUP_UPDATES = 3


class GraphedUpdate:
    """update(batch) -> values, the same function, with every call after the first `warmup` one CUDA graph replay."""

    def __init__(self, update: Callable, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = WARMUP_UPDATES):  # fmt: skip
        self.update, self.optimizer, self.device, self.warmup = update, optimizer, torch.device(device), int(warmup)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device} (trainer.cuda_graph=true)")
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_calls = 0

    def __call__(self, batch):
        with torch.cuda.device(self.device):
            if self.graph is None:
                if self.eager_calls < self.warmup:
                    self.eager_calls += 1
                    return self._on_side_stream(batch)
                self._record(batch)
            for f in fields(batch):
                getattr(self.inputs, f.name).copy_(getattr(batch, f.name), non_blocking=True)
            self.graph.replay()
            # The graph writes its output into the same memory every replay: the caller gets its own copy.
            return self.outputs.clone()

    def _on_side_stream(self, batch):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)  # the batch was gathered on the current stream
        with torch.cuda.stream(self.stream):
            values = self.update(batch)
        current.wait_stream(self.stream)
        return values

    def _record(self, batch) -> None:
        """Records one update on static copies of `batch`'s tensors (the graph's inputs from then on); it runs
        nothing: the replay that follows in __call__ is this call's update."""
        self.inputs = replace(batch, **{f.name: getattr(batch, f.name).clone() for f in fields(batch)})
        self.graph = torch.cuda.CUDAGraph()
        with _capturable(self.optimizer), torch.cuda.graph(self.graph, stream=self.stream):
            self.outputs = self.update(self.inputs)


@contextlib.contextmanager
def _capturable(optimizer: torch.optim.Optimizer):
    """Adam refuses to be recorded unless its groups say `capturable`. For fused Adam (ours) the flag changes no
    kernel, so it is set for the recording only: checkpoints keep saying False, and an eager run that resumes from
    them gets no warning about capturable optimizers running eagerly."""
    saved = [group["capturable"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["capturable"] = True
    try:
        yield
    finally:
        for group, value in zip(optimizer.param_groups, saved):
            group["capturable"] = value
