"""Record episodes of a policy into an .npz dataset (format: src/worldmodel/dataset.py, README "Datasets").

    python scripts/collect.py env=pendulum episodes=100 out=data/pendulum_random.npz
    python scripts/collect.py env=cartpole episodes=200 policy=sticky out=data/cartpole_sticky.npz
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from worldmodel.cli import user_errors
from worldmodel.config import validate_env
from worldmodel.dataset import collect_episodes, save_dataset
from worldmodel.env import env_spec
from worldmodel.errors import ConfigError, WorldModelError
from worldmodel.rollout import RandomPolicy, StickyRandomPolicy
from worldmodel.runtime import DATASET_SEED_OFFSET


@hydra.main(version_base="1.3", config_path="../conf", config_name="collect")
def main(cfg: DictConfig) -> None:
    with user_errors():
        out = Path(cfg.out)
        if out.exists():
            raise WorldModelError(f"out={out} already exists; datasets are never overwritten. Choose another path.")
        for key, minimum in (("episodes", 1), ("seed", 0)):
            if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < minimum:
                raise ConfigError(key, cfg[key], f"an integer >= {minimum}")
        policies = {"random": RandomPolicy, "sticky": StickyRandomPolicy}
        if cfg.policy not in policies:
            raise ConfigError("policy", cfg.policy, f"one of {', '.join(policies)}")
        validate_env(cfg)
        prob = cfg.sticky_prob
        if isinstance(prob, bool) or not isinstance(prob, int | float) or not 0 <= prob <= 1:
            raise ConfigError("sticky_prob", prob, "a number in [0, 1] (the chance of repeating the previous action)")
        seed = cfg.seed + DATASET_SEED_OFFSET
        env = instantiate(cfg.env, seed=seed, num_envs=1)  # whole episodes, one at a time
        spec = env_spec(env)
        extra = {"repeat_prob": prob} if cfg.policy == "sticky" else {}
        policy = policies[cfg.policy](env.action_space, seed, **extra)
        episodes = collect_episodes(env, spec, policy, cfg.episodes, seed=seed)
        save_dataset(out, episodes)
        lengths = episodes["lengths"]
        print(f"wrote {out}: {len(lengths)} episodes of {spec.id} ({cfg.policy} policy), "
              f"{int(lengths.sum())} transitions, length {lengths.min()}..{lengths.max()} (mean {lengths.mean():.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
