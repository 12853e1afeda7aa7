"""The open-loop evaluator gives exactly the right numbers on a hand-made case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodel import ReplayBuffer
from worldmodel.evaluation import TrajectoryPlot, episode_window_starts, longest_episode, open_loop, trajectory
from worldmodel.models.base import WorldModel


class Drift(WorldModel):
    """Imagines obs_last + k * step at horizon k, reward 0.5, termination probability 0.9 from horizon 3 on."""

    loss_terms = ()

    def __init__(self, step):
        super().__init__(obs_dim=2, action_dim=1)
        self.step = torch.as_tensor(step, dtype=torch.float32)

    def loss(self, batch):
        raise NotImplementedError

    def imagine(self, context_obs, actions, first=None):
        horizon = actions.shape[1] - context_obs.shape[1] + 1
        k = torch.arange(1, horizon + 1, dtype=context_obs.dtype).view(1, -1, 1)
        obs = context_obs[:, -1:] + k * self.step.to(context_obs.dtype)
        b = context_obs.shape[0]
        term = (k.view(1, -1).expand(b, -1) >= 3).to(obs.dtype) * 0.9
        return {"obs": obs, "reward": torch.full((b, horizon), 0.5), "terminated_prob": term}


def hand_made_buffer() -> ReplayBuffer:
    """Two episodes: obs_t = (t, 2t) for 6 steps (terminated at the end), then (t^2, 0) for 4 steps (truncated)."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(6):
        buffer.add([t, 2 * t], [0.0], 1.0, [t + 1, 2 * (t + 1)], t == 5, False)
    for t in range(4):
        buffer.add([t * t, 0], [0.0], 0.0, [(t + 1) ** 2, 0], False, t == 3)
    return buffer


def test_window_starts_stay_inside_episodes():
    buffer = hand_made_buffer()
    assert episode_window_starts(buffer, 3).tolist() == [0, 1, 2, 3, 6, 7]
    assert episode_window_starts(buffer, 6).tolist() == [0]
    assert episode_window_starts(buffer, 7).tolist() == []
    assert longest_episode(buffer) == 6  # what the trainer's warning names when no evaluation window fits
    assert longest_episode(ReplayBuffer(10, obs_dim=2, action_dim=1)) == 0


def test_window_starts_never_cross_from_one_stream_into_the_next():
    """Two streams, each with an episode still open at its newest row: stream 0 holds logical rows 0..4 and stream 1
    rows 5..8, so a window may end at row 4 but not run on into row 5."""
    buffer = ReplayBuffer(20, obs_dim=2, action_dim=1, streams=2)
    for k, n in ((1, 4), (0, 5)):
        for t in range(n):
            buffer.add([t, k], [0.0], 0.0, [t + 1, k], False, False, stream=k)
    assert episode_window_starts(buffer, 3).tolist() == [0, 1, 2, 5, 6]
    assert episode_window_starts(buffer, 5).tolist() == [0]
    assert longest_episode(buffer) == 5  # not 9: the open episodes of two streams are two stretches


def test_open_loop_numbers_by_hand():
    buffer = hand_made_buffer()
    res = open_loop(Drift(step=1.0), buffer, context=2, horizon=2)  # windows of 3 rows: starts 0,1,2,3,6,7
    # Targets (next_obs of rows s+1, s+2) and predictions (obs of row s+1, plus k):
    #   first episode, s=0..3: targets (s+2, 2s+4), (s+3, 2s+6); preds (s+2, 2s+3), (s+3, 2s+4)
    #   second episode, s=6 (t=0): targets (4,0),(9,0); preds (2,1),(3,1)   s=7 (t=1): targets (9,0),(16,0); preds (5,1),(6,1)
    targets = [np.array([[s + 2, 2 * s + 4], [s + 3, 2 * s + 6]], float) for s in range(4)]
    targets += [np.array([[4, 0], [9, 0]], float), np.array([[9, 0], [16, 0]], float)]
    lasts = [np.array([s + 1, 2 * s + 2], float) for s in range(4)] + [np.array([1, 0.0]), np.array([4, 0.0])]
    preds = [last + np.array([[1.0], [2.0]]) for last in lasts]
    targets, preds, lasts = np.stack(targets), np.stack(preds), np.stack(lasts)
    var = targets.reshape(-1, 2).var(0)
    expected = (((preds - targets) ** 2).mean(0) / var).mean(-1)
    expected_copy = (((lasts[:, None] - targets) ** 2).mean(0) / var).mean(-1)
    np.testing.assert_allclose(res.nmse, expected, rtol=1e-12)
    np.testing.assert_allclose(res.copy_last_nmse, expected_copy, rtol=1e-12)
    rewards = np.array([[1, 1]] * 4 + [[0, 0]] * 2, float)
    np.testing.assert_allclose(res.reward_mse, ((0.5 - rewards) ** 2).mean(0), rtol=1e-12)
    # Window s=3 ends on row 5, the terminal step (a window's last row may end its episode): Drift says "no" there
    # (probability 0 before horizon 3): the one termination is missed, and none of the 11 other steps is an alarm.
    assert res.windows == 6 and res.terminations == 1
    assert res.terminated_recall == 0.0 and res.terminated_false_alarms == 0.0
    # Horizon 3 (windows of 4 rows: starts 0, 1, 2, 6): Drift says "yes" at horizon 3 in every window, which catches
    # the termination of window 2 and is a false alarm in the other three, of 11 steps that do not end an episode.
    res = open_loop(Drift(step=1.0), buffer, context=2, horizon=3)
    assert res.windows == 4 and res.terminations == 1
    assert res.terminated_recall == 1.0 and res.terminated_false_alarms == pytest.approx(3 / 11)
    assert res.scalars()["eval/terminated_recall"] == 1.0 and res.as_dict()["terminated_false_alarms"] == 3 / 11


