"""The optimizer, the learning-rate schedule and early stopping.

The learning rate rises linearly over ``train.warmup_steps`` updates to ``train.lr``. Then,
with ``train.schedule: plateau``, after ``train.plateau_patience`` validations in a row without
a better BLEU it is multiplied by ``train.plateau_factor``, never below ``train.min_lr``; with
``inverse_sqrt`` (the Transformer's, Vaswani et al.) it decays as ``lr * sqrt(warmup / step)``,
whatever validation says. After ``train.patience`` validations without a better BLEU training
stops. These decisions depend on the step and the validation scores alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from seq2seq.config import TrainConfig


def make_adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one call updates every parameter) where this torch has it
    for the device (CPU since torch 2.4), else the multi-tensor one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


@dataclass
class ScheduleState:
    """The schedule's part of a run's state, saved with the rest in every checkpoint."""

    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0  # since the best, for early stopping
    plateau_count: int = 0  # since the last improvement or lr drop
    lr_scale: float = 1.0  # from reduce-on-plateau
    stop_reason: str = ""  # why the run stopped (early stopping, or a budget: see train.py)


@dataclass(frozen=True)
class Schedule:
    """The settings of the schedule (``train.*``); the state it moves is a ``ScheduleState``."""

    lr: float
    warmup_steps: int = 0
    plateau_patience: int = 1
    plateau_factor: float = 0.5
    min_lr: float = 0.0
    patience: int = 0  # 0: no early stopping
    kind: str = "plateau"  # plateau | inverse_sqrt

    @classmethod
    def from_config(cls, t: TrainConfig) -> Schedule:
        return cls(t.lr, t.warmup_steps, t.plateau_patience, t.plateau_factor, t.min_lr, t.patience,
                   t.schedule)

    def learning_rate(self, step: int, state: ScheduleState) -> float:
        """The learning rate of update ``step`` (0-based)."""
        if self.kind == "inverse_sqrt":
            updates = step + 1
            return self.lr * min(updates / self.warmup_steps, (self.warmup_steps / updates) ** 0.5)
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.lr * warmup * state.lr_scale

    def record(self, state: ScheduleState, bleu: float, step: int) -> bool:
        """Take the validation BLEU at ``step``; True when it is the best so far."""
        if bleu > state.best_bleu:
            state.best_bleu, state.best_step = bleu, step
            state.bad_validations = state.plateau_count = 0
            return True
        state.bad_validations += 1
        state.plateau_count += 1
        if (self.kind == "plateau" and state.plateau_count >= self.plateau_patience
                and self.plateau_factor < 1.0):
            state.lr_scale = max(state.lr_scale * self.plateau_factor, self.min_lr / self.lr)
            state.plateau_count = 0
        if self.patience_spent(state):
            state.stop_reason = (f"early stopping: no better validation BLEU in {self.patience} "
                                 f"validations")
        return False

    def patience_spent(self, state: ScheduleState) -> bool:
        return bool(self.patience) and state.bad_validations >= self.patience
