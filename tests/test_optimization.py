"""Tests for optimization.py: LAMB against its formulas, foreach vs for-loop, resume, GradScaler, groups, builders."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from optimization import FINETUNING_NO_DECAY, OPTIMIZERS, BertAdam, Lamb, build_optimizer, param_groups

SHAPES = [(5, 3), (7,), (4, 6), (6,)]  # two matrices (decayed group) and two vectors (no-decay group)


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def make_grads(steps: int, scale: float = 3.0, seed: int = 1) -> list[list[torch.Tensor]]:
    """Per-step gradients; scale 3 puts the global norm near 20, far above max_grad_norm=1, so clipping is on."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in SHAPES] for _ in range(steps)]


def groups_of(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    return [{"params": [params[0], params[2]], "weight_decay": weight_decay},
            {"params": [params[1], params[3]], "weight_decay": 0.0}]


def reference_lamb(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], decays: list[float], *, lr: float,
                   betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0, use_nvlamb=False, adam_w_mode=True,
                   bias_correction=True, grad_averaging=True) -> list[torch.Tensor]:
    """NVLAMB written out from the reference's per-step formulas, one tensor at a time, in float64."""
    b1, b2 = betas
    b3 = 1 - b1 if grad_averaging else 1.0
    w = [x.double().clone() for x in weights]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, start=1):
        g_all = [g.double() for g in step_grads]
        gnorm = math.sqrt(sum(float((g * g).sum()) for g in g_all))
        clip = gnorm / max_grad_norm if gnorm > max_grad_norm else 1.0
        for i, (g, wd) in enumerate(zip(g_all, decays)):
            g = g / clip
            if not adam_w_mode:
                g = g + wd * w[i]
            m[i] = b1 * m[i] + b3 * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
            u = (m[i] / c1) / ((v[i] / c2).sqrt() + eps)
            if adam_w_mode and wd != 0:
                u = u + wd * w[i]
            ratio = 1.0
            if use_nvlamb or wd != 0:
                wn, un = float(w[i].norm()), float(u.norm())
                ratio = wn / un if wn > 0 and un > 0 else 1.0
            w[i] = w[i] - lr * ratio * u
    return w


def run_lamb(params: list[nn.Parameter], grads: list[list[torch.Tensor]], optimizer: torch.optim.Optimizer) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for-loop"])
@pytest.mark.parametrize("options", [
    {},
    {"use_nvlamb": True},
    {"adam_w_mode": False},
    {"bias_correction": False, "grad_averaging": False, "use_nvlamb": True},
], ids=["default", "nvlamb", "l2", "no-correction"])
def test_lamb_matches_reference_formulas(foreach: bool, options: dict) -> None:
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads = make_grads(20)
    optimizer = Lamb(groups_of(params, 0.01), lr=0.02, foreach=foreach, **options)
    run_lamb(params, grads, optimizer)
    expected = reference_lamb(start, grads, [0.01, 0.0, 0.01, 0.0], lr=0.02, **options)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=0)
    last_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[-1]))
    assert last_norm > 1.0  # the global-norm clip was active, so the formula's clipping branch was checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamb_foreach_equals_for_loop(dtype: torch.dtype) -> None:
    results = []
    for foreach in (True, False):
        params = make_params(dtype=dtype)
        optimizer = Lamb(groups_of(params, 0.01), lr=0.02, foreach=foreach)
        run_lamb(params, make_grads(10), optimizer)
        results.append((params, optimizer))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
        state_a, state_b = oa.state[a], ob.state[b]
        assert state_a["exp_avg"].dtype == torch.float32  # fp32 moments for any parameter dtype
        torch.testing.assert_close(state_a["exp_avg_sq"], state_b["exp_avg_sq"], atol=1e-9, rtol=1e-6)
        assert state_a["step"].item() == state_b["step"].item() == 10


def test_lamb_default_picks_for_loop_on_cpu() -> None:
    assert Lamb(make_params(), lr=0.1).foreach is False


