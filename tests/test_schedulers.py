"""Tests for schedulers.py: each schedule against its formula at every step, resume via state_dict, names."""
from __future__ import annotations

import io
import math

import pytest
import torch

from schedulers import SCHEDULERS, PolyWarmUpScheduler, build_scheduler

BASE_LR, WARMUP, TOTAL = 0.5, 0.25, 20


def poly(p: float) -> float:
    return p / WARMUP if p < WARMUP else max(1 - p, 0.0) ** 0.5


def linear(p: float) -> float:
    return p / WARMUP if p < WARMUP else max((p - 1) / (WARMUP - 1), 0.0)  # the reference's own form


def constant(p: float) -> float:
    return p / WARMUP if p < WARMUP else 1.0


def cosine(p: float) -> float:
    return p / WARMUP if p < WARMUP else 0.5 * (1 + math.cos(math.pi * min((p - WARMUP) / (1 - WARMUP), 1.0)))


FORMULAS = {"poly": poly, "linear": linear, "constant": constant, "cosine": cosine, "none": lambda p: 1.0}


def make_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)


def lrs_used(optimizer: torch.optim.Optimizer, scheduler, updates: int) -> list[float]:
    """The lr each optimizer.step() runs with, stepping the schedule after each update as the training loop does."""
    used = []
    for _ in range(updates):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_matches_formula_at_every_step(name: str) -> None:
    optimizer = make_optimizer()
    scheduler = build_scheduler(name, optimizer, WARMUP, TOTAL)
    used = lrs_used(optimizer, scheduler, TOTAL + 3)  # three steps past the end too
    # The k-th update (k = 1..) uses base_lr * f(k / total), as the reference (progress = (step + 1) / total).
    expected = [BASE_LR * FORMULAS[name](k / TOTAL) for k in range(1, TOTAL + 4)]
    assert used == pytest.approx(expected, abs=1e-12)
    if name in ("poly", "linear", "cosine"):
        assert used[0] > 0.0 and used[TOTAL - 1] == pytest.approx(0.0, abs=1e-12)


def test_poly_degree() -> None:
    optimizer = make_optimizer()
    scheduler = PolyWarmUpScheduler(optimizer, 0.0, 10, degree=2.0)
    assert lrs_used(optimizer, scheduler, 3) == pytest.approx([BASE_LR * (1 - k / 10) ** 2 for k in (1, 2, 3)])


def test_cosine_decays_from_one_after_warmup() -> None:
    """Not the reference's cos(pi + progress) quirk: the factor falls monotonically from 1 to 0 after warm-up."""
    optimizer = make_optimizer()
    used = lrs_used(optimizer, build_scheduler("cosine", optimizer, WARMUP, TOTAL), TOTAL)
    after = used[int(WARMUP * TOTAL) - 1:]
    assert after[0] == pytest.approx(BASE_LR) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(after, after[1:]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_resume_from_state_dict_continues_identically(name: str) -> None:
    optimizer = make_optimizer()
    scheduler = build_scheduler(name, optimizer, WARMUP, TOTAL)
    straight = lrs_used(optimizer, scheduler, TOTAL)

    optimizer = make_optimizer()
    scheduler = build_scheduler(name, optimizer, WARMUP, TOTAL)
    first = lrs_used(optimizer, scheduler, 7)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    # A fresh process: new optimizer (its lr not restored) and a new scheduler, then the scheduler state.
    optimizer = make_optimizer()
    scheduler = build_scheduler(name, optimizer, WARMUP, TOTAL)
    scheduler.load_state_dict(state)
    assert scheduler.last_epoch == 7
    rest = lrs_used(optimizer, scheduler, TOTAL - 7)
    assert first + rest == pytest.approx(straight, abs=1e-12)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        build_scheduler("step", make_optimizer(), WARMUP, TOTAL)
    assert all(name in str(error.value) for name in SCHEDULERS)


def test_bad_warmup_or_total_steps() -> None:
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler("poly", make_optimizer(), 1.5, TOTAL)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler("linear", make_optimizer(), WARMUP, 0)
