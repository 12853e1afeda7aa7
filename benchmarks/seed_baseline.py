"""The seed notebook's approach (../shared/seed/world_model_notebook.md), kept as the baseline every benchmark row is
measured against. Deliberately naive: a Python list-comprehension sampler, a one-env loop with a per-step `add`, and
a numpy -> tensor copy of every batch. Its known bugs stay in (sampled windows run across the write pointer and
across episode resets; the model reconstructs its input), with these changes:
* `seed_update(predict_next=True)`: the time-to-quality baseline predicts the next observation, or it would not be
  doing the same job as ours;
* the notebook's `add` reads `terminated or truncated` from globals and its loop passes five arguments to a
  four-argument `add`: here the loop passes `done` (what the notebook meant);
* the benchmarks train it with Adam at lr 1e-3, ours, where the notebook uses 3e-4 (the faster rate can only help
  it).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn


class SeedReplayBuffer:
    """The seed's buffer: one array per field, `np.stack` over a Python list of slices to sample."""

    def __init__(self, capacity: int, obs_shape: tuple, action_shape: tuple):
        self.capacity = capacity
        self.obs_buffer = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.action_buffer = np.zeros((capacity, *action_shape), dtype=np.float32)
        self.reward_buffer = np.zeros((capacity,), dtype=np.float32)
        self.dones_buffer = np.zeros((capacity,), dtype=bool)
        self.ptr = 0
        self.size = 0

    def add(self, obs, action, reward, done) -> None:
        self.obs_buffer[self.ptr] = obs
        self.action_buffer[self.ptr] = action
        self.reward_buffer[self.ptr] = reward
        self.dones_buffer[self.ptr] = done
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, seq_len: int):
        idxs = np.random.randint(0, self.size - seq_len, size=batch_size)
        obs = np.stack([self.obs_buffer[i : i + seq_len] for i in idxs])
        actions = np.stack([self.action_buffer[i : i + seq_len] for i in idxs])
        rewards = np.stack([self.reward_buffer[i : i + seq_len] for i in idxs])
        dones = np.stack([self.dones_buffer[i : i + seq_len] for i in idxs])
        return obs, actions, rewards, dones


def seed_collect(env: gym.Env, buffer: SeedReplayBuffer, steps: int) -> None:
    """The seed's one-env collection loop: sample, step, add, reset on done."""
    obs, _ = env.reset(seed=0)
    for _ in range(steps):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        buffer.add(obs, action, reward, done)
        obs = next_obs
        if done:
            obs, _ = env.reset()


class SeedWorldModel(nn.Module):
    """The seed's model: encoder MLP -> nn.GRU -> linear decoder and reward head."""

    def __init__(self, obs_dim: int, action_dim: int, latent_dim: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(obs_dim, 128), nn.ReLU(), nn.Linear(128, latent_dim))
        self.dynamics = nn.GRU(input_size=latent_dim + action_dim, hidden_size=latent_dim, batch_first=True)
        self.decoder = nn.Linear(latent_dim, obs_dim)
        self.reward_head = nn.Linear(latent_dim, 1)

    def forward(self, obs, actions):
        z = self.encoder(obs)
        h, _ = self.dynamics(torch.cat([z, actions], dim=-1))
        return self.decoder(h), self.reward_head(h).squeeze(-1)


def seed_update(model, optimizer, buffer: SeedReplayBuffer, batch_size: int, seq_len: int, device,
                predict_next: bool = False) -> torch.Tensor:  # fmt: skip
    """One step of the seed's training loop. The seed reconstructs the current observation; with predict_next the
    target becomes the next observation (its obs shifted by one step), the only change we make for time-to-quality."""
    obs_b, act_b, rew_b, _ = buffer.sample(batch_size, seq_len + int(predict_next))
    obs_b = torch.tensor(obs_b, dtype=torch.float32, device=device)
    act_b = torch.tensor(act_b, dtype=torch.float32, device=device)
    rew_b = torch.tensor(rew_b, dtype=torch.float32, device=device)
    if predict_next:
        obs_in, target, act_b, rew_b = obs_b[:, :-1], obs_b[:, 1:], act_b[:, :-1], rew_b[:, :-1]
    else:
        obs_in = target = obs_b
    obs_hat, rew_hat = model(obs_in, act_b)
    loss = nn.functional.mse_loss(obs_hat, target) + nn.functional.mse_loss(rew_hat, rew_b)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss
