"""Write a Triton model repository entry for an exported model: ``<repository>/<name>/config.pbtxt`` and
``<name>/<version>/model.*``, for the onnxruntime, pytorch (LibTorch), tensorrt-plan or python backend.

The config has the reference's tensor names (int32 ``input__0..2`` [-1], ``output__0/1`` [-1]), the maximum batch
size, dynamic batching (preferred sizes, max queue delay) and instance groups (KIND_GPU or KIND_CPU, count). The
``python`` backend serves the ONNX or TorchScript file through ``python_backend_model.py``: it is the one the
PyPI server (``pytriton_server.py``) carries; the NGC container has all four.

    python triton/deploy.py --model-repository model_repository --model-name bert --model-path model.onnx \\
        --backend onnxruntime --max-batch-size 16 --preferred-batch-sizes 8 16 --instance-kind KIND_GPU
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import model as triton_model

import utils  # noqa: E402  (the sibling above put the repository root on sys.path)
from file_utils import atomic_path, atomic_write  # noqa: E402

HERE = Path(__file__).resolve().parent
# backend -> (config platform/backend line, file name in the version folder, accepted export suffixes)
BACKENDS = {
    "onnxruntime": ('platform: "onnxruntime_onnx"', "model.onnx", (".onnx",)),
    "pytorch": ('platform: "pytorch_libtorch"', "model.pt", (".pt", ".ts")),
    "tensorrt": ('platform: "tensorrt_plan"', "model.plan", (".plan", ".engine")),
    "python": ('backend: "python"', "model.py", (".onnx", ".pt", ".ts")),
}
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")


@dataclass
class DeployConfig:
    """What config.pbtxt says about one model."""

    name: str
    backend: str
    max_batch_size: int = 16
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_us: int = 0
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    output_type: str = "TYPE_FP32"
    served_file: str = ""  # python backend: the ONNX/TorchScript file its model.py runs
    intra_op_threads: int = 1  # python backend: threads per instance
    tensorrt_accelerator: str = ""  # onnxruntime on GPU: "FP16" or "FP32" runs it through ORT's TensorRT provider


def config_text(config: DeployConfig) -> str:
    """The model's config.pbtxt in protobuf text format (Triton's ``inference.ModelConfig``)."""
    platform = BACKENDS[config.backend][0]
    tensors = []
    for name in triton_model.INPUT_NAMES:
        tensors.append(f'input {{\n  name: "{name}"\n  data_type: TYPE_INT32\n  dims: [ -1 ]\n}}')
    for name in triton_model.OUTPUT_NAMES:
        tensors.append(f'output {{\n  name: "{name}"\n  data_type: {config.output_type}\n  dims: [ -1 ]\n}}')
    lines = [f'name: "{config.name}"', platform, f"max_batch_size: {config.max_batch_size}", *tensors]
    if config.max_batch_size > 0:
        sizes = ", ".join(str(size) for size in config.preferred_batch_sizes)
        lines.append("dynamic_batching {\n" + (f"  preferred_batch_size: [ {sizes} ]\n" if sizes else "")
                     + f"  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {config.instance_count}\n    kind: {config.instance_kind}\n"
                 "  }\n]")
    parameters = {"model_file": config.served_file, "intra_op_threads": str(config.intra_op_threads)} \
        if config.backend == "python" else {}
    if config.backend == "onnxruntime" and config.instance_kind == "KIND_CPU":
        parameters = {"intra_op_thread_count": str(config.intra_op_threads)}
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    if config.tensorrt_accelerator:
        lines.append('optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [ {\n'
                     '      name: "tensorrt"\n      parameters { key: "precision_mode" value: "'
                     f'{config.tensorrt_accelerator}" }}\n      parameters {{ key: "max_workspace_size_bytes" '
                     'value: "8589934592" }\n    } ]\n  }\n}')
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> object:
    """Parse config.pbtxt text with Triton's own ModelConfig protobuf (shipped in tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def check_config(config: DeployConfig) -> None:
    """Fail on settings Triton would refuse, naming the flag."""
    if config.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"--instance-kind must be KIND_GPU or KIND_CPU, got {config.instance_kind!r}")
    if config.max_batch_size < 0 or config.instance_count < 1 or config.max_queue_delay_us < 0:
        raise ValueError("--max-batch-size and --max-queue-delay-us must be >= 0 and --instance-count >= 1")
    bad = [size for size in config.preferred_batch_sizes if not 1 <= size <= config.max_batch_size]
    if bad:
        raise ValueError(f"--preferred-batch-sizes {bad} must lie in 1..--max-batch-size {config.max_batch_size}")
    if config.backend == "tensorrt" and config.instance_kind == "KIND_CPU":
        raise ValueError("--backend tensorrt runs on a GPU only: use --instance-kind KIND_GPU")
    if config.tensorrt_accelerator and (config.backend != "onnxruntime" or config.instance_kind != "KIND_GPU"):
        raise ValueError("--tensorrt-accelerator needs --backend onnxruntime --instance-kind KIND_GPU")


