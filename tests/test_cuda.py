"""The CUDA code paths against their CPU counterparts: skipped without a GPU, run by benchmarks/gpu_check.sh.

Each test computes the same thing on the GPU and on the host (or with the reference implementation) and compares:
the hand-written GRU's single-block backward pass, its bf16 path and its Triton kernels, the replay ring stored on the GPU or gathered
through pinned memory, a few training updates of each model (eager, and replayed as one CUDA graph), and a GPU run
resumed on the GPU and on the host (eager, and graphed). Under torch's sync debug mode they also check that
collecting, sampling and updating never make the host wait for the GPU.
Speed is benchmarks/' business, not these tests'.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from conftest import run_train, scalars
from test_fused_gru import CASES as FUSED_CASES
from test_fused_gru import assert_fused_is_the_cell_loop
from test_layers import assert_reset_gru_is_the_cell_loop, case
from test_model import linear_system_buffer
from test_model_zoo import MODELS, fitted, random_batch
from test_resume import RUN
from worldmodel.cuda_graph import WARMUP_UPDATES, GraphedUpdate
from worldmodel.models import fused_gru
from worldmodel.replay import ReplayBuffer
from worldmodel.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")
DEVICE = "cuda"


@contextlib.contextmanager
def no_host_waits():
    """torch's sync debug mode: inside, any host-device synchronisation (a read-back, a copy from pageable memory)
    raises. The training loop must have none between its logging points, so that the host runs ahead of the GPU."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def trainer_update(model, device: str, lr: float = 1e-3, **trainer_args):
    """Trainer's update function (fused Adam, clipping; batch size and length come from the batches given)."""
    trainer = Trainer(steps=1, prefill=0, batch_size=1, seq_len=1, lr=lr, device=device, **trainer_args)
    return trainer.build_update(model.to(device))[1]


def on_the_gpu(host: ReplayBuffer) -> ReplayBuffer:
    """The rows of a host buffer (linear_system_buffer: obs_dim 3, action_dim 1) in a ring stored on the GPU."""
    ring = ReplayBuffer(1000, 3, 1, device=DEVICE, seed=0)
    ring.extend(**host[:])
    return ring


def random_rows(rng: np.random.Generator, lead: tuple[int, ...], obs_dim: int, action_dim: int) -> dict:
    """Random transitions of shape `lead` (steps, or steps x streams), about 1 in 10 ending an episode."""
    return {
        "obs": rng.normal(size=(*lead, obs_dim)).astype(np.float32),
        "action": rng.normal(size=(*lead, action_dim)).astype(np.float32),
        "reward": rng.normal(size=lead).astype(np.float32),
        "next_obs": rng.normal(size=(*lead, obs_dim)).astype(np.float32),
        "terminated": rng.random(lead) < 0.05,
        "truncated": rng.random(lead) < 0.05,
    }


def test_reset_gru_on_the_gpu_is_the_cell_loop():
    """On a GPU the backward pass runs as one block over the whole window (the host splits it): same function."""
    assert_reset_gru_is_the_cell_loop(*case(16, 24, 10, 12, 0.1, seed=3, dtype=torch.float32, device=DEVICE))


