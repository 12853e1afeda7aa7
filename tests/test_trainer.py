"""The trainer's log window (loss_window.py): each update's loss terms kept on the device as a row, summed and checked at
log time; and the trainer's own checks."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from worldmodel import GRUWorldModel, ReplayBuffer, env_spec, make_env
from worldmodel import loss_window
from worldmodel.errors import WorldModelError
from worldmodel.logger import Logger
from worldmodel.loss_window import Diverged, LossWindow
from worldmodel.rollout import RandomPolicy
from worldmodel import trainer as trainer_module
from worldmodel.trainer import Throughput, Trainer, require_finite, row_chunks
from worldmodel.vector import make_collector

TERMS = ("loss", "obs", "reward")


def values(step: int) -> torch.Tensor:
    return torch.tensor([step, 0.5 * step, 1.0 / step])


def accumulate(window: LossWindow, steps: range, bad: dict | None = None) -> None:
    """Updates `steps`, with bad[step] = (term index, value) making one term of that update non-finite."""
    for step in steps:
        v = values(step)
        if bad and step in bad:
            v[bad[step][0]] = bad[step][1]
        window.add(step, v)


def test_the_window_means_are_those_of_its_updates_across_a_growing_buffer(monkeypatch):
    monkeypatch.setattr(loss_window, "ROWS", 4)  # 11 updates between logs: the rows double twice
    window = LossWindow(TERMS, torch.device("cpu"), log_every=100)
    accumulate(window, range(1, 12))
    assert len(window.values) == 16
    means = window.flush()
    expected = torch.stack([values(s) for s in range(1, 12)]).mean(0).tolist()
    assert list(means) == [f"train/{t}" for t in TERMS]
    assert list(means.values()) == pytest.approx(expected, rel=1e-6)
    accumulate(window, range(12, 14))  # the next window starts empty
    assert window.flush()["train/loss"] == pytest.approx(12.5)


@pytest.mark.parametrize("log_every", [3, 100])
def test_a_divergence_is_reported_at_its_first_update_and_term(log_every):
    """The first non-finite update of the window and, of its terms, those that were non-finite then; later bad
    updates and terms do not change the report."""
    window = LossWindow(TERMS, torch.device("cpu"), log_every)
    accumulate(window, range(20, 26))
    window.flush()  # a finite window: logged and cleared
    bad = {29: (2, math.nan), 30: (1, math.inf), 31: (2, -math.inf)}
    accumulate(window, range(26, 33), bad)
    with pytest.raises(Diverged, match=r"train/reward became non-finite at update 29$"):
        window.check_finite()
    window = LossWindow(TERMS, torch.device("cpu"), log_every)
    accumulate(window, range(1, 5), {3: (1, math.nan)})
    window.values[2, 0] = math.inf  # two terms bad at the same, first, update
    with pytest.raises(Diverged, match=r"train/loss, train/obs became non-finite at update 3$"):
        window.check_finite()


def restored(saved: dict, step: int) -> LossWindow:
    window = LossWindow(TERMS, torch.device("cpu"), log_every=100)
    window.load_state_dict(saved, step)
    return window


def test_a_checkpointed_window_resumes_with_the_same_rows():
    """A checkpoint mid-window saves its rows, so the resumed window sums the same rows in the same order (runs
    resume bit-identical: tests/test_resume.py); a checkpoint from before the rows were saved carries their sum."""
    window = LossWindow(TERMS, torch.device("cpu"), log_every=100)
    accumulate(window, range(1, 8))
    saved = window.state_dict()
    accumulate(window, range(8, 11))
    expected = window.flush()

    resumed = restored(saved, step=7)
    assert resumed.start == 1 and resumed.rows == resumed.updates == 7
    accumulate(resumed, range(8, 11))
    assert resumed.flush() == expected  # to the bit

    old = {"step": 7, "window_updates": 7, "window_sums": saved["window_values"].sum(0),
           "first_nonfinite": torch.full((3,), -1)}  # fmt: skip
    resumed = restored(old, step=7)
    accumulate(resumed, range(8, 11), {9: (0, math.nan)})
    with pytest.raises(Diverged, match="train/loss became non-finite at update 9$"):
        resumed.check_finite()
    resumed = restored(old, step=7)
    accumulate(resumed, range(8, 11))
    got = resumed.flush()
    assert list(got.values()) == pytest.approx(list(expected.values()), rel=1e-6)


def test_a_window_restored_from_an_old_checkpoint_counts_once():
    """The sums an old checkpoint carried belong to the window it was saved in: the next log window means its own
    updates only."""
    old = {"step": 7, "window_updates": 7, "window_sums": torch.stack([values(s) for s in range(1, 8)]).sum(0)}
    resumed = restored(old, step=7)
    accumulate(resumed, range(8, 11))
    first = resumed.flush()
    expected = torch.stack([values(s) for s in range(1, 11)]).mean(0).tolist()
    assert list(first.values()) == pytest.approx(expected, rel=1e-6)
    accumulate(resumed, range(11, 14))
    second = resumed.flush()
    expected = torch.stack([values(s) for s in range(11, 14)]).mean(0).tolist()
    assert list(second.values()) == pytest.approx(expected, rel=1e-6)


def random_rows(n: int, obs_dim: int = 3, action_dim: int = 2, seed: int = 0, delta: float = 0.1) -> dict:
    """n consecutive transitions of one episode, random but for next_obs = obs + `delta`-sized steps."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    return {"obs": obs, "action": rng.normal(size=(n, action_dim)).astype(np.float32),
            "reward": rng.normal(size=n).astype(np.float32),
            "next_obs": (obs + delta * rng.normal(size=(n, obs_dim))).astype(np.float32),
            "terminated": np.zeros(n, dtype=bool), "truncated": np.zeros(n, dtype=bool)}  # fmt: skip