def test_false_alarms_are_left_out_where_every_scored_step_ends_an_episode():
    """Episodes of exactly C + H - 1 = 5 steps scored at horizon 1: every scored step is a termination."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for _ in range(3):
        for t in range(5):
            buffer.add([t, 0], [0.0], 0.0, [t + 1, 0], t == 4, False)
    res = open_loop(Drift(step=1.0), buffer, context=5, horizon=1)
    assert res.windows == 3 and res.terminations == 3 and res.terminated_recall == 0.0
    assert res.terminated_false_alarms is None and "eval/terminated_false_alarms" not in res.scalars()


def test_termination_recall_is_left_out_where_no_episode_ends_in_a_window():
    """Pendulum only truncates: there is no termination to catch, and a recall of 0 or 1 would be made up."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(12):
        buffer.add([t, 0], [0.0], 0.0, [t + 1, 0], False, t == 11)
    res = open_loop(Drift(step=1.0), buffer, context=2, horizon=3)
    assert res.terminations == 0 and res.terminated_recall is None and res.terminated_false_alarms == 1 / 3
    assert "eval/terminated_recall" not in res.scalars() and res.as_dict()["terminated_recall"] is None


def test_perfect_model_scores_zero_and_reports_requested_horizons():
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(40):
        buffer.add([t, -t], [0.0], 0.0, [t + 1, -(t + 1)], False, t == 39)
    res = open_loop(Drift(step=[1.0, -1.0]), buffer, context=3, horizon=15)  # obs move by exactly (+1, -1): perfect
    assert res.nmse.max() == pytest.approx(0.0, abs=1e-20) and res.copy_last_nmse[0] > 0
    assert res.copy_last_nmse[14] == pytest.approx(res.copy_last_nmse[0] * 225)  # error grows as k^2
    d = res.as_dict()
    assert set(d["nmse"]) == {"1", "5", "10", "15"} and set(d["copy_last_nmse"]) == {"1", "5", "10", "15"}
    assert "eval/nmse_h15" in res.scalars() and "eval/copy_last_nmse_h5" in res.scalars()


def test_no_window_long_enough_gives_none():
    buffer = hand_made_buffer()
    assert open_loop(Drift(1.0), buffer, context=5, horizon=5) is None
    assert trajectory(Drift(1.0), buffer, context=5, horizon=5) is None


def test_trajectory_figure_shows_the_middle_window_and_redraws_without_memory():
    # Windows of 3 transitions inside one episode start at logical rows 0, 1, 2, 3, 6, 7; the middle one is row 3.
    true, imagined = trajectory(Drift(1.0), hand_made_buffer(), context=2, horizon=2)
    np.testing.assert_array_equal(true, [[3, 6], [4, 8], [5, 10], [6, 12]])
    np.testing.assert_array_equal(imagined, [[5, 9], [6, 10]])  # (4, 8) + k * (1, 1)
    plot = TrajectoryPlot(obs_dim=2, context=2, horizon=2)
    first = plot.image(true, imagined)
    assert first.dtype == np.uint8 and first.shape == (260, 640, 3) and len(plot.axes) == 2
    other = plot.image(true * 100, imagined * -3)
    assert not np.array_equal(first, other)
    # The figure is reused across validation passes: the same trajectories must draw the same image again, whatever
    # was drawn in between (axis limits follow the data, nothing is left over).
    np.testing.assert_array_equal(plot.image(true, imagined), first)


class Recorder(Drift):
    """Drift that also records the first context observation of every window it is shown."""

    def __init__(self):
        super().__init__(step=0.0)
        self.seen: list[float] = []

    def imagine(self, context_obs, actions, first=None):
        self.seen += context_obs[:, 0, 0].tolist()
        return super().imagine(context_obs, actions, first)


