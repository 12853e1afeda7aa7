"""Row 3: training updates per second (sample a batch + one gradient step), ours against the seed notebook's loop.

Two configs: the seed's own (batch 32, seq_len 16, latent 32) and a large one (batch 256 x seq_len 64 x latent 256).
Ours is Trainer.build_update on GRUWorldModel (the default model, conf/model/gru.yaml: next-obs delta, reward and
termination heads) with ReplayBuffer.sample; the seed's loop samples its buffer with np.stack, copies numpy ->
tensor every step, and trains its encoder -> nn.GRU -> linear decoder model. Both on the same CartPole data. Three
more rows per config: the seed's loop training our model (which separates the loop from the model), ours with MLP
heads (model.head_layers=2) and ours with bfloat16 autocast (trainer.precision=bf16), each noting the seed's loop
training that same variant of our model. The notes also give the share of our step spent sampling the batch (waiting
on data), the fresh pages of memory each update makes the kernel hand over (see models/layers.py) and, on a GPU, the
share of the time it was busy, and more rows there: ours with the whole update replayed as a CUDA graph
(trainer.cuda_graph=true), eager and, under --compile, compiled; each with the batch gathered outside the graph and
copied in, and gathered by the graph itself from the drawn rows (what a run does with the ring on the GPU).

    python benchmarks/bench_updates.py [--quick] [--device cuda] [--compile]
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from common import Row, gpu_busy, page_faults, sync, time_per_call
from seed_baseline import SeedReplayBuffer, SeedWorldModel, seed_update
from worldmodel import RandomPolicy, ReplayBuffer, env_spec, make_env
from worldmodel.cuda_graph import WARMUP_UPDATES
from worldmodel.models import WorldModel, fused_gru
from worldmodel.models.layers import gru_cell_loop, gru_sequence
from worldmodel.replay import Batch
from worldmodel.rollout import Collector
from worldmodel.trainer import Trainer

CONFIGS = {"seed config": (32, 16, 32), "large": (256, 64, 256)}  # batch, seq_len, latent
CONF = Path(__file__).resolve().parents[1] / "conf"
#: Variants of ours, each a row per config: the override a user would pass -> the matching `ours` arguments.
VARIANTS = {"model.head_layers=2": {"head_layers": 2}, "trainer.precision=bf16": {"precision": "bf16"}}
DATA_STEPS = 50_000


def cartpole_data(steps: int) -> dict[str, np.ndarray]:
    env = make_env("CartPole-v1", seed=0)
    spec = env_spec(env)
    buffer = ReplayBuffer(steps, spec.obs_dim, spec.action_dim, seed=0)
    Collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec).collect(steps)
    return buffer[:]


def config_model(name: str, data: dict, device: str, **overrides) -> WorldModel:
    """conf/model/<name>.yaml (overrides replace its keys) built for `data`, its normalizer fitted, on `device`."""
    model = instantiate(OmegaConf.load(CONF / "model" / f"{name}.yaml"), obs_dim=data["obs"].shape[1],
                        action_dim=data["action"].shape[1], **overrides)  # fmt: skip
    model.fit_normalizer(data["obs"], data["action"], data["reward"], data["next_obs"])
    return model.to(device)


def our_model(data: dict, latent: int, device: str, head_layers: int | None = None) -> WorldModel:
    """The default model (conf/model/gru.yaml) at `latent`; head_layers overrides the config's."""
    overrides = {"latent_dim": latent}
    if head_layers is not None:
        overrides["head_layers"] = head_layers
    return config_model("gru", data, device, **overrides)


def our_buffer(data: dict, device: str) -> ReplayBuffer:
    """Our replay buffer holding `data`, stored on `device`."""
    buffer = ReplayBuffer(len(data["obs"]), data["obs"].shape[1], data["action"].shape[1], device=device, seed=0)
    buffer.extend(*(data[k] for k in ("obs", "action", "reward", "next_obs", "terminated", "truncated")))
    return buffer


