"""The run toolkit every entry script shares: distributed setup, seeding, precision, the training loop,
checkpoints, dllogger-format logging, progress bars and throughput / MFU accounting."""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from file_utils import (
    CheckpointError,
    PathLike,
    atomic_path,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)

Precision = Literal["fp32", "fp16", "bf16"]
Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
log = logging.getLogger(__name__)

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


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (in place); the tensor itself in a single process."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


@dataclass
class RunEnv:
    """Where this process runs: its ranks, the world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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
        # One port per job, so that two jobs sharing a node do not meet at torch's default port 29500.
        job = env.get("SLURM_JOB_ID", "")
        env.setdefault("MASTER_PORT", str(20000 + int(job) % 20000) if job.isdigit() else "29500")
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
    if world_size > 1 and not dist.is_initialized():
        timeout = _dt.timedelta(minutes=30)
        store, rank, world_size = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # Keys of each torchrun restart apart: the workers of a restarted group must not read the addresses the
        # previous (killed) group published in the same store, or they connect to dead ports.
        store = dist.PrefixStore(f"default_pg/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=store, rank=rank,
                                world_size=world_size, timeout=timeout, device_id=device if use_cuda else None)
    return RunEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if one was started (call from a ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch with ``seed + rank`` so ranks draw different dropout masks."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def check_schedule_flags(args: Any, world_size: int) -> None:
    """The training flags every fine-tuning and distillation script checks alike: batch arithmetic, a positive
    ``--learning_rate``, positive ``--num_train_epochs`` unless ``--max_steps`` sets the length, and
    ``--warmup_proportion`` in [0, 1)."""
    check_batch_arithmetic(args.train_batch_size, args.gradient_accumulation_steps, world_size)
    check_positive_finite(learning_rate=args.learning_rate)
    if args.max_steps <= 0:
        check_positive_finite(num_train_epochs=args.num_train_epochs)
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")


def check_batch_arithmetic(train_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """Return the micro-batch of a per-rank batch split over accumulation steps, or fail with the numbers.

    As in the reference, ``train_batch_size`` is per rank *before* accumulation, so the global batch is
    ``train_batch_size * world_size`` and each micro-step sees ``train_batch_size // gradient_accumulation_steps``.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if train_batch_size < 1:
        raise ValueError(f"--train_batch_size must be a positive number of sequences, got {train_batch_size}")
    if train_batch_size % gradient_accumulation_steps:
        raise ValueError(
            f"--train_batch_size {train_batch_size} is not divisible by --gradient_accumulation_steps "
            f"{gradient_accumulation_steps}: the micro-batch must be a whole number "
            f"(global batch = micro-batch x {world_size} ranks x {gradient_accumulation_steps} accumulation steps)")
    return train_batch_size // gradient_accumulation_steps


def check_positive_finite(**flags: float) -> None:
    """Raise ValueError naming the flag (``learning_rate=...`` is ``--learning_rate``) when a value is NaN,
    infinite or not above zero: one NaN learning rate would otherwise be applied and saved."""
    for name, value in flags.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")