def fitted_gru(rows: dict) -> GRUWorldModel:
    torch.manual_seed(0)
    model = GRUWorldModel(3, 2, latent_dim=8, hidden_dim=16)
    model.fit_normalizer(rows["obs"], rows["action"], rows["reward"], rows["next_obs"])
    return model


def test_grad_clip_caps_the_norm_of_the_gradient_each_update_applies():
    """trainer.grad_clip caps the global norm of the gradient Adam is given (its first moment after one update is
    (1 - beta1) x that gradient); a gradient already below the cap is applied as it is."""
    rows = random_rows(200)
    buffer = ReplayBuffer(200, 3, 2, seed=0)
    buffer.extend(**rows)
    model, batch = fitted_gru(rows), buffer.sample(8, 6)
    reference = copy.deepcopy(model)
    reference.loss(batch)[0].backward()
    grads = [p.grad for p in reference.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert norm > 1e-3
    for clip in (norm / 100, 10 * norm):
        clipped = copy.deepcopy(model)
        optimizer, update, _ = Trainer(steps=1, prefill=0, batch_size=8, seq_len=6, lr=1e-3,
                                       grad_clip=clip).build_update(clipped)  # fmt: skip
        update(batch)
        scale = min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s
        beta1 = optimizer.param_groups[0]["betas"][0]
        for p, g in zip(clipped.parameters(), grads):
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], (1 - beta1) * scale * g, rtol=1e-4, atol=1e-9)


