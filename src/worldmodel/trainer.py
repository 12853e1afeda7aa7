"""Trainer: prefill with random steps, then alternate collecting env steps and gradient updates of the world model.

Everything the loop depends on is in its checkpoints (see checkpoint.py and resume.py), so a run stopped at any update
and resumed ends bit-identical, on CPU, to one that never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodel.checkpoint import Checkpointer, resume_candidates
from worldmodel.cuda_graph import GraphedUpdate
from worldmodel.errors import ConfigError, RunInterrupted, WorldModelError
from worldmodel.evaluation import TrajectoryPlot, longest_episode, open_loop, trajectory
from worldmodel.logger import Logger
from worldmodel.loss_window import Diverged, LossWindow
from worldmodel.models import WorldModel
from worldmodel.replay import ReplayBuffer
from worldmodel.resume import check_steps_cover
from worldmodel.rollout import Collector
from worldmodel.runtime import StopSignals, flush_denormals, rng_state, set_rng_state

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
GRAPHED_COMPILE_MODES = COMPILE_MODES[2:]  # they record CUDA graphs of their own: not inside trainer.cuda_graph's
PREFILL_BLOCK = 10_000  # env steps the prefill collects between looks at the stop flag (well under a second here)
CHUNK_ROWS = 65_536  # rows per chunk where the whole buffer is read at the start (checks, normalizer): 34 MB at obs 64


def require_finite(rows: dict | Iterable[dict], obs_dtype: str, what: str) -> None:
    """Refuses NaN/inf in collected rows (one dict of columns, or chunks of them) before anything trains on them: a
    normalizer fitted on them, and every loss, would be NaN, found only as a divergence (or a traceback from the
    trajectory figure's axis limits)."""
    bad: dict[str, int] = {}
    for chunk in [rows] if isinstance(rows, dict) else rows:
        for name, values in chunk.items():
            if values.dtype.kind == "f":
                bad[name] = bad.get(name, 0) + int((~np.isfinite(values)).sum())
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        cause = "The env returned them: check it, or wrap it to clip or replace them."
        if obs_dtype == "float16" and set(bad) <= {"obs", "next_obs"}:
            cause = ("buffer.obs_dtype=float16 stores observations beyond +-65504 as inf: use float32 or bfloat16 "
                     "(unless the env itself returned them).")  # fmt: skip
        counts = ", ".join(f"{k}: {v}" for k, v in bad.items())
        raise WorldModelError(f"{what} holds NaN/inf values ({counts}), on which no model can train; nothing was "
                              f"trained. {cause}")  # fmt: skip


def row_chunks(buffer: ReplayBuffer, rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The buffer's rows in logical order, CHUNK_ROWS at a time (numpy copies of one chunk each)."""
    rows = rows or CHUNK_ROWS
    for start in range(0, len(buffer), rows):
        yield buffer[start : start + rows]


def stack_terms(model: WorldModel, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss, *terms] in model.loss_terms order, the order train/* and val/* are named in: by name, so a model whose
    loss builds its dict in another order is still logged under the right names."""
    if terms.keys() != set(model.loss_terms):
        raise WorldModelError(f"{type(model).__name__}.loss returned the terms {sorted(terms)}, but its loss_terms "
                              f"declare {sorted(model.loss_terms)}: they must name the same terms.")  # fmt: skip
    return torch.stack([loss, *(terms[name] for name in model.loss_terms)])


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
        val_seq_len: int | None = None,
        eval_every: int = 500,
        log_every: int = 100,
        eval_context: int = 5,
        eval_horizon: int = 15,
        eval_figure: bool = True,
        checkpoint_every: int = 1000,
        keep_checkpoints: int = 3,
        resume: bool | str = False,  # trainer.resume, which instantiate(cfg.trainer) passes: train.py acts on it
        device: str | torch.device = "cpu",
        progress: bool = True,
        compile: bool = False,
        compile_mode: str = "default",
        precision: str = "fp32",
        cuda_graph: bool | str = False,
    ):
        self.steps, self.prefill = int(steps), int(prefill)
        self.batch_size, self.seq_len, self.lr = int(batch_size), int(seq_len), float(lr)
        self.env_steps_per_update, self.grad_clip = int(env_steps_per_update), float(grad_clip)
        self.val_steps, self.eval_every, self.log_every = int(val_steps), int(eval_every), int(log_every)
        # The val/* windows: None (runs saved before the key existed) is seq_len. Fixed, val/* compare across seq_len.
        self.val_seq_len = self.seq_len if val_seq_len is None else int(val_seq_len)
        self.eval_context, self.eval_horizon, self.eval_figure = int(eval_context), int(eval_horizon), eval_figure
        self.checkpoint_every, self.keep_checkpoints = int(checkpoint_every), int(keep_checkpoints)
        self.device = torch.device(device)
        self.progress = progress
        self.compile, self.compile_mode, self.precision = bool(compile), str(compile_mode), str(precision)
        if cuda_graph == "auto":  # the default config's: on wherever it can be (an eager update there is ~7x slower)
            own_graphs = self.compile and self.compile_mode in GRAPHED_COMPILE_MODES
            cuda_graph = self.device.type == "cuda" and not own_graphs
        self.cuda_graph = bool(cuda_graph)
        self._plot: TrajectoryPlot | None = None  # built at the first figure, redrawn after

    def fit(
        self,
        collector: Collector,
        val_collector: Collector,
        model: WorldModel,
        logger: Logger,
        checkpointer: Checkpointer | None = None,
        resume_from: dict | None = None,
    ) -> dict:
        """Trains `model` on what `collector` gathers and validates it on `val_collector`'s held-out episodes.

        Returns the final metrics; `val/loss` is the run's objective (lower is better). `resume_from`: a payload of
        resume.load_for_resume to continue from; its state entries are taken out of it once restored (they may map
        the checkpoint file, which must not stay mapped).
        """
        # Watched from here, not only in the loop: a long prefill stopped by Ctrl-C or SLURM ends with a message
        # rather than a traceback (or, for SIGTERM, nothing at all).
        with StopSignals() as stop, flush_denormals():
            try:
                return self._run(collector, val_collector, model, logger, checkpointer, resume_from, stop)
            except Diverged as diverged:
                kept = "no checkpoint is written without trainer's checkpointer"
                if checkpointer is not None:
                    found = resume_candidates(checkpointer.run_dir)
                    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been written yet"
                raise WorldModelError(f"{diverged}; {kept}. Lower trainer.lr or trainer.grad_clip, or check the env's "
                                      "observations for NaN/inf.") from None  # fmt: skip

    def _run(self, collector: Collector, val_collector: Collector, model: WorldModel, logger: Logger,
             checkpointer: Checkpointer | None, resume_from: dict | None, stop: StopSignals) -> dict:  # fmt: skip
        val_collector.collect(self.val_steps)  # a pure function of its seed: collected again on resume, not saved
        val_buffer = val_collector.buffer
        model.to(self.device).train()
        optimizer, update, sample = self.build_update(model, collector.buffer)
        if resume_from is None:
            loop = self._start(collector, val_buffer, model, logger, stop)
        else:
            loop = self._restore(resume_from, collector, model, optimizer)
            log.info("resumed from %s at update %d", resume_from["path"], loop.step)
        # A signal from here on is acted on after the next update, which checkpoints.
        timer = Throughput()
        bar = tqdm(total=self.steps, initial=loop.step, desc="train", dynamic_ncols=True,
                   disable=None if self.progress else True)  # fmt: skip
        for step in range(loop.step + 1, self.steps + 1):
            t0 = time.perf_counter()
            env_steps = collector.collect(self.env_steps_per_update).env_steps
            t1 = time.perf_counter()
            # sample gives a Batch, or only its rows where a CUDA graph gathers the batch itself (build_update).
            values = update(sample(self.batch_size, self.seq_len))
            timer.add(env_steps, collect_s=t1 - t0, update_s=time.perf_counter() - t1)
            loop.window.add(step, values)
            bar.update(1)
            final = step == self.steps
            if step % self.log_every == 0 or final:
                scalars = self._log_train(logger, loop, timer, collector, step)
                bar.set_postfix(loss=f"{scalars['train/loss']:.4g}")
            if step % self.eval_every == 0 or final:
                self._validate(logger, loop, model, val_buffer, step)
            loop.step = step
            path = None
            if checkpointer is not None and (final or stop.signum is not None or step % self.checkpoint_every == 0):
                loop.window.check_finite()  # never checkpoint a diverged model over a good one
                self._check_weights(model, step)
                path = checkpointer.save(self._state_dict(loop, collector, model, optimizer), step, final)
            if stop.signum is not None and not final:  # stopped at the last update: the run is finished anyway
                bar.close()
                raise RunInterrupted(stop.signum, step, path)
        bar.close()
        return loop.metrics

    def _start(self, collector: Collector, val_buffer: ReplayBuffer, model: WorldModel, logger: Logger,
               stop: StopSignals) -> Loop:  # fmt: skip
        """A fresh run: the prefill, the normalizer fitted on it (then frozen: see Normalizer), and the validation
        at update 0."""
        self._prefill(collector, stop)
        buffer = collector.buffer
        # In chunks: a buffer.dataset may fill most of the memory, and a copy of it (float64 in the fit) would not fit.
        require_finite(row_chunks(buffer), buffer.obs_dtype, "the prefill data")
        require_finite(val_buffer[:], val_buffer.obs_dtype, "the held-out data (trainer.val_steps)")
        model.fit_normalizer_chunks((r["obs"], r["action"], r["reward"], r["next_obs"]) for r in row_chunks(buffer))
        initial = self.evaluate(model, val_buffer)
        self._log_eval(logger, initial, model, val_buffer, step=0)
        return self._loop(model, metrics={"val/loss_initial": initial["val/loss"], **initial})

    def _log_train(self, logger: Logger, loop: Loop, timer: Throughput, collector: Collector, step: int) -> dict:
        t0 = time.perf_counter()
        scalars = loop.window.flush()
        # On a GPU, update() only queues kernels; reading the losses back waits for those still queued.
        timer.update_s += time.perf_counter() - t0
        scalars.update(timer.read(), **{"data/buffer_size": len(collector.buffer),
                                        "data/env_steps": collector.env_steps})  # fmt: skip
        logger.log(scalars, step)
        return scalars

    def _validate(self, logger: Logger, loop: Loop, model: WorldModel, val_buffer: ReplayBuffer, step: int) -> None:
        val = self.evaluate(model, val_buffer)
        bad = [k for k, v in val.items() if not math.isfinite(v)]
        if bad:
            loop.window.check_finite()  # an update of the window may have diverged first
            raise Diverged(step, ", ".join(bad))
        self._log_eval(logger, val, model, val_buffer, step)
        log.info("step %d/%d  val/loss %.4g", step, self.steps, val["val/loss"])
        loop.metrics.update(val)

    def _prefill(self, collector: Collector, stop: StopSignals) -> None:
        """Collects `prefill` env steps in blocks, so a stop signal is noticed within one block; stopped, there is
        nothing to checkpoint yet (RunInterrupted at update 0). Blocks leave the data as one call would: collectors
        carry the remainder of a vector step over to the next call."""
        left = self.prefill
        if len(collector.buffer):  # buffer.dataset: a run that starts from recorded episodes says how many
            log.info("buffer: %d transitions from the dataset", len(collector.buffer))
        log.info("prefill: %d env steps", self.prefill)
        while left > 0 and stop.signum is None:
            collector.collect(min(left, PREFILL_BLOCK))
            left -= PREFILL_BLOCK
        if stop.signum is not None:
            raise RunInterrupted(stop.signum, 0, None)
        if self.prefill:
            self._top_up(collector)
        buffer = collector.buffer
        if not buffer.can_sample(self.seq_len):  # trainer.prefill=0 on a dataset (the validator allows it) too short
            raise ConfigError("trainer.prefill", self.prefill, f"a larger value, a buffer.dataset with longer episodes "
                              f"or a shorter trainer.seq_len: after the prefill the replay buffer's longest stream "
                              f"holds {int(buffer.ring.sizes.max())} transitions, less than one window of "
                              f"trainer.seq_len={self.seq_len}")  # fmt: skip

    def _top_up(self, collector: Collector) -> None:
        """A vectorized env's autoreset steps store nothing (see vector.py), so `prefill` env steps can leave every
        stream a few transitions short of one window, which config validation cannot foresee. Collect on, one step of
        every env at a time, until the first update can sample: at most every other step is a reset step."""
        buffer, extra = collector.buffer, 0
        for _ in range(2 * self.seq_len):
            if buffer.can_sample(self.seq_len):
                break
            extra += collector.collect(buffer.streams).steps
        if extra:
            log.info("prefill: %d more transitions collected, so that a stream holds trainer.seq_len=%d (autoreset "
                     "steps store none)", extra, self.seq_len)  # fmt: skip

    def build_update(self, model: WorldModel, buffer: ReplayBuffer | None = None):
        """(optimizer, update, sample): update(sample(batch_size, seq_len)) takes one gradient step on windows drawn
        from `buffer` and returns [loss, *terms] (detached, still on the device). Nothing in it reads a value back to
        the host, so on a GPU the host goes on to sample the next batch while the kernels of this update still run.

        With cuda_graph, the update is replayed as one CUDA graph (cuda_graph.py). If `buffer`'s ring is on the
        trainer's GPU, the graph gathers the batch too: sample is then buffer.sample_rows (the rows of the windows) and
        update gathers and trains on them. Otherwise sample is buffer.sample and update takes its Batch."""
        # One fused kernel for the whole parameter update instead of a handful per parameter tensor.
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, fused=self.device.type in ("cuda", "cpu"))
        loss_fn = self._loss_fn(model)
        params = [p for p in model.parameters() if p.requires_grad]

        def update(batch) -> torch.Tensor:
            model.check_fitted()  # here, not inside a compiled loss, where reading the flag would break the graph
            values = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            values[0].backward()
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
            optimizer.step()
            return values.detach()

        sample = None if buffer is None else buffer.sample
        if not self.cuda_graph:
            return optimizer, update, sample
        if buffer is not None and _stored_on(buffer, self.device):
            graphed = GraphedUpdate(update, optimizer, self.device, prepare=buffer.batch_at)
            return optimizer, graphed, buffer.sample_rows
        return optimizer, GraphedUpdate(update, optimizer, self.device), sample

    def _loss_fn(self, model: WorldModel):
        """batch -> [loss, *terms] as one fp32 tensor, under bf16 autocast and/or torch.compile when configured."""
        bf16 = self.precision == "bf16"

        def loss_fn(batch):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, terms = model.loss(batch)
            return stack_terms(model, loss, terms).float()

        if not self.compile:
            return loss_fn
        return torch.compile(loss_fn, mode=self.compile_mode, dynamic=False)

    @torch.no_grad()
    def evaluate(self, model: WorldModel, val_buffer: ReplayBuffer) -> dict[str, float]:
        """val/*: mean loss terms over the held-out transitions in fixed windows of val_seq_len (seq_len unless set; a
        stream's shorter tail is left out), so numbers compare across steps, and across seq_len when val_seq_len is set;
        eval/*: open-loop prediction error per horizon next to the copy-last baseline (see evaluation.py)."""
        model.eval()
        names = ("loss", *model.loss_terms)
        totals = torch.zeros(len(names), dtype=torch.float64)
        count = 0
        for batch in val_buffer.sequences(self.val_seq_len, batch_size=256):
            totals += stack_terms(model, *model.loss(batch)).double().cpu() * len(batch)
            count += len(batch)
        model.train()
        metrics = {f"val/{name}": float(v) / count for name, v in zip(names, totals)}
        result = open_loop(model, val_buffer, self.eval_context, self.eval_horizon)
        if result is None:
            log.warning("eval/* skipped: a window of trainer.eval_context + trainer.eval_horizon - 1 = %d steps fits in "
                        "no held-out episode (the longest holds %d); lower eval_horizon or eval_context (raising "
                        "trainer.val_steps helps only where it cut the episodes short)",
                        self.eval_context + self.eval_horizon - 1, longest_episode(val_buffer))  # fmt: skip
            return metrics
        return {**metrics, **result.scalars()}

    def _log_eval(self, logger: Logger, metrics: dict, model: WorldModel, val_buffer: ReplayBuffer, step: int) -> None:
        logger.log(metrics, step)
        if self.eval_figure:
            window = trajectory(model, val_buffer, self.eval_context, self.eval_horizon)
            if window is not None:
                if self._plot is None:
                    self._plot = TrajectoryPlot(model.obs_dim, self.eval_context, self.eval_horizon)
                logger.log_image("eval/trajectory", self._plot.image(*window), step)

    def _loop(self, model: WorldModel, metrics: dict) -> Loop:
        window = LossWindow(("loss", *model.loss_terms), self.device, self.log_every)
        return Loop(step=0, metrics=metrics, window=window)

    def _check_weights(self, model: WorldModel, step: int) -> None:
        """The losses of update S are computed before update S changes the weights, so finite losses do not prove
        finite weights: checked here, once per checkpoint (one read-back)."""
        if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
            raise Diverged(step, "the model's weights")

    def _state_dict(self, loop: Loop, collector: Collector, model: WorldModel, optimizer) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "buffer": collector.buffer.state_dict(copy=False),  # written from the ring itself: no second copy
            "collector": collector.state_dict(),
            "rng": rng_state(),
            "metrics": loop.metrics,
            "loop": {"step": loop.step, **loop.window.state_dict()},
        }

    def _restore(self, payload: dict, collector: Collector, model: WorldModel, optimizer) -> Loop:
        check_steps_cover(payload, self.steps)  # cli.PreflightChecks and train.py checked it already; here for API use
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        for state in optimizer.state.values():  # load_state_dict keeps host tensors as given: the mapped file's
            state.update({k: v.clone() for k, v in state.items() if torch.is_tensor(v)})
        collector.buffer.load_state_dict(payload["buffer"])
        collector.load_state_dict(payload["collector"])
        set_rng_state(payload["rng"])
        loop = self._loop(model, dict(payload["metrics"]))
        loop.step = payload["loop"]["step"]
        loop.window.load_state_dict(payload["loop"], loop.step)
        # train.py maps the checkpoint file (resume.resume_payload): nothing may keep it mapped once it is read, or
        # pruning it later would not free its disk space, and a resumed run would need a checkpoint more of room.
        for key in ("model", "optimizer", "buffer", "collector", "rng", "loop"):
            payload.pop(key)
        return loop


@dataclass
class Loop:
    """What the loop carries from one update to the next, all of it checkpointed."""

    step: int  # updates made
    metrics: dict  # the latest val/* and eval/* (and val/loss_initial): what fit returns
    window: LossWindow  # train/* since the last log


@dataclass
class Throughput:
    """perf/*: updates and env steps per second of their own time (not logging's or evaluation's) since the last log."""

    updates: int = 0
    env_steps: int = 0
    update_s: float = 0.0
    collect_s: float = 0.0

    def add(self, env_steps: int, collect_s: float, update_s: float) -> None:
        self.updates += 1
        self.env_steps += env_steps
        self.collect_s += collect_s
        self.update_s += update_s

    def read(self) -> dict[str, float]:
        """The rates since the last read; counting starts again from zero."""
        scalars = {"perf/updates_per_s": self.updates / max(self.update_s, 1e-9)}
        if self.env_steps:
            scalars["perf/env_steps_per_s"] = self.env_steps / max(self.collect_s, 1e-9)
        self.updates = self.env_steps = 0
        self.update_s = self.collect_s = 0.0
        return scalars

def _stored_on(buffer: ReplayBuffer, device: torch.device) -> bool:
    """Whether `buffer`'s ring is on `device` ("cuda" means the current CUDA device, as for the model's .to)."""
    table = next(iter(buffer.ring.tables.values()))
    return table.device == torch.empty(0, device=device).device