def test_capped_windows_are_spread_over_the_whole_buffer():
    """With more valid windows than max_windows, the scored ones span every episode and stream, not just the oldest."""
    # Two streams of three 20-step episodes each; obs[0] is the row's logical index, obs[1] its stream.
    buffer = ReplayBuffer(120, obs_dim=2, action_dim=1, streams=2)
    for k in range(2):
        for t in range(60):
            row = 60 * k + t
            buffer.add([row, k], [0.0], 0.0, [row + 0.5, k], t % 20 == 19, False, stream=k)
    starts = episode_window_starts(buffer, 2 + 3 - 1)
    assert len(starts) == 6 * 17
    model = Recorder()
    res = open_loop(model, buffer, context=2, horizon=3, max_windows=6, batch_size=4)
    chosen = np.array(sorted(model.seen), dtype=np.int64)
    assert res.windows == 6 and len(set(chosen.tolist())) == 6
    at = np.searchsorted(starts, chosen)
    np.testing.assert_array_equal(starts[at], chosen)  # every scored window is a valid one
    assert chosen[0] == starts[0] and chosen[-1] == starts[-1]  # from the oldest to the newest episode
    assert (chosen >= 60).sum() == 3  # half of them from stream 1
    gap = (len(starts) - 1) / 5
    assert set(np.diff(at).tolist()) <= {int(np.floor(gap)), int(np.ceil(gap))}  # evenly spaced among valid starts
    again = Recorder()
    open_loop(again, buffer, context=2, horizon=3, max_windows=6)
    assert sorted(again.seen) == sorted(model.seen)  # deterministic


@pytest.mark.parametrize(
    "horizon, reported", [(1, [1]), (3, [1, 3]), (7, [1, 5, 7]), (10, [1, 5, 10]), (12, [1, 5, 10, 12])]
)
def test_reported_horizons_always_include_the_last(horizon, reported):
    """eval/*_hH and metrics.json report 1, 5, 10, ... and the requested horizon H itself, whatever H is."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(30):
        buffer.add([t, -t], [0.0], 0.0, [t + 1, -(t + 1)], False, t == 29)
    res = open_loop(Drift(step=[0.5, -0.5]), buffer, context=2, horizon=horizon)
    assert res.horizon == horizon and res.report_horizons() == reported
    d = res.as_dict()
    for key in ("nmse", "copy_last_nmse", "reward_mse"):
        assert list(d[key]) == [str(h) for h in reported]
        assert d[key][str(horizon)] == pytest.approx(float(getattr(res, key)[horizon - 1]))
    scalars = res.scalars()
    expected = {f"eval/{key}_h{h}" for key in ("nmse", "copy_last_nmse", "reward_mse") for h in reported}
    assert set(scalars) == expected | {"eval/terminated_false_alarms"}  # no episode ends: no recall
    assert scalars[f"eval/nmse_h{horizon}"] == pytest.approx(float(res.nmse[-1]))
    assert res.nmse[-1] > 0 and (horizon == 1 or res.nmse[-1] > res.nmse[0])  # the value of horizon H, not of 1


@pytest.mark.parametrize("value", [5.0, 123.456], ids=["exact", "rounded"])
def test_a_dimension_that_never_varies_is_left_out_of_nmse(value):
    """obs = (t, value): the second dimension is constant, its variance 0 up to rounding. A model off by 1e-6 there
    would otherwise score an nmse in the millions; the score is the first dimension's, as in a buffer without it.
    5.0's square is exact, but 123.456's is not: E[x^2] - E[x]^2 leaves a small positive variance, so the dimension
    only counts as constant relative to its mean's magnitude, not by an absolute floor."""
    both, first = ReplayBuffer(100, obs_dim=2, action_dim=1), ReplayBuffer(100, obs_dim=1, action_dim=1)
    for t in range(40):
        both.add([t, value], [0.0], 0.0, [t + 1, value], False, t == 39)
        first.add([t], [0.0], 0.0, [t + 1], False, t == 39)
    res = open_loop(Drift(step=[0.5, 1e-6]), both, context=3, horizon=4)
    expected = open_loop(Drift(step=[0.5]), first, context=3, horizon=4)
    assert 0 < res.nmse[0] < 1
    np.testing.assert_allclose(res.nmse, expected.nmse, rtol=1e-12)
    np.testing.assert_allclose(res.copy_last_nmse, expected.copy_last_nmse, rtol=1e-12)