def deploy(model_path: Path, repository: Path, config: DeployConfig, version: int = 1) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and ``<name>/<version>/<model file>``; return the model folder.

    Files are written to temporary names and renamed, so a failed deploy leaves no half-written model behind.
    """
    check_config(config)
    if not model_path.is_file():
        raise FileNotFoundError(f"--model-path {model_path} does not exist")
    suffixes = BACKENDS[config.backend][2]
    if model_path.suffix not in suffixes:
        raise ValueError(f"--model-path {model_path}: the {config.backend} backend serves {' or '.join(suffixes)} "
                         "files")
    folder = repository / config.name
    version_dir = folder / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    if config.backend == "python":
        config.served_file = "model" + model_path.suffix
        _copy(HERE / "python_backend_model.py", version_dir / "model.py")
        _copy(model_path, version_dir / config.served_file)
    else:
        _copy(model_path, version_dir / BACKENDS[config.backend][1])
    text = config_text(config)
    try:
        parse_config(text)
    except ImportError:
        pass  # tritonclient is not installed here; the tests check every backend's config with it
    with atomic_write(folder / "config.pbtxt", "w") as handle:
        handle.write(text)
    return folder


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The model-repository flags (model-navigator's triton-config-model names, where it had one)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True, help="Model repository folder (created if missing).")
    parser.add_argument("--model-name", default="bert", help="Model name, the folder inside the repository.")
    parser.add_argument("--model-version", type=int, default=1, help="Version folder.")
    parser.add_argument("--model-path", required=True, help="Exported model: .onnx, TorchScript .pt, TensorRT .plan.")
    parser.add_argument("--backend", choices=tuple(BACKENDS), required=True,
                        help="onnxruntime, pytorch (LibTorch), tensorrt (plan), or python (the ONNX/TorchScript "
                             "file run by python_backend_model.py: the PyPI server has only this one).")
    parser.add_argument("--max-batch-size", type=int, default=16, help="Largest batch Triton forms (0: no batching).")
    parser.add_argument("--preferred-batch-sizes", type=int, nargs="*", default=[],
                        help="Batch sizes the dynamic batcher aims for.")
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="How long a request may wait for others to batch with, in microseconds.")
    parser.add_argument("--instance-kind", choices=INSTANCE_KINDS, default="KIND_GPU", help="Where instances run.")
    parser.add_argument("--instance-count", type=int, default=1, help="Model instances (per GPU with KIND_GPU).")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp32",
                        help="Output precision of the exported model (fp16 exports return fp16 logits).")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="CPU threads per instance.")
    parser.add_argument("--tensorrt-accelerator", choices=("FP16", "FP32"), default=None,
                        help="ONNX on GPU: run through ONNX Runtime's TensorRT provider at this precision.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    config = DeployConfig(name=args.model_name, backend=args.backend, max_batch_size=args.max_batch_size,
                          preferred_batch_sizes=args.preferred_batch_sizes, max_queue_delay_us=args.max_queue_delay_us,
                          instance_kind=args.instance_kind, instance_count=args.instance_count,
                          output_type="TYPE_FP16" if args.precision == "fp16" else "TYPE_FP32",
                          intra_op_threads=args.intra_op_threads,
                          tensorrt_accelerator=args.tensorrt_accelerator or "")
    try:
        folder = deploy(Path(args.model_path), Path(args.model_repository), config, args.model_version)
    except utils.USER_ERRORS as exc:
        return utils.report_error("deploy.py", exc)
    print(f"wrote {folder / 'config.pbtxt'} and {folder / str(args.model_version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
