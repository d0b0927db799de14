"""Optimizers for BERT: NVLAMB (LAMB), the reference's BertAdam, AdamW construction and weight-decay groups."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from schedulers import warmup_constant, warmup_linear, warmup_poly

logger = logging.getLogger(__name__)

# BERT's weight-decay rule, matched by substring of the parameter name: LayerNorm parameters and biases are not
# decayed. Pre-training lists the TF-era LayerNorm names (gamma/beta) too; fine-tuning lists only ours.
PRETRAINING_NO_DECAY = ("bias", "gamma", "beta", "LayerNorm")
FINETUNING_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")

OPTIMIZERS = ("lamb", "adamw", "bertadam")
IMPLEMENTATIONS = {
    "lamb": ("auto", "apex", "foreach", "for-loop"),
    "adamw": ("auto", "fused", "foreach", "for-loop"),
    "bertadam": ("auto", "for-loop"),
}


def param_groups(model: nn.Module, weight_decay: float, no_decay: Sequence[str] = PRETRAINING_NO_DECAY, *,
                 drop_pooler: bool = False) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a no-decay group by name (BERT's rule).

    Args:
        model: the model whose `named_parameters()` are grouped (frozen parameters are left out).
        weight_decay: decay of the first group; the second group gets 0.0.
        no_decay: a parameter is not decayed when any of these substrings is in its name. Default: the
            pre-training list; pass FINETUNING_NO_DECAY for the reference fine-tuning rule.
        drop_pooler: leave out parameters whose name contains "pooler", as the reference SQuAD fine-tuning does
            (its pooler gets no gradient there, and DDP would wait for it).

    Returns:
        Non-empty groups `[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]`.
    """
    decay: list[nn.Parameter] = []
    no_decay_params: list[nn.Parameter] = []
    dropped = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if drop_pooler and "pooler" in name:
            dropped += 1
            continue
        (no_decay_params if any(nd in name for nd in no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay_params, "weight_decay": 0.0}]
    for group in groups:
        logger.info("weight decay %g: %d tensors, %d parameters", group["weight_decay"], len(group["params"]),
                    sum(p.numel() for p in group["params"]))
    if dropped:
        logger.info("left %d pooler tensors out of the optimizer", dropped)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return groups


def _foreach_supported() -> bool:
    """Whether this torch has every multi-tensor op and overload the foreach LAMB uses."""
    ops = ("_foreach_norm", "_foreach_add_", "_foreach_mul_", "_foreach_div", "_foreach_div_", "_foreach_addcmul_",
           "_foreach_sqrt_", "_foreach_copy_")
    if not all(hasattr(torch, op) for op in ops):
        return False
    return ("Tensor" in torch.ops.aten._foreach_div.overloads()
            and "dtype" in str(torch.ops.aten._foreach_norm.Scalar._schema))


FOREACH_SUPPORTED = _foreach_supported()


def _foreach_devices() -> tuple[str, ...]:
    """Device types with real multi-tensor kernels. On the CPU foreach ops are loops over the tensors that
    allocate every temporary at once, measured 2.5x slower than the for-loop (benchmarks/optimizer_step.py)."""
    foreach_utils = getattr(torch.utils, "_foreach_utils", None)
    if hasattr(foreach_utils, "_get_foreach_kernels_supported_devices"):
        return tuple(foreach_utils._get_foreach_kernels_supported_devices())
    return ("cuda",)