def seed_buffer(data: dict) -> SeedReplayBuffer:
    """The seed's buffer holding `data`, written one transition at a time as the seed does."""
    buffer = SeedReplayBuffer(len(data["obs"]), (data["obs"].shape[1],), (data["action"].shape[1],))
    for obs, action, reward, term, trunc in zip(*(data[k] for k in ("obs", "action", "reward", "terminated",
                                                                     "truncated"))):  # fmt: skip
        buffer.add(obs, action, reward, term or trunc)
    return buffer


def ours(data: dict, batch: int, seq_len: int, latent: int, device: str, compile: bool,
         head_layers: int | None = None, precision: str = "fp32", cuda_graph: bool = False,
         gather_in_graph: bool = True):  # fmt: skip
    """(update callable, sample callable) for our pipeline, storage and model on `device`: what Trainer.fit calls.
    gather_in_graph=False keeps the batch's gather out of a CUDA graph (the graph then takes the whole batch)."""
    buffer = our_buffer(data, device)
    model = our_model(data, latent, device, head_layers)
    trainer = Trainer(steps=1, prefill=0, batch_size=batch, seq_len=seq_len, lr=1e-3, device=device, compile=compile,
                      precision=precision, cuda_graph=cuda_graph)  # fmt: skip
    _, update, sample = trainer.build_update(model, buffer if gather_in_graph else None)
    sample = sample or buffer.sample
    return (lambda: update(sample(batch, seq_len))), (lambda: sample(batch, seq_len))


def seed(data: dict, batch: int, seq_len: int, latent: int, device: str):
    buffer = seed_buffer(data)
    model = SeedWorldModel(data["obs"].shape[1], data["action"].shape[1], latent).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return lambda: seed_update(model, optimizer, buffer, batch, seq_len, device)


