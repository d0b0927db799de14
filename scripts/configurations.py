#!/usr/bin/env python3
"""Read configurations.yml (multi-node pre-training jobs for run.sub) and print a job's ``sbatch`` line.

    python -m scripts.configurations configurations.yml bert--DGX1_4x8x16x128
    BATCHSIZE=2048 LR=6e-3 GRADIENT_STEPS=128 PHASE=1 sbatch -N4 --ntasks-per-node=8 run.sub
    python -m scripts.configurations configurations.yml bert--DGX1_4x8x4x256 --after 1234   # phase 2 after job 1234
    python -m scripts.configurations configurations.yml                                       # every job

Each job is checked as run_pretraining.py checks it before its first step (``utils.check_batch_arithmetic``):
BATCHSIZE per GPU must split into GRADIENT_STEPS whole micro-batches.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402

REQUIRED = ("NNODES", "BATCHSIZE", "LR", "GRADIENT_STEPS", "PHASE")
OPTIONAL = ("PRECISION",)


@dataclass(frozen=True)
class Job:
    """One multi-node job: its name, the GPUs (run.sub tasks) of each node and the variables run.sub reads."""

    name: str
    gpus_per_node: int
    variables: dict[str, str]

    @property
    def nodes(self) -> int:
        """Nodes of the job (sbatch -N)."""
        return int(self.variables["NNODES"])

    @property
    def world_size(self) -> int:
        """Ranks of the job: one per GPU."""
        return self.nodes * self.gpus_per_node

    @property
    def micro_batch(self) -> int:
        """Sequences per GPU per micro-step (ValueError naming the numbers when they do not divide)."""
        return utils.check_batch_arithmetic(int(self.variables["BATCHSIZE"]), int(self.variables["GRADIENT_STEPS"]),
                                            self.world_size)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all GPUs (run_pretraining.py's --train_batch_size is per GPU)."""
        return int(self.variables["BATCHSIZE"]) * self.world_size


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


def load(path: str | Path) -> dict[str, Job]:
    """The jobs of a configurations file by name (keys starting with "." are templates); ValueError names the
    file, the job and the key at fault."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map job names to jobs")
    jobs = {}
    for name, entry in data.items():
        if str(name).startswith("."):
            continue
        where = f"{path}: {name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("variables"), dict):
            raise ValueError(f"{where} has no 'variables' mapping")
        variables = entry["variables"]
        unknown = sorted(set(variables) - set(REQUIRED) - set(OPTIONAL))
        missing = [key for key in REQUIRED if key not in variables]
        if unknown or missing:
            raise ValueError(f"{where}: variables missing {missing}, unknown {unknown} "
                             f"(run.sub reads {', '.join(REQUIRED + OPTIONAL)})")
        for key in ("NNODES", "BATCHSIZE", "GRADIENT_STEPS"):
            _positive_int(variables[key], f"{where}: {key}")
        if variables["PHASE"] not in (1, 2):
            raise ValueError(f"{where}: PHASE must be 1 or 2, got {variables['PHASE']!r}")
        system = entry.get("system")
        gpus = _positive_int(system.get("gpus_per_node") if isinstance(system, dict) else None,
                             f"{where}: system.gpus_per_node")
        job = Job(str(name), gpus, {key: str(variables[key]) for key in REQUIRED + OPTIONAL if key in variables})
        try:
            job.micro_batch  # noqa: B018  (the check itself)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        jobs[job.name] = job
    return jobs


def sbatch_line(job: Job, after: str | None = None, script: str = "run.sub") -> str:
    """``VAR=value ... sbatch -N<nodes> --ntasks-per-node=<gpus> [--dependency=afterok:<after>] run.sub``."""
    env = " ".join(f"{key}={value}" for key, value in job.variables.items() if key != "NNODES")
    dependency = f" --dependency=afterok:{after}" if after else ""
    return f"{env} sbatch -N{job.nodes} --ntasks-per-node={job.gpus_per_node}{dependency} {script}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="The configurations file (configurations.yml).")
    parser.add_argument("names", nargs="*", help="Jobs to print (default: every job, each after its name).")
    parser.add_argument("--after", help="Job id the printed jobs wait for (sbatch --dependency=afterok:<id>); "
                                        "phase 2 starts from that phase 1 job's last checkpoint.")
    args = parser.parse_args(argv)
    try:
        jobs = load(args.file)
        unknown = [name for name in args.names if name not in jobs]
        if unknown:
            raise ValueError(f"no job {', '.join(unknown)} in {args.file}; jobs: {', '.join(jobs)}")
    except (ValueError, FileNotFoundError) as exc:
        return utils.report_error("configurations", exc)
    for name in args.names or jobs:
        line = sbatch_line(jobs[name], args.after)
        print(line if args.names else f"{name}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