def _by_device_and_dtype(params: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Bucket tensors so that each multi-tensor op sees one device and one dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        buckets[(p.device, p.dtype)].append(p)
    return buckets


def _trust_scale(weight_norm: torch.Tensor, update_norm: torch.Tensor, lr: float) -> torch.Tensor:
    """-lr * ||w|| / ||u|| per tensor, or -lr where either norm is 0 (LAMB trust ratio, sign folded in)."""
    ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
    return ratio * -lr


class Lamb(torch.optim.Optimizer):
    """NVLAMB: LAMB with global gradient-norm clipping first and bias correction, as the reference's FusedLAMB.

    One step, following the reference's kernels (apex `FusedLAMB` / `lamb_amp_opt`):
      1. global L2 norm of all gradients of all groups, `gnorm`;
      2. `clip = gnorm / max_grad_norm` if `gnorm > max_grad_norm` else 1, and `g = grad / clip`;
      3. L2 mode (`adam_w_mode=False`) only: `g += weight_decay * w`;
      4. `m = beta1 m + beta3 g` (beta3 = 1 - beta1 with grad_averaging, else 1), `v = beta2 v + (1 - beta2) g^2`;
      5. `u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)` (no correction without bias_correction),
         plus `weight_decay * w` in decoupled mode (`adam_w_mode=True`) when weight_decay != 0;
      6. `w -= lr * ratio * u` with the per-tensor trust ratio `ratio = ||w|| / ||u||` (1 when either norm is 0),
         applied only when `use_nvlamb` or the group's weight_decay != 0 (so by default the no-decay group,
         biases and LayerNorm, gets plain Adam steps: reference quirk kept on purpose).

    The optimizer clips by itself: the training loop measures the norm (to skip non-finite steps) but must not
    clip again (`LoopConfig.max_grad_norm=None`); it hands that norm to `step(grad_norm=...)` (`takes_grad_norm`),
    so that step 1 is not computed twice. It has no loss-scale handling of its own; with fp16 use
    `torch.amp.GradScaler` (`scaler.unscale_(opt)` then `scaler.step(opt)`), which skips the whole step, state
    included, when a gradient is inf/NaN. Called directly, without `utils.optimizer_step` or a scaler, a
    non-finite gradient is not skipped (as torch's own optimizers).

    Moments are fp32 for any parameter dtype; a bf16/fp16 parameter is updated in fp32 and rounded once
    (no fp32 master copy is kept). `foreach=None` picks the multi-tensor path when this torch has the ops and
    every parameter is on a device with multi-tensor kernels (CUDA), and the for-loop path otherwise (CPU);
    both do the same maths in the same order.
    """

    takes_grad_norm = True  # `step` accepts the global gradient norm its caller already measured

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 grad_averaging: bool = True, adam_w_mode: bool = True, max_grad_norm: float = 1.0,
                 use_nvlamb: bool = False, foreach: bool | None = None) -> None:
        if lr < 0.0:
            raise ValueError(f"Lamb: invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"Lamb: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Lamb: invalid weight_decay {weight_decay}")
        if foreach and not FOREACH_SUPPORTED:
            raise ValueError("Lamb: foreach=True but this torch lacks the multi-tensor ops; use foreach=False")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, grad_averaging=grad_averaging, adam_w_mode=adam_w_mode,
                        use_nvlamb=use_nvlamb)
        super().__init__(params, defaults)
        # Clipping is by the global norm over every group, so it is one setting, not a per-group one.
        self.max_grad_norm = max_grad_norm
        if foreach is None:
            devices = {p.device.type for group in self.param_groups for p in group["params"]}
            foreach = FOREACH_SUPPORTED and devices <= set(_foreach_devices())
        self.foreach = foreach

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            # `step` lives on the CPU (as in torch.optim.Adam): bias corrections are host scalars, no sync.
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def _global_grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """fp32 L2 norm of the gradients of `params`, on the device of the first one."""
        norms: list[torch.Tensor] = []
        for grads in _by_device_and_dtype([p.grad for p in params]).values():
            if self.foreach:
                norms.extend(torch._foreach_norm(grads, 2, dtype=torch.float32))
            else:
                norms.extend(torch.linalg.vector_norm(g, 2, dtype=torch.float32) for g in grads)
        device = params[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))

    @staticmethod
    def _bias_corrections(group: dict[str, Any], steps: list[torch.Tensor]) -> tuple[list[float], list[float]]:
        if not group["bias_correction"]:
            return [1.0] * len(steps), [1.0] * len(steps)
        beta1, beta2 = group["betas"]
        counts = [s.item() for s in steps]
        return [1.0 - beta1 ** t for t in counts], [1.0 - beta2 ** t for t in counts]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             grad_norm: torch.Tensor | None = None) -> torch.Tensor | None:
        """Clip all gradients by their global norm (``grad_norm`` when the caller measured it over the same
        gradients, else measured here), then take one LAMB step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        every = [p for params in with_grad for p in params]
        if not every:
            return loss
        for p in every:
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
        grad_norm = self._global_grad_norm(every) if grad_norm is None else grad_norm.float()
        if self.max_grad_norm > 0:
            clip = torch.where(grad_norm > self.max_grad_norm, grad_norm / self.max_grad_norm, 1.0)
        else:
            clip = torch.ones_like(grad_norm)
        update = self._update_foreach if self.foreach else self._update_for_loop
        for group, params in zip(self.param_groups, with_grad):
            for (device, dtype), bucket in _by_device_and_dtype(params).items():
                update(group, bucket, clip.to(device), dtype != torch.float32)
        return loss

    def _update_foreach(self, group: dict[str, Any], params: list[torch.Tensor], clip: torch.Tensor,
                        low_precision: bool) -> None:
        """Steps 2-6 for one device/dtype bucket with multi-tensor ops."""
        beta1, beta2 = group["betas"]
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        states = [self._state(p) for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        bc1, bc2 = self._bias_corrections(group, steps)
        weights = [p.float() for p in params] if low_precision else params
        if low_precision:
            grads = [p.grad.float() for p in params]
            torch._foreach_div_(grads, clip)
        else:
            grads = torch._foreach_div([p.grad for p in params], clip)
        if not group["adam_w_mode"] and wd != 0:
            torch._foreach_add_(grads, weights, alpha=wd)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=beta3)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        del grads
        denom = torch._foreach_div(exp_avg_sqs, bc2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, bc1)
        torch._foreach_div_(updates, denom)
        del denom
        if group["adam_w_mode"] and wd != 0:
            torch._foreach_add_(updates, weights, alpha=wd)
        if group["use_nvlamb"] or wd != 0:
            scale = _trust_scale(torch.stack(torch._foreach_norm(weights)), torch.stack(torch._foreach_norm(updates)),
                                 lr)
            torch._foreach_mul_(updates, list(scale.unbind()))
            torch._foreach_add_(weights, updates)
        else:
            torch._foreach_add_(weights, updates, alpha=-lr)
        if low_precision:
            torch._foreach_copy_(params, weights)

    def _update_for_loop(self, group: dict[str, Any], params: list[torch.Tensor], clip: torch.Tensor,
                         low_precision: bool) -> None:
        """Steps 2-6 one tensor at a time: the plain-PyTorch twin of `_update_foreach`, same ops in the same order."""
        beta1, beta2 = group["betas"]
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            state = self._state(p)
            state["step"] += 1.0
            (bc1,), (bc2,) = self._bias_corrections(group, [state["step"]])
            weight = p.float() if low_precision else p
            grad = p.grad.float() / clip
            if not group["adam_w_mode"] and wd != 0:
                grad.add_(weight, alpha=wd)
            state["exp_avg"].mul_(beta1).add_(grad, alpha=beta3)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (state["exp_avg_sq"] / bc2).sqrt_().add_(eps)
            update = (state["exp_avg"] / bc1).div_(denom)
            if group["adam_w_mode"] and wd != 0:
                update.add_(weight, alpha=wd)
            if group["use_nvlamb"] or wd != 0:
                update.mul_(_trust_scale(torch.linalg.vector_norm(weight), torch.linalg.vector_norm(update), lr))
                weight.add_(update)
            else:
                weight.add_(update, alpha=-lr)
            if low_precision:
                p.copy_(weight)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep the moments fp32 for bf16/fp16 parameters (torch casts them to the param)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None or p.dtype == torch.float32:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)


def _bertadam_warmup_cosine(x: float, warmup: float = 0.002) -> float:
    """BertAdam's own cosine: linear warm-up, then `0.5 * (1 + cos(pi * x))` (x from 0, not from warmup)."""
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


