"""The run toolkit every entry script shares: distributed setup, seeding, precision, the training loop,
checkpoints, dllogger-format logging, progress bars and throughput / MFU accounting."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from file_utils import load_checkpoint, save_checkpoint

Precision = Literal["fp32", "fp16", "bf16"]

# ----------------------------------------------------------------------------------------------------------------
# Ranks and distributed setup
# ----------------------------------------------------------------------------------------------------------------


def get_rank() -> int:
    """Global rank, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on the one rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if get_world_size() > 1:
        dist.barrier()


@dataclass
class RunEnv:
    """Where this process runs: its ranks, the world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    """First host of the SLURM allocation (what every task agrees on), or localhost outside SLURM."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   check=True, timeout=30).stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
        match = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        if match:
            return match.group(1) + (match.group(2) or "")
    return "127.0.0.1"


def _ranks_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, int(env.get("LOCAL_RANK", 0)), 1


def setup_distributed(no_cuda: bool = False) -> RunEnv:
    """Read torchrun / SLURM variables, pick the device and start the process group (NCCL on GPU, gloo on CPU)."""
    rank, local_rank, world_size = _ranks_from_env()
    use_cuda = torch.cuda.is_available() and not no_cuda
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        # TF32 for fp32 matmuls and convolutions on Ampere and newer: the reference's "tf32" precision.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=_dt.timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return RunEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, distributed=distributed)


def cleanup_distributed() -> None:
    """Destroy the process group if one was started (call from a ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with ``seed + rank`` so ranks draw different dropout masks."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def check_batch_arithmetic(train_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """Return the micro-batch of a per-rank batch split over accumulation steps, or fail with the numbers.

    As in the reference, ``train_batch_size`` is per rank *before* accumulation, so the global batch is
    ``train_batch_size * world_size`` and each micro-step sees ``train_batch_size // gradient_accumulation_steps``.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if train_batch_size < 1 or train_batch_size % gradient_accumulation_steps:
        raise ValueError(
            f"--train_batch_size {train_batch_size} is not divisible by --gradient_accumulation_steps "
            f"{gradient_accumulation_steps}: the micro-batch must be a whole number "
            f"(global batch = micro-batch x {world_size} ranks x {gradient_accumulation_steps} accumulation steps)")
    return train_batch_size // gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------------------------
# Precision and model wrapping
# ----------------------------------------------------------------------------------------------------------------


def resolve_precision(fp16: bool, bf16: bool, device: torch.device) -> Precision:
    """Turn the --fp16/--amp and --bf16 flags into one precision name, rejecting combinations that can't work."""
    if fp16 and bf16:
        raise ValueError("--fp16/--amp and --bf16 are mutually exclusive; choose one")
    if fp16 and device.type != "cuda":
        raise ValueError("--fp16/--amp needs a CUDA device (fp16 autocast with loss scaling); use --bf16 on CPU")
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--bf16 is not supported by this GPU; use --fp16")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The one precision context: a no-op for fp32, autocast to bf16/fp16 otherwise. Model code never branches."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def make_grad_scaler(precision: Precision, device: torch.device, init_scale: float = 2.0**16,
                     static: bool = False) -> torch.amp.GradScaler:
    """Loss scaler, enabled only for fp16 (bf16 and fp32 have fp32's exponent range).

    Dynamic by default. ``static`` (the reference's ``--loss_scale S`` > 0) keeps ``init_scale`` from growing; it
    still halves on an overflow, so that step is skipped instead of applied.
    """
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=precision == "fp16")
    if static:
        scaler.set_growth_interval(2**31 - 1)
    return scaler


