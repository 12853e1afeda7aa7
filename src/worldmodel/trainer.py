"""Trainer: prefill with random steps, then alternate collecting env steps and gradient updates of the world model."""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from worldmodel.errors import WorldModelError
from worldmodel.logger import Logger
from worldmodel.model import WorldModel
from worldmodel.replay import ReplayBuffer
from worldmodel.rollout import Collector

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        steps: int,
        prefill: int,
        batch_size: int,
        seq_len: int,
        lr: float,
        env_steps_per_update: int = 1,
        grad_clip: float = 10.0,
        val_steps: int = 2000,
        eval_every: int = 500,
        log_every: int = 100,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ):
        self.steps, self.prefill = int(steps), int(prefill)
        self.batch_size, self.seq_len, self.lr = int(batch_size), int(seq_len), float(lr)
        self.env_steps_per_update, self.grad_clip = int(env_steps_per_update), float(grad_clip)
        self.val_steps, self.eval_every, self.log_every = int(val_steps), int(eval_every), int(log_every)
        self.device = torch.device(device)
        self.progress = progress

    def fit(self, collector: Collector, val_collector: Collector, model: WorldModel, logger: Logger) -> dict:
        """Trains `model` on what `collector` gathers and validates it on `val_collector`'s held-out episodes.

        Returns the final metrics; `val/loss` is the run's objective (lower is better).
        """
        # Late in training many values become subnormal floats, which CPUs process ~1.5x slower; flushing them to
        # zero left every loss bit-identical in our runs.
        torch.set_flush_denormal(True)
        buffer = collector.buffer
        val_collector.collect(self.val_steps)
        collector.collect(self.prefill)
        # Statistics from the prefill data, then frozen: see Normalizer.
        stored = buffer[:]
        model.normalizer.fit(stored["obs"], stored["action"], stored["reward"], stored["next_obs"])
        model.to(self.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)

        initial = self.evaluate(model, val_collector.buffer)
        logger.log(initial, step=0)
        metrics = {"val/loss_initial": initial["val/loss"], **initial}
        sums: dict[str, torch.Tensor] = {}  # summed on device, read back only at log time (no per-step host sync)
        window = {"updates": 0, "env_steps": 0, "update_s": 0.0, "collect_s": 0.0}
        bar = tqdm(total=self.steps, desc="train", disable=None if self.progress else True, dynamic_ncols=True)
        for step in range(1, self.steps + 1):
            t0 = time.perf_counter()
            window["env_steps"] += collector.collect(self.env_steps_per_update).steps
            t1 = time.perf_counter()
            loss, terms = model.loss(buffer.sample(self.batch_size, self.seq_len))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            optimizer.step()
            window["update_s"] += time.perf_counter() - t1
            window["collect_s"] += t1 - t0
            window["updates"] += 1
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach()
            bar.update(1)

            if step % self.log_every == 0 or step == self.steps:
                scalars = {f"train/{k}": float(v) / window["updates"] for k, v in sums.items()}
                self._check_finite(scalars, step)
                scalars["perf/updates_per_s"] = window["updates"] / max(window["update_s"], 1e-9)
                if window["env_steps"]:
                    scalars["perf/env_steps_per_s"] = window["env_steps"] / max(window["collect_s"], 1e-9)
                scalars["data/buffer_size"] = len(buffer)
                scalars["data/env_steps"] = collector.total_steps
                logger.log(scalars, step)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4g}")
                sums = {}
                window = dict.fromkeys(window, 0)
            if step % self.eval_every == 0 or step == self.steps:
                val = self.evaluate(model, val_collector.buffer)
                self._check_finite(val, step)
                logger.log(val, step)
                log.info("step %d/%d  val/loss %.4g", step, self.steps, val["val/loss"])
                metrics.update(val)
        bar.close()
        return metrics

    @torch.no_grad()
    def evaluate(self, model: WorldModel, val_buffer: ReplayBuffer) -> dict[str, float]:
        """Mean loss terms over every held-out transition, in fixed windows so numbers compare across steps."""
        model.eval()
        totals: dict[str, float] = {}
        count = 0
        for batch in val_buffer.sequences(self.seq_len, batch_size=256):
            loss, terms = model.loss(batch)
            for name, value in {"loss": loss, **terms}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(batch)
            count += len(batch)
        model.train()
        return {f"val/{name}": value / count for name, value in totals.items()}

    @staticmethod
    def _check_finite(scalars: dict[str, float], step: int) -> None:
        bad = [k for k, v in scalars.items() if not math.isfinite(v)]
        if bad:
            raise WorldModelError(
                f"Training diverged at update {step}: {', '.join(bad)} became non-finite. Lower trainer.lr or "
                "trainer.grad_clip, or check the env's observations for NaN/inf."
            )