BERTADAM_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_cosine": _bertadam_warmup_cosine,
    "warmup_constant": warmup_constant,
    "warmup_linear": warmup_linear,
    "warmup_poly": warmup_poly,
}


class BertAdam(torch.optim.Optimizer):
    """The reference's fp32 fine-tuning optimizer, kept for compatibility (Adam as in the original BERT code).

    Differs from AdamW on purpose, as the reference: no bias correction; each gradient tensor is clipped to
    `max_grad_norm` on its own (`clip_grad_norm_` per tensor, not a global norm; 0 turns it off); the
    update is `m / (sqrt(v) + e) + weight_decay * w`. When `t_total != -1` the lr of the update after `step`
    updates is `lr * schedule(step / t_total, warmup)` (so the first update has lr 0 during warm-up, as the
    reference); leave `t_total=-1` when an external scheduler drives the lr. Kept for reference parity; the
    scripts here use `lamb` and `adamw`.
    """

    def __init__(self, params: Iterable[Any], lr: float, warmup: float = -1, t_total: int = -1,
                 schedule: str = "warmup_linear", b1: float = 0.9, b2: float = 0.999, e: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0) -> None:
        if lr < 0.0:
            raise ValueError(f"BertAdam: invalid learning rate {lr}")
        if schedule not in BERTADAM_SCHEDULES:
            raise ValueError(f"BertAdam: unknown schedule {schedule!r}; valid: {', '.join(BERTADAM_SCHEDULES)}")
        if not 0.0 <= warmup < 1.0 and warmup != -1:
            raise ValueError(f"BertAdam: warmup must be in [0, 1) or -1, got {warmup}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"BertAdam: b1 and b2 must be in [0, 1), got {b1}, {b2}")
        if e < 0.0:
            raise ValueError(f"BertAdam: invalid epsilon {e}")
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def get_lr(self) -> list[float]:
        """The lr each parameter with state will use on its next update (reference API)."""
        lrs = []
        for group in self.param_groups:
            for p in group["params"]:
                if self.state[p]:
                    lrs.append(self._scheduled_lr(group, self.state[p]["step"]))
        return lrs or [0.0]

    @staticmethod
    def _scheduled_lr(group: dict[str, Any], step: int) -> float:
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * BERTADAM_SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One BertAdam update of every parameter with a gradient (clips each gradient tensor in place)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["next_v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
                grad = p.grad
                state["next_m"].mul_(group["b1"]).add_(grad, alpha=1.0 - group["b1"])
                state["next_v"].mul_(group["b2"]).addcmul_(grad, grad, value=1.0 - group["b2"])
                update = state["next_m"] / (state["next_v"].sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-self._scheduled_lr(group, state["step"]))
                state["step"] += 1
        return loss


def apex_lamb_available() -> bool:
    """Whether apex's FusedLAMB can run here: apex and its CUDA extension (`amp_C`) installed, and a GPU."""
    return (importlib.util.find_spec("apex") is not None and importlib.util.find_spec("amp_C") is not None
            and torch.cuda.is_available())


def _fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch.optim.AdamW takes `fused=True` for parameters on `device` (nanoGPT's signature check)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    foreach_utils = getattr(torch.utils, "_foreach_utils", None)
    if hasattr(foreach_utils, "_get_fused_kernels_supported_devices"):
        return device.type in foreach_utils._get_fused_kernels_supported_devices()
    return device.type == "cuda"


def _first_tensor(params: list[Any]) -> torch.Tensor:
    first = params[0]
    if isinstance(first, dict):
        for group in params:
            group_params = group["params"]
            group_params = [group_params] if isinstance(group_params, torch.Tensor) else list(group_params)
            if group_params:
                return group_params[0]
        raise ValueError("build_optimizer: every parameter group is empty")
    return first


def build_optimizer(name: str, params_or_groups: Iterable[Any], lr: float, *, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, max_grad_norm: float = 1.0,
                    device: torch.device | str | None = None, implementation: str = "auto",
                    **kw: Any) -> torch.optim.Optimizer:
    """Make the optimizer called `name` (one of OPTIMIZERS) with the reference's hyperparameter names.

    Args:
        params_or_groups: parameters, or groups as from `param_groups` (a group's own weight_decay wins).
        weight_decay: decay for groups that do not set their own.
        max_grad_norm: global-norm clip done *inside* lamb (and per tensor inside bertadam); adamw does not
            clip, so the training loop clips for it (`LoopConfig.max_grad_norm`).
        device: where the parameters live; by default the first parameter's device.
        implementation: `auto`, or one of IMPLEMENTATIONS[name]. For lamb, auto takes apex `FusedLAMB` when
            `apex_lamb_available()` and the parameters are on CUDA, else our `Lamb` (foreach when supported).
            For adamw, auto takes `fused=True` when this torch supports it on the device, else torch's default.
        **kw: passed on: lamb `bias_correction, grad_averaging, adam_w_mode, use_nvlamb`; bertadam
            `warmup, t_total, schedule`; adamw any other `torch.optim.AdamW` argument.

    Raises ValueError for an unknown name or implementation, or one that this machine cannot run.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if implementation not in IMPLEMENTATIONS[name]:
        raise ValueError(f"unknown implementation {implementation!r} for {name}; valid: "
                         f"{', '.join(IMPLEMENTATIONS[name])}")
    params = list(params_or_groups)
    if not params:
        raise ValueError("build_optimizer: got no parameters")
    device = torch.device(device) if device is not None else _first_tensor(params).device

    if name == "lamb":
        if implementation == "auto" and device.type == "cuda" and apex_lamb_available():
            implementation = "apex"
        if implementation == "apex":
            if not (device.type == "cuda" and apex_lamb_available()):
                raise ValueError("implementation='apex' needs apex with its CUDA extensions and CUDA parameters")
            from apex.optimizers import FusedLAMB

            optimizer = FusedLAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  max_grad_norm=max_grad_norm, **kw)
        else:
            foreach = {"auto": None, "foreach": True, "for-loop": False}[implementation]
            optimizer = Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             max_grad_norm=max_grad_norm, foreach=foreach, **kw)
    elif name == "adamw":
        if implementation == "fused" and not _fused_adamw_supported(device):
            raise ValueError(f"implementation='fused': this torch has no fused AdamW for {device.type}")
        if implementation == "auto":
            implementation = "fused" if _fused_adamw_supported(device) else "default"
        choice = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
                  "default": {}}[implementation]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      **choice, **kw)
    else:
        optimizer = BertAdam(params, lr=lr, b1=betas[0], b2=betas[1], e=eps, weight_decay=weight_decay,
                             max_grad_norm=max_grad_norm, **kw)
    logger.info("optimizer %s (%s), lr %g, weight decay %g", name, type(optimizer).__name__, lr, weight_decay)
    return optimizer


# ----------------------------------------------------------------------------------------------------------------
# The reference's optimizer state (apex FusedLAMBAMP) <-> Lamb's

_REFERENCE_GROUP_KEYS = ("bias_correction", "betas", "eps", "weight_decay", "grad_averaging", "max_grad_norm")


def is_reference_lamb_state(state_dict: dict[str, Any]) -> bool:
    """True for FusedLAMBAMP's layout: a tensor `lr` and a `step` in each parameter group."""
    groups = state_dict.get("param_groups", [])
    return any("step" in g or isinstance(g.get("lr"), torch.Tensor) for g in groups)


def lamb_state_from_reference(state_dict: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """FusedLAMBAMP's optimizer state as `Lamb.load_state_dict` takes it, and the step count it held.

    The reference keeps the step (int32 tensor) and the lr (fp32 tensor) per group and only `exp_avg`/`exp_avg_sq`
    per parameter; Lamb keeps a float lr per group and the step per parameter. Moments are copied unchanged;
    FusedLAMBAMP's defaults fill what it does not store (decoupled weight decay, no NVLAMB trust ratio everywhere).
    """
    groups, state, steps = [], {}, set()
    for group in state_dict["param_groups"]:
        step = int(group.get("step", 0))
        steps.add(step)
        converted = {k: v for k, v in group.items() if k not in ("step", "max_grad_norm")}
        converted["lr"] = float(group["lr"])
        converted.setdefault("adam_w_mode", True)
        converted.setdefault("use_nvlamb", False)
        groups.append(converted)
        for index in group["params"]:
            saved = state_dict["state"].get(index)
            if saved is not None:
                state[index] = {"step": torch.tensor(float(step)), "exp_avg": saved["exp_avg"],
                                "exp_avg_sq": saved["exp_avg_sq"]}
    if len(steps) > 1:
        raise ValueError(f"the reference optimizer state holds different steps per group: {sorted(steps)}")
    return {"state": state, "param_groups": groups}, steps.pop() if steps else 0


def lamb_state_to_reference(state_dict: dict[str, Any], max_grad_norm: float = 1.0) -> dict[str, Any]:
    """Lamb's optimizer state in FusedLAMBAMP's layout (what the reference's run_pretraining.py loads)."""
    groups, state = [], {}
    for group in state_dict["param_groups"]:
        steps = {float(state_dict["state"][i]["step"]) for i in group["params"] if i in state_dict["state"]}
        if len(steps) > 1:
            raise ValueError(f"Lamb state holds different steps within one group: {sorted(steps)}")
        converted = {k: group[k] for k in _REFERENCE_GROUP_KEYS if k in group}
        converted.setdefault("max_grad_norm", max_grad_norm)
        converted.update(params=list(group["params"]), lr=torch.tensor(float(group["lr"]), dtype=torch.float32),
                         step=torch.tensor(int(steps.pop()) if steps else 0, dtype=torch.int32))
        groups.append(converted)
        for index in group["params"]:
            if index in state_dict["state"]:
                saved = state_dict["state"][index]
                state[index] = {"exp_avg": saved["exp_avg"], "exp_avg_sq": saved["exp_avg_sq"]}
    return {"state": state, "param_groups": groups}