@pytest.mark.skipif(fused_gru.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("shape", FUSED_CASES)
def test_the_fused_gru_kernels_on_the_gpu_are_the_cell_loop(shape):
    assert_fused_is_the_cell_loop(*shape, device=DEVICE)


def test_reset_gru_under_bf16_autocast_on_the_gpu():
    assert_reset_gru_is_the_cell_loop(*case(8, 12, 6, 8, 0.3, seed=11, dtype=torch.float32, device=DEVICE),
                                      autocast=True)  # fmt: skip


@pytest.mark.parametrize("obs_dtype", ["float32", "float16"])
def test_a_ring_on_the_gpu_and_one_behind_pinned_memory_sample_what_the_host_ring_samples(obs_dtype):
    """Three buffers fed the same rows with the same seed: on the host, on the GPU, and on the host with batches for
    the GPU (pinned memory, non-blocking copies). Wrapped segments and two streams included: every batch must be the
    same, bit for bit."""
    rng = np.random.default_rng(0)
    t, n, obs_dim, action_dim = 90, 2, 5, 2
    valid = rng.random((t, n)) > 0.1
    rows = random_rows(rng, (t, n), obs_dim, action_dim)
    kinds = {"host": {}, "gpu": {"device": DEVICE}, "pinned": {"batch_device": DEVICE}}
    buffers = {}
    for kind, where in kinds.items():
        buffers[kind] = ReplayBuffer(2 * 40, obs_dim, action_dim, streams=n, seed=5, obs_dtype=obs_dtype, **where)
        buffers[kind].extend_streams(valid, **rows)  # 90 steps into segments of 40: both wrap
    assert buffers["gpu"].ring.device.type == "cuda" and buffers["pinned"].ring.device.type == "cpu"
    for _ in range(5):
        batches = {kind: buffer.sample(16, 7) for kind, buffer in buffers.items()}
        assert batches["gpu"].obs.device.type == batches["pinned"].obs.device.type == "cuda"
        for name, expected in vars(batches["host"]).items():
            for kind in ("gpu", "pinned"):
                torch.testing.assert_close(getattr(batches[kind], name).cpu(), expected, rtol=0, atol=0, msg=name)
    # Both kinds of state round-trip through the GPU ring too: a snapshot, and the stored rows a checkpoint writes
    # (through torch.save, which holds no CUDA tensor: a checkpoint loads on a host).
    for copy in (True, False):
        again = ReplayBuffer(2 * 40, obs_dim, action_dim, streams=n, seed=9, obs_dtype=obs_dtype, device=DEVICE)
        state = buffers["gpu"].state_dict(copy=copy)
        saved = io.BytesIO()
        torch.save(state, saved)
        saved.seek(0)
        again.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        for name, expected in buffers["host"][:].items():
            np.testing.assert_array_equal(again[:][name], expected, err_msg=name)


def test_a_ring_on_the_gpu_hands_host_batches_that_have_arrived():
    """buffer.device=cuda with trainer.device=cpu: batches are copied from the GPU to the host, and must be whole when
    sample returns (first is computed from them at once, and the caller reads them), even with GPU work queued."""
    t, obs_dim = 3000, 64
    rows = random_rows(np.random.default_rng(0), (t,), obs_dim, 1)
    gpu = ReplayBuffer(2000, obs_dim, 1, device=DEVICE, batch_device="cpu", seed=1)
    host = ReplayBuffer(2000, obs_dim, 1, seed=1)
    gpu.extend(**rows)
    host.extend(**rows)
    busy = torch.randn(4096, 4096, device=DEVICE)
    for _ in range(5):
        for _ in range(8):  # GPU work queued ahead of the batch's copy, so that a copy that does not wait lands late
            busy = busy @ busy
            busy = busy / busy.norm()
        got, expected = gpu.sample(1024, 32), host.sample(1024, 32)
        assert got.obs.device.type == "cpu"
        for name, value in vars(expected).items():
            assert torch.equal(getattr(got, name), value), name


def test_collecting_sampling_and_updating_never_make_the_host_wait_for_the_gpu():
    """The host must run ahead of the GPU: write the next step and sample the next batch while the update in flight
    still runs (a copy from pageable memory would wait for it: transfer.to_device stages through pinned memory)."""
    buffer = linear_system_buffer(600, seed=0)
    gpu = on_the_gpu(buffer)
    update = trainer_update(fitted("gru", obs_dim=3, action_dim=1).train(), DEVICE)
    update(gpu.sample(16, 8))  # the first update checks, once, that the normalizer was fitted (a read-back)
    row = buffer[-1]
    with no_host_waits():
        for _ in range(3):
            gpu.add(row["obs"], row["action"], float(row["reward"]), row["next_obs"], False, False)
            values = update(gpu.sample(16, 8))  # index arithmetic on the host, one gather on the GPU
    assert torch.isfinite(values).all()


def test_default_model_updates_on_the_gpu_follow_the_host():
    """The default model has no randomness of its own: a few of Trainer's updates on the same batches and weights
    give the same losses on the GPU as on the host, to float rounding."""
    buffer = linear_system_buffer(600, seed=0)
    batches = [buffer.sample(16, 8) for _ in range(5)]
    losses = {}
    for device in ("cpu", DEVICE):
        model = fitted("gru", obs_dim=3, action_dim=1).train()
        update = trainer_update(model, device)
        losses[device] = torch.stack([update(b.to(device)).cpu() for b in batches])
    assert torch.isfinite(losses["cpu"]).all()
    torch.testing.assert_close(losses[DEVICE], losses["cpu"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_on_the_gpu(name, precision):
    """Each model (rssm and the ensemble draw their own noise, so not comparable to the host step for step) fits one
    batch on the GPU: finite losses that fall, and no update after the first makes the host wait for the GPU."""
    update = trainer_update(fitted(name).train(), DEVICE, lr=3e-3, precision=precision)
    batch = random_batch().to(DEVICE)
    losses = [update(batch)[0]]  # the first update reads the normalizer's flag back, once
    with no_host_waits():
        losses += [update(batch)[0] for _ in range(59)]
    losses = torch.stack(losses).cpu()
    assert torch.isfinite(losses).all()
    assert losses[-10:].mean() < 0.7 * losses[:3].mean()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_the_graphed_update_is_the_eager_update(name, precision):
    """trainer.cuda_graph=true: warm-up updates run eagerly, then one update is recorded and replayed. From the same
    weights, on the same windows, with the same CUDA random stream (the rssm's noise and the ensemble's bootstrap
    draws continue it as eager updates do), every update gives the losses and weights of eager updates; the replays
    never make the host wait for the GPU."""
    assert_graphed_updates_are_eager_updates(name, precision=precision)


def test_a_graph_that_takes_whole_batches_is_the_eager_update():
    """Where the graph cannot gather from the ring (a ring on the host), it takes the batch sampled outside it."""
    assert_graphed_updates_are_eager_updates("gru", gather_in_graph=False)


@pytest.mark.slow
@pytest.mark.parametrize("gather_in_graph", [True, False])
def test_the_graphed_update_of_a_compiled_loss_is_its_eager_update(gather_in_graph):
    """trainer.compile=true inside the graph: the warm-up updates compile the loss on the graph's own inputs, so the
    recording needs no new compilation (a compiled function compiles again for inputs laid out differently, and the
    batches are strided views of the gathered tables, whichever way they are gathered)."""
    assert_graphed_updates_are_eager_updates("gru", gather_in_graph, compile=True)


def assert_graphed_updates_are_eager_updates(name: str, gather_in_graph: bool = True, **trainer_args) -> None:
    """The same windows of a ring on the GPU through Trainer's update, eagerly and as a CUDA graph: the same losses,
    step by step, and the same weights at the end. With gather_in_graph (what a run with its ring on the GPU does)
    the graph gathers each batch itself from the rows ReplayBuffer.sample_rows picks; without, it takes batches sampled
    outside it. The eager updates take ReplayBuffer.sample's batches, drawn from the same random state."""
    ring = on_the_gpu(linear_system_buffer(600, seed=0))
    start = ring.rng.bit_generator.state
    losses, weights = {}, {}
    for graphed in (False, True):
        ring.rng.bit_generator.state = start
        model = fitted(name, obs_dim=3, action_dim=1).train()  # seeds torch, the CUDA generator included
        trainer = Trainer(steps=1, prefill=0, batch_size=16, seq_len=8, lr=1e-3, device=DEVICE, cuda_graph=graphed,
                          **trainer_args)  # fmt: skip
        _, update, sample = trainer.build_update(model.to(DEVICE), ring if gather_in_graph else None)
        sample = sample or ring.sample
        assert (sample == ring.sample_rows) == (graphed and gather_in_graph)
        values = [update(sample(16, 8)) for _ in range(WARMUP_UPDATES + 2)]  # warm-up, recording + replay, a replay
        with no_host_waits():
            values += [update(sample(16, 8)) for _ in range(4)]
        losses[graphed] = torch.stack(values).cpu()
        weights[graphed] = [p.detach().cpu() for p in model.parameters()]
    assert isinstance(update, GraphedUpdate) and update.graph is not None
    assert torch.isfinite(losses[False]).all()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    for got, expected in zip(weights[True], weights[False]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one batch shape"):
        update(sample(8, 8))


@pytest.fixture(scope="module")
def eager_gpu_run(tmp_path_factory):
    """The tests' short run (test_resume.RUN) on the GPU with eager updates, uninterrupted: the curves the runs below
    must follow."""
    run_dir = tmp_path_factory.mktemp("eager_gpu_run")
    run_train([*RUN, f"trainer.device={DEVICE}", "trainer.cuda_graph=false", f"hydra.run.dir={run_dir}"])
    return scalars(run_dir)


def assert_same_curves(got: dict, expected: dict) -> None:
    """To float rounding: the GPU's kernels need not be bit-reproducible across processes."""
    for tag in ("train/loss", "val/loss"):
        steps, values = zip(*expected[tag])
        got_steps, got_values = zip(*got[tag])
        assert got_steps == steps
        np.testing.assert_allclose(got_values, values, rtol=1e-3, err_msg=tag)


def test_a_gpu_run_resumes_on_the_gpu_and_on_the_host(tmp_path, eager_gpu_run):
    """An eager run checkpointed on the GPU (ring, optimizer state and CUDA RNG there) continues on the GPU with the
    curves of a run that never stopped, and on the host (trainer.device may change on resume)."""
    gpu = [*RUN, f"trainer.device={DEVICE}", "trainer.cuda_graph=false"]
    parts, moved = tmp_path / "parts", tmp_path / "moved"
    for run_dir in (parts, moved):
        run_train([*gpu, "trainer.steps=120", f"hydra.run.dir={run_dir}"])
    run_train([*gpu, f"hydra.run.dir={parts}", "trainer.resume=true"])
    run_train([*RUN, "trainer.device=cpu", f"hydra.run.dir={moved}", "trainer.resume=true"])
    assert [s for s, _ in scalars(moved)["val/loss"]] == [s for s, _ in eager_gpu_run["val/loss"]]
    assert_same_curves(scalars(parts), eager_gpu_run)
    assert scalars(moved)["val/loss"][-1][1] < 0.5 * eager_gpu_run["val/loss"][0][1]  # trained on after the move


def test_a_graphed_gpu_run_follows_the_eager_run_and_resumes(tmp_path, eager_gpu_run):
    """A real run on the GPU with the default trainer.cuda_graph=auto records its update as a CUDA graph; stopped at a
    checkpoint and resumed (the graph is then recorded over the loaded weights and optimizer state), it has the curves
    of the eager run that never stopped."""
    graphed = [*RUN, f"trainer.device={DEVICE}", f"hydra.run.dir={tmp_path}"]
    run_train([*graphed, "trainer.steps=120"])
    run_train([*graphed, "trainer.resume=true"])
    assert_same_curves(scalars(tmp_path), eager_gpu_run)
    assert (tmp_path / "train.log").read_text().count("recorded the update as a CUDA graph") == 2  # run, resumed run
