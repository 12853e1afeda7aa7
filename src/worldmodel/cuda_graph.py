"""GraphedUpdate: the whole training update (loss, backward, clipping, Adam) replayed as one CUDA graph.

At small sizes (the default trainer's batch 32 x 16) an update is a few hundred tiny kernels, and on a GPU the host's
time to launch them, not the GPU's time to run them, is expected to set the pace (benchmarks/bench_updates.py's CUDA
rows measure it). A CUDA graph records the kernels of one update
once; each later update is a copy of its input into the graph's input tensors and one launch. When the replay ring
is on the same GPU, the graph also records the gather of the batch from the ring (Trainer.build_update): the input
copied in is then only the rows drawn, one small copy, where the host used to launch 13 kernels: the index copy,
the gathers, the ops that derive `first`, and a copy of each of the batch's seven tensors. The ring's tables keep their memory for the whole run (writes and loads go into them in
place), so the recorded gather reads whatever was collected before each replay.

Recording needs what the update already guarantees (trainer.py): no host-device synchronisation inside it (no
read-backs; tests/test_cuda.py checks this under torch's sync debug mode), fixed shapes, and state that keeps its
memory from one update to the next: parameters and Adam's moments are updated in place, and fused Adam keeps its
step counts on the device. The graph records the kernels, not the values, so a replay computes what an eager update
would from the same inputs and the same state; random draws (the rssm's noise, the ensemble's bootstrap indices)
continue the CUDA generator's stream as an eager update would.

Every call copies its input into the graph's input tensors, made at the first call, and each of the first `warmup`
calls runs one eager update on them, on the side stream the recording then uses (torch's recipe: lazy
initialisations, Adam's state and a compiled loss's kernels among them, must happen before recording, on exactly
the inputs that will be recorded: a compiled loss compiles again for another input layout, which cannot happen while
recording). The next call records an update and replays it. Every call, eager or replayed,
is exactly one update, so a run's curve does not change shape, and a resumed run (state loaded before the first
update) records its graph over the loaded state.

The recording fixes what was Python state when it was made: the learning rate, Adam's betas and eps and the
clipping norm are numbers inside the graph, and the graph updates the tensors the optimizer held then. A learning-rate
schedule, or loading another optimizer state after the first updates, would need a new recording; Trainer has
neither.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import fields, is_dataclass, replace
from typing import Callable

import torch

log = logging.getLogger(__name__)

WARMUP_UPDATES = 3


class GraphedUpdate:
    """update(batch) -> values, the same function, with every call after the first `warmup` one CUDA graph replay.

    The input is a Batch (a dataclass of tensors) or a single tensor. With `prepare`, each call is
    update(prepare(input)) and the graph records prepare too: given ReplayBuffer.batch_at and the rows that
    ReplayBuffer.sample_rows picks, the graph gathers its own batch from the ring, and a call copies in only those
    indices."""

    def __init__(self, update: Callable, optimizer: torch.optim.Optimizer, device: torch.device,
                 warmup: int = WARMUP_UPDATES, prepare: Callable | None = None):  # fmt: skip
        self.update, self.optimizer, self.device, self.warmup = update, optimizer, torch.device(device), int(warmup)
        self.prepare = prepare or (lambda batch: batch)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device} (trainer.cuda_graph=true)")
        if self.warmup < 1:  # the first update reads a flag back and creates Adam's state: neither can be recorded
            raise ValueError(f"GraphedUpdate needs warmup >= 1 eager updates before recording, not {warmup}")
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream()
        self.inputs = self.outputs = self.graph = None
        self.eager_calls = 0

    def __call__(self, batch):
        with torch.cuda.device(self.device):
            self._copy_in(batch)
            if self.graph is None:
                if self.eager_calls < self.warmup:
                    self.eager_calls += 1
                    return self._on_side_stream()
                self._record()
            self.graph.replay()
            # The graph writes its output into the same memory every replay: the caller gets its own copy.
            return self.outputs.clone()

    def _copy_in(self, batch) -> None:
        given = _tensors(batch)
        if self.inputs is None:
            static = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in given.items()}
            self.inputs = replace(batch, **static) if is_dataclass(batch) else static[None]
        expected = _tensors(self.inputs)
        if given.keys() != expected.keys():
            raise ValueError(f"GraphedUpdate: recorded for {_kind(self.inputs)}, called with {_kind(batch)}")
        for name, static in expected.items():
            value = given[name]
            if value.shape != static.shape or value.dtype != static.dtype:  # copy_ would broadcast or cast silently
                raise ValueError(
                    f"GraphedUpdate: {f'batch.{name}' if name else 'the input'} is {tuple(value.shape)} {value.dtype}, but the update's inputs are "
                    f"{tuple(static.shape)} {static.dtype}: a graphed update takes one batch shape "
                    "(trainer.batch_size x trainer.seq_len) for the whole run."
                )
            # From page-locked host memory (the rows from ReplayBuffer.sample_rows) the copy is queued without waiting.
            static.copy_(value, non_blocking=True)

    def _on_side_stream(self):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)  # the inputs were written on the current stream
        with torch.cuda.stream(self.stream):
            values = self.update(self.prepare(self.inputs))
        current.wait_stream(self.stream)  # and are overwritten there by the next call
        return values

    def _record(self) -> None:
        """Records one update on the input tensors. It runs nothing: the replay after it is this call's update."""
        graph = torch.cuda.CUDAGraph()
        with _capturable(self.optimizer), torch.cuda.graph(graph, stream=self.stream):
            outputs = self.update(self.prepare(self.inputs))
        self.graph, self.outputs = graph, outputs  # only once recorded: a failed recording leaves nothing half-made
        log.info("recorded the update as a CUDA graph after %d eager updates; every later update replays it",
                 self.eager_calls)  # fmt: skip


def _tensors(inputs) -> dict[str | None, torch.Tensor]:
    """The tensors of an update's input by field name (a dataclass), or the one tensor given (name None)."""
    if is_dataclass(inputs):
        return {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    return {None: inputs}


def _kind(inputs) -> str:
    return f"a {type(inputs).__name__}" if is_dataclass(inputs) else "one tensor"


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
