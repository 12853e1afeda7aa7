"""WorldModel: it predicts the next step (not the current one), resets at episode starts, and learns known dynamics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel import GRUWorldModel, ReplayBuffer
from worldmodel import trainer as trainer_module
from worldmodel.errors import WorldModelError
from worldmodel.replay import Batch
from worldmodel.trainer import Trainer
from worldmodel.normalize import Normalizer


def fitted_model(obs_dim=3, action_dim=2, **kw) -> WorldModel:
    torch.manual_seed(0)
    model = GRUWorldModel(obs_dim, action_dim, latent_dim=16, hidden_dim=32, **kw)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(500, obs_dim)).astype(np.float32)
    model.normalizer.fit(obs, rng.normal(size=(500, action_dim)), rng.normal(size=500), obs + rng.normal(size=obs.shape))
    return model


def random_inputs(b=4, t=6, obs_dim=3, action_dim=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, t, obs_dim, generator=g), torch.randn(b, t, action_dim, generator=g)


def test_first_flag_resets_the_recurrent_state():
    """After a `first` step, predictions must not depend on anything from the previous episode."""
    model = fitted_model()
    obs, action = random_inputs()
    first = torch.zeros(4, 6, dtype=torch.bool)
    first[:, 0] = first[:, 3] = True
    base = model(obs, action, first)["delta"]
    obs2, action2 = obs.clone(), action.clone()
    obs2[:, :3] += 5.0
    action2[:, :3] -= 3.0  # change only the previous episode
    other = model(obs2, action2, first)["delta"]
    torch.testing.assert_close(base[:, 3:], other[:, 3:])
    assert not torch.allclose(base[:, :3], other[:, :3])
    # Without the reset flag, the history does leak in: the flag is what isolates episodes.
    first[:, 3] = False
    assert not torch.allclose(model(obs, action, first)["delta"][:, 3:], model(obs2, action2, first)["delta"][:, 3:])


def test_prediction_at_t_never_sees_the_future():
    model = fitted_model()
    obs, action = random_inputs()
    first = torch.zeros(4, 6, dtype=torch.bool)
    first[:, 0] = True
    base = model(obs, action, first)["delta"]
    obs2 = obs.clone()
    obs2[:, 4:] += 10.0
    torch.testing.assert_close(model(obs2, action, first)["delta"][:, :4], base[:, :4])


@pytest.mark.parametrize("head_layers", [1, 2])
def test_heads_are_the_head_modules(head_layers):
    """Linear heads run as one fused matmul; it must be the function the three saved head modules describe."""
    model = fitted_model(head_layers=head_layers)
    h, x = torch.randn(5, 7, 16), torch.randn(5, 7, 18)
    out, features = model._heads(h, x), torch.cat([h, x], dim=-1)
    torch.testing.assert_close(out["delta"], model.next_obs_head(features))
    torch.testing.assert_close(out["reward"], model.reward_head(features).squeeze(-1))
    torch.testing.assert_close(out["terminated_logit"], model.terminated_head(features).squeeze(-1))


def test_normalizer_lives_in_the_state_dict():
    model = fitted_model()
    state = model.state_dict()
    assert state["normalizer.fitted"] and "normalizer.obs_mean" in state and "normalizer.delta_std" in state
    fresh = GRUWorldModel(3, 2, latent_dim=16, hidden_dim=32)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.normalizer.obs_std, model.normalizer.obs_std)


def test_unfitted_model_refuses_to_train():
    model = GRUWorldModel(3, 2)
    obs, action = random_inputs()
    batch = Batch(obs, action, obs[..., 0], obs, *(torch.zeros(4, 6, dtype=torch.bool),) * 3)
    with pytest.raises(RuntimeError, match="fitted"):
        model.loss(batch)


def linear_system_buffer(steps: int, seed: int) -> ReplayBuffer:
    """x' = A x + B u with a stable rotation-like A, reward = -|x|^2, episodes of 50 steps ending in truncation."""
    rng = np.random.default_rng(seed)
    a = np.array([[0.95, 0.2, 0.0], [-0.2, 0.95, 0.0], [0.0, 0.1, 0.9]], dtype=np.float32)
    b = np.array([[0.0], [0.5], [0.2]], dtype=np.float32)
    buffer = ReplayBuffer(steps, 3, 1, seed=seed)
    x = rng.normal(size=3).astype(np.float32)
    for t in range(steps):
        u = rng.uniform(-1, 1, size=1).astype(np.float32)
        nx = a @ x + b @ u
        end = (t + 1) % 50 == 0
        buffer.add(x, u, -float(x @ x), nx, False, end)
        x = rng.normal(size=3).astype(np.float32) if end else nx
    return buffer