def test_a_window_as_long_as_the_whole_buffer_is_scored():
    """One episode of exactly C + H - 1 transitions fills the buffer: its one window counts (a short validation
    buffer would otherwise score nothing, and open_loop would return None)."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(4):
        buffer.add([t, 2 * t], [0.0], 0.0, [t + 1, 2 * (t + 1)], False, t == 3)
    assert episode_window_starts(buffer, 4).tolist() == [0]
    assert open_loop(Drift(1.0), buffer, context=2, horizon=3).windows == 1
    assert trajectory(Drift(1.0), buffer, context=2, horizon=3) is not None


@pytest.mark.parametrize("training", [True, False])
def test_evaluation_leaves_the_model_in_the_mode_it_found(training):
    """open_loop and trajectory score in eval mode (no dropout), then hand the model back as it was: the trainer
    validates mid-run, and a model left in eval mode would train on without its dropout."""
    model = Drift(1.0).train(training)
    open_loop(model, hand_made_buffer(), context=2, horizon=2)
    assert model.training == training
    trajectory(model, hand_made_buffer(), context=2, horizon=2)
    assert model.training == training


def test_copy_last_and_reward_scalars_are_their_own_numbers():
    """eval/copy_last_nmse_hH and eval/reward_mse_hH log the baseline's and the reward's values, not the model's nmse
    (here they all differ)."""
    res = open_loop(Drift(step=1.0), hand_made_buffer(), context=2, horizon=2)
    scalars, d = res.scalars(), res.as_dict()
    assert len({res.nmse[1], res.copy_last_nmse[1], res.reward_mse[1]}) == 3
    for h in (1, 2):
        assert scalars[f"eval/nmse_h{h}"] == d["nmse"][str(h)] == float(res.nmse[h - 1])
        assert scalars[f"eval/copy_last_nmse_h{h}"] == d["copy_last_nmse"][str(h)] == float(res.copy_last_nmse[h - 1])
        assert scalars[f"eval/reward_mse_h{h}"] == d["reward_mse"][str(h)] == float(res.reward_mse[h - 1])


def test_where_no_dimension_varies_every_dimension_is_scored():
    """A buffer whose observations never change: no dimension varies, so nmse falls back to all of them (a perfect
    model scores 0, one off by a little a large but finite number) rather than a mean over no dimension (NaN)."""
    buffer = ReplayBuffer(100, obs_dim=2, action_dim=1)
    for t in range(20):
        buffer.add([3.0, -1.0], [0.0], 0.0, [3.0, -1.0], False, t == 19)
    perfect = open_loop(Drift(step=0.0), buffer, context=2, horizon=3)
    assert perfect.nmse.tolist() == [0.0, 0.0, 0.0] and perfect.copy_last_nmse.tolist() == [0.0, 0.0, 0.0]
    off = open_loop(Drift(step=1e-3), buffer, context=2, horizon=3)
    assert np.isfinite(off.nmse).all() and (off.nmse > 0).all()


def test_a_new_true_trajectory_redraws_the_kept_background():
    """The true trajectory is drawn once and kept as a bitmap; another true trajectory (another validation buffer,
    the figure reused) must replace it, even when the imagined one is the same."""
    true, imagined = trajectory(Drift(1.0), hand_made_buffer(), context=2, horizon=2)
    plot = TrajectoryPlot(obs_dim=2, context=2, horizon=2)
    first = plot.image(true, imagined)
    assert not np.array_equal(plot.image(true[::-1].copy(), imagined), first)
    np.testing.assert_array_equal(plot.image(true, imagined), first)


def test_imagined_steps_are_drawn_after_the_context():
    """The imagined line covers steps C .. C+H-1 of the true one (right of the context marker), not 0 .. H-1."""
    true, imagined = trajectory(Drift(1.0), hand_made_buffer(), context=2, horizon=2)
    plot = TrajectoryPlot(obs_dim=2, context=2, horizon=2)
    plot.image(true, imagined)
    for d, line in enumerate(plot.imagined_lines):
        np.testing.assert_array_equal(line.get_xdata(), [2, 3])
        np.testing.assert_array_equal(line.get_ydata(), imagined[:, d])
    np.testing.assert_array_equal(plot.true_lines[0].get_xdata(), [0, 1, 2, 3])


def test_a_constant_dimension_whose_variance_rounds_below_zero_is_still_left_out():
    """As above, but 42 rows of 123.456 make E[x^2] - E[x]^2 come out slightly negative (-1.8e-12): clamped to 0, the
    dimension counts as constant. Unclamped, its sqrt is NaN, which no test calls constant, and the 1e-6 error there
    would be scored against a variance of 1e-12."""
    both, first = ReplayBuffer(100, obs_dim=2, action_dim=1), ReplayBuffer(100, obs_dim=1, action_dim=1)
    for t in range(42):
        both.add([t, 123.456], [0.0], 0.0, [t + 1, 123.456], False, t == 41)
        first.add([t], [0.0], 0.0, [t + 1], False, t == 41)
    res = open_loop(Drift(step=[0.5, 1e-6]), both, context=3, horizon=4)
    expected = open_loop(Drift(step=[0.5]), first, context=3, horizon=4)
    np.testing.assert_allclose(res.nmse, expected.nmse, rtol=1e-12)
