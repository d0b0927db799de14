"""Throughput and latency of a served model per batch size and concurrency, written as CSV like the reference's.

With Triton's ``perf_analyzer`` on PATH (PyPI ``perf-analyzer``, or the NGC ``tritonserver:<version>-py3-sdk``
container) it drives the measurement, fed with real SQuAD windows; its CSV rows get a leading ``Batch`` column.
Without it, the script says so and measures with a built-in load generator: ``--concurrency`` client threads, each
sending batches back to back for ``--measurement-interval`` ms after a warm-up; the server's own statistics give the
queue and compute columns, and Network+Server Send/Recv is the rest of the client-side latency. Times are in
microseconds, as perf_analyzer writes them.

    python triton/run_performance_on_triton.py --server-url grpc://localhost:8001 --model-name bert \\
        --batch-sizes 1 8 16 --concurrency 1 2 --result-path triton_performance_offline.csv
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dataloader
import numpy as np
import run_inference_on_triton as client

import utils  # noqa: E402  (the siblings above put the repository root on sys.path)
from file_utils import atomic_write  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

ROOT = dataloader.ROOT
COLUMNS = ["Batch", "Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
           "Server Compute Input", "Server Compute Infer", "Server Compute Output", "Client Recv", "p50 latency",
           "p90 latency", "p95 latency", "p99 latency", "avg latency", "Tool"]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The reference's performance flags that apply here (--batch-sizes, --measurement-interval, --result-path)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default="grpc://localhost:8001",
                        help="Server address; http:// or grpc:// chooses the protocol (default grpc).")
    parser.add_argument("--model-name", default="bert", help="Served model name.")
    parser.add_argument("--model-version", default="", help="Served model version (default: the server's choice).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="Batch sizes to measure.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1],
                        help="Requests in flight at once (perf_analyzer's --concurrency-range), each measured.")
    parser.add_argument("--max-seq-length", type=int, default=384, help="Tokens per window (every request is "
                                                                        "padded to this length).")
    parser.add_argument("--vocab-file", default=str(ROOT / "vocab" / "vocab"), help="WordPiece vocabulary.")
    parser.add_argument("--predict-file", default=str(ROOT / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"),
                        help="SQuAD JSON whose windows are sent (default: the bundled sample).")
    parser.add_argument("--do-lower-case", action="store_true", help="Lower-case the text (uncased models).")
    parser.add_argument("--measurement-interval", type=int, default=5000, help="Milliseconds measured per point.")
    parser.add_argument("--warmup", type=float, default=1.0, help="Seconds of load before each measurement.")
    parser.add_argument("--performance-tool", choices=("auto", "perf_analyzer", "builtin"), default="auto",
                        help="auto: perf_analyzer when it is on PATH, else the built-in load generator.")
    parser.add_argument("--result-path", required=True, help="CSV file to write.")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for one request.")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Fail on bad flags before contacting the server."""
    if min(args.batch_sizes) < 1 or min(args.concurrency) < 1:
        raise ValueError("--batch-sizes and --concurrency must be >= 1")
    if args.measurement_interval < 1 or args.max_seq_length < 8:
        raise ValueError("--measurement-interval must be >= 1 and --max-seq-length >= 8")
    for flag in ("vocab_file", "predict_file"):
        if not Path(getattr(args, flag)).is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    if args.performance_tool == "perf_analyzer" and shutil.which("perf_analyzer") is None:
        raise FileNotFoundError("--performance-tool perf_analyzer: perf_analyzer is not on PATH")


def server_stats(served: client.TritonModel) -> dict[str, tuple[int, int]]:
    """Cumulative (count, ns) of the server's queue and compute phases for the model."""
    stats = served._as_dict(served._call("the inference statistics", served.client.get_inference_statistics,
                                         served.model_name, served.model_version))
    model = (stats.get("model_stats") or [{}])[0].get("inference_stats", {})
    return {phase: (int(model.get(phase, {}).get("count", 0)), int(model.get(phase, {}).get("ns", 0)))
            for phase in ("queue", "compute_input", "compute_infer", "compute_output")}


