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
from worldmodel.config import validate_collect
from worldmodel.dataset import collect_episodes, non_finite, save_dataset
from worldmodel.env import env_spec
from worldmodel.errors import WorldModelError
from worldmodel.rollout import POLICIES
from worldmodel.runtime import DATASET_SEED_OFFSET


@hydra.main(version_base="1.3", config_path="../conf", config_name="collect")
def main(cfg: DictConfig) -> None:
    with user_errors():
        validate_collect(cfg)  # also checked before Hydra wrote the run dir (conf/collect.yaml's callback)
        out, prob = Path(cfg.out), cfg.sticky_prob
        seed = cfg.seed + DATASET_SEED_OFFSET
        env = instantiate(cfg.env, seed=seed, num_envs=1)  # whole episodes, one at a time
        spec = env_spec(env)
        extra = {"repeat_prob": prob} if cfg.policy == "sticky" else {}
        policy = POLICIES[cfg.policy](env.action_space, seed, **extra)
        episodes = collect_episodes(env, spec, policy, cfg.episodes, seed=seed)
        if bad := non_finite(episodes):  # train.py and evaluate.py would refuse the file: nothing is written
            raise WorldModelError(f"{spec.id} returned NaN/inf values ({bad}); {out} was not written.")
        save_dataset(out, episodes)
        lengths = episodes["lengths"]
        print(f"wrote {out}: {len(lengths)} episodes of {spec.id} ({cfg.policy} policy), "
              f"{int(lengths.sum())} transitions, length {lengths.min()}..{lengths.max()} (mean {lengths.mean():.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
