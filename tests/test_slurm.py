"""run.sub on a real SLURM: a one-node cluster (munged, slurmctld and slurmd from Debian's munge and slurm-wlm,
no cgroups) started here once for the module, then CPU jobs of the tiny config with 2 tasks over gloo: phase 1,
SIGTERM and requeue, phase 2 after a job dependency, and 2 SLURM tasks == 1 task with twice the batch.

.ci/run installs the packages; without them (or without root) the module is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from file_utils import load_checkpoint

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo")
TINY_JOB = {  # the tiny config on the test shards: 2 tasks (GPUS) of batch 4, fp32 on the CPU, no binding tools
    "CONFIG": "tiny", "PRECISION": "fp32", "GPUS": "2", "BATCHSIZE": "4", "GRADIENT_STEPS": "1", "LR": "5e-3",
    "WARMUP_UPDATES": "0.1", "SEQ_LENGTH": "64", "MAX_PREDICTIONS": "10", "NUM_WORKERS": "0", "CONT": "none",
    "RERUN_DASK": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
}
PHASE1_STEPS = 16


def _missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} (Debian packages slurm-wlm and munge, which .ci/run installs)"
    if os.geteuid() != 0:
        return "needs root to start slurmd (it launches the job steps)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A one-node SLURM cluster whose every file is under ``root``; ``env`` is what its client commands need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.pids: dict[str, Path] = {}

    def start(self) -> None:
        munge = self.root / "munge"
        for folder in (munge, self.root / "state", self.root / "spool"):
            folder.mkdir(parents=True, mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "socket"
        self._daemon("munged", ["munged", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={munge}/pid",
                                f"--log-file={munge}/log", f"--seed-file={munge}/seed", "--force"], munge / "pid")
        self.conf.write_text("\n".join([
            "ClusterName=bert", f"SlurmctldHost={self.host}", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd.log",
            # No cgroups: processes are tracked through /proc, tasks are not confined.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1", "KillWait=60",
            "MinJobAge=3600", "SchedulerParameters=sched_interval=1",
            f"NodeName={self.host} CPUs=2 RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE", ""]))
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-i"], self.root / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd", "-f", str(self.conf)], self.root / "slurmd.pid")
        deadline = time.time() + 60
        while self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() not in ("idle", "mix", "alloc"):
            if time.time() > deadline:
                raise RuntimeError(f"the node never came up:\n{self.logs()}")
            time.sleep(0.5)

    def _daemon(self, name: str, argv: list[str], pid_file: Path) -> None:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        deadline = time.time() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            if done.returncode != 0 or time.time() > deadline:
                raise RuntimeError(f"{name} did not start (exit {done.returncode}): {done.stderr}\n{self.logs()}")
            time.sleep(0.1)
        self.pids[name] = pid_file

    def stop(self) -> None:
        """Stop the daemons this cluster started (by their pid files), newest first; SIGKILL after 30 s."""
        for name in reversed(list(self.pids)):
            pid = int(self.pids[name].read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                         for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("munge/log")))

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done

    def sbatch(self, *args: str, **env: str) -> str:
        """Submit run.sub; returns the job id."""
        out = self.root / "job-%j.out"
        return self.run("sbatch", "-N1", "--ntasks-per-node=2", f"--output={out}", "--open-mode=append", *args,
                        "run.sub", **env).stdout.strip().split(";")[0]

    def output(self, job: str) -> str:
        path = self.root / f"job-{job}.out"
        return path.read_text() if path.exists() else ""

    def job(self, job: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job: str, timeout: float = 300) -> dict[str, str]:
        """Wait until ``job`` has ended; returns its scontrol fields."""
        deadline = time.time() + timeout
        while True:
            fields = self.job(job)
            if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            if time.time() > deadline:
                self.run("scancel", job, check=False)
                raise AssertionError(f"job {job} still {fields['JobState']} after {timeout} s:\n"
                                     f"{self.output(job)[-3000:]}\n{self.logs()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def jobs(cluster, pretraining_shards, tmp_path_factory):
    """Phase 1 undisturbed, then phase 2 submitted at once with --dependency=afterok on it (shards made by run.sub
    itself, without MPI), both run to the end: {"phase1": id, "phase2": id, "results": folder}."""
    results = tmp_path_factory.mktemp("results")
    base = {**TINY_JOB, "RESULTS_ROOT": str(results)}
    phase1 = cluster.sbatch(**base, PHASE="1", TRAIN_STEPS=str(PHASE1_STEPS), CHECKPOINT_STEPS="8",
                            DATASETS=str(pretraining_shards["train"].parent), DATA_SUBDIR="train")
    source = tmp_path_factory.mktemp("datasets")
    (source / "wikipedia" / "source" / "en").mkdir(parents=True)
    (source / "wikipedia" / "source" / "en" / "a.txt").write_text(
        (REPO / "data" / "sample" / "source" / "en" / "wikitext2_valid.txt").read_text(encoding="utf-8"))
    phase2 = cluster.sbatch(f"--dependency=afterok:{phase1}", **{
        **base, "PHASE": "2", "TRAIN_STEPS": "3", "PHASE1_END_STEP": str(PHASE1_STEPS), "LR": "1e-3",
        "RERUN_DASK": "true", "PREP_MPI": "none", "DASK_TASKS_PER_NODE": "1", "NUM_SHARDS_PER_WORKER": "1",
        "BIN_SIZE": "none", "DATASETS": str(source)})
    assert cluster.job(phase2)["JobState"] == "PENDING"
    for job in (phase1, phase2):
        fields = cluster.wait(job)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), cluster.output(job)[-4000:]
    return {"phase1": phase1, "phase2": phase2, "results": results}


def _summary(path: Path) -> list[dict]:
    return [json.loads(line[len("DLLL "):]) for line in path.read_text().splitlines() if line.startswith("DLLL ")]


def test_phase1_job_leaves_checkpoints_and_a_dllogger_summary(cluster, jobs):
    out = jobs["results"] / jobs["phase1"]
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_16.pt", "ckpt_8.pt"]
    final = load_checkpoint(out / f"ckpt_{PHASE1_STEPS}.pt")
    assert final["train_state"]["step"] == PHASE1_STEPS and len(final["rng_per_rank"]) == 2
    records = _summary(out / "summary.json")
    assert any(r["data"].get("world_size") == 2 for r in records if r.get("step") == "PARAMETER")
    steps = [r["step"][1] for r in records if r["type"] == "LOG" and isinstance(r.get("step"), list) and r["step"]]
    assert steps == list(range(1, PHASE1_STEPS + 1))
    assert any(r.get("step") == [] and "e2e_train_time" in r["data"] for r in records), records[-1]
    assert "bind.sh:" in cluster.output(jobs["phase1"])  # no numactl / NUMA / IB here: it says what it skips


def test_phase2_after_the_dependency_starts_from_phase1s_last_checkpoint(cluster, jobs):
    phase1_ckpt = jobs["results"] / jobs["phase1"] / f"ckpt_{PHASE1_STEPS}.pt"
    out = jobs["results"] / jobs["phase2"]
    assert (out / "init_checkpoint.txt").read_text().strip() == str(phase1_ckpt)
    loaded = [r["data"]["checkpoint_loaded"] for r in _summary(out / "summary.json")
              if "checkpoint_loaded" in r.get("data", {})]
    assert loaded == [str(phase1_ckpt)]
    final = load_checkpoint(out / f"ckpt_{PHASE1_STEPS + 3}.pt")
    assert final["phase"] == 2 and final["train_state"]["step"] == 3
    assert (out / "shards" / "phase2" / "unbinned" / "parquet" / ".num_samples.json").is_file()
    assert "preprocessing" in cluster.output(jobs["phase2"])


def test_sigterm_checkpoints_and_the_requeued_job_ends_like_the_undisturbed_one(cluster, jobs, pretraining_shards):
    job = cluster.sbatch(**TINY_JOB, RESULTS_ROOT=str(jobs["results"]), PHASE="1", TRAIN_STEPS=str(PHASE1_STEPS),
                         CHECKPOINT_STEPS="100", DATASETS=str(pretraining_shards["train"].parent), DATA_SUBDIR="train")
    deadline = time.time() + 300
    while "Training Iteration: 2 " not in cluster.output(job):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            cluster.output(job)[-3000:]
        time.sleep(0.2)
    cluster.run("scancel", "--signal=TERM", job)
    fields = cluster.wait(job)
    log = cluster.output(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    out = jobs["results"] / job
    saved = list(out.glob("ckpt_*.pt"))
    assert len(saved) == 1 and "preempted_at_step" in log, log[-4000:]
    step = load_checkpoint(saved[0])["train_state"]["step"]
    assert 2 <= step < PHASE1_STEPS and saved[0].name == f"ckpt_{step}.pt"

    cluster.run("scontrol", "requeue", job)
    # SLURM holds a requeued job back for two minutes (its begin time); a cluster's admin would not wait here either.
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    fields = cluster.wait(job)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        cluster.output(job)[-4000:]
    assert "resuming from the newest checkpoint" in cluster.output(job)
    expected = load_checkpoint(jobs["results"] / jobs["phase1"] / f"ckpt_{PHASE1_STEPS}.pt")["model"]
    final = load_checkpoint(out / f"ckpt_{PHASE1_STEPS}.pt")["model"]
    for key, tensor in expected.items():
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_two_slurm_tasks_equal_one_task_with_twice_the_batch(cluster, tmp_path):
    """tests/ddp_pretrain_worker.py (the torchrun equivalence of test_pretraining) with ranks from srun."""
    weights = {}
    for tasks in (1, 2):
        out = tmp_path / f"{tasks}.pt"
        # Each task names its file by SLURM_PROCID; only the rank that utils.setup_distributed made rank 0 saves.
        done = cluster.run("srun", "-N1", f"--ntasks={tasks}", "bash", "-c",
                           f'exec "{sys.executable}" tests/ddp_pretrain_worker.py --out "$0.$SLURM_PROCID" '
                           "--global_batch 8", str(out), timeout=300, OMP_NUM_THREADS="1")
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(p.name for p in tmp_path.glob(f"{tasks}.pt.*")) == [f"{tasks}.pt.0"]
        weights[tasks] = torch.load(f"{out}.0", weights_only=True)
    for key, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][key], tensor, rtol=0, atol=1e-5, msg=key)