def builtin_load(args: argparse.Namespace, protocol: str, url: str, batches: list[dict[str, np.ndarray]],
                 concurrency: int) -> tuple[np.ndarray, dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Load from ``concurrency`` client threads sending batches back to back: after ``args.warmup`` seconds, the
    latencies (microseconds) of the requests started in the next ``args.measurement_interval`` ms, and the server's
    statistics before and after."""
    stop_warmup = time.perf_counter() + args.warmup
    stop = stop_warmup + args.measurement_interval / 1000
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    started = threading.Barrier(concurrency + 1)

    def worker(index: int) -> None:
        try:
            served = client.TritonModel(url, protocol, args.model_name, args.model_version, args.timeout)
            started.wait()
            request = index
            while True:
                begin = time.perf_counter()
                if begin >= stop:
                    return
                served.infer(batches[request % len(batches)])
                if begin >= stop_warmup:
                    latencies[index].append((time.perf_counter() - begin) * 1e6)
                request += concurrency
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            started.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    stats_client = client.TritonModel(url, protocol, args.model_name, args.model_version, args.timeout)
    try:
        started.wait()
    except threading.BrokenBarrierError:
        pass
    time.sleep(max(0.0, stop_warmup - time.perf_counter()))
    before = server_stats(stats_client)
    for thread in threads:
        thread.join()
    after = server_stats(stats_client)
    if errors:
        raise errors[0]
    values = np.concatenate([np.asarray(x) for x in latencies])
    if len(values) == 0:
        raise client.TritonError(f"no request finished within --measurement-interval {args.measurement_interval} ms")
    return values, before, after


def builtin_point(args: argparse.Namespace, protocol: str, url: str, batches: list[dict[str, np.ndarray]],
                  batch_size: int, concurrency: int) -> dict[str, Any]:
    """One (batch size, concurrency) point measured by ``builtin_load``; latencies in microseconds."""
    values, before, after = builtin_load(args, protocol, url, batches, concurrency)
    elapsed = args.measurement_interval / 1000
    requests = after["compute_infer"][0] - before["compute_infer"][0]

    def per_request(phase: str) -> float:
        count = after[phase][0] - before[phase][0]
        return (after[phase][1] - before[phase][1]) / 1000 / count if count else 0.0

    server = sum(per_request(phase) for phase in ("queue", "compute_input", "compute_infer", "compute_output"))
    return {"Batch": batch_size, "Concurrency": concurrency,
            "Inferences/Second": round(len(values) * batch_size / elapsed, 2), "Client Send": "",
            "Network+Server Send/Recv": round(max(0.0, float(values.mean()) - server), 1) if requests else "",
            "Server Queue": round(per_request("queue"), 1),
            "Server Compute Input": round(per_request("compute_input"), 1),
            "Server Compute Infer": round(per_request("compute_infer"), 1),
            "Server Compute Output": round(per_request("compute_output"), 1), "Client Recv": "",
            **{f"p{q} latency": round(float(np.percentile(values, q)), 1) for q in (50, 90, 95, 99)},
            "avg latency": round(float(values.mean()), 1), "Tool": "builtin"}


def perf_analyzer_point(args: argparse.Namespace, protocol: str, url: str, data_file: Path, batch_size: int,
                        concurrency: int) -> dict[str, Any]:
    """One point measured by perf_analyzer; its CSV row with Batch and Tool added."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "perf.csv"
        command = ["perf_analyzer", "-m", args.model_name, "-u", url, "-i", protocol, "-b", str(batch_size),
                   "--concurrency-range", f"{concurrency}:{concurrency}:1", "--input-data", str(data_file),
                   *[f"--shape={name}:{args.max_seq_length}" for name in ("input__0", "input__1", "input__2")],
                   "--measurement-mode", "time_windows", "--measurement-interval", str(args.measurement_interval),
                   "-f", str(result)]
        if args.model_version:
            command += ["-x", args.model_version]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise client.TritonError(f"perf_analyzer failed (exit {done.returncode}): "
                                     f"{(done.stderr or done.stdout).strip()[-2000:]}")
        rows = list(csv.DictReader(io.StringIO(result.read_text())))
    row = rows[-1]
    point = {column: row.get(column, "") for column in COLUMNS}
    point.update({"Batch": batch_size, "Concurrency": concurrency, "Tool": "perf_analyzer"})
    return point


def write_input_data(batches: list[dict[str, np.ndarray]], path: Path) -> None:
    """perf_analyzer's --input-data JSON: one entry per window (the reference's prepare_input_data.py format)."""
    entries = [{name: {"content": batch[name][row].tolist(), "shape": [batch[name].shape[1]]} for name in batch}
               for batch in batches for row in range(batch["input__0"].shape[0])]
    path.write_text(json.dumps({"data": entries}))


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        check_arguments(args)
        protocol, url = client.split_url(args.server_url, None)
        served = client.TritonModel(url, protocol, args.model_name, args.model_version, args.timeout)
        served.check(max(args.batch_sizes), args.max_seq_length)
        tool = args.performance_tool
        if tool == "auto":
            tool = "perf_analyzer" if shutil.which("perf_analyzer") else "builtin"
            if tool == "builtin":
                print("perf_analyzer is not on PATH (pip install perf-analyzer, or use the NGC "
                      "tritonserver:<version>-py3-sdk container): measuring with the built-in tritonclient load "
                      "generator instead", file=sys.stderr)
        tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
        windows = dataloader.build_windows(dataloader.read_examples(args.predict_file), tokenizer,
                                           args.max_seq_length, min(128, args.max_seq_length // 2))
        points = []
        with tempfile.TemporaryDirectory() as scratch:
            data_file = Path(scratch) / "data.json"
            if tool == "perf_analyzer":
                write_input_data(list(dataloader.fixed_batches(windows, 1)), data_file)
            for batch_size in args.batch_sizes:
                batches = list(dataloader.fixed_batches(windows, batch_size))
                for concurrency in args.concurrency:
                    if tool == "perf_analyzer":
                        point = perf_analyzer_point(args, protocol, url, data_file, batch_size, concurrency)
                    else:
                        point = builtin_point(args, protocol, url, batches, batch_size, concurrency)
                    points.append(point)
                    print(f"batch {batch_size:3d} concurrency {concurrency:2d}: {point['Inferences/Second']} "
                          f"inferences/s, p50 {point['p50 latency']} us, p99 {point['p99 latency']} us", flush=True)
        with atomic_write(args.result_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(points)
    except utils.USER_ERRORS + (client.TritonError,) as exc:
        return utils.report_error("run_performance_on_triton.py", exc)
    print(json.dumps({"result_path": args.result_path, "tool": tool, "points": len(points)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