def wrap_model(model: nn.Module, env: RunEnv, compile: bool = False, allreduce_fp16: bool = False) -> nn.Module:
    """Move to the device, optionally ``torch.compile``, and wrap in DDP when there is more than one rank.

    ``allreduce_fp16`` registers DDP's fp16 compression hook: gradients travel as fp16 and are averaged there,
    the reference's ``--allreduce_post_accumulation_fp16``.
    """
    model = model.to(env.device)
    if compile:
        model = torch.compile(model)
    if env.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
        if allreduce_fp16:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (for saving and FLOP counts)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def shuffled_batches(num_items: int, micro_batch: int, seed: int, env: RunEnv,
                     make_batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                     state: Optional[TrainState] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this rank's share of ``num_items`` examples, epoch after epoch.

    Epoch e is a permutation seeded by ``seed + e`` (the same on every rank), wrapped around to a multiple of the
    world size and dealt out rank by rank, like ``DistributedSampler``; ``make_batch(indices)`` builds each batch.
    ``state.epoch`` counts the finished passes (and says where to start).
    """
    per_rank = math.ceil(num_items / env.world_size)
    epoch = state.epoch if state is not None else 0
    while True:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        order = order.repeat(math.ceil(per_rank * env.world_size / num_items))[:per_rank * env.world_size]
        shard = order[env.rank::env.world_size]
        for first in range(0, per_rank, micro_batch):
            yield make_batch(shard[first:first + micro_batch])
        epoch += 1
        if state is not None:
            state.epoch = epoch


def move_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch of tensors to ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# dllogger-compatible logging
# ----------------------------------------------------------------------------------------------------------------


class Verbosity:
    """dllogger's verbosity levels: a backend receives a record when its verbosity >= the record's."""

    OFF = -1
    DEFAULT = 0
    VERBOSE = 1


def format_step(step: Any) -> str:
    """Render a dllogger step as the reference does: tuples as epoch/iteration, strings as themselves."""
    if isinstance(step, str):
        return step
    if isinstance(step, (tuple, list)):
        names = ("Training Epoch", "Training Iteration", "Validation Iteration")
        return " ".join(f"{name}: {value}" for name, value in zip(names, step))
    return str(step)


def _plain(value: Any) -> Any:
    """Make a metric JSON-serialisable (tensors and numpy scalars become Python numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class JSONStreamBackend:
    """Writes dllogger's ``DLLL {json}`` lines (one per record) to a file."""

    def __init__(self, verbosity: int, filename: str | os.PathLike, append: bool = False) -> None:
        self.verbosity = verbosity
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(filename, "a" if append else "w", encoding="utf-8")
        self._start = time.time()

    def _write(self, record: dict) -> None:
        now = time.time()
        head = {"timestamp": str(now), "datetime": str(_dt.datetime.now(_dt.timezone.utc).astimezone()),
                "elapsedtime": str(now - self._start)}
        self._file.write("DLLL " + json.dumps({**head, **record}, default=str) + "\n")

    def log(self, timestamp: float, elapsedtime: float, step: Any, data: dict) -> None:
        step = list(step) if isinstance(step, tuple) else step
        self._write({"type": "LOG", "step": step, "data": {k: _plain(v) for k, v in data.items()}})

    def metadata(self, timestamp: float, elapsedtime: float, metric: str, metadata: dict) -> None:
        self._write({"type": "METADATA", "metric": metric, "metadata": metadata})

    def flush(self) -> None:
        self._file.flush()


class StdOutBackend:
    """Prints ``DLL <datetime> - <step> <metric> : <value> <unit>`` lines, as dllogger's stdout backend does."""

    def __init__(self, verbosity: int, step_format: Callable[[Any], str] = format_step) -> None:
        self.verbosity = verbosity
        self.step_format = step_format
        self._meta: dict[str, dict] = {}

    def _fmt(self, name: str, value: Any) -> str:
        meta = self._meta.get(name, {})
        value = _plain(value)
        text = format(value, meta["format"].lstrip(":")) if "format" in meta and isinstance(value, (int, float)) \
            else (f"{value:.6g}" if isinstance(value, float) else str(value))
        return f"{name} : {text}" + (f" {meta['unit']}" if meta.get("unit") else "")

    def log(self, timestamp: float, elapsedtime: float, step: Any, data: dict) -> None:
        fields = " ".join(self._fmt(k, v) for k, v in data.items())
        print(f"DLL {_dt.datetime.now():%Y-%m-%d %H:%M:%S.%f} - {self.step_format(step)} {fields}", flush=True)

    def metadata(self, timestamp: float, elapsedtime: float, metric: str, metadata: dict) -> None:
        self._meta[metric] = metadata

    def flush(self) -> None:
        sys.stdout.flush()


class Logger:
    """dllogger's ``Logger``: fans records out to backends that are verbose enough. No backends = a no-op."""

    def __init__(self, backends: Iterable[Any] = ()) -> None:
        self.backends = list(backends)
        self.starttime = time.time()

    def log(self, step: Any, data: dict, verbosity: int = Verbosity.DEFAULT) -> None:
        now = time.time()
        for backend in self.backends:
            if backend.verbosity >= verbosity:
                backend.log(now, now - self.starttime, step, data)

    def metadata(self, metric: str, metadata: dict) -> None:
        now = time.time()
        for backend in self.backends:
            backend.metadata(now, now - self.starttime, metric, metadata)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()


def setup_logger(json_path: str | os.PathLike | None, enabled: bool | None = None) -> Any:
    """Rank 0 logs to the ``--json-summary`` file and stdout; other ranks get a logger with no backends.

    When NVIDIA's ``dllogger`` package is installed it is used (same records, same format); otherwise this
    module's compatible implementation is.
    """
    enabled = is_main_process() if enabled is None else enabled
    try:
        import dllogger  # type: ignore[import-not-found]
    except ImportError:
        dllogger = None
    if dllogger is not None:
        backends = []
        if enabled:
            if json_path:
                backends.append(dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, str(json_path)))
            backends.append(dllogger.StdOutBackend(dllogger.Verbosity.VERBOSE, step_format=format_step))
        return dllogger.Logger(backends)
    backends = []
    if enabled:
        if json_path:
            backends.append(JSONStreamBackend(Verbosity.VERBOSE, json_path))
        backends.append(StdOutBackend(Verbosity.VERBOSE))
    return Logger(backends)


def log_config(logger: Any, args: Any) -> None:
    """Record the resolved run configuration once, as the reference's ``PARAMETER`` records."""
    config = vars(args) if not isinstance(args, dict) else args
    logger.log(step="PARAMETER", data={"Config": [json.dumps(config, default=str, sort_keys=True)]})


def progress_bar(iterable: Optional[Iterable] = None, total: Optional[int] = None, disable: bool = False,
                 desc: str = "", initial: int = 0) -> Any:
    """A tqdm bar on the main process only (and never when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable or not is_main_process(),
                dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, MFU and memory
# ----------------------------------------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peak FLOP/s for bf16/fp16 and for TF32, from the vendors' datasheets:
# H100 SXM / H200: NVIDIA H100 datasheet (989 TFLOPS bf16, 495 tf32); H100 PCIe: 756 / 378; A100: 312 / 156
# (A100 datasheet); A10: 125 / 62.5; L4: 121 / 60; L40S: 362 / 183; V100 SXM2: 125 fp16 / 15.7 fp32; T4: 65 / 8.1.
_PEAK_FLOPS = [  # (substring of torch.cuda.get_device_name, half-precision peak, fp32/tf32 peak)
    ("H200", 989e12, 495e12), ("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 495e12),
    ("A100", 312e12, 156e12), ("L40S", 362e12, 183e12), ("A10", 125e12, 62.5e12), ("L4", 121e12, 60e12),
    ("V100", 125e12, 15.7e12), ("T4", 65e12, 8.1e12),
]


def peak_flops(device: torch.device, precision: Precision) -> Optional[float]:
    """Peak FLOP/s of the device for this precision, or None when unknown (CPUs: MFU is reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, single in _PEAK_FLOPS:
        if key in name:
            return single if precision == "fp32" else half
    return None


def bert_flops_per_sequence(config: Any, seq_len: int, masked_tokens: float | None = None,
                            num_params_encoder: int | None = None) -> float:
    """Training FLOPs (forward + backward) for one sequence of BERT.

    A matmul of an (m x k) by (k x n) matrix costs 2mkn FLOPs forward and twice that backward, so a weight
    matrix with P parameters applied to T tokens costs 6PT. Per layer the weights are 4H^2 (Q, K, V, output)
    + 2HI (feed-forward), applied to all S tokens. Attention adds QK^T and PV: 2 x 2 S^2 H forward per layer,
    so 12 S^2 H with backward. The MLM head (H^2 transform + HV decoder) runs on the ``masked_tokens`` rows
    (all S rows when the dense sequence output is off); the NSP/pooler head is negligible.
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    encoder = num_params_encoder or layers * (4 * hidden * hidden + 2 * hidden * inter)
    vocab = getattr(config, "padded_vocab_size", config.vocab_size)
    rows = seq_len if masked_tokens is None else masked_tokens
    return 6.0 * encoder * seq_len + 12.0 * layers * seq_len * seq_len * hidden + 6.0 * rows * (
        hidden * hidden + hidden * vocab)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) stayed NaN/inf for too many consecutive steps; nothing was updated by them."""


@dataclass
class TrainState:
    """Counters that make a run resumable; all plain values so they load with ``weights_only=True``."""

    step: int = 0  # optimizer steps taken (overflow-skipped steps don't count, as in the reference)
    epoch: int = 0
    skipped_steps: int = 0
    sequences: int = 0  # sequences trained on, summed over ranks

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class TrainResult:
    """What a call of ``train_loop`` did; the figures exclude the warm-up steps."""

    final_loss: float
    steps: int
    train_time: float
    sequences_per_second: float
    stopped_early: bool = False


def train_loop(model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
               loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, *,
               env: RunEnv, precision: Precision, gradient_accumulation_steps: int, max_steps: int,
               max_grad_norm: Optional[float] = 1.0, state: Optional[TrainState] = None, log_freq: int = 1,
               logger: Any = None, on_step: Optional[Callable[[TrainState], bool]] = None,
               progress: bool = True,
               flops_per_batch: Optional[Callable[[dict[str, torch.Tensor]], float]] = None,
               allreduce_post_accumulation: bool = True, timing_warmup_steps: int = 1,
               max_consecutive_skips: int = 50) -> TrainResult:
    """Run optimizer steps until ``state.step == max_steps`` or ``batches`` is exhausted.

    Each optimizer step takes ``gradient_accumulation_steps`` micro-batches: forward under the precision context,
    loss divided by the accumulation steps, backward through the scaler (gradients are all-reduced only on the
    last micro-step when ``allreduce_post_accumulation``). Then unscale, clip (unless the optimizer clips
    itself, like LAMB), step, update the scale, step the schedule and ``zero_grad(set_to_none=True)``.
    A step whose loss or gradients are not finite is skipped, not applied; ``max_consecutive_skips`` of them in a
    row raise ``NonFiniteLossError``. ``on_step(state)`` runs after each applied step and returns True to stop
    (checkpointing, preemption). Losses are read back (``.item()``, a device sync) once per step for that check.
    """
    state = state or TrainState()
    logger = logger or Logger()
    raw_model = unwrap_model(model)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    clip_inside = getattr(optimizer, "clips_gradients", False)
    peak = peak_flops(env.device, precision)
    model.train()
    bar = progress_bar(total=max_steps, initial=state.step, disable=not progress, desc="train")
    last_loss: Optional[torch.Tensor] = None
    consecutive_skips, steps_this_call, stopped = 0, 0, False
    timed = _Meter()  # steps after the warm-up, for the final throughput
    total = _Meter()  # every step of this call, the fallback when too few steps ran to leave warm-up out
    window = _Meter()  # since the last log line
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    try:
        while state.step < max_steps:
            t_start = time.perf_counter()
            micro_batches = list(islice(batches, gradient_accumulation_steps))
            if len(micro_batches) < gradient_accumulation_steps:
                break  # data exhausted; a partial accumulation would be a step with a different batch size
            window.data_time += time.perf_counter() - t_start
            step_loss = torch.zeros((), device=env.device)
            step_seqs, step_flops = 0, 0.0
            for index, batch in enumerate(micro_batches):
                if flops_per_batch is not None:
                    step_flops += flops_per_batch(batch)
                step_seqs += int(next(iter(batch.values())).shape[0])
                batch = move_to_device(batch, env.device)
                last = index == gradient_accumulation_steps - 1
                sync = model.no_sync() if is_ddp and allreduce_post_accumulation and not last \
                    else contextlib.nullcontext()
                with sync:
                    with autocast(precision, env.device):
                        loss = loss_fn(model, batch)
                    scaler.scale(loss / gradient_accumulation_steps).backward()
                step_loss += loss.detach().float() / gradient_accumulation_steps
            scaler.unscale_(optimizer)
            grad_norm = None
            if not clip_inside and max_grad_norm:
                grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), max_grad_norm)
            if env.world_size > 1:  # the data-parallel mean loss, for logging and the finiteness check
                dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
                step_loss /= env.world_size
            finite = torch.isfinite(step_loss)
            if grad_norm is not None:
                finite &= torch.isfinite(grad_norm)
            if scaler.is_enabled():
                scale_before = scaler.get_scale()
                scaler.step(optimizer)  # skips the update itself when it found inf/NaN gradients
                scaler.update()
                applied = scaler.get_scale() >= scale_before  # the scale backs off exactly when it skipped
            else:
                applied = bool(finite)
                if applied:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not applied:
                state.skipped_steps += 1
                consecutive_skips += 1
                if consecutive_skips >= max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"loss or gradients were NaN/inf for {consecutive_skips} consecutive steps after step "
                        f"{state.step} (last loss {step_loss.item()}); stopping. Those steps applied no update and "
                        "wrote no checkpoint. Lower the learning rate or check the data.")
                if scaler.is_enabled():
                    logger.log(step="PARAMETER", data={"loss_scale": scaler.get_scale()})
                continue
            consecutive_skips = 0
            scheduler.step()
            state.step += 1
            steps_this_call += 1
            state.sequences += step_seqs * env.world_size
            last_loss = step_loss
            elapsed = time.perf_counter() - t_start
            meters = (window, total, timed) if steps_this_call > timing_warmup_steps else (window, total)
            for meter in meters:
                meter.add(step_seqs * env.world_size, step_flops * env.world_size, elapsed)
            bar.update(1)
            if state.step % log_freq == 0 or state.step == max_steps:
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                loss_value = step_loss.item()
                record: dict[str, Any] = {
                    "average_loss": loss_value,
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "skipped_steps": state.skipped_steps,
                    "sequences_per_second": window.rate(),
                    "data_time_fraction": window.data_time / max(window.time, 1e-9),
                }
                norm = getattr(optimizer, "last_grad_norm", None) if clip_inside else grad_norm
                if norm is not None:
                    record["grad_norm"] = float(norm)
                if flops_per_batch is not None:
                    achieved = window.flops / max(window.time, 1e-9)
                    record["tflops"] = achieved / 1e12
                    record["mfu"] = achieved / peak if peak else "n/a"
                record["peak_memory_gib"] = peak_memory_gib(env.device)
                logger.log(step=(state.epoch, state.step), data=record)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                window = _Meter()
                if env.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(env.device)
            if on_step is not None and on_step(state):
                stopped = True
                break
    finally:
        bar.close()
    figures = timed if timed.time > 0 else total
    return TrainResult(final_loss=last_loss.item() if last_loss is not None else float("nan"),
                       steps=steps_this_call, train_time=figures.time, sequences_per_second=figures.rate(),
                       stopped_early=stopped)


