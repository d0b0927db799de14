"""run.sub on a real SLURM: a one-node cluster (munged, slurmctld and slurmd from Debian's munge and slurm-wlm,
no cgroups) started here once for the module, then CPU jobs of the tiny config with 2 tasks over gloo: phase 1,
SIGTERM and requeue, phase 2 after a job dependency, and 2 SLURM tasks == 1 task with twice the batch.
.ci/run installs the packages; without them (or without root) those tests are skipped with the reason.

The multi-node paths a one-node CPU cluster cannot run (pyxis containers, MPI preprocessing, 64 nodes of
configurations.yml) are checked as dry runs: run.sub with a stand-in srun that records its calls.
"""
from __future__ import annotations

import json
import os
import re
import shlex
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

import run_pretraining
from data import preprocess_pretraining
from file_utils import load_checkpoint
from scripts import configurations

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo")
TINY_JOB = {  # the tiny config on the test shards: 2 tasks (GPUS) of batch 4, fp32 on the CPU, no binding tools
    "CONFIG": "tiny", "PRECISION": "fp32", "GPUS": "2", "BATCHSIZE": "4", "GRADIENT_STEPS": "1", "LR": "5e-3",
    "WARMUP_UPDATES": "0.1", "SEQ_LENGTH": "64", "MAX_PREDICTIONS": "10", "NUM_WORKERS": "0", "CONT": "none",
    "RERUN_DASK": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
}
PHASE1_STEPS = 24


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
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_16.pt", "ckpt_24.pt", "ckpt_8.pt"]
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
    # SIGTERM right after the first step, so that the job is far (23 steps) from its end when the signal lands.
    while "Training Iteration: 1 " not in cluster.output(job):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            cluster.output(job)[-3000:]
        time.sleep(0.05)
    cluster.run("scancel", "--signal=TERM", job)
    fields = cluster.wait(job)
    log = cluster.output(job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    out = jobs["results"] / job
    saved = list(out.glob("ckpt_*.pt"))
    assert len(saved) == 1 and "preempted_at_step" in log, log[-4000:]
    step = load_checkpoint(saved[0])["train_state"]["step"]
    assert 1 <= step < PHASE1_STEPS and saved[0].name == f"ckpt_{step}.pt"

    cluster.run("scontrol", "requeue", job)
    # SLURM holds a requeued job back for two minutes (its begin time); a cluster's admin would not wait here either.
    # But slurmd refuses ("Job credential revoked") a relaunch whose credential is from the same second as the
    # first run's end, which a fast machine reaches: start it a little later instead of at once.
    time.sleep(2)
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


# ----------------------------------------------------------------------------------------------------------------
# Dry runs: run.sub with a stand-in srun (no cluster needed)
# ----------------------------------------------------------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
if [ "$1" = --help ]; then [ -z "${FAKE_PYXIS:-}" ] || echo "  --container-image=[USER@][REGISTRY#]IMAGE[:TAG]|PATH"
  exit 0; fi
printf '%q ' "$@" >> "$SRUN_LOG"; echo >> "$SRUN_LOG"
"""


def _dry_run(tmp_path: Path, line: str, pyxis: bool = False, **env: str) -> tuple[subprocess.CompletedProcess,
                                                                                   list[list[str]]]:
    """Run run.sub as the sbatch ``line`` would start it (its VAR=value words in the environment, -N, tasks per
    node and dependency in SLURM's variables); returns the result and the srun calls, each split into words."""
    words = shlex.split(line)
    at = words.index("sbatch")
    variables = dict(word.split("=", 1) for word in words[:at])
    for word in words[at + 1:-1]:
        if word.startswith("-N"):
            variables["SLURM_JOB_NUM_NODES"] = word[2:]
        elif word.startswith("--ntasks-per-node="):
            variables["SLURM_NTASKS_PER_NODE"] = word.split("=")[1]
        elif word.startswith("--dependency="):
            variables["SLURM_JOB_DEPENDENCY"] = word.split("=")[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "srun.log"
    log.write_text("")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_LOG": str(log), "SLURM_JOB_ID": "77",
               "SLURM_SUBMIT_DIR": str(REPO), "DATASETS": str(tmp_path / "datasets"),
               "RESULTS_ROOT": str(tmp_path / "results"), **({"FAKE_PYXIS": "1"} if pyxis else {}), **variables, **env}
    done = subprocess.run(["bash", str(REPO / "run.sub")], cwd=REPO, env=run_env, capture_output=True, text=True,
                          timeout=60)
    return done, [shlex.split(call) for call in log.read_text().splitlines()]


def _after(words: list[str], marker: str) -> list[str]:
    return words[words.index(marker) + 1:]


@pytest.fixture
def phase1_checkpoint(tmp_path) -> Path:
    """What a finished phase 1 job 76 leaves, and the shards a job with RERUN_DASK=false reads."""
    ckpt = tmp_path / "results" / "76" / "ckpt_7038.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stand-in")
    for phase in ("phase1", "phase2"):
        shards = tmp_path / "datasets" / "pretrain" / phase / "bin_size_64" / "parquet"
        shards.mkdir(parents=True)
        (shards / "shard-0.parquet").write_bytes(b"stand-in")
    return ckpt


def test_every_configurations_job_reaches_run_pretraining_as_valid_flags(tmp_path, phase1_checkpoint):
    for name, job in configurations.load(REPO / "configurations.yml").items():
        line = configurations.sbatch_line(job, after="76" if job.variables["PHASE"] == "2" else None)
        done, calls = _dry_run(tmp_path, line, RERUN_DASK="false")
        assert done.returncode == 0 and len(calls) == 1, (name, done.stderr)
        assert calls[0][:1] == [f"--ntasks-per-node={job.gpus_per_node}"], calls[0]
        assert _after(calls[0], "--")[:2] == ["python3", "-u"] and "--cpu=exclusive" in calls[0]
        args = run_pretraining.parse_arguments(_after(calls[0], str(REPO / "run_pretraining.py")))
        run_pretraining.check_arguments(args, job.world_size)
        assert (args.train_batch_size, args.gradient_accumulation_steps, args.learning_rate) == (
            int(job.variables["BATCHSIZE"]), int(job.variables["GRADIENT_STEPS"]), float(job.variables["LR"]))
        assert args.fp16 == (job.variables.get("PRECISION", "fp16") == "fp16") and args.resume_from_checkpoint
        assert args.input_dir.endswith(f"pretrain/phase{job.variables['PHASE']}/bin_size_64/parquet")
        if job.variables["PHASE"] == "2":
            assert args.phase2 and args.init_checkpoint == str(phase1_checkpoint) and args.max_seq_length == 512
        else:
            assert not args.phase2 and args.init_checkpoint is None and args.max_seq_length == 128


def test_with_pyxis_every_step_runs_in_the_image_and_preprocessing_runs_under_mpi(tmp_path, phase1_checkpoint):
    results = tmp_path / "results" / "77"
    done, calls = _dry_run(tmp_path, "PHASE=2 sbatch -N2 --ntasks-per-node=8 --dependency=afterok:76 run.sub",
                           pyxis=True)
    assert done.returncode == 0, done.stderr
    prep, balance, train = calls
    mounts = (f"--container-mounts={tmp_path}/datasets:/datasets,{results}:/results,"
              f"{phase1_checkpoint.parent}:/checkpoints")
    for call in calls:
        assert "--container-image=bert:24.12-py3" in call and mounts in call, call
    sink = "/results/shards/phase2/bin_size_64/parquet"
    assert prep[:3] == ["--mpi=pmix", "--ntasks-per-node=128",
                        f"--export=ALL,LD_PRELOAD=/usr/lib/{os.uname().machine}-linux-gnu/libjemalloc.so.2"]
    prep_args = preprocess_pretraining.parse_args(_after(prep, "data.preprocess_pretraining"))
    assert (prep_args.sink, prep_args.wikipedia, prep_args.schedule, prep_args.num_blocks, prep_args.bin_size,
            prep_args.target_seq_length, prep_args.masking, prep_args.balance) == (
        sink, "/datasets/wikipedia/source", "mpi", 4096, 64, 512, True, False)
    assert _after(balance, "data.balance_shards") == ["--indir", sink, "--num-shards", "4096"]
    args = run_pretraining.parse_arguments(_after(train, "/workspace/bert/run_pretraining.py"))
    assert (args.input_dir, args.output_dir, args.init_checkpoint, args.config_file) == (
        sink, "/results", "/checkpoints/ckpt_7038.pt", "/workspace/bert/bert_configs/large.json")
    assert "/workspace/bert/bind.sh" in train and args.phase2 and args.phase1_end_step == 7038
    assert (results / "init_checkpoint.txt").read_text().strip() == str(phase1_checkpoint)

    # Requeued: the dependency is gone and the shards are done; the checkpoint chosen at the first start is used.
    (results / "shards" / "phase2" / "bin_size_64" / "parquet" / ".num_samples.json").write_text("{}")
    done, calls = _dry_run(tmp_path, "PHASE=2 sbatch -N2 --ntasks-per-node=8 run.sub", CONT="none")
    assert done.returncode == 0 and len(calls) == 1, done.stderr
    assert f"--init_checkpoint={phase1_checkpoint}" in calls[0]
    (results / "ckpt_7100.pt").write_bytes(b"stand-in")  # once it has its own checkpoints, it resumes from those
    done, calls = _dry_run(tmp_path, "PHASE=2 sbatch -N2 --ntasks-per-node=8 run.sub", CONT="none")
    assert "resuming from the newest checkpoint" in done.stdout
    assert not [word for word in calls[0] if word.startswith("--init_checkpoint")]


@pytest.mark.parametrize("variables, message", [
    ("PHASE=3", "PHASE must be 1 or 2, got '3'"),
    ("PRECISION=fp8", "PRECISION must be fp16, bf16, tf32 or fp32, got 'fp8'"),
    ("BIN_SIZE=100", "BIN_SIZE must be none, 32, 64, 128, 256 or 512, got '100'"),
    ("CONFIG=huge", "CONFIG=huge: no"),
    ("NNODES=4", "NNODES=4 but the job has 1 nodes: sbatch -N4"),
    ("PHASE=2", "PHASE=2 needs INIT_CHECKPOINT=<phase 1 checkpoint> or sbatch --dependency=afterok:<phase 1 job>"),
    ("PHASE=2 INIT_CHECKPOINT=/nowhere/ckpt_1.pt", "INIT_CHECKPOINT /nowhere/ckpt_1.pt does not exist"),
])
def test_bad_variables_stop_the_job_before_any_step_with_one_line(tmp_path, variables, message):
    done, calls = _dry_run(tmp_path, f"{variables} sbatch -N1 --ntasks-per-node=8 run.sub")
    assert done.returncode == 1 and calls == []
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run.sub: {message}"), lines


# ----------------------------------------------------------------------------------------------------------------
# bind.sh on a stand-in DGX (lscpu, nvidia-smi, ibstat and numactl that only print)
# ----------------------------------------------------------------------------------------------------------------

LSCPU = """Thread(s) per core:  2
Core(s) per socket:  16
Socket(s):           2
NUMA node(s):        2
"""


def _bind(tmp_path: Path, local_rank: int, *options: str, tools: bool = True) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"lscpu": f"cat <<'EOF'\n{LSCPU}EOF", "ibstat": "printf 'mlx5_%s\\n' 3 1 2 0",
             "nvidia-smi": "for i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: A100 (UUID: GPU-$i)\"; done",
             "numactl": 'echo "numactl $* IB=${OMPI_MCA_btl_openib_if_include:-}"'}
    if not tools:  # one NUMA node, no IB device, no GPU, no numactl
        stubs = {"lscpu": "printf 'Socket(s): 1\\nCore(s) per socket: 2\\nNUMA node(s): 1\\n'", "ibstat": "true"}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_LOCALID": str(local_rank)}
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_MCA_btl_openib_if_include"):
        env.pop(key, None)
    return subprocess.run(["bash", str(REPO / "bind.sh"), *options, "--", "echo", "task"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_bind_sh_binds_each_rank_near_its_gpu(tmp_path):
    done = _bind(tmp_path, 3, "--cpu=exclusive", "--ib=single")
    assert done.returncode == 0, done.stderr
    # 32 cores for 8 GPUs: rank 3 takes cores 12-15 and their SMT siblings 44-47, NUMA node 0, the second IB device
    assert done.stdout == "numactl --physcpubind=12-15,44-47 --membind=0 -- echo task IB=mlx5_1\n"
    done = _bind(tmp_path, 5, "--cpu=exclusive,nosmt", "--mem=off")
    assert done.stdout == "numactl --physcpubind=20-23 -- echo task IB=\n"
    assert _bind(tmp_path, 5).stdout == "numactl --cpunodebind=1 --membind=1 -- echo task IB=\n"
    cores = tmp_path / "cores.sh"
    cores.write_text("bind_cpu_cores=(0-3 4-7 8-11 12-15 16-19 20-23 24-27 28-31)\n")
    assert _bind(tmp_path, 6, f"--cpu={cores}", "--mem=off").stdout == "numactl --physcpubind=24-27 -- echo task IB=\n"


def test_bind_sh_without_numa_or_infiniband_says_so_and_runs_the_task(tmp_path):
    done = _bind(tmp_path, 0, "--cpu=node", "--ib=single", tools=False)
    assert done.returncode == 0 and done.stdout == "task\n"
    assert "one NUMA node: --cpu=node binds nothing" in done.stderr
    assert "no InfiniBand device found: --ib=single binds no NIC" in done.stderr
    done = _bind(tmp_path, 0, "--cpu=sometimes", tools=False)
    assert done.returncode == 1 and done.stderr.startswith("bind.sh: invalid --cpu mode 'sometimes'")
