"""A test env (`env.id=nan_env:NanCartPole-v0`, with tests/ on PYTHONPATH) whose observations turn NaN after a set
number of steps, to check that divergence stops a run while its last good checkpoint survives."""

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv


class NanCartPole(CartPoleEnv):
    def __init__(self, nan_after: int = 10**9, **kwargs):
        super().__init__(**kwargs)
        self.nan_after, self.steps_taken = nan_after, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps_taken += 1
        if self.steps_taken > self.nan_after:
            obs = np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


gym.register("NanCartPole-v0", entry_point=NanCartPole, max_episode_steps=500)