def test_lamb_step_with_the_loops_grad_norm_equals_measuring_it_itself() -> None:
    """utils.optimizer_step hands LAMB the norm it measured (nn.utils.get_total_norm) instead of a second pass."""
    from utils import optimizer_step

    torch.manual_seed(0)
    models = [nn.Linear(8, 4), nn.Linear(8, 4)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [Lamb(m.parameters(), lr=0.1, max_grad_norm=0.5) for m in models]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for model in models:
            loss = model(x).pow(2).sum()
            loss.backward()
        optimizers[0].step()
        optimizers[0].zero_grad()
        outcome = optimizer_step(optimizers[1], scaler, list(models[1].parameters()), None, loss)
        assert outcome.applied and outcome.grad_norm > 0.5  # the clipping branch is taken
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_lamb_converges_on_tiny_problem() -> None:
    """bert optimization_test: 3 weights reach their target within 100 steps (no decay: plain Adam steps)."""
    w = nn.Parameter(torch.zeros(3))
    target = torch.tensor([0.1, -0.2, -0.1])
    optimizer = Lamb([w], lr=0.2, weight_decay=0.0)
    for _ in range(100):
        optimizer.zero_grad()
        ((target - w) ** 2).mean().backward()
        optimizer.step()
    torch.testing.assert_close(w.detach(), target, atol=1e-2, rtol=0)


def test_lamb_zero_weight_uses_plain_lr() -> None:
    """Trust ratio falls back to lr alone when ||w|| == 0: the first step moves by lr * u."""
    w = nn.Parameter(torch.zeros(4))
    optimizer = Lamb([w], lr=0.1, weight_decay=0.01, max_grad_norm=0.0)
    w.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    optimizer.step()
    # Step 1 with bias correction: u = g / (|g| + eps) = sign(g) (weight term is 0).
    expected = -0.1 * w.grad / (w.grad.abs() + 1e-6)
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamb_state_dict_round_trip(dtype: torch.dtype) -> None:
    grads = make_grads(10)
    params = make_params(dtype=dtype)
    optimizer = Lamb(groups_of(params, 0.01), lr=0.02)
    run_lamb(params, grads[:5], optimizer)

    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    resumed_optimizer = Lamb(groups_of(resumed, 0.01), lr=0.02)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert all(resumed_optimizer.state[p]["exp_avg"].dtype == torch.float32 for p in resumed)

    run_lamb(params, grads[5:], optimizer)
    run_lamb(resumed, grads[5:], resumed_optimizer)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg"], resumed_optimizer.state[b]["exp_avg"])
        assert resumed_optimizer.state[b]["step"].item() == 10


def test_grad_scaler_skips_inf_step_and_leaves_state() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = Lamb(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(5, 4)

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        scaler.scale(model(x).square().sum()).backward()
        if poison:
            model.weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()

    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = Lamb(twin.parameters(), lr=0.01)
    twin(x).square().sum().backward()
    twin_optimizer.step()
    step(poison=False)
    # The optimizer saw unscaled gradients: its step equals one taken on the plain (unscaled) gradients.
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)

    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    scale = scaler.get_scale()
    step(poison=True)
    assert scaler.get_scale() < scale
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    for key, value in state.items():
        assert torch.equal(optimizer.state[model.weight][key], value)
    assert optimizer.state[model.weight]["step"].item() == 1


class _Tiny(nn.Module):
    """Parameter names as in the reference model: dense, LayerNorm, pooler, and a TF-style gamma."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.pooler = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_pretraining_rule() -> None:
    model = _Tiny()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == {"dense.weight", "pooler.weight"}
    assert _names(model, no_decay) == {"dense.bias", "LayerNorm.weight", "LayerNorm.bias", "pooler.bias", "gamma"}


def test_param_groups_finetuning_rule_and_drop_pooler() -> None:
    model = _Tiny()
    decay, no_decay = param_groups(model, 0.01, FINETUNING_NO_DECAY, drop_pooler=True)
    assert _names(model, decay) == {"dense.weight", "gamma"}
    assert _names(model, no_decay) == {"dense.bias", "LayerNorm.weight", "LayerNorm.bias"}


def test_param_groups_no_trainable_parameters() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.01)


def test_build_optimizer_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        build_optimizer("sgd", nn.Linear(2, 2).parameters(), 0.1)
    assert all(name in str(error.value) for name in OPTIMIZERS)
    with pytest.raises(ValueError, match="for-loop"):
        build_optimizer("lamb", nn.Linear(2, 2).parameters(), 0.1, implementation="fast")
    with pytest.raises(ValueError, match="apex"):
        build_optimizer("lamb", nn.Linear(2, 2).parameters(), 0.1, implementation="apex")


def test_build_optimizer_lamb_passes_hyperparameters() -> None:
    model = _Tiny()
    optimizer = build_optimizer("lamb", param_groups(model, 0.01), 0.006, max_grad_norm=2.0, use_nvlamb=True,
                                implementation="foreach")
    assert isinstance(optimizer, Lamb)
    assert optimizer.foreach and optimizer.max_grad_norm == 2.0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert all(g["use_nvlamb"] and g["lr"] == 0.006 and g["eps"] == 1e-6 for g in optimizer.param_groups)


def test_build_optimizer_adamw_matches_torch_and_does_not_clip() -> None:
    params, twin = make_params(), make_params()
    optimizer = build_optimizer("adamw", groups_of(params, 0.01), 0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    reference = torch.optim.AdamW(groups_of(twin, 0.01), lr=0.01, eps=1e-6, foreach=False)
    grads = make_grads(5)
    run_lamb(params, grads, optimizer)
    run_lamb(twin, grads, reference)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bertadam_matches_formula() -> None:
    """No bias correction, per-tensor clipping, decay added to the update, lr = lr * warmup_linear(step/t_total)."""
    lr, t_total, warmup, wd, steps = 0.05, 10, 0.2, 0.01, 8
    params = make_params()
    start = [p.detach().double().clone() for p in params]
    grads = make_grads(steps)
    optimizer = BertAdam(params, lr=lr, warmup=warmup, t_total=t_total, weight_decay=wd)
    run_lamb(params, grads, optimizer)

    w, m, v = start, [torch.zeros_like(x) for x in start], [torch.zeros_like(x) for x in start]
    for step, step_grads in enumerate(grads):
        x = step / t_total
        factor = x / warmup if x < warmup else max((x - 1) / (warmup - 1), 0.0)
        for i, g in enumerate(step_grads):
            g = g.double()
            g = g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))  # clip_grad_norm_(p, 1.0) on each tensor
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            w[i] = w[i] - lr * factor * (m[i] / (v[i].sqrt() + 1e-6) + wd * w[i])
    for p, e in zip(params, w):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-6, rtol=0)


def test_bertadam_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule"):
        BertAdam(make_params(), lr=0.1, schedule="warmup_exp")
    with pytest.raises(ValueError, match="warmup"):
        BertAdam(make_params(), lr=0.1, warmup=1.5)
