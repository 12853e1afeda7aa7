"""Train a world model: compose config -> build env, buffer, model, trainer -> loop -> log -> checkpoint.

    python scripts/train.py                                   # CartPole, GRU world model, default trainer
    python scripts/train.py buffer.capacity=100000 model.latent_dim=64
    python scripts/train.py -m model.latent_dim=32,64 seed=0,1   # a sweep, one directory per job

Returns the final validation loss (lower is better), so Hydra sweepers can optimize it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from worldmodel.checkpoint import Checkpointer, finish_checkpoints
from worldmodel.cli import user_errors
from worldmodel.config import validate_config
from worldmodel.env import env_spec
from worldmodel.logger import Logger, has_hparams
from worldmodel.resume import RunFinished, resume_payload
from worldmodel.rollout import RandomPolicy
from worldmodel.run_lock import CONTINUE_SWEEP, JOB_CONFIG_REPLACED, only_process_in
from worldmodel.runtime import VAL_SEED_OFFSET, resolve_device, seed_everything
from worldmodel.vector import make_collector


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # How to resume, if stopped, names this file (under submitit too). Only one process works in a run dir at a time:
    # a single run holds it since its pre-run checks, so only a sweep job can be refused here, after Hydra saved its
    # config (worldmodel.cli.PreflightChecks refuses the sweep earlier where its jobs' directories are in use).
    with user_errors(script=__file__), only_process_in(run_dir, changed=JOB_CONFIG_REPLACED, then=CONTINUE_SWEEP):
        # 1. Check every value, and the checkpoint to resume from, before any work starts. (For a single run,
        #    worldmodel.cli.PreflightChecks made these checks even earlier, before Hydra wrote into the run dir.)
        validate_config(cfg)
        try:
            # None: a fresh start. The file is mapped, not read: its replay buffer goes from the file into the new
            # ring, never held in memory twice.
            resume_from = resume_payload(run_dir, cfg, mmap=True)
        except RunFinished as done:  # trainer.resume=auto, as a continued sweep passes to every job
            if done.step == cfg.trainer.steps:  # a kill after the final checkpoint may have left the rest undone
                finish_checkpoints(run_dir, done.path, cfg.trainer.keep_checkpoints)
                if not has_hparams(run_dir):
                    with Logger(run_dir, done.step + 1, OmegaConf.to_yaml(cfg, resolve=True)) as logger:
                        logger.log_hparams(cfg, done.metrics, step=done.step)
            print(f"{run_dir} has already made its {done.step} updates: nothing to do (val/loss "
                  f"{done.metrics['val/loss']:.4g})")
            return done.metrics["val/loss"]
        seed_everything(cfg.seed)
        device = resolve_device(cfg.trainer.device)
        storage = resolve_device(cfg.buffer.device, key="buffer.device", auto=device)  # where the replay ring lives

        # 2. Build: env -> replay buffer -> world model -> trainer.
        env = instantiate(cfg.env, seed=cfg.seed)  # a gymnasium vector env when env.num_envs > 1
        spec = env_spec(env)
        dims = {"obs_dim": spec.obs_dim, "action_dim": spec.action_dim}
        streams = getattr(env, "num_envs", 1)  # one replay stream per env, so no sequence mixes two envs
        # A resumed run's buffer comes whole from its checkpoint: its dataset file is not read again (it may have moved).
        dataset = None if resume_from else cfg.buffer.dataset
        buffer = instantiate(cfg.buffer, **dims, streams=streams, device=storage, batch_device=device, seed=cfg.seed,
                             dataset=dataset, discrete_actions=spec.discrete, capacity_key="buffer.capacity")  # fmt: skip
        model = instantiate(cfg.model, **dims)
        trainer = instantiate(cfg.trainer, device=device)

        # 3. Rollout: random actions fill the training buffer; a separately seeded env gives held-out episodes.
        collector = make_collector(env, buffer, RandomPolicy(env.action_space, cfg.seed), seed=cfg.seed, spec=spec)
        val_seed = cfg.seed + VAL_SEED_OFFSET
        val_env = instantiate(cfg.env, seed=val_seed, num_envs=1)
        # Held-out data in full precision whatever buffer.obs_dtype stores: targets rounded to bfloat16 would
        # penalise the metric itself (val_steps rows: the memory saved would be nothing).
        val_buffer = instantiate(cfg.buffer, **dims, capacity=cfg.trainer.val_steps, device=storage,
                                 batch_device=device, seed=val_seed, dataset=None, obs_dtype="float32",
                                 capacity_key="trainer.val_steps")  # fmt: skip
        val_policy = RandomPolicy(val_env.action_space, val_seed)
        val_collector = make_collector(val_env, val_buffer, val_policy, seed=val_seed, spec=spec)

        # 4. Loop: prefill, then alternate collecting and updating, logging to TensorBoard in the run's own dir and
        #    checkpointing the whole state (model, optimizer, buffer, env, RNGs) to <run dir>/checkpoints/.
        checkpointer = Checkpointer(run_dir, cfg, spec, keep=cfg.trainer.keep_checkpoints)
        # Remove what a killed run logged after its checkpoint; a fresh start removes all an earlier attempt in this
        # directory logged (a requeued sweep job that was killed before its first checkpoint starts over here).
        purge_step = resume_from["loop"]["step"] + 1 if resume_from else 0
        config_text = OmegaConf.to_yaml(cfg, resolve=True)  # a resumed run's replaces the earlier attempts'
        with Logger(run_dir, purge_step=purge_step, config=config_text) as logger:
            metrics = trainer.fit(collector, val_collector, model, logger, checkpointer, resume_from)
            logger.log_hparams(cfg, metrics, step=cfg.trainer.steps)  # HParams tab: flattened config, final metrics
        print(f"val/loss {metrics['val/loss_initial']:.4g} -> {metrics['val/loss']:.4g}; run dir: {run_dir}")
        return metrics["val/loss"]


if __name__ == "__main__":
    main()