def fit_on(model, buffer: ReplayBuffer, steps: int, lr: float, batch_size: int = 32, seq_len: int = 8,
           decay: bool = False):  # fmt: skip
    """Fits the normalizer on everything in `buffer`, then takes `steps` Adam updates on sampled windows. decay: the
    rate falls linearly to 10%, so a score is of a settled model rather than of the last noisy step."""
    rows = buffer[:]
    model.fit_normalizer(rows["obs"], rows["action"], rows["reward"], rows["next_obs"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / steps if decay else 1.0)
    for _ in range(steps):
        loss, _ = model.loss(buffer.sample(batch_size, seq_len))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


@pytest.mark.parametrize("head_layers", [1, 2])  # linear heads (the config default) and MLP heads
def test_learns_a_linear_system_to_tight_error(head_layers):
    torch.manual_seed(0)
    train, val = linear_system_buffer(4000, 0), linear_system_buffer(500, 1)
    model = GRUWorldModel(3, 1, latent_dim=32, hidden_dim=64, head_layers=head_layers)
    assert len(model.next_obs_head) == 3 * (head_layers - 1) + 1  # Linear, LayerNorm, SiLU per hidden layer
    model = fit_on(model, train, steps=600, lr=2e-3)
    batch = next(val.sequences(8, batch_size=1000))
    pred = model.predict(batch.obs, batch.action, batch.first)
    obs_mse = ((pred["next_obs"] - batch.next_obs) ** 2).mean() / batch.next_obs.var(dim=(0, 1)).mean()
    copy_last = ((batch.obs - batch.next_obs) ** 2).mean() / batch.next_obs.var(dim=(0, 1)).mean()
    assert obs_mse < 1e-3 < copy_last / 20  # far better than predicting "nothing changes"
    reward_nmse = ((pred["reward"] - batch.reward) ** 2).mean() / batch.reward.var()
    assert reward_nmse < 0.05
    assert pred["terminated_prob"].max() < 0.05  # the system never terminates


class GraphContract:
    """What GraphedUpdate computes, without CUDA: the input copied into tensors of its own, then update(prepare(it))."""

    def __init__(self, update, optimizer, device, prepare=None):
        self.update, self.prepare = update, prepare or (lambda batch: batch)

    def __call__(self, given):
        return self.update(self.prepare(given.clone() if isinstance(given, torch.Tensor) else given))


def test_a_graphed_update_gathers_its_batch_from_the_rows_drawn(monkeypatch):
    """With trainer.cuda_graph and the ring on the trainer's device, Trainer.build_update has the graph gather each
    batch itself (ReplayBuffer.batch_at) from the rows that ReplayBuffer.sample_rows picks. GraphedUpdate needs CUDA
    (tests/test_cuda.py runs it); a stand-in with its contract checks the wiring here: the same losses and weights,
    bit for bit, as eager updates on the batches ReplayBuffer.sample draws from the same random state."""
    monkeypatch.setattr(trainer_module, "GraphedUpdate", GraphContract)
    losses, weights = {}, {}
    for graphed in (False, True):
        torch.manual_seed(0)
        buffer, model = linear_system_buffer(600, seed=0), GRUWorldModel(3, 1, latent_dim=16, hidden_dim=32)
        rows = buffer[:]
        model.fit_normalizer(rows["obs"], rows["action"], rows["reward"], rows["next_obs"])
        trainer = Trainer(steps=1, prefill=0, batch_size=8, seq_len=6, lr=1e-3, cuda_graph=graphed)
        _, update, sample = trainer.build_update(model, buffer)
        assert isinstance(update, GraphContract) == graphed and (sample == buffer.sample_rows) == graphed
        losses[graphed] = torch.stack([update(sample(8, 6)) for _ in range(6)])
        weights[graphed] = [p.detach().clone() for p in model.parameters()]
    assert torch.equal(losses[True], losses[False])
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def transition_batch(b=4, t=8, obs_dim=3, action_dim=2, seed=2, dtype=torch.float32) -> Batch:
    """A Batch of random transitions, `first` set at every row's start."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, t, obs_dim, generator=g, dtype=dtype)
    action = torch.randn(b, t, action_dim, generator=g, dtype=dtype)
    reward = torch.randn(b, t, generator=g, dtype=dtype)
    next_obs = obs + torch.randn(b, t, obs_dim, generator=g, dtype=dtype)
    terminated = torch.rand(b, t, generator=g) < 0.3
    first = torch.zeros(b, t, dtype=torch.bool)
    first[:, 0] = True
    return Batch(obs, action, reward, next_obs, terminated, torch.zeros(b, t, dtype=torch.bool), first)


def test_termination_loss_ignores_time_limit_truncations():
    """A time-limit truncation is not a termination: the termination head is taught `terminated` alone, so an env's
    time limit never teaches the model that the state ends the episode."""
    model = fitted_model()
    with torch.no_grad():
        model.terminated_head[-1].bias.fill_(2.0)  # logits far from 0, where BCE against 0 and 1 differ clearly
    batch = transition_batch()
    batch.terminated[:, -1] = False
    truncated = batch.truncated.clone()
    truncated[:, -1] = True  # episodes cut by a time limit (and a truncated row in the middle of one window)
    truncated[0, 3] = True
    batch.terminated[0, 3] = False
    assert (truncated & ~batch.terminated).sum() == 5
    _, terms = model.loss(batch)
    prob = model.predict(batch.obs, batch.action, batch.first)["terminated_prob"].double()
    target = batch.terminated.double()
    expected = -(target * prob.log() + (1 - target) * (1 - prob).log()).mean()
    torch.testing.assert_close(terms["terminated"].double(), expected, rtol=1e-5, atol=1e-6)
    truncated_batch = Batch(**{**vars(batch), "truncated": truncated})
    total, truncated_terms = model.loss(truncated_batch)
    torch.testing.assert_close(truncated_terms["terminated"], terms["terminated"], rtol=0, atol=0)
    torch.testing.assert_close(total, model.loss(batch)[0], rtol=0, atol=0)


def test_loss_total_is_the_coefficient_weighted_sum_of_its_terms():
    """conf/model/gru.yaml's *_coef keys weight their terms: total = obs + reward_coef * reward + terminated_coef *
    terminated + open_loop_coef * open_loop, and the terms themselves do not depend on the weights."""
    batch = transition_batch()
    default = fitted_model(open_loop_steps=3)
    _, default_terms = default.loss(batch)
    coefs = {"reward_coef": 0.3, "terminated_coef": 2.5, "open_loop_coef": 0.7}
    model = fitted_model(open_loop_steps=3, **coefs)
    total, terms = model.loss(batch)
    assert tuple(terms) == model.loss_terms
    for name in model.loss_terms:
        torch.testing.assert_close(terms[name], default_terms[name])
        assert terms[name] > 0, name
    expected = (terms["obs"] + 0.3 * terms["reward"] + 2.5 * terms["terminated"] + 0.7 * terms["open_loop"])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(default.loss(batch)[0], sum(default_terms.values()))


def open_loop_by_imagine(model, batch: Batch, k: int) -> torch.Tensor:
    """The open-loop term computed from `imagine`, as its docstring defines it: observe the first c = T - k rows,
    imagine the rest, score horizons 2..k+1 (next_obs[c..T-1]) in normalized obs units, only up to the first reset
    among the imagined rows, the mean over the scored steps and dimensions."""
    T = batch.obs.shape[1]
    c = T - k
    pred = model.imagine(batch.obs[:, :c], batch.action, batch.first[:, :c], units="normalized")["obs"]
    assert pred.shape[1] == k + 1
    target = model.normalizer.normalize("obs", batch.next_obs)
    total, count = 0.0, 0
    for b in range(batch.obs.shape[0]):
        for i in range(c, T):
            if batch.first[b, c : i + 1].any():
                break
            total = total + ((pred[b, i - c + 1] - target[b, i]) ** 2).sum()
            count += pred.shape[-1]
    return total / count


@pytest.mark.parametrize("head_layers", [1, 2])
def test_open_loop_term_is_imagine_scored_up_to_the_first_reset(head_layers):
    """model.open_loop_steps trains on what `imagine` predicts: the term equals imagine's normalized error on the last
    k steps, with every step from an episode start onwards left out of both the sum and the count."""
    k, T = 4, 8
    model = fitted_model(head_layers=head_layers, open_loop_steps=k).double()
    batch = transition_batch(b=6, t=T, dtype=torch.float64)
    batch.first[1, 5] = True  # a reset inside the imagined part: rows 5..7 unscored, row 4 scored
    batch.first[2, 4] = True  # a reset at its first imagined row: nothing of this window scored
    batch.first[3, 6] = batch.first[3, 7] = True  # two resets: rows 4, 5 scored
    batch.first[4, 2] = True  # a reset among the observed rows: imagine starts from it too
    batch.first[5, 3] = True  # a reset at the last observed row (c - 1): imagine starts from it, rows 4..7 scored
    _, terms = model.loss(batch)
    expected = open_loop_by_imagine(model, batch, k)
    torch.testing.assert_close(terms["open_loop"], expected, rtol=1e-7, atol=1e-9)
    # Its gradients too: they reach the observed rows' steps (the state imagination starts from) as imagine's do.
    params = list(model.parameters())
    got_grads = torch.autograd.grad(terms["open_loop"], params, allow_unused=True)
    for got, want in zip(got_grads, torch.autograd.grad(expected, params, allow_unused=True)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # The term is what open_loop_steps adds: the other terms are those of the model without it.
    _, closed = fitted_model(head_layers=head_layers).double().loss(batch)
    for name in ("obs", "reward", "terminated"):
        torch.testing.assert_close(terms[name], closed[name])
    assert closed["open_loop"] == 0


@pytest.mark.parametrize("open_loop_steps", [7, 8])  # T - 1 and T
def test_open_loop_steps_of_a_whole_window_imagine_all_but_its_first_row(open_loop_steps):
    """open_loop_steps >= seq_len - 1 imagines from the first row alone: k = T - 1 steps (horizons 2..T), the most a
    window of T rows holds, not one fewer; a larger setting is that same term."""
    T = 8
    model = fitted_model(open_loop_steps=open_loop_steps).double()
    batch = transition_batch(b=3, t=T, dtype=torch.float64)
    batch.first[1, 6] = True  # a reset late in the window: rows 1..5 scored
    _, terms = model.loss(batch)
    torch.testing.assert_close(terms["open_loop"], open_loop_by_imagine(model, batch, T - 1), rtol=1e-7, atol=1e-9)


def test_a_dimension_constant_in_the_fitted_data_is_only_centered():
    """Acrobot's reward is -1 until an episode terminates, and a prefill may hold no termination; a one-hot action the
    prefill never took is always 0. Such dimensions get std 1: a later 0 reward is then a target of 1, where a small
    floor made it 1000 (val/loss 500 for some Acrobot seeds). A varying dimension keeps its own scale, however small."""
    norm = Normalizer(obs_dim=2, action_dim=3)
    rng = np.random.default_rng(0)
    obs = np.stack([rng.normal(0, 1e-6, 500), np.full(500, 7.0)], axis=1)
    action = np.eye(3)[rng.integers(0, 2, 500)]  # action 2 never taken
    norm.fit(obs, action, np.full(500, -1.0), obs + rng.normal(0, 1e-5, (500, 2)))
    assert norm.reward_std.tolist() == [1.0] and norm.reward_mean.tolist() == [-1.0]
    assert norm.normalize("reward", torch.tensor([[0.0]])).item() == 1.0
    assert norm.action_std[2] == 1.0 and norm.action_std[0] == pytest.approx(0.5, abs=0.05)
    assert norm.obs_std[1] == 1.0 and norm.obs_std[0] == pytest.approx(1e-6, rel=0.1)
    assert norm.delta_std[0] == pytest.approx(1e-5, rel=0.1)


class Reordered(GRUWorldModel):
    """A model whose loss builds its dict of terms in another order than loss_terms (or with other terms)."""

    extra: dict = {}

    def loss(self, batch):
        total, terms = super().loss(batch)
        return total, {**dict(reversed(list(terms.items()))), **self.extra}


def test_loss_terms_are_logged_by_name_not_by_the_dicts_order():
    """train/* and val/* are named from loss_terms: the values once went by the dict's order, so a new model's
    curves could carry each other's names; a term declared but not returned (or the reverse) is refused."""
    torch.manual_seed(0)
    model = Reordered(3, 2, latent_dim=16, hidden_dim=32)
    model.normalizer = fitted_model().normalizer
    obs, action = random_inputs()
    false = torch.zeros(obs.shape[:2], dtype=torch.bool)
    batch = Batch(obs=obs, action=action, reward=obs[..., 0], next_obs=obs + 0.1, terminated=false, truncated=false,
                  first=false)  # fmt: skip
    loss, terms = model.loss(batch)
    stacked = trainer_module.stack_terms(model, loss, terms)
    assert stacked.tolist() == [loss.item(), *(terms[name].item() for name in model.loss_terms)]
    Reordered.extra = {"l2": loss}
    try:
        with pytest.raises(WorldModelError, match=r"returned the terms .*'l2'.* but its loss_terms declare"):
            trainer_module.stack_terms(model, *model.loss(batch))
    finally:
        Reordered.extra = {}


def test_actions_of_the_wrong_width_are_refused_not_broadcast():
    """Discrete actions given as indices [..., 1] broadcast against a 2-column one-hot normalizer without error."""
    model = fitted_model(action_dim=2)
    obs, _ = random_inputs()
    with pytest.raises(ValueError, match=r"action has 1 values .* the model takes 2 \(a Discrete env's actions are one-hot"):
        model.predict(obs, torch.zeros(*obs.shape[:2], 1))


def test_the_normalizer_fitted_in_chunks_has_the_statistics_of_the_whole_data():
    """Chunks of uneven sizes (a large buffer read piecewise) give the mean and std of all rows at once, to float32
    precision, and a dimension constant in every chunk (123.456, far from 0) stays constant."""
    rng = np.random.default_rng(1)
    obs = np.stack([50 + 3 * rng.normal(size=1000), np.full(1000, 123.456)], axis=1).astype(np.float32)
    action, reward = rng.normal(size=(1000, 1)).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    next_obs = (obs + rng.normal(0, 0.1, obs.shape)).astype(np.float32)
    whole, chunked = Normalizer(obs_dim=2, action_dim=1), Normalizer(obs_dim=2, action_dim=1)
    whole.fit(obs, action, reward, next_obs)
    cuts = [0, 1, 130, 130, 131, 600, 1000]  # one chunk empty
    chunked.fit_chunks((obs[a:b], action[a:b], reward[a:b], next_obs[a:b]) for a, b in zip(cuts, cuts[1:]))
    for (name, value), (_, expected) in zip(chunked.state_dict().items(), whole.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=2e-7, atol=0, msg=name)  # an empty chunk adds no NaN
    assert chunked.obs_std[1] == 1.0 and chunked.obs_mean[1] == np.float32(123.456)
    empty = Normalizer(obs_dim=2, action_dim=1)
    for nothing in ([], [(obs[:0], action[:0], reward[:0], next_obs[:0])]):  # no rows: refused, not fitted to NaN
        with pytest.raises(ValueError, match="at least one row"):
            empty.fit_chunks(nothing)
    assert not empty.fitted


def test_a_small_but_varying_dimension_keeps_its_own_std_next_to_a_large_mean():
    """A dimension that varies by 1e-4 of its mean (a position far from the origin moving a little) is not constant:
    only float32 rounding (1e-6 of the mean) or an absolute 1e-8 counts as not varying."""
    norm = Normalizer(obs_dim=2, action_dim=1)
    rng = np.random.default_rng(0)
    obs = np.stack([100.0 + rng.normal(0, 1e-2, 500), rng.normal(0, 1, 500)], axis=1)
    norm.fit(obs, rng.normal(size=(500, 1)), rng.normal(size=500), obs + rng.normal(0, 1, (500, 2)))
    assert norm.obs_std[0] == pytest.approx(1e-2, rel=0.1) and norm.obs_mean[0] == pytest.approx(100.0, rel=1e-4)
    x = torch.tensor([[100.003, -0.5]])
    torch.testing.assert_close(norm.denormalize("obs", norm.normalize("obs", x)), x)  # denormalize undoes normalize


def test_a_dimension_near_zero_that_varies_below_the_absolute_floor_is_constant():
    """Values around 0 that differ by less than 1e-8 (round-off left in a quantity that is 0) are only centered:
    relative to a mean of ~0 the 1e-6 rule alone would call them varying and scale them up by 1e9."""
    norm = Normalizer(obs_dim=1, action_dim=1)
    rng = np.random.default_rng(0)
    obs = rng.normal(0, 1e-10, (500, 1))
    norm.fit(obs, rng.normal(size=(500, 1)), rng.normal(size=500), obs + 1.0)
    assert norm.obs_std.tolist() == [1.0]


def test_imagine_feeds_its_own_predictions_back_as_observations():
    """Past the context the GRU observes its own predictions: imagine's horizon k is what predict gives, teacher-
    forced, on the context followed by imagine's first k - 1 predictions, with the action of the same row."""
    C, H = 3, 4
    model = fitted_model()
    obs, action = random_inputs(t=C + H - 1)
    with torch.no_grad():
        out = model.imagine(obs[:, :C], action)
        fed = model.predict(torch.cat([obs[:, :C], out["obs"][:, :-1]], dim=1), action)
    for key, fed_key in [("obs", "next_obs"), ("reward", "reward"), ("terminated_prob", "terminated_prob")]:
        torch.testing.assert_close(out[key], fed[fed_key][:, C - 1 :], msg=key)


def test_open_loop_term_is_zero_where_every_imagined_stretch_starts_an_episode():
    """With a reset at the first imagined row of every window nothing is scored: the term is 0 (no NaN from 0 / 0),
    and the total is the teacher-forced loss alone."""
    model = fitted_model(open_loop_steps=3)
    batch = transition_batch(t=8)
    batch.first[:, 5] = True
    total, terms = model.loss(batch)
    assert terms["open_loop"] == 0
    torch.testing.assert_close(total, terms["obs"] + terms["reward"] + terms["terminated"])


def test_default_heads_are_those_of_checkpoints_saved_before_head_layers():
    """GRUWorldModel's head_layers defaults to 2 (conf/model/gru.yaml sets 1): a checkpoint saved before the argument
    existed holds two-layer heads (Linear, LayerNorm, SiLU, Linear) and must load into the model built without it."""
    keys = GRUWorldModel(3, 2, latent_dim=16, hidden_dim=32).state_dict()
    for head in ("next_obs_head", "reward_head", "terminated_head"):
        assert [k for k in keys if k.startswith(head + ".")] == [
            f"{head}.{k}" for k in ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
        ]
    assert keys["next_obs_head.0.weight"].shape == (32, 2 * 16 + 2)


def test_mlp_is_linear_layernorm_silu_blocks_then_a_linear_output():
    """models.base.mlp, which every model's encoder and heads use: `layers` Linear layers, each but the last followed
    by LayerNorm and SiLU (the layout, and so the state_dict keys, checkpoints hold)."""
    from torch import nn

    from worldmodel.models.base import mlp

    net = mlp(4, 8, 3, layers=3)
    assert [type(m) for m in net] == [nn.Linear, nn.LayerNorm, nn.SiLU] * 2 + [nn.Linear]
    assert [m.weight.shape for m in net if isinstance(m, nn.Linear)] == [(8, 4), (8, 8), (3, 8)]
    assert [type(m) for m in mlp(4, 8, 3, layers=1)] == [nn.Linear]


def test_loading_an_unfitted_state_makes_the_model_refuse_to_train_again():
    """check_fitted remembers a pass (it would stall a GPU every step), but loading a state_dict forgets it: a model
    that trained and is then given an unfitted normalizer refuses, rather than training on raw units."""
    model = fitted_model()
    batch = transition_batch(obs_dim=3, action_dim=2)
    model.loss(batch)  # passes, and is remembered
    model.load_state_dict(GRUWorldModel(3, 2, latent_dim=16, hidden_dim=32).state_dict())
    with pytest.raises(RuntimeError, match="fitted"):
        model.loss(batch)


def test_the_delta_of_float16_observations_is_fitted_as_the_loss_computes_it():
    """buffer.obs_dtype=float16 stores obs and next_obs as float16, but batches (and so the loss's delta targets) are
    float32. A delta taken in float16 overflowed to inf beyond 65504 (a NaN normalizer, reported as a divergence)."""
    obs = np.array([[40000.0], [-40000.0], [1.0]], np.float16)
    next_obs = np.array([[-30000.0], [30000.0], [1.0009765625]], np.float16)
    norm = Normalizer(obs_dim=1, action_dim=1)
    norm.fit(obs, np.zeros((3, 1)), np.zeros(3), next_obs)
    expected = next_obs.astype(np.float32) - obs.astype(np.float32)
    assert torch.isfinite(norm.delta_std).all()
    assert norm.delta_mean.item() == pytest.approx(expected.mean(), rel=1e-6)
    assert norm.delta_std.item() == pytest.approx(expected.std(), rel=1e-6)
