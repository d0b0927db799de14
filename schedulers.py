"""Learning-rate schedules (poly, linear, constant, cosine warm-up) as pure functions of the step behind LambdaLR."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

# Every schedule below is a function of `progress`, the fraction of total_steps reached, and returns the factor the
# base learning rate is multiplied by. `warmup` is a fraction of total_steps too, as in the reference
# (--warmup_proportion): during warm-up the factor rises linearly as progress / warmup.
#
# Timing, as the reference's: its scheduler is stepped *before* each optimizer step with
# progress = (steps_done + 1) / total_steps, so the k-th update (k = 1, 2, ...) uses factor f(k / total_steps).
# LambdaLR calls the schedule with last_epoch = optimizer steps done so far (0 right after construction) and the
# training loop calls scheduler.step() *after* optimizer.step(), so each scheduler maps last_epoch e to
# f((e + 1) / total_steps): the lr it writes is the one for the *next* update. The first update therefore uses
# f(1 / total_steps), never a zero learning rate.


def warmup_poly(progress: float, warmup: float, degree: float = 0.5) -> float:
    """Linear warm-up, then polynomial decay `(1 - progress) ** degree` to 0 at the end (reference degree 0.5).

    Past the end the factor stays 0 (the reference would take a fractional power of a negative number).
    """
    if progress < warmup:
        return progress / warmup
    return max(1.0 - progress, 0.0) ** degree


def warmup_linear(progress: float, warmup: float) -> float:
    """Linear warm-up, then linear decay from 1 at the end of warm-up to 0 at the end (reference `warmup_linear`).

    The reference writes the decay as `max((progress - 1) / (warmup - 1), 0)`; `(1 - progress) / (1 - warmup)` is
    the same line, and warmup == 1 (all warm-up) gives 0 at the end instead of dividing by zero.
    """
    if progress < warmup:
        return progress / warmup
    if warmup >= 1.0:
        return 0.0
    return max((1.0 - progress) / (1.0 - warmup), 0.0)


def warmup_constant(progress: float, warmup: float) -> float:
    """Linear warm-up, then the base learning rate unchanged."""
    if progress < warmup:
        return progress / warmup
    return 1.0


def warmup_cosine(progress: float, warmup: float) -> float:
    """Linear warm-up, then half-cosine decay from 1 at the end of warm-up to 0 at the end.

    Deliberately NOT the reference's `CosineWarmUpScheduler`, which computes `0.5 * (1 + cos(pi + progress))`
    = `0.5 * (1 - cos(progress))`: a factor near 0 just after warm-up that *rises* to 0.23 at the end, which is
    no decay at all. Here `0.5 * (1 + cos(pi * (progress - warmup) / (1 - warmup)))`, clamped to 0 past the end.
    """
    if progress < warmup:
        return progress / warmup
    if warmup >= 1.0 or progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def _check(warmup: float, total_steps: int) -> None:
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup is a fraction of total_steps and must be in [0, 1], got {warmup}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")


_SETTINGS = frozenset({"lr_lambdas", "_schedule", "total_steps", "warmup", "degree"})


class _WarmUpScheduler(LambdaLR):
    """LambdaLR over `schedule(progress, warmup)` with progress = (optimizer steps done + 1) / total_steps.

    The whole state is the step (`last_epoch`), so `state_dict()` / `load_state_dict()` resume exactly;
    `load_state_dict` also re-applies the loaded step's lr to the optimizer, so the order of loading the
    optimizer and the scheduler does not matter.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[float], float], total_steps: int,
                 last_epoch: int = -1) -> None:
        self.total_steps = total_steps
        self._schedule = schedule
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, steps_done: int) -> float:
        """Factor for the next update, number steps_done + 1."""
        return self._schedule((steps_done + 1) / self.total_steps)

    def state_dict(self) -> dict:
        """The step and LambdaLR's bookkeeping, plain values only: loads with `torch.load(weights_only=True)`.

        The schedule's settings (warmup, total_steps, degree) are constructor arguments, not state, so a resumed
        run takes them from its own flags.
        """
        return {k: v for k, v in super().state_dict().items() if k not in _SETTINGS}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step and write the lr for the next update into the optimizer."""
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        lrs = [base_lr * self._factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def fast_forward(self, steps_done: int) -> None:
        """Jump to ``steps_done`` optimizer steps, for a checkpoint that stores only its step (the reference's)."""
        self.load_state_dict({**self.state_dict(), "last_epoch": steps_done})


class PolyWarmUpScheduler(_WarmUpScheduler):
    """Reference pre-training schedule: linear warm-up over `warmup` of the run, then `(1 - progress) ** degree`.

    Returns (writes) the lr for the next update: the k-th update uses `base_lr * warmup_poly(k / total_steps)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int, degree: float = 0.5,
                 last_epoch: int = -1) -> None:
        _check(warmup, total_steps)
        self.warmup, self.degree = warmup, degree
        super().__init__(optimizer, lambda p: warmup_poly(p, warmup, degree), total_steps, last_epoch)


class LinearWarmUpScheduler(_WarmUpScheduler):
    """Reference fine-tuning schedule: linear warm-up, then linear decay to 0 at total_steps.

    Returns (writes) the lr for the next update: the k-th update uses `base_lr * warmup_linear(k / total_steps)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int,
                 last_epoch: int = -1) -> None:
        _check(warmup, total_steps)
        self.warmup = warmup
        super().__init__(optimizer, lambda p: warmup_linear(p, warmup), total_steps, last_epoch)


class ConstantWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then constant. Kept for reference parity (the entry scripts use poly and linear).

    Returns (writes) the lr for the next update: the k-th update uses `base_lr * warmup_constant(k / total_steps)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int,
                 last_epoch: int = -1) -> None:
        _check(warmup, total_steps)
        self.warmup = warmup
        super().__init__(optimizer, lambda p: warmup_constant(p, warmup), total_steps, last_epoch)


class CosineWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then half-cosine decay to 0 (corrected; see `warmup_cosine` for the reference's quirk).
    Kept for reference parity (the entry scripts use poly and linear).

    Returns (writes) the lr for the next update: the k-th update uses `base_lr * warmup_cosine(k / total_steps)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int,
                 last_epoch: int = -1) -> None:
        _check(warmup, total_steps)
        self.warmup = warmup
        super().__init__(optimizer, lambda p: warmup_cosine(p, warmup), total_steps, last_epoch)


class ConstantLR(_WarmUpScheduler):
    """The base learning rate at every step; `total_steps` only sizes the progress. Kept for reference parity
    (its `ConstantLR`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int = 1, last_epoch: int = -1) -> None:
        _check(0.0, total_steps)
        super().__init__(optimizer, lambda p: 1.0, total_steps, last_epoch)


SCHEDULERS = ("poly", "linear", "constant", "cosine", "none")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int) -> LambdaLR:
    """Make the schedule called `name` (one of SCHEDULERS); `warmup` is a fraction of `total_steps`.

    `none` keeps the base learning rate (ConstantLR, warmup ignored). Raises ValueError for an unknown name.
    """
    if name == "poly":
        return PolyWarmUpScheduler(optimizer, warmup, total_steps)
    if name == "linear":
        return LinearWarmUpScheduler(optimizer, warmup, total_steps)
    if name == "constant":
        return ConstantWarmUpScheduler(optimizer, warmup, total_steps)
    if name == "cosine":
        return CosineWarmUpScheduler(optimizer, warmup, total_steps)
    if name == "none":
        return ConstantLR(optimizer, total_steps)
    raise ValueError(f"unknown lr schedule {name!r}; valid names: {', '.join(SCHEDULERS)}")
