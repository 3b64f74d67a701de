"""The learning-rate schedule and early stopping, from lists of validation BLEU alone: no model."""

from __future__ import annotations

import pytest

from seq2seq.config import Config, ConfigError, TrainConfig
from seq2seq.training.schedule import Schedule, ScheduleState


def replay(schedule: Schedule, scores: list[float]) -> tuple[ScheduleState, list[bool], list[float]]:
    """Feed ``scores`` as the validations of steps 10, 20, ...; (state, improved, lr scales)."""
    state, improved, scales = ScheduleState(), [], []
    for n, bleu in enumerate(scores, start=1):
        improved.append(schedule.record(state, bleu, step=10 * n))
        scales.append(state.lr_scale)
    return state, improved, scales


def test_warmup_rises_linearly_to_lr_then_holds():
    state = ScheduleState()
    warm = Schedule(lr=0.01, warmup_steps=4)
    assert [warm.learning_rate(step, state) for step in range(6)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert Schedule(lr=0.01).learning_rate(0, state) == 0.01  # no warmup: full rate at once
    state.lr_scale = 0.5
    assert warm.learning_rate(1, state) == pytest.approx(0.0025)  # a drop scales the warmup too


def test_plateau_drops_the_rate_after_patience_validations_without_a_better_bleu():
    schedule = Schedule(lr=1.0, plateau_patience=2, plateau_factor=0.5, min_lr=0.0, patience=0)
    state, improved, scales = replay(schedule, [10, 12, 11, 12, 11, 11, 13, 12])
    assert improved == [True, True, False, False, False, False, True, False]
    # equal BLEU is no improvement; the count restarts after each drop and each improvement
    assert scales == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert (state.best_bleu, state.best_step, state.bad_validations) == (13, 70, 1)
    assert schedule.learning_rate(1000, state) == 0.25


def test_min_lr_bounds_the_drops():
    schedule = Schedule(lr=1.0, plateau_patience=1, plateau_factor=0.1, min_lr=0.05, patience=0)
    _, _, scales = replay(schedule, [5, 4, 3, 2, 1])
    assert scales == pytest.approx([1, 0.1, 0.05, 0.05, 0.05])
    assert Schedule(lr=1.0, plateau_factor=1.0).plateau_factor == 1.0
    _, _, unchanged = replay(Schedule(lr=1.0, plateau_patience=1, plateau_factor=1.0), [5, 4, 3])
    assert unchanged == [1, 1, 1]  # a factor of 1 turns the drops off


def test_patience_stops_after_that_many_validations_without_a_better_bleu():
    schedule = Schedule(lr=1.0, plateau_factor=1.0, patience=3)
    state, _, _ = replay(schedule, [1, 2, 2, 1])
    assert state.stop_reason == "" and not schedule.patience_spent(state)
    schedule.record(state, 2, step=50)
    assert schedule.patience_spent(state)
    assert state.stop_reason == "early stopping: no better validation BLEU in 3 validations"
    never, _, _ = replay(Schedule(lr=1.0, patience=0), [3, 2, 1, 0, 0, 0, 0])
    assert never.stop_reason == "" and not Schedule(lr=1.0, patience=0).patience_spent(never)


def test_an_improvement_resets_the_patience():
    schedule = Schedule(lr=1.0, plateau_factor=1.0, patience=2)
    state, _, _ = replay(schedule, [1, 0, 2, 0])
    assert state.bad_validations == 1 and state.stop_reason == ""


def test_the_schedule_reads_the_train_section():
    t = TrainConfig(lr=0.002, warmup_steps=7, plateau_patience=3, plateau_factor=0.7, min_lr=1e-4,
                    patience=9)
    assert Schedule.from_config(t) == Schedule(0.002, 7, 3, 0.7, 1e-4, 9)


def test_inverse_sqrt_rises_over_warmup_then_decays_as_one_over_root_step():
    schedule = Schedule(lr=1e-3, warmup_steps=100, kind="inverse_sqrt")
    state = ScheduleState()
    assert schedule.learning_rate(0, state) == pytest.approx(1e-5)
    assert schedule.learning_rate(49, state) == pytest.approx(5e-4)
    assert schedule.learning_rate(99, state) == pytest.approx(1e-3)  # the peak, at the warm-up's end
    assert schedule.learning_rate(399, state) == pytest.approx(5e-4)  # sqrt(100 / 400)
    assert schedule.learning_rate(9999, state) == pytest.approx(1e-4)


def test_inverse_sqrt_ignores_plateaus_but_still_stops_early():
    schedule = Schedule(lr=1e-3, warmup_steps=10, plateau_patience=1, plateau_factor=0.5,
                        patience=3, kind="inverse_sqrt")
    state, improved, scales = replay(schedule, [10.0, 9.0, 9.0, 9.0])
    assert scales == [1.0] * 4  # no drop on stalls: the step alone sets the rate
    assert state.stop_reason.startswith("early stopping")
    assert schedule.learning_rate(39, state) == pytest.approx(1e-3 * 0.5)


@pytest.mark.parametrize("settings, key", [(["train.schedule=cosine"], "train.schedule"),
                                           (["train.schedule=inverse_sqrt"], "train.warmup_steps")])
def test_schedule_settings_are_checked(settings, key):
    with pytest.raises(ConfigError, match=key):
        Config().override(settings)