def step_count(text: str) -> int:
    """argparse type of step counts the reference parses as float (``--max_steps 1e3``): a whole number, never
    NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of steps")
    return int(value)


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


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight oneDNN laid out once for its CPU matmul kernel.

    It calls ``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU freezing pass emits. The packed
    weight is opaque: no gradient, no state-dict entries, no ``.to()``. A ``LinearActivation``'s activation follows.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.act = getattr(linear, "act", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return y if self.act is None else self.act(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module, rows_hint: int = 384) -> int:
    """Swap every fp32 CPU ``nn.Linear`` of an eval-mode model for a `PackedLinear`; return how many were swapped.

    CPU inference only. oneDNN on prepacked weights is a few percent faster than MKL's sgemm where MKL takes its
    AVX-512 path, and much faster where it does not (benchmarks/RESULTS.md, "Serving"). ``rows_hint`` (rows per
    matmul, batch x sequence) picks the packing. Returns 0, changing nothing, off x86 (where it was not measured) or
    where PyTorch was built without oneDNN.
    """
    if model.training:
        raise ValueError("prepack_linears is for inference: call model.eval() first")
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" \
                    and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, rows_hint))
                count += 1
    return count


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


def wrap_model(model: nn.Module, env: RunEnv, compile: bool = False, allreduce_fp16: bool = False,
               cuda_graphs: bool = False) -> nn.Module:
    """Move to the device, optionally ``torch.compile``, and wrap in DDP when there is more than one rank.

    ``cuda_graphs`` (the reference's ``--cuda_graphs``) compiles with ``mode="reduce-overhead"``, which replays
    the compiled step as CUDA graphs; it needs a CUDA device. ``allreduce_fp16`` registers DDP's fp16 compression
    hook: gradients travel as fp16 and are averaged there, the reference's ``--allreduce_post_accumulation_fp16``.
    """
    if cuda_graphs and env.device.type != "cuda":
        raise ValueError(f"--cuda_graphs needs a CUDA device; this run is on {env.device.type}")
    model = model.to(env.device)
    if compile or cuda_graphs:
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
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


class ShuffledBatches:
    """Endless micro-batches of this rank's share of ``num_items`` examples, epoch after epoch (a ``BatchSource``).

    Epoch e is a permutation seeded by ``seed + e`` (the same on every rank), wrapped around to a multiple of the
    world size and dealt out rank by rank, like ``DistributedSampler``; ``make_batch(indices)`` builds each batch.
    ``epoch`` counts the finished passes.
    """

    def __init__(self, num_items: int, micro_batch: int, seed: int, make_batch: Callable[[torch.Tensor], Batch],
                 rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.micro_batch, self.seed, self.make_batch = num_items, micro_batch, seed, make_batch
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def batches(self) -> Iterator[Batch]:
        per_rank = math.ceil(self.num_items / self.world_size)
        while True:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.repeat(math.ceil(per_rank * self.world_size / self.num_items))[:per_rank * self.world_size]
            shard = order[self.rank::self.world_size]
            for first in range(0, per_rank, self.micro_batch):
                yield self.make_batch(shard[first:first + self.micro_batch])
            self.epoch += 1


class IteratorBatches:
    """A ``BatchSource`` over batches made elsewhere (benchmarks, tests): they all count as epoch 0."""

    epoch = 0

    def __init__(self, batches: Iterable[Batch]) -> None:
        self._batches = iter(batches)

    def batches(self) -> Iterator[Batch]:
        return self._batches


def move_to_device(batch: Batch, device: torch.device) -> Batch:
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
    """Writes dllogger's ``DLLL {json}`` lines (one per record, flushed at once, so a killed run keeps its log).

    With ``append`` (how ``setup_logger`` opens it) a resumed run, or phase 2 with the same file, adds to the log
    after a ``run_start`` METADATA record instead of truncating it.
    """

    def __init__(self, verbosity: int, filename: PathLike, append: bool = False) -> None:
        self.verbosity = verbosity
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(filename, "a" if append else "w", encoding="utf-8")
        self._start = time.time()
        if append:
            self.metadata(self._start, 0.0, "run_start", {"argv": sys.argv, "pid": os.getpid()})

    def _write(self, record: dict) -> None:
        now = time.time()
        head = {"timestamp": str(now), "datetime": str(_dt.datetime.now(_dt.timezone.utc).astimezone()),
                "elapsedtime": str(now - self._start)}
        self._file.write("DLLL " + json.dumps({**head, **record}, default=str) + "\n")
        self._file.flush()

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


def tensorboard_tag(key: str) -> str:
    """The namespaced TensorBoard tag of a dllogger metric: ``loss/average_loss``, ``optimizer/learning_rate``,
    ``throughput/sequences_per_second``, ``memory/peak_memory_gib``, ``time/e2e_train_time``, ``eval/F1``, ..."""
    if key in ("learning_rate", "grad_norm", "skipped_steps", "loss_scale"):
        group = "optimizer"
    elif "loss" in key:
        group = "loss"
    elif key in ("tflops", "mfu", "data_time_fraction") or "per_second" in key or "throughput" in key:
        group = "throughput"
    elif "memory" in key:
        group = "memory"
    elif "time" in key or "latency" in key:
        group = "time"
    else:
        group = "eval"
    return f"{group}/" + re.sub(r"[^A-Za-z0-9_.\-]+", "_", key).strip("_")


class TensorBoardBackend:
    """Writes the numbers of each dllogger record as TensorBoard scalars (same ``log``/``metadata``/``flush``
    interface as the other backends), under namespaced tags (``tensorboard_tag``).

    Training records (step ``(epoch, step)``) are written at global step ``step_offset + step`` (phase 2 passes
    ``--phase1_end_step`` so that it continues phase 1's curves, as its checkpoints are numbered); the run's final
    record (step ``()``) at the last step written. Strings (``mfu`` "n/a" on a CPU) and ``PARAMETER`` records are
    not scalars, except the resolved config, kept as text. Needs the ``tensorboard`` package.
    """

    def __init__(self, verbosity: int, log_dir: PathLike, step_offset: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module raises it when the tensorboard package is missing
            raise ValueError(f"--tensorboard {log_dir} needs the tensorboard package, which is not installed: "
                             "pip install tensorboard (or leave out --tensorboard)") from None
        self.verbosity = verbosity
        self.step_offset = step_offset
        self.last_step = step_offset
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, timestamp: float, elapsedtime: float, step: Any, data: dict) -> None:
        if step == "PARAMETER":
            if "Config" in data:
                config = data["Config"][0] if isinstance(data["Config"], list) else data["Config"]
                self.writer.add_text("config", f"```\n{config}\n```", global_step=self.last_step)
            return
        if isinstance(step, (tuple, list)) and len(step) >= 2 and isinstance(step[1], int):
            self.last_step = self.step_offset + step[1]
        elif not (isinstance(step, (tuple, list)) and len(step) == 0):
            return
        # NVIDIA's dllogger passes a datetime, this module's Logger seconds since the epoch
        walltime = timestamp.timestamp() if isinstance(timestamp, _dt.datetime) else timestamp
        for key, value in data.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tensorboard_tag(key), value, global_step=self.last_step, walltime=walltime)

    def metadata(self, timestamp: float, elapsedtime: float, metric: str, metadata: dict) -> None:
        pass  # units live in the tags' documentation; TensorBoard has nowhere to show them

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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


def setup_logger(json_path: PathLike | None, enabled: bool | None = None, tensorboard_dir: PathLike | None = None,
                 tensorboard_step_offset: int = 0) -> Any:
    """Rank 0 logs to the ``--json-summary`` file, stdout and (with ``tensorboard_dir``) TensorBoard; other ranks
    get a logger with no backends.

    When NVIDIA's ``dllogger`` package is installed it is used (same records, same format); otherwise this
    module's compatible implementation is. The TensorBoard backend is this module's in both cases.
    """
    enabled = is_main_process() if enabled is None else enabled
    try:
        import dllogger  # type: ignore[import-not-found]
    except ImportError:
        dllogger = None
    tensorboard = [TensorBoardBackend(Verbosity.VERBOSE, tensorboard_dir, tensorboard_step_offset)] \
        if enabled and tensorboard_dir else []
    if dllogger is not None:
        backends = []
        if enabled:
            if json_path:
                backends.append(dllogger.JSONStreamBackend(dllogger.Verbosity.VERBOSE, str(json_path), append=True))
            backends.append(dllogger.StdOutBackend(dllogger.Verbosity.VERBOSE, step_format=format_step))
        return dllogger.Logger(backends + tensorboard)
    backends = []
    if enabled:
        if json_path:
            backends.append(JSONStreamBackend(Verbosity.VERBOSE, json_path, append=True))
        backends.append(StdOutBackend(Verbosity.VERBOSE))
    return Logger(backends + tensorboard)


def close_logger(dllog: Any) -> None:
    """Flush the logger and close the backends that hold a writer (TensorBoard's)."""
    dllog.flush()
    for backend in getattr(dllog, "backends", []):
        if isinstance(backend, TensorBoardBackend):
            backend.close()


def log_config(dllog: Any, args: Any) -> None:
    """Record the resolved run configuration once, as the reference's ``PARAMETER`` records."""
    config = vars(args) if not isinstance(args, dict) else args
    dllog.log(step="PARAMETER", data={"Config": [json.dumps(config, default=str, sort_keys=True)]})


def progress_bar(iterable: Iterable | None = None, total: int | None = None, disable: bool = False,
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


def peak_flops(device: torch.device, precision: Precision) -> float | None:
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
# The training loop: micro-batch accumulation, the optimizer step and the metrics, composed in ``train_loop``
# ----------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm stayed NaN/inf for too many consecutive steps; none of them updated the weights."""


class BatchSource(Protocol):
    """What the loop draws micro-batches from: endless ``batches()`` and the ``epoch`` they are in."""

    epoch: int

    def batches(self) -> Iterator[Batch]: ...


@dataclass
class TrainState:
    """Counters that make a run resumable; all plain values so they load with ``weights_only=True``."""

    step: int = 0  # optimizer steps taken (skipped steps don't count, as in the reference)
    skipped_steps: int = 0
    sequences: int = 0  # sequences trained on, summed over ranks

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in self.state_dict():
            if name in state:
                setattr(self, name, int(state[name]))


@dataclass
class TrainParts:
    """What one training run steps: the (wrapped) model, its loss, optimizer, schedule and loss scaler."""

    model: nn.Module
    loss_fn: LossFn  # (model, micro-batch on the device) -> scalar loss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    flops_per_batch: Callable[[Batch], float] | None = None  # training FLOPs of one micro-batch, for TFLOPs/MFU


@dataclass
class LoopConfig:
    """How ``train_loop`` steps; each entry script fills it from its flags (``from_args``)."""

    max_steps: int  # stop when ``state.step`` reaches this
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # clip to this total norm; None when the optimizer clips itself (LAMB)
    log_freq: int = 1  # one log record every N optimizer steps
    progress: bool = True  # a tqdm bar on rank 0
    allreduce_post_accumulation: bool = True  # DDP all-reduces only in the last micro-batch's backward
    timing_warmup_steps: int = 1  # steps left out of the final throughput
    max_consecutive_skips: int = 50  # non-finite steps in a row before NonFiniteLossError

    @classmethod
    def from_args(cls, args: Any, max_steps: int, **overrides: Any) -> LoopConfig:
        """The settings every entry script names alike: accumulation, log frequency, progress bar, all-reduce."""
        return cls(max_steps=max_steps, gradient_accumulation_steps=args.gradient_accumulation_steps,
                   log_freq=args.log_freq, progress=not args.disable_progress_bar,
                   allreduce_post_accumulation=getattr(args, "allreduce_post_accumulation", True), **overrides)


@dataclass
class TrainResult:
    """What a call of ``train_loop`` did; the throughput figures leave the warm-up steps out."""

    final_loss: float  # data-parallel mean loss of the last applied step
    mean_loss: float  # mean over the applied steps of this call
    steps: int
    train_time: float
    sequences_per_second: float
    stopped_early: bool = False


def forward_backward(model: nn.Module, micro_batches: list[Batch], loss_fn: LossFn, scaler: torch.amp.GradScaler,
                     precision: Precision, device: torch.device, allreduce_post_accumulation: bool) -> torch.Tensor:
    """Accumulate the gradients of the mean loss over ``micro_batches``; return that mean loss (detached).

    Each forward runs under the precision context and each backward through the scaler. Under DDP with
    ``allreduce_post_accumulation`` the gradients are all-reduced once, in the last backward (``no_sync``).
    """
    count = len(micro_batches)
    skip_sync = isinstance(model, nn.parallel.DistributedDataParallel) and allreduce_post_accumulation
    mean_loss = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        batch = move_to_device(batch, device)
        with model.no_sync() if skip_sync and index < count - 1 else contextlib.nullcontext():
            with autocast(precision, device):
                loss = loss_fn(model, batch)
            scaler.scale(loss / count).backward()
        mean_loss += loss.detach().float() / count
    return mean_loss


@dataclass
class StepOutcome:
    """Whether ``optimizer_step`` applied the update, and the total gradient norm it measured (before clipping)."""

    applied: bool
    grad_norm: torch.Tensor


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters: list[torch.Tensor],
                   max_grad_norm: float | None, loss: torch.Tensor) -> StepOutcome:
    """Unscale, measure the total gradient norm, clip, then step only if the loss and the norm are finite.

    The norm is measured whatever the optimizer (LAMB clips inside itself, so ``max_grad_norm`` is None for it), so
    a NaN/inf gradient with a finite loss is skipped in fp32 and bf16 too; an optimizer that clips by the global
    norm itself (``takes_grad_norm``: LAMB) gets this one instead of measuring it again. With fp16 the scaler makes
    that call (and backs the scale off). Gradients are zeroed either way.
    """
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if max_grad_norm:
        nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, grad_norm)
    step_kwargs = {"grad_norm": grad_norm} if getattr(optimizer, "takes_grad_norm", False) else {}
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer, **step_kwargs)  # skips the update itself when unscale_ found inf/NaN gradients
        scaler.update()
        applied = scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped
    else:
        applied = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if applied:
            optimizer.step(**step_kwargs)
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(applied, grad_norm)


@dataclass
class _Meter:
    """Sequences, FLOPs and seconds accumulated over some steps."""

    sequences: int = 0
    flops: float = 0.0
    time: float = 0.0
    data_time: float = 0.0

    def rate(self) -> float:
        return self.sequences / self.time if self.time > 0 else 0.0


class Metrics:
    """Owns a run's meters: throughput since the last log record, over the call (minus warm-up), and the loss sum.

    ``record`` builds the log record (the one place ``.item()`` syncs the device) and resets the window.
    """

    def __init__(self, run_env: RunEnv, precision: Precision, flops_per_batch: Callable[[Batch], float] | None,
                 timing_warmup_steps: int = 1) -> None:
        self.device, self.world_size = run_env.device, run_env.world_size
        self.peak = peak_flops(run_env.device, precision)
        self.flops_per_batch = flops_per_batch
        self.timing_warmup_steps = timing_warmup_steps
        self.window, self.timed, self.total = _Meter(), _Meter(), _Meter()
        self.steps = 0
        self.loss_sum = torch.zeros((), device=run_env.device)
        self.last_loss: torch.Tensor | None = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add_data_time(self, seconds: float) -> None:
        self.window.data_time += seconds

    def add_step(self, micro_batches: list[Batch], seconds: float, loss: torch.Tensor) -> int:
        """Count one applied step; returns the sequences it trained on, summed over ranks."""
        sequences = sum(int(next(iter(batch.values())).shape[0]) for batch in micro_batches) * self.world_size
        flops = sum(map(self.flops_per_batch, micro_batches)) * self.world_size if self.flops_per_batch else 0.0
        self.steps += 1
        meters = (self.window, self.total, self.timed) if self.steps > self.timing_warmup_steps else (
            self.window, self.total)
        for meter in meters:
            meter.sequences += sequences
            meter.flops += flops
            meter.time += seconds
        self.loss_sum += loss
        self.last_loss = loss
        return sequences

    def record(self, loss: torch.Tensor, learning_rate: float, grad_norm: torch.Tensor,
               skipped_steps: int) -> dict[str, Any]:
        """The log record of the steps since the previous one; resets the window and the peak-memory counter."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        window, self.window = self.window, _Meter()
        record: dict[str, Any] = {
            "average_loss": loss.item(), "learning_rate": learning_rate, "grad_norm": grad_norm.item(),
            "skipped_steps": skipped_steps, "sequences_per_second": window.rate(),
            "data_time_fraction": window.data_time / max(window.time, 1e-9),
        }
        if self.flops_per_batch is not None:
            achieved = window.flops / max(window.time, 1e-9)
            record["tflops"] = achieved / 1e12
            record["mfu"] = achieved / self.peak if self.peak else "n/a"
        record["peak_memory_gib"] = peak_memory_gib(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return record

    def result(self, stopped_early: bool = False) -> TrainResult:
        figures = self.timed if self.timed.time > 0 else self.total  # too few steps to leave warm-up out
        return TrainResult(final_loss=self.last_loss.item() if self.last_loss is not None else float("nan"),
                           mean_loss=self.loss_sum.item() / self.steps if self.steps else float("nan"),
                           steps=self.steps, train_time=figures.time, sequences_per_second=figures.rate(),
                           stopped_early=stopped_early)


def train_loop(run: Run, parts: TrainParts, data: BatchSource, loop: LoopConfig, state: TrainState | None = None,
               on_step: Callable[[TrainState], bool] | None = None) -> TrainResult:
    """Take optimizer steps until ``state.step == loop.max_steps`` (or the data ends, or ``on_step`` says stop).

    A step is ``gradient_accumulation_steps`` micro-batches through ``forward_backward``, the data-parallel mean
    loss, then ``optimizer_step``; an applied step advances the schedule and the state. A skipped (non-finite) step
    advances nothing; ``max_consecutive_skips`` of them in a row raise ``NonFiniteLossError``. ``on_step(state)``
    runs after each applied step (checkpoints, preemption) and returns True to stop.
    """
    state = state or TrainState()
    metrics = Metrics(run.env, run.precision, parts.flops_per_batch, loop.timing_warmup_steps)
    parameters = [p for p in unwrap_model(parts.model).parameters() if p.requires_grad]
    batches, skipped_in_a_row = data.batches(), 0
    parts.model.train()
    with progress_bar(total=loop.max_steps, initial=state.step, disable=not loop.progress, desc="train") as bar:
        while state.step < loop.max_steps:
            tic = time.perf_counter()
            micro_batches = list(islice(batches, loop.gradient_accumulation_steps))
            if len(micro_batches) < loop.gradient_accumulation_steps:
                break  # data exhausted; a partial accumulation would be a step with a different batch size
            metrics.add_data_time(time.perf_counter() - tic)
            loss = forward_backward(parts.model, micro_batches, parts.loss_fn, parts.scaler, run.precision,
                                    run.device, loop.allreduce_post_accumulation)
            loss = all_reduce_mean(loss)
            outcome = optimizer_step(parts.optimizer, parts.scaler, parameters, loop.max_grad_norm, loss)
            if not outcome.applied:
                state.skipped_steps += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= loop.max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"loss or gradients were NaN/inf for {skipped_in_a_row} consecutive steps after step "
                        f"{state.step} (last loss {loss.item()}, gradient norm {outcome.grad_norm.item()}); "
                        "stopping. Those steps applied no update and wrote no checkpoint. Lower the learning rate "
                        "or check the data.")
                skipped = {"skipped_steps": state.skipped_steps}
                if parts.scaler.is_enabled():
                    skipped["loss_scale"] = parts.scaler.get_scale()
                run.dllog.log(step="PARAMETER", data=skipped)
                continue
            skipped_in_a_row = 0
            parts.scheduler.step()
            state.step += 1
            state.sequences += metrics.add_step(micro_batches, time.perf_counter() - tic, loss)
            bar.update(1)
            if state.step % loop.log_freq == 0 or state.step == loop.max_steps:
                record = metrics.record(loss, parts.optimizer.param_groups[0]["lr"], outcome.grad_norm,
                                        state.skipped_steps)
                run.dllog.log(step=(data.epoch, state.step), data=record)
                bar.set_postfix(loss=f"{record['average_loss']:.4f}")
            if on_step is not None and on_step(state):
                return metrics.result(stopped_early=True)
    return metrics.result()


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


def gather_rng_states() -> list[dict[str, Any]]:
    """``rng_state()`` of every rank, in rank order (a collective: every rank must call it)."""
    if get_world_size() == 1:
        return [rng_state()]
    states: list[Any] = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(checkpoint: dict[str, Any], rank: int, world_size: int) -> None:
    """Give this rank the RNG state it saved (``rng_per_rank``), so dropout after a resume is what it would have
    been; a checkpoint without per-rank states (or from another world size) restores rank 0's everywhere."""
    per_rank = checkpoint.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
        return
    if world_size > 1:
        log.warning("the checkpoint holds no RNG state per rank for %d ranks; every rank continues from rank 0's",
                    world_size)
    set_rng_state(checkpoint["rng"])


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
    """Owns ``ckpt_<step>.pt`` files in one folder: atomic saves, keep the newest N, find the newest loadable one.

    Files are written to a hidden temporary name and renamed, so any ``ckpt_<step>.pt`` present is complete and
    a run killed mid-write leaves the previous checkpoints untouched. Pruning deletes only checkpoints numbered
    above ``first_step`` (phase 2 passes phase 1's last step, so phase 1's checkpoints stay), never a
    ``protect``-ed one (the checkpoint a phase started from) and never the file just written.
    """

    pattern = re.compile(r"^ckpt_(\d+)\.pt$")

    def __init__(self, directory: PathLike, keep: int = 3, dllog: Any = None, first_step: int = 0) -> None:
        if keep < 1:
            raise ValueError(f"--keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.dllog = dllog or Logger()
        self.first_step = first_step
        self.protected: set[Path] = set()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.pattern.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def newest_loadable(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, and its content; unreadable newer ones are skipped with a warning.

        Returns None for a folder without checkpoints; raises CheckpointError when none of them loads.
        """
        found = self.checkpoints()
        for _, path in reversed(found):
            try:
                return path, self.load(path)
            except CheckpointError as exc:
                log.warning("skipping %s, which cannot be loaded (%s); trying the one before it", path.name, exc)
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {self.directory} can be loaded; "
                                  "start afresh in another folder, or repair one and pick it with --resume_step")
        return None

    def step_of(self, path: PathLike) -> int | None:
        """The step in a ``ckpt_<step>.pt`` file name, or None for another name."""
        match = self.pattern.match(Path(path).name)
        return int(match.group(1)) if match else None

    def protect(self, path: PathLike) -> None:
        """Never prune ``path`` (the checkpoint this phase started from)."""
        self.protected.add(Path(path).resolve())

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of saves that a killed run left (call on rank 0 before the first save)."""
        return remove_stale_temp_files(self.directory, "ckpt_*.pt")

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt_{step}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as ``ckpt_<step>.pt`` atomically, then prune this phase's files to the newest ``keep``.

        Refuses (NonFiniteLossError) weights holding NaN/inf; a failed write (a full disk) is a CheckpointError
        naming the file and the free space, and leaves the earlier checkpoints as they were.
        """
        path = self.path_for(step)
        check_finite_weights(state.get("model", {}), str(path))
        start = time.perf_counter()
        try:
            save_checkpoint(state, path)
        except (OSError, RuntimeError) as exc:
            free = shutil.disk_usage(self.directory).free / 2**30 if self.directory.is_dir() else float("nan")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"could not write {path} ({free:.2f} GiB free there): {reason}; the earlier "
                                  "checkpoints are kept") from exc
        ours = [p for s, p in self.checkpoints() if s > self.first_step and p.resolve() not in self.protected]
        for old in ours[:-self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        self.dllog.log(step="PARAMETER", data={"checkpoint_step": step,
                                               "checkpoint_save_seconds": time.perf_counter() - start})
        return path

    def load(self, path: PathLike) -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True``; errors name the file."""
        start = time.perf_counter()
        state = load_checkpoint(path)
        self.dllog.log(step="PARAMETER", data={"checkpoint_loaded": str(path),
                                               "checkpoint_load_seconds": time.perf_counter() - start})
        return state


def check_finite_weights(state_dict: dict[str, Any], what: str) -> None:
    """Raise NonFiniteLossError naming ``what`` when a floating-point tensor holds NaN or inf: never save those."""
    bad = [key for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteLossError(f"not writing {what}: {len(bad)} weight tensors hold NaN/inf (e.g. "
                                 f"{', '.join(bad[:3])}); the earlier files are kept")


class StepProfiler:
    """A ``torch.profiler`` trace of ``steps`` optimizer steps after step ``start`` (``--profile``), written per rank
    as a Chrome trace (``trace_rank<r>.json``, open in Perfetto or chrome://tracing) into ``folder``.

    ``on_step`` is a ``train_loop`` hook; call ``close`` after the loop (it writes a trace cut short by the end).
    """

    def __init__(self, folder: PathLike, start: int, run_env: RunEnv, steps: int = 5) -> None:
        self.path = Path(folder) / f"trace_rank{run_env.rank}.json"
        self.start, self.steps = start, steps
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if run_env.device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler: Any = None
        self.stop_at = 0
        if start <= 0:
            self._begin(0)

    def _begin(self, step: int) -> None:
        self.profiler = torch.profiler.profile(activities=self.activities)
        self.profiler.start()
        self.stop_at = step + self.steps

    def on_step(self, state: TrainState) -> bool:
        if self.profiler is None and self.stop_at == 0 and state.step >= self.start:
            self._begin(state.step)
        elif self.profiler is not None and state.step >= self.stop_at:
            self.close()
        return False

    def close(self) -> None:
        """Stop and write the trace, if one is being recorded."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            self.profiler.export_chrome_trace(str(tmp))
        log.info("wrote a profiler trace of %d steps to %s", self.steps, self.path)
        self.profiler = None


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


class Checkpointer:
    """When a training run saves: every ``interval`` steps, once at the end, and at once on SIGTERM (preemption).

    ``state_fn(train_state)`` returns what to save; the checkpointer adds every rank's RNG state (``rng`` is rank
    0's, as the reference; ``rng_per_rank`` all of them). Files are numbered ``step_offset + step`` (phase 2
    continues phase 1's numbering). ``on_step`` is ``train_loop``'s hook; call ``finish`` after the loop and
    ``close`` in a ``finally`` (it restores the signal handlers).
    """

    def __init__(self, run: Run, manager: CheckpointManager, state_fn: Callable[[TrainState], dict[str, Any]],
                 interval: int, step_offset: int = 0, enabled: bool = True) -> None:
        self.run, self.manager, self.state_fn = run, manager, state_fn
        self.interval, self.step_offset, self.enabled = interval, step_offset, enabled
        self.saved_step: int | None = None
        self.preemption = PreemptionFlag()

    def save(self, state: TrainState) -> None:
        """Rank 0 writes ``ckpt_<step_offset + step>.pt``; every rank waits for it."""
        if not self.enabled or self.saved_step == state.step:
            return
        rng = gather_rng_states()
        if self.run.is_main:
            self.run.synchronize()
            self.manager.save(self.step_offset + state.step,
                              {**self.state_fn(state), "rng": rng[0], "rng_per_rank": rng})
        barrier()
        self.saved_step = state.step

    def on_step(self, state: TrainState) -> bool:
        """Save on the interval; on a SIGTERM seen by any rank, save and ask the loop to stop."""
        if self.preemption.any_rank(self.run.env):
            self.save(state)
            self.run.dllog.log(step="PARAMETER", data={"preempted_at_step": self.step_offset + state.step})
            return True
        if state.step % self.interval == 0:
            self.save(state)
        return False

    def finish(self, state: TrainState) -> None:
        """The final checkpoint of a run that took at least one step (none if this step is saved already)."""
        if state.step > 0:
            self.save(state)

    def close(self) -> None:
        self.preemption.restore()


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning helpers: epochs to steps, and a rank-aware cache of tokenized features
# ----------------------------------------------------------------------------------------------------------------


def steps_per_epochs(num_examples: int, micro_batch: int, world_size: int, gradient_accumulation_steps: int,
                     epochs: float) -> int:
    """Optimizer steps in ``epochs`` passes over ``num_examples``: each rank runs ceil(ceil(N / ranks) / micro)
    micro-batches per pass (``ShuffledBatches``), and every ``gradient_accumulation_steps`` of them make a step."""
    micro_batches = math.ceil(math.ceil(num_examples / world_size) / micro_batch)
    return max(1, int(micro_batches * epochs) // gradient_accumulation_steps)


def cached_features(path: Path | None, key: str, build: Callable[[], dict[str, Any]],
                    run_env: RunEnv) -> dict[str, Any]:
    """Tokenized features from the cache file ``path`` when its ``key`` matches, else ``build()`` them (and cache).

    The cache holds tensors, strings and numbers only (written atomically, read with ``weights_only=True``); a
    cache with another key, or unreadable, is rebuilt. Rank 0 reads or builds it first and the other ranks read it
    after a barrier. Failing to write it (a read-only data folder) is a warning, not an error. ``path`` None: no
    cache.
    """
    def read() -> dict[str, Any] | None:
        if path is None or not path.is_file():
            return None
        try:
            stored = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("ignoring unreadable features cache: %s", exc)
            return None
        if not isinstance(stored, dict) or stored.get("key") != key:
            log.warning("features cache %s was made with other settings or files; rebuilding it", path)
            return None
        return stored["features"]

    features = read() if run_env.is_main else None
    if run_env.is_main and features is None:
        features = build()
        if path is not None:
            try:
                remove_stale_temp_files(path.parent, path.name)
                save_checkpoint({"key": key, "features": features}, path)
            except OSError as exc:
                log.warning("could not write the features cache %s (%s); continuing without it", path, exc)
    barrier()
    if not run_env.is_main:
        features = read() or build()
    return features


def save_finetuned(run: Run, model: nn.Module, output_dir: PathLike, skip: bool = False) -> None:
    """Write the fine-tuned model (``config.json`` + ``pytorch_model.bin``) from rank 0, unless ``skip``."""
    if run.is_main and not skip:
        check_finite_weights(unwrap_model(model).state_dict(), f"the fine-tuned model in {output_dir}")
        unwrap_model(model).save_pretrained(output_dir)
    barrier()


# ----------------------------------------------------------------------------------------------------------------
# The run scaffold: what every entry script does around its own work
# ----------------------------------------------------------------------------------------------------------------

# Errors that mean "bad flags, files or data": one line on stderr and exit status 1, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError)


@dataclass
class Run:
    """One process of a job, as ``run_job`` set it up: where it runs, in which precision, and its dllogger."""

    env: RunEnv
    precision: Precision
    dllog: Any

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.env.device)

    def synchronize(self) -> None:
        """Wait for queued GPU work (before timing or saving); nothing on CPU."""
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def grad_scaler(self, args: Any) -> torch.amp.GradScaler:
        """The loss scaler of ``--fp16`` runs (disabled otherwise), by one policy for every script: ``--loss_scale``
        S > 0 starts at S and never grows; 0 is dynamic from ``--init_loss_scale`` (pre-training, 2**20) or 2**16."""
        return make_grad_scaler(self.precision, self.env.device,
                                init_scale=args.loss_scale or getattr(args, "init_loss_scale", 2.0**16),
                                static=args.loss_scale > 0)


def configure_logging(is_main: bool) -> None:
    """Python logging, once per process: INFO on rank 0 (optimizer groups, load reports, shard summaries), WARNING
    on the other ranks so each message appears once."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if is_main else logging.WARNING)


def add_run_flags(group: argparse._ActionsContainer, json_summary: str | None = None,
                  tensorboard: bool | str = True) -> None:
    """The flags `run_job` reads: ``--local_rank`` (torch.distributed.launch), ``--json-summary`` (default
    ``json_summary``; None means <output_dir>/dllogger.json) and, unless ``tensorboard`` is False, ``--tensorboard``
    (a string adds a note to its help)."""
    group.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                       help="Set by torch.distributed.launch; torchrun's LOCAL_RANK variable takes precedence.")
    group.add_argument("--json-summary", dest="json_summary", default=json_summary,
                       help="dllogger JSON-lines file written by rank 0" + (
                           "." if json_summary else " (default: <output_dir>/dllogger.json)."))
    if tensorboard:
        note = f"; {tensorboard}" if isinstance(tensorboard, str) else ""
        group.add_argument("--tensorboard", default=None, metavar="DIR",
                           help="Also write the logged scalars as TensorBoard events to DIR (rank 0; needs the "
                                f"tensorboard package){note}.")


def add_precision_flags(group: argparse._ActionsContainer, loss_scale_help: str | None = None) -> None:
    """The precision flags every training script shares: ``--fp16``/``--amp``, ``--bf16`` and ``--loss_scale``."""
    group.add_argument("--fp16", "--amp", dest="fp16", action="store_true",
                       help="fp16 autocast with dynamic loss scaling (CUDA only).")
    group.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU or CPU); no loss scaling needed.")
    group.add_argument("--loss_scale", type=float, default=0.0,
                       help=loss_scale_help or "With --fp16: 0 = dynamic loss scaling; S > 0 = start at S and never "
                                               "grow.")


def check_precision_flags(args: Any, device: torch.device) -> Precision:
    """``--fp16/--amp`` and ``--bf16`` to one precision; ``--loss_scale`` only with ``--fp16``, and not negative."""
    loss_scale = getattr(args, "loss_scale", 0.0)
    if not loss_scale >= 0:
        raise ValueError(f"--loss_scale must be >= 0, got {loss_scale}")
    if loss_scale > 0 and not args.fp16:
        raise ValueError("--loss_scale only applies with --fp16/--amp (bf16 and fp32 need no loss scaling)")
    return resolve_precision(args.fp16, args.bf16, device)


def report_error(script: str, exc: BaseException) -> int:
    """Print ``<script>: error: <message>`` on stderr and return the exit status 1."""
    print(f"{script}: error: {exc}", file=sys.stderr)
    return 1


def run_job(script: str, args: Any, check: Callable[[Any, int], None], body: Callable[[Run], None], *,
            json_summary: PathLike | None, errors: tuple[type[BaseException], ...] = (),
            tensorboard: PathLike | None = None, tensorboard_step_offset: int = 0) -> int:
    """Set up a run, check its flags, run ``body`` and turn user errors into one line and exit status 1.

    In order: ``--local_rank`` to ``LOCAL_RANK`` (torch.distributed.launch), distributed setup, Python logging,
    ``check(args, world_size)`` and the precision flags (before any file is written), the dllogger (rank 0 writes
    ``json_summary``, and TensorBoard events to the folder ``tensorboard`` when given, steps offset by
    ``tensorboard_step_offset``), seeds (``--seed`` + rank) and the resolved config. ``errors`` adds
    script-specific exception types to ``USER_ERRORS``. The dllogger is flushed (and closed) and the process group
    closed in any case.
    """
    if getattr(args, "local_rank", -1) >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    env = setup_distributed(no_cuda=getattr(args, "no_cuda", False))
    configure_logging(env.is_main)
    dllog = Logger()
    try:
        check(args, env.world_size)
        precision = check_precision_flags(args, env.device)
        dllog = setup_logger(json_summary if env.is_main else None, enabled=env.is_main, tensorboard_dir=tensorboard,
                             tensorboard_step_offset=tensorboard_step_offset)
        set_seed(args.seed, env.rank)
        log_config(dllog, args)
        dllog.log(step="PARAMETER", data={"SEED": args.seed, "precision": precision, "world_size": env.world_size,
                                          "device": str(env.device)})
        body(Run(env, precision, dllog))
        return 0
    except USER_ERRORS + errors as exc:
        return report_error(script, exc)
    finally:
        close_logger(dllog)
        cleanup_distributed()
