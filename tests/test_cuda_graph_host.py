"""GraphedUpdate's own decisions, on the host: its argument checks, when it runs eagerly, records and replays, and
what the recording leaves behind. torch.cuda's streams and graphs are replaced by stand-ins that say what was asked of
them (tests/test_cuda.py runs the real ones on a GPU, and compares with eager updates)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import pytest
import torch

from worldmodel.cuda_graph import GraphedUpdate, _capturable


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeGraph:
    """Counts replays; `recording` is True inside torch.cuda.graph(...)."""

    recording = False

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@contextlib.contextmanager
def fake_record(graph, stream=None):
    FakeGraph.recording = True
    try:
        yield
    finally:
        FakeGraph.recording = False


@pytest.fixture
def host_cuda(monkeypatch):
    """torch.cuda's device, streams and graphs as stand-ins: GraphedUpdate's logic runs without a GPU."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_record)


@dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor


def optimizer(capturable=(False,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in capturable]
    opt = torch.optim.Adam(groups, lr=1e-3)
    for group, flag in zip(opt.param_groups, capturable):
        group["capturable"] = flag
    return opt


def graphed(update, warmup=2, prepare=None, opt=None):
    """A GraphedUpdate built under the stand-ins, its input tensors on the host."""
    graph = GraphedUpdate(update, opt or optimizer(), "cuda", warmup=warmup, prepare=prepare)
    graph.device = torch.device("cpu")
    return graph


def test_a_graphed_update_refuses_the_host_and_fewer_than_one_warmup_update():
    update, opt = (lambda batch: batch), optimizer()
    with pytest.raises(ValueError, match="need a CUDA device, not cpu"):
        GraphedUpdate(update, opt, "cpu")
    for warmup in (0, -1):  # refused before any CUDA call: no GPU needed to see it
        with pytest.raises(ValueError, match=f"warmup >= 1 eager updates before recording, not {warmup}"):
            GraphedUpdate(update, opt, "cuda", warmup=warmup)


def test_warmup_updates_run_eagerly_then_one_recording_is_replayed_for_every_later_call(host_cuda):
    """`warmup` eager updates on the graph's own input tensors, then one call that records the update and replays it,
    then replays only: every call is exactly one update, and only the recording sees `capturable` set."""
    opt = optimizer()
    calls = []

    def update(batch):
        calls.append((FakeGraph.recording, opt.param_groups[0]["capturable"], batch.clone()))
        return batch.sum().reshape(1)

    step = graphed(update, warmup=2, opt=opt)
    for i in range(5):
        out = step(torch.full((2, 3), float(i)))
        assert torch.equal(step.inputs, torch.full((2, 3), float(i)))  # every call copies its input in
        if i < 2:
            assert step.graph is None and step.eager_calls == i + 1 and out.item() == 6.0 * i
    assert [(recording, capturable) for recording, capturable, _ in calls] == [(False, False)] * 2 + [(True, True)]
    assert [batch[0, 0].item() for *_, batch in calls] == [0.0, 1.0, 2.0]  # update(the graph's inputs) each time
    assert step.graph.replays == 3 and step.eager_calls == 2
    assert opt.param_groups[0]["capturable"] is False  # set for the recording only: checkpoints keep saying False
    assert out is not step.outputs and out.data_ptr() != step.outputs.data_ptr()  # the caller's own copy
    out.add_(1.0)
    assert step.outputs.item() == 12.0  # the recording's output (of the input at call 3) is left as it was


def test_a_graphed_update_records_prepare_with_the_update(host_cuda):
    """With `prepare` (the ring's gather), each update is update(prepare(input)), eager or recorded."""
    seen = []
    step = graphed(lambda batch: seen.append(batch) or batch.sum().reshape(1), warmup=1, prepare=lambda rows: rows * 10)
    step(torch.ones(3))
    step(torch.ones(3))
    assert [b.tolist() for b in seen] == [[10.0] * 3] * 2


def test_a_failed_recording_leaves_no_graph_and_the_optimizer_as_it_was(host_cuda):
    opt = optimizer(capturable=(False, True))
    fail = [True]

    def update(batch):
        if FakeGraph.recording and fail[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return batch.sum().reshape(1)

    step = graphed(update, warmup=1, opt=opt)
    step(torch.ones(2))
    with pytest.raises(RuntimeError, match="capturing"):
        step(torch.ones(2))
    assert step.graph is None and step.outputs is None
    assert [g["capturable"] for g in opt.param_groups] == [False, True]
    fail[0] = False
    assert step(torch.ones(2)).item() == 2.0 and step.graph.replays == 1  # the next call records again


def test_capturable_is_set_for_the_recording_and_each_groups_own_value_restored():
    opt = optimizer(capturable=(False, True, False))
    with _capturable(opt):
        assert [g["capturable"] for g in opt.param_groups] == [True, True, True]
    assert [g["capturable"] for g in opt.param_groups] == [False, True, False]


def test_a_graphed_update_refuses_another_shape_dtype_or_kind_of_input(host_cuda):
    """copy_ into the recorded inputs would broadcast or cast silently; a Batch of other fields cannot be copied."""
    step = graphed(lambda batch: batch.x.sum().reshape(1) if isinstance(batch, Pair) else batch.sum().reshape(1))
    pair = Pair(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    step(pair)
    assert isinstance(step.inputs, Pair) and step.inputs is not pair
    for bad, where in ((Pair(torch.zeros(1, 3), pair.y), "batch.x is (1, 3)"),
                       (Pair(pair.x, torch.zeros(4, dtype=torch.int32)), "batch.y is (4,) torch.int32"),
                       (Pair(pair.x.double(), pair.y), "batch.x is (4, 3) torch.float64")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{re.escape(where)}.*one batch shape"):
            step(bad)
    with pytest.raises(ValueError, match="recorded for a Pair, called with one tensor"):
        step(torch.zeros(4, 3))
    single = graphed(lambda batch: batch.sum().reshape(1))
    single(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="the input is \\(4, 3\\) torch.float64"):
        single(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="recorded for one tensor, called with a Pair"):
        single(pair)