def seed_loop_our_model(data: dict, batch: int, seq_len: int, latent: int, device: str,
                        head_layers: int | None = None, precision: str = "fp32"):  # fmt: skip
    """The seed's loop (np.stack sampling, numpy -> tensor copies, plain Adam) driving our model: the same work per
    update as ours, so the ratio isolates the loop (sampling, transfers, the update step) from the model's cost.
    head_layers and precision make it train one of ours' VARIANTS (bf16: the loss under autocast, as Trainer does)."""
    buffer = seed_buffer(data)
    model = our_model(data, latent, device, head_layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def update():
        with autocast:
            loss, _ = model.loss(seed_batch(buffer, batch, seq_len, device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return update


def seed_batch(buffer: SeedReplayBuffer, batch: int, seq_len: int, device: str, within_episodes: bool = False) -> Batch:
    """A batch for our model from the seed's sampler (np.stack, then numpy -> tensor), as the seed's loop would make
    one: windows of seq_len + 1 observations, each step's target the next one; `first` from the done flags. At an
    episode's last step that target is the next episode's reset observation (the seed stores no next_obs);
    within_episodes keeps only windows where that never happens (drawn again until there are `batch` of them)."""
    arrays = buffer.sample(batch, seq_len + 1)
    while within_episodes and arrays[3][:, :seq_len].any():
        keep = ~arrays[3][:, :seq_len].any(axis=1)
        more = buffer.sample(batch, seq_len + 1)
        arrays = tuple(np.concatenate([a[keep], b])[:batch] for a, b in zip(arrays, more))
    obs, action, reward, done = (torch.tensor(x, device=device) for x in arrays)
    first = torch.ones_like(done[:, :-1])
    first[:, 1:] = done[:, :-2]
    return Batch(obs=obs[:, :-1], action=action[:, :-1], reward=reward[:, :-1], next_obs=obs[:, 1:],
                 terminated=done[:, :-1], truncated=torch.zeros_like(done[:, :-1]), first=first)  # fmt: skip


def gru_rows(quick: bool = False, device: str = "cpu") -> list[Row]:
    """The recurrence alone, forward + backward over a window: our gru_sequence (state zeroed where an episode starts)
    against stepping nn.GRUCell under autograd (the same function) and the fused nn.GRU (which cannot reset)."""
    out = []
    for name, (batch, seq_len, latent) in CONFIGS.items():
        torch.manual_seed(0)
        features = latent + 2  # the GRU input: latent + CartPole's one-hot action
        cell = nn.GRUCell(features, latent).to(device)
        fused = nn.GRU(features, latent, batch_first=True).to(device)
        x = torch.randn(batch, seq_len, features, device=device, requires_grad=True)
        first = torch.rand(batch, seq_len, device=device) < 0.05
        first[:, 0] = True

        h0 = x.new_zeros(batch, latent)
        step_ours = lambda: gru_sequence(cell, x, first)[0].sum().backward()  # noqa: E731
        step_cell = lambda: gru_cell_loop(cell, x, first, h0)[0].sum().backward()  # noqa: E731
        calls = max(2, (200 if name == "seed config" else 5) // (4 if quick else 1))
        timed = lambda fn: time_per_call(fn, calls, 3 if quick else 5, device=device)  # noqa: E731
        t_ours = timed(step_ours)
        case = f"GRU forward + backward, {name}: batch {batch}, seq_len {seq_len}, latent {latent}, {device}"
        out.append(Row("updates", case, t_ours * 1e3, timed(step_cell) * 1e3, "nn.GRUCell stepped", "ms", False))
        out.append(Row("updates", case, t_ours * 1e3, timed(lambda: fused(x)[0].sum().backward()) * 1e3,
                       "nn.GRU, no resets", "ms", False))  # fmt: skip
        if fused_gru.supports(x.transpose(0, 1), h0, latent):  # ours ran the Triton kernels: against its Python loop
            with mock.patch.object(fused_gru, "ENABLED", False):
                t_loop = timed(step_ours)
            out.append(Row("updates", case, t_ours * 1e3, t_loop * 1e3, "ours stepped in Python, no Triton", "ms",
                           False))  # fmt: skip
    return out


def zoo_rows(data: dict, quick: bool = False, device: str = "cpu") -> list[Row]:
    """Every model config (conf/model/*.yaml) at the default trainer's batch: updates/s with trainer.compile=true
    against eager, and what compiling costs before the first update, so a user can tell when it pays off."""
    trainer_cfg = OmegaConf.load(CONF / "trainer" / "default.yaml")
    batch, seq_len = int(trainer_cfg.batch_size), int(trainer_cfg.seq_len)
    buffer = our_buffer(data, device)
    out = []
    for path in sorted((CONF / "model").glob("*.yaml")):
        rates, first_update = {}, {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = config_model(path.stem, data, device)
            trainer = Trainer(steps=1, prefill=0, batch_size=batch, seq_len=seq_len, lr=1e-3, device=device,
                              compile=compiled)  # fmt: skip
            _, update, sample = trainer.build_update(model, buffer)
            start = time.perf_counter()
            update(sample(batch, seq_len))
            sync(device)
            first_update[compiled] = time.perf_counter() - start
            rates[compiled] = 1 / time_per_call(lambda: update(sample(batch, seq_len)), 50 if quick else 200,
                                                3 if quick else 5, device=device)  # fmt: skip
        case = f"model={path.stem}, batch {batch} x seq_len {seq_len}, {device}, trainer.compile=true"
        out.append(Row("updates", case, rates[True], rates[False], "eager", "updates/s", True,
                       {"first update (compiling)": f"{first_update[True]:.0f} s"}))  # fmt: skip
    return out


def rows(quick: bool = False, device: str = "cpu", compile: bool = False) -> Iterator[Row]:
    """Each row as soon as it is measured, so a run cut short by a time limit still shows the rows it finished."""
    torch.manual_seed(0)
    np.random.seed(0)
    data = cartpole_data(DATA_STEPS // 5 if quick else DATA_STEPS)
    for name, (batch, seq_len, latent) in CONFIGS.items():
        calls = max(2, (200 if name == "seed config" else 10) // (4 if quick else 1))
        if torch.device(device).type == "cuda":
            calls *= 5
        repeats = 3 if quick else 5
        case = f"{name}: batch {batch}, seq_len {seq_len}, latent {latent}, {device}"
        seed_update = seed(data, batch, seq_len, latent, device)
        t_seed = time_per_call(seed_update, calls, repeats, device=device)
        seed_faults = page_faults(seed_update, calls)
        for compiled in sorted({False, compile}):
            update, sample = ours(data, batch, seq_len, latent, device, compiled)
            t_ours = time_per_call(update, calls, repeats, device=device)
            t_sample = time_per_call(sample, calls, repeats, device=device)
            label = case + (", trainer.compile=true" if compiled else "")
            notes = {"sampling share of step": f"{t_sample / t_ours:.0%}"}
            if seed_faults is not None:
                notes["page faults per update"] = f"{page_faults(update, calls):,.0f} (seed loop {seed_faults:,.0f})"
            if torch.device(device).type == "cuda":
                notes["GPU busy"] = f"{gpu_busy(update, calls, device):.0%}"
            yield Row("updates", label, 1 / t_ours, 1 / t_seed, "seed loop", "updates/s", True, notes)
            if torch.device(device).type == "cuda":
                # The whole update replayed as one CUDA graph (with the compiled loss too, under --compile); its eager
                # warm-up and its recording are not timed.
                # A/B in one run: the batch gathered outside the graph and copied in (what every graphed update did
                # until 26 Nov 2026), then gathered by the graph itself from the drawn rows (what Trainer does now
                # with the ring on the GPU).
                for inside in (False, True):
                    graphed, draw = ours(data, batch, seq_len, latent, device, compiled, cuda_graph=True,
                                         gather_in_graph=inside)  # fmt: skip
                    t_graphed = time_per_call(graphed, calls, repeats, warmup=WARMUP_UPDATES + 2, device=device)
                    t_draw = time_per_call(draw, calls, repeats, device=device)
                    # The sampling call timed alone (with a sync), over a step: in the run it overlaps GPU work. For
                    # "gathered in the graph" it is the host's index draw only; the gather is inside the graph.
                    notes = {"host sampling time / step": f"{t_draw / t_graphed:.0%}",
                             "GPU busy": f"{gpu_busy(graphed, calls, device):.0%}"}  # fmt: skip
                    how = "gathered in the graph" if inside else "batch copied into the graph"
                    yield Row("updates", f"{label}, trainer.cuda_graph=true, {how}", 1 / t_graphed, 1 / t_seed,
                              "seed loop", "updates/s", True, notes)  # fmt: skip
            if not compiled:
                t_same = time_per_call(seed_loop_our_model(data, batch, seq_len, latent, device), calls, repeats,
                                       device=device)  # fmt: skip
                yield Row("updates", f"{case}, both with our model", 1 / t_ours, 1 / t_same, "seed loop, our model",
                          "updates/s", True)  # fmt: skip
                # What the MLP heads' extra capacity costs per update, and what bf16 autocast gains (on a CPU only
                # where matmuls dominate and the CPU has bf16 units). The note runs the seed's loop on the same
                # variant of our model: below the seed's own loop, it says whether the loop or the model is why.
                for override, kwargs in VARIANTS.items():
                    variant = ours(data, batch, seq_len, latent, device, False, **kwargs)[0]
                    t_variant = time_per_call(variant, calls, repeats, device=device)
                    t_seed_variant = time_per_call(seed_loop_our_model(data, batch, seq_len, latent, device, **kwargs),
                                                   calls, repeats, device=device)  # fmt: skip
                    note = f"{1 / t_seed_variant:,.4g} updates/s, ours {t_seed_variant / t_variant:.2f}x"
                    yield Row("updates", f"{case}, ours with {override}", 1 / t_variant, 1 / t_seed, "seed loop",
                              "updates/s", True, {"seed loop training this model": note})  # fmt: skip
    yield from gru_rows(quick, device)
    if compile:
        yield from zoo_rows(data, quick, device)


if __name__ == "__main__":
    from run import main

    main(only=["updates"])