@dataclass
class _Meter:
    """Sequences, FLOPs and seconds accumulated over some steps."""

    sequences: int = 0
    flops: float = 0.0
    time: float = 0.0
    data_time: float = 0.0

    def add(self, sequences: int, flops: float, seconds: float) -> None:
        self.sequences += sequences
        self.flops += flops
        self.time += seconds

    def rate(self) -> float:
        return self.sequences / self.time if self.time > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, RNG state and preemption
# ----------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Owns ``ckpt_<step>.pt`` files in one folder: atomic saves, keep the newest N, find the newest complete one.

    Files are written to a hidden temporary name and renamed, so any ``ckpt_<step>.pt`` present is complete and
    a run killed mid-write leaves the previous checkpoints untouched. Pruning never touches the file just written.
    """

    pattern = re.compile(r"^ckpt_(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike, keep: int = 3, logger: Any = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.logger = logger or Logger()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.pattern.match(p.name))]
        return sorted(found)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt_{step}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``ckpt_<step>.pt`` atomically, then delete all but the newest ``keep``."""
        path = self.path_for(step)
        start = time.perf_counter()
        save_checkpoint(state, path)
        for _, old in self.checkpoints()[:-self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        self.logger.log(step="PARAMETER", data={"checkpoint_step": step,
                                                "checkpoint_save_seconds": time.perf_counter() - start})
        return path

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True``; errors name the file."""
        start = time.perf_counter()
        state = load_checkpoint(path)
        self.logger.log(step="PARAMETER", data={"checkpoint_loaded": str(path),
                                                "checkpoint_load_seconds": time.perf_counter() - start})
        return state


class PreemptionFlag:
    """Remembers a SIGTERM (SLURM preemption / ``scancel``) so the loop can checkpoint at the next step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def any_rank(self, env: RunEnv) -> bool:
        """True when any rank got the signal (all ranks must stop at the same step)."""
        if env.world_size == 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
