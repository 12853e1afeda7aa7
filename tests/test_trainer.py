"""Trainer's log window: each update's loss terms kept on the device as a row, summed and checked at log time."""

from __future__ import annotations

import math

import pytest
import torch

from worldmodel import trainer as trainer_module
from worldmodel.errors import WorldModelError
from worldmodel.trainer import Trainer

TERMS = ("loss", "obs", "reward")


def window_trainer(log_every: int = 100) -> Trainer:
    trainer = Trainer(steps=1000, prefill=0, batch_size=1, seq_len=1, lr=1e-3, log_every=log_every)
    trainer.terms = TERMS  # set by fit from the model
    return trainer


def values(step: int) -> torch.Tensor:
    return torch.tensor([step, 0.5 * step, 1.0 / step])


def accumulate(trainer: Trainer, state: dict, steps: range, bad: dict | None = None) -> None:
    """Updates `steps`, with bad[step] = (term index, value) making one term of that update non-finite."""
    for step in steps:
        v = values(step)
        if bad and step in bad:
            v[bad[step][0]] = bad[step][1]
        trainer._accumulate(state, step, v)


def test_the_window_means_are_those_of_its_updates_across_a_growing_buffer(monkeypatch):
    monkeypatch.setattr(trainer_module, "WINDOW_ROWS", 4)  # 11 updates between logs: the rows double twice
    trainer = window_trainer()
    state = trainer._fresh_loop_state({})
    accumulate(trainer, state, range(1, 12))
    assert len(state["window_values"]) == 16
    means = trainer._flush_window(state, None)
    expected = torch.stack([values(s) for s in range(1, 12)]).mean(0).tolist()
    assert list(means) == [f"train/{t}" for t in TERMS]
    assert list(means.values()) == pytest.approx(expected, rel=1e-6)
    accumulate(trainer, state, range(12, 14))  # the next window starts empty
    assert trainer._flush_window(state, None)["train/loss"] == pytest.approx(12.5)


@pytest.mark.parametrize("log_every", [3, 100])
def test_a_divergence_is_reported_at_its_first_update_and_term(log_every):
    """The first non-finite update of the window and, of its terms, those that were non-finite then; later bad
    updates and terms do not change the report."""
    trainer = window_trainer(log_every)
    state = trainer._fresh_loop_state({})
    accumulate(trainer, state, range(20, 26))
    trainer._flush_window(state, None)  # a finite window: logged and cleared
    bad = {29: (2, math.nan), 30: (1, math.inf), 31: (2, -math.inf)}
    accumulate(trainer, state, range(26, 33), bad)
    with pytest.raises(WorldModelError, match=r"train/reward became non-finite at update 29;"):
        trainer._check_finite(state, None)
    state = trainer._fresh_loop_state({})
    accumulate(trainer, state, range(1, 5), {3: (1, math.nan)})
    state["window_values"][2, 0] = math.inf  # two terms bad at the same, first, update
    with pytest.raises(WorldModelError, match=r"train/loss, train/obs became non-finite at update 3;"):
        trainer._check_finite(state, None)


def test_a_checkpointed_window_resumes_with_the_same_rows():
    """A checkpoint mid-window saves its rows, so the resumed window sums the same rows in the same order (runs
    resume bit-identical: tests/test_resume.py); a checkpoint from before the rows were saved carries their sum."""
    trainer = window_trainer()
    state = trainer._fresh_loop_state({})
    accumulate(trainer, state, range(1, 8))
    state["step"] = 7
    saved = trainer._loop_state_dict(state)
    accumulate(trainer, state, range(8, 11))
    expected = trainer._flush_window(state, None)

    resumed = trainer._restore_loop(saved, {})
    assert resumed["window_start"] == 1 and resumed["window_rows"] == resumed["window_updates"] == 7
    accumulate(trainer, resumed, range(8, 11))
    assert trainer._flush_window(resumed, None) == expected  # to the bit

    old = {"step": 7, "window_updates": 7, "window_sums": saved["window_values"].sum(0),
           "first_nonfinite": torch.full((3,), -1)}  # fmt: skip
    resumed = trainer._restore_loop(old, {})
    accumulate(trainer, resumed, range(8, 11), {9: (0, math.nan)})
    with pytest.raises(WorldModelError, match="train/loss became non-finite at update 9;"):
        trainer._check_finite(resumed, None)
    resumed = trainer._restore_loop(old, {})
    accumulate(trainer, resumed, range(8, 11))
    got = trainer._flush_window(resumed, None)
    assert list(got.values()) == pytest.approx(list(expected.values()), rel=1e-6)