def test_validation_loss_weights_every_window_alike():
    """val/* are means over every held-out window, also when the last validation batch is smaller than the others
    (257 windows: batches of 129 and 128), not means of per-batch means."""
    train = random_rows(400)
    model = fitted_gru(train)
    val = random_rows(514, seed=1)
    val["next_obs"][258:] += 30.0  # the second batch's windows: far larger losses than the first's
    val_buffer = ReplayBuffer(514, 3, 2, seed=0)
    val_buffer.extend(**val)
    trainer = Trainer(steps=1, prefill=0, batch_size=8, seq_len=2, lr=1e-3)
    assert [len(b) for b in val_buffer.sequences(2, batch_size=256)] == [129, 128]
    got = trainer.evaluate(model, val_buffer)
    model.eval()
    with torch.no_grad():
        loss, terms = model.loss(val_buffer.gather(np.arange(0, 514, 2), 2))  # all 257 windows in one batch
    expected = {"val/loss": float(loss), **{f"val/{k}": float(v) for k, v in terms.items()}}
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["whole", "in-chunks"])
def test_the_normalizer_is_fitted_on_the_prefill_data(tmp_path, monkeypatch, chunk_rows):
    """After the prefill, the model's normalizer holds the mean and std of the stored observations, actions, rewards
    and observation deltas (next_obs - obs), as normalize.py documents, whether the buffer is read at once or, as a
    large one is, in chunks (7 rows here: 43 of them, the last shorter). fit leaves the process's flush-to-zero
    setting as it found it (left on, it broke hypothesis' float strategies in later tests of the same process)."""
    if chunk_rows:
        monkeypatch.setattr(trainer_module, "CHUNK_ROWS", chunk_rows)
    torch.set_flush_denormal(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny run: a second thread only contends for two shared cores
    try:
        torch.manual_seed(0)
        env, val_env = make_env("CartPole-v1", seed=0), make_env("CartPole-v1", seed=1)
        spec = env_spec(env)
        buffer, val_buffer = ReplayBuffer(1000, 4, 2, seed=0), ReplayBuffer(40, 4, 2, seed=1)
        collector = make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
        val_collector = make_collector(val_env, val_buffer, RandomPolicy(val_env.action_space, 1), seed=1, spec=spec)
        model = GRUWorldModel(4, 2, latent_dim=8, hidden_dim=16)
        trainer = Trainer(steps=1, prefill=300, batch_size=4, seq_len=6, lr=1e-3, env_steps_per_update=0, val_steps=40,
                          eval_context=2, eval_horizon=3, eval_figure=False, progress=False)  # fmt: skip
        with Logger(tmp_path) as logger:
            trainer.fit(collector, val_collector, model, logger)
        assert torch.tensor([1e-39]).mul(1.0).item() != 0.0  # subnormals survive: no flush to zero after fit
    finally:
        torch.set_num_threads(threads)
    rows = {k: v.astype(np.float64) for k, v in buffer[:].items()}
    assert len(rows["obs"]) == 300  # the prefill, and nothing after it (env_steps_per_update=0)
    data = {"obs": rows["obs"], "action": rows["action"], "delta": rows["next_obs"] - rows["obs"],
            "reward": rows["reward"][:, None]}  # fmt: skip
    norm = model.normalizer
    assert bool(norm.fitted)
    for name, values in data.items():
        mean = torch.as_tensor(values.mean(0), dtype=torch.float32)
        std = torch.as_tensor(np.where(values.std(0) > 1e-8, values.std(0), 1.0), dtype=torch.float32)
        torch.testing.assert_close(getattr(norm, f"{name}_mean"), mean, msg=f"{name}_mean")
        torch.testing.assert_close(getattr(norm, f"{name}_std"), std, msg=f"{name}_std")


def test_non_finite_collected_data_is_refused_naming_its_likely_cause():
    """float16 storage turns observations beyond 65504 into inf; an env may return NaN itself. Either way nothing can
    train on them, and the message says which setting, if any, is to blame."""
    def one_row(buffer, obs, reward=0.0):
        buffer.add(obs, [0.0], reward, obs, False, False)
        return buffer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "overflow encountered in cast"
        overflowed = one_row(ReplayBuffer(10, 2, 1, obs_dtype="float16"), [1e6, 0.0])
    with pytest.raises(WorldModelError, match=r"prefill data holds NaN/inf values \(obs: 1, next_obs: 1\).*float16"):
        require_finite(overflowed[:], overflowed.obs_dtype, "the prefill data")
    from_env = one_row(ReplayBuffer(10, 2, 1), [0.0, 0.0], reward=float("nan"))
    with pytest.raises(WorldModelError, match=r"\(reward: 1\).*The env returned them"):
        require_finite(from_env[:], from_env.obs_dtype, "the prefill data")
    require_finite(one_row(ReplayBuffer(10, 2, 1), [1e6, 0.0])[:], "float32", "fine")  # float32 holds it


def test_non_finite_rows_are_counted_over_every_chunk_of_a_large_buffer():
    """The prefill's check reads a large buffer in chunks: a NaN in a later chunk is found, and counted with the
    others."""
    buffer = ReplayBuffer(100, 2, 1)
    for t in range(30):
        obs = [float("nan") if t in (3, 25) else 0.0, 0.0]
        buffer.add(obs, [0.0], 0.0, [0.0, 0.0], False, False)
    with pytest.raises(WorldModelError, match=r"\(obs: 2\)"):
        require_finite(row_chunks(buffer, rows=8), buffer.obs_dtype, "the prefill data")
    assert sum(len(chunk["obs"]) for chunk in row_chunks(buffer, rows=8)) == 30


def test_float16_is_blamed_only_for_non_finite_observations():
    """A NaN reward in a float16 buffer came from the env (rewards are stored as float32): the message must not send
    the user to change buffer.obs_dtype."""
    buffer = ReplayBuffer(10, 2, 1, obs_dtype="float16")
    buffer.add([0.0, 0.0], [0.0], float("nan"), [0.0, 0.0], False, False)
    with pytest.raises(WorldModelError, match=r"\(reward: 1\).*The env returned them") as err:
        require_finite(buffer[:], buffer.obs_dtype, "the prefill data")
    assert "float16" not in str(err.value)


def tiny_fit(tmp_path, monkeypatch=None, stop_after_prefill=False, val_env=("CartPole-v1", None), **trainer_args):
    """A CartPole run of a few updates in this process (about a second), logged into tmp_path. stop_after_prefill: a
    SIGTERM arrives once the prefill is done, so the loop sees it after its first update. val_env: (id, kwargs) of
    the env the held-out episodes come from."""
    torch.manual_seed(0)
    env, val_env = make_env("CartPole-v1", seed=0), make_env(val_env[0], seed=1, kwargs=val_env[1])
    spec = env_spec(env)
    buffer, val_buffer = ReplayBuffer(1000, 4, 2, seed=0), ReplayBuffer(40, 4, 2, seed=1)
    collector = make_collector(env, buffer, RandomPolicy(env.action_space, 0), seed=0, spec=spec)
    val_collector = make_collector(val_env, val_buffer, RandomPolicy(val_env.action_space, 1), seed=1, spec=spec)
    model = GRUWorldModel(4, 2, latent_dim=8, hidden_dim=16)
    trainer = Trainer(prefill=100, batch_size=4, seq_len=6, lr=1e-3, val_steps=40, eval_context=2, eval_horizon=3,
                      eval_figure=False, progress=False, **trainer_args)  # fmt: skip
    if stop_after_prefill:
        prefill = trainer._prefill

        def then_stopped(collector, stop):
            prefill(collector, stop)
            stop.signum = 15

        monkeypatch.setattr(trainer, "_prefill", then_stopped)
    with Logger(tmp_path) as logger:
        return trainer.fit(collector, val_collector, model, logger)


def test_non_finite_held_out_data_is_refused_before_training(tmp_path):
    """NaN observations in the held-out episodes alone (the training env is fine): named as such before any update,
    not found later as a divergence that blames trainer.lr."""
    import nan_env  # noqa: F401  registers NanCartPole-v0

    with pytest.raises(WorldModelError, match=r"held-out data \(trainer.val_steps\) holds NaN/inf"):
        tiny_fit(tmp_path, val_env=("NanCartPole-v0", {"nan_after": 10}), steps=2)


def test_the_final_update_is_logged_even_off_the_log_every_schedule(tmp_path):
    """trainer.steps=3 with log_every=2: train/* at 2 and at 3, the run's last point (else its final losses, and the
    updates since the last log, would never be shown)."""
    from conftest import raw_scalars

    tiny_fit(tmp_path, steps=3, log_every=2, eval_every=100)
    logged = raw_scalars(tmp_path)
    assert [s for s, _ in logged["train/loss"]] == [2, 3]
    assert [s for s, _ in logged["val/loss"]] == [0, 3]


def test_a_stop_noticed_at_the_final_update_finishes_the_run(tmp_path, monkeypatch):
    """The final update's checkpoint is the finished run's: a stop that arrives then is not an interruption (which
    would print a resume command and skip the run's HParams summary). One that arrives earlier is."""
    from worldmodel.errors import RunInterrupted

    metrics = tiny_fit(tmp_path / "a", monkeypatch, stop_after_prefill=True, steps=1)
    assert math.isfinite(metrics["val/loss"])
    with pytest.raises(RunInterrupted) as stopped:
        tiny_fit(tmp_path / "b", monkeypatch, stop_after_prefill=True, steps=2)
    assert (stopped.value.signum, stopped.value.step) == (15, 1)


def test_throughput_rates_are_those_of_the_interval_since_the_last_read():
    """perf/* are logged every trainer.log_every updates; each point is the rate over that interval alone, so a slow
    stretch (a GPU shared with another job, an eval figure's aftermath) shows where it happened instead of being
    averaged into every later point. An interval with no env steps (an offline run) logs no env rate."""
    timer = Throughput()
    timer.add(env_steps=10, collect_s=0.5, update_s=0.25)
    timer.add(env_steps=10, collect_s=0.5, update_s=0.25)
    assert timer.read() == {"perf/updates_per_s": pytest.approx(4.0), "perf/env_steps_per_s": pytest.approx(20.0)}
    timer.add(env_steps=30, collect_s=1.0, update_s=1.0)
    assert timer.read() == {"perf/updates_per_s": pytest.approx(1.0), "perf/env_steps_per_s": pytest.approx(30.0)}
    timer.add(env_steps=0, collect_s=0.0, update_s=0.5)
    assert timer.read() == {"perf/updates_per_s": pytest.approx(2.0)}


def test_validation_windows_are_trainer_val_seq_len_whatever_the_training_seq_len():
    """val/* are means over windows that each start from a blank GRU state, so their length changes the number: with
    windows of each run's own seq_len, an Optuna trial (or a grid job) with a longer seq_len scored lower on the same
    model and data by that alone. trainer.val_seq_len fixes the windows; null keeps those of seq_len."""
    model = fitted_gru(random_rows(400))
    val_buffer = ReplayBuffer(512, 3, 2, seed=0)
    val_buffer.extend(**random_rows(512, seed=1))
    got = {seq_len: Trainer(steps=1, prefill=0, batch_size=8, seq_len=seq_len, lr=1e-3, val_seq_len=16).evaluate(
        model, val_buffer)["val/loss"] for seq_len in (4, 16, 32)}  # fmt: skip
    assert got[4] == got[16] == got[32]
    own = {seq_len: Trainer(steps=1, prefill=0, batch_size=8, seq_len=seq_len, lr=1e-3).evaluate(
        model, val_buffer)["val/loss"] for seq_len in (4, 16)}  # fmt: skip
    assert own[16] == got[16] and own[4] != own[16]  # null: the windows of seq_len, as before the key existed
