"""Run the real Triton Inference Server bundled in PyPI's ``nvidia-pytriton`` on a model repository, on the CPU.

``nvidia-pytriton`` ships tritonserver (2.51) with the Python backend. It needs numpy<2, so it lives in its own
virtual environment, created once (``ensure_venv``) and cached in ``$BERT_RECIPE_PYTRITON_VENV`` or
``~/.cache/bert-recipe/pytriton-venv``; its Python backend stub is linked against this interpreter's libpython, found
through ``LD_LIBRARY_PATH`` = the interpreter's LIBDIR. Only Python-backend models can be served this way (deploy.py
``--backend python``); a GPU server runs the NGC container instead (scripts/docker/triton_inference_server.sh).

    python triton/pytriton_server.py --model-repository model_repository   # serves on 8000 (HTTP) / 8001 (gRPC)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_ENV = "BERT_RECIPE_PYTRITON_VENV"
# What the server's Python backend needs: the server itself, numpy<2 for its stub, and what the served model.py runs.
VENV_REQUIREMENTS = ("nvidia-pytriton>=0.5", "numpy<2", "onnxruntime>=1.17")
INSTALL_TIMEOUT_S = 900


class ServerError(RuntimeError):
    """The server could not be installed or started; the message holds its own error output."""


def default_venv() -> Path:
    """Where the server's virtual environment is cached: $BERT_RECIPE_PYTRITON_VENV, else under ~/.cache."""
    return Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "bert-recipe" / "pytriton-venv")


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker(venv: Path) -> Path:
    return venv / "bert-recipe-requirements.txt"


def ensure_venv(venv: Path | None = None, log: Path | None = None) -> Path:
    """Create (once) the virtual environment holding nvidia-pytriton and return it.

    Built in a temporary folder beside ``venv`` and renamed into place when pip succeeds, under a file lock, so
    concurrent callers and interrupted runs never see a half-installed environment.
    """
    venv = Path(venv or default_venv())
    wanted = "\n".join(VENV_REQUIREMENTS) + "\n"
    if _marker(venv).is_file() and _marker(venv).read_text() == wanted:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker(venv).is_file() and _marker(venv).read_text() == wanted:
            return venv
        build = Path(tempfile.mkdtemp(prefix=f".{venv.name}.", dir=venv.parent))
        try:
            # The same interpreter as this one: the stub is chosen by its version and linked against its libpython.
            _run([sys.executable, "-m", "venv", str(build)], log)
            _run([str(_venv_python(build)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                  *VENV_REQUIREMENTS], log)
            _marker(build).write_text(wanted)
            build.chmod(0o755)  # mkdtemp made it private
            shutil.rmtree(venv, ignore_errors=True)
            build.rename(venv)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    # A venv's scripts hold its absolute path; the renamed one is used only through `bin/python -m` and the server
    # binary, which do not depend on it.
    return venv


def _run(command: list[str], log: Path | None) -> None:
    """Run an install step with a time limit; fail with its output."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ServerError(f"{' '.join(command[:4])} ... did not finish in {INSTALL_TIMEOUT_S} s") from None
    if log is not None:
        with open(log, "a") as handle:
            handle.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ServerError(f"{' '.join(command[:4])} ... failed (exit {done.returncode}): {done.stderr[-2000:]}")


def server_dist(venv: Path) -> Path:
    """The tritonserver distribution folder inside the venv's pytriton package."""
    found = sorted(venv.glob("lib/python*/site-packages/pytriton/tritonserver"))
    if not found:
        raise ServerError(f"{venv} holds no pytriton/tritonserver: is nvidia-pytriton installed there?")
    return found[0]


def backend_directory(venv: Path, work_dir: Path) -> Path:
    """A backends/ folder for the server: the bundled Python backend plus the stub built for this Python version."""
    dist = server_dist(venv)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    target = work_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [*(dist / "backends" / "python").iterdir(), stub]:
        if source.is_file():
            shutil.copy2(source, target / source.name)
    return work_dir / "backends"


def server_env(venv: Path) -> dict[str, str]:
    """The server's environment: this interpreter's LIBDIR for the stub's libpython and the wheel's own libraries
    (the stub's libcudart), and the venv's bin first on PATH (the stub's embedded interpreter finds the venv, hence
    numpy<2 and onnxruntime, from there)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    wheel_libs = str(server_dist(venv).parents[1] / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, wheel_libs, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)  # the repository's own path must not reach the stub (numpy 2 lives there)
    env.pop("PYTHONHOME", None)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process before exec: have Linux send it SIGTERM when the process that started it dies, so a
    killed test run or launcher leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Server:
    """A running tritonserver process and where to reach it."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_file: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_server(model_repository: Path, venv: Path, work_dir: Path, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 ready_timeout: float = 120.0) -> Server:
    """Start tritonserver on 127.0.0.1 (free ports unless given) and wait until it and its models are ready.

    Raises ServerError with the server's own log when it exits or is not ready within ``ready_timeout`` seconds.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    binary = server_dist(venv) / "bin" / "tritonserver"
    http_port, grpc_port = http_port or free_port(), grpc_port or free_port()
    command = [str(binary), f"--model-repository={model_repository}",
               f"--backend-directory={backend_directory(venv, work_dir)}",
               f"--cache-directory={server_dist(venv) / 'caches'}",
               "--http-address=127.0.0.1", f"--http-port={http_port}", "--grpc-address=127.0.0.1",
               f"--grpc-port={grpc_port}", "--allow-metrics=true" if metrics_port else "--allow-metrics=false",
               *([f"--metrics-port={metrics_port}", "--metrics-address=127.0.0.1"] if metrics_port else []),
               "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0"]
    log_file = work_dir / "tritonserver.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(venv),
                                   cwd=work_dir, start_new_session=True, preexec_fn=_die_with_parent)
    server = Server(process, http_port, grpc_port, log_file)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"tritonserver exited with status {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise ServerError(f"tritonserver was not ready after {ready_timeout:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(model_repository: Path, venv: Path | None = None, work_dir: Path | None = None,
                   **kwargs: object) -> Iterator[Server]:
    """``start_server`` as a context manager that always stops the server."""
    with tempfile.TemporaryDirectory(prefix="tritonserver.") as scratch:
        server = start_server(model_repository, ensure_venv(venv), Path(work_dir or scratch), **kwargs)
        try:
            yield server
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True, help="Folder written by deploy.py --backend python.")
    parser.add_argument("--venv", default=None, help=f"Server virtual environment (default: ${VENV_ENV} or "
                                                     "~/.cache/bert-recipe/pytriton-venv); created when missing.")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1.")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1.")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port on 127.0.0.1.")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="Seconds to wait for the models.")
    args = parser.parse_args(argv)
    # SIGTERM (timeout, kill) ends the launcher through the `finally` that stops the server, not around it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repository = Path(args.model_repository).resolve()
    if not repository.is_dir():
        print(f"pytriton_server.py: error: --model-repository {repository} does not exist", file=sys.stderr)
        return 1
    try:
        with running_server(repository, Path(args.venv) if args.venv else None, http_port=args.http_port,
                            grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                            ready_timeout=args.ready_timeout) as server:
            print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}; Ctrl-C stops it",
                  flush=True)
            server.process.wait()
            print(server.log_tail(), file=sys.stderr)
            return server.process.returncode or 0
    except ServerError as exc:
        print(f"pytriton_server.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
