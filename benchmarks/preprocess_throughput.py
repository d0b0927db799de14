"""Throughput and memory of the Dask preprocessing pipeline, end to end on WikiText-2 (valid + test).

For each worker count: a LocalCluster of that many single-threaded worker processes runs
``data.preprocess_pretraining`` from source text to balanced, statically masked Parquet shards. The first run on
a fresh cluster ("cold") includes each worker's imports and tokenizer load; the timed ("warm") runs that follow
are the steady state a long job sees. Figures: source WordPiece tokens per second (the corpus processed),
output tokens per second (tokens written, about duplicate-factor times more), pairs per second, and each
worker's peak resident memory. Ends with one JSON line.

    python benchmarks/preprocess_throughput.py [--workers 1 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.preprocess_pretraining import DEFAULT_VOCAB, PreprocessConfig, preprocess  # noqa: E402
from data.sample.build_sample import wikitext_articles, write_source  # noqa: E402

SHARED = Path(os.environ.get("BERT_SHARED_DATA", REPO.parent / "shared" / "data"))


def peak_rss_bytes() -> int:
    """Peak resident set size of the calling process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_source(directory: Path) -> int:
    """WikiText-2 valid + test as LDDL source files; returns the number of articles."""
    count = 0
    for split in ("valid", "test"):
        path = SHARED / "wikitext-2" / f"{split}.txt"
        if not path.is_file():
            sys.exit(f"needs {path} (the shared data folder beside the repository, or BERT_SHARED_DATA)")
        articles = [text for _, text in wikitext_articles(path.read_text(encoding="utf-8").splitlines())]
        write_source(directory / f"wikitext2_{split}.txt", f"wikitext2-{split}", articles)
        count += len(articles)
    return count


def run_once(client, source: Path, sink: Path, args: argparse.Namespace) -> dict:
    if sink.exists():
        shutil.rmtree(sink)
    config = PreprocessConfig(sink=str(sink), vocab_file=str(DEFAULT_VOCAB), masking=not args.dynamic,
                              target_seq_length=args.target_seq_length, duplicate_factor=args.duplicate_factor)
    started = time.perf_counter()
    report = preprocess(config, [source], client, num_blocks=args.num_blocks)
    seconds = time.perf_counter() - started
    output_tokens = 0
    import pyarrow.parquet as pq

    for path in sink.glob("shard-*"):
        output_tokens += int(pq.read_table(path, columns=["num_tokens"]).column(0).to_numpy().sum())
    return {"seconds": seconds, "source_tokens": report["tokens"], "pairs": report["pairs"],
            "output_tokens": output_tokens, "documents": report["documents"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to measure.")
    parser.add_argument("--repeats", type=int, default=2, help="Warm runs per worker count (the best is reported).")
    parser.add_argument("--num-blocks", type=int, default=8, help="Partitions (and shards) of each run.")
    parser.add_argument("--target-seq-length", type=int, default=128)
    parser.add_argument("--duplicate-factor", type=int, default=5)
    parser.add_argument("--dynamic", action="store_true", help="Leave masking to the loader (default: static).")
    args = parser.parse_args()

    from dask.distributed import Client, LocalCluster

    work = Path(tempfile.mkdtemp(prefix="preprocess-bench-"))
    try:
        source = work / "source"
        articles = make_source(source)
        size = sum(p.stat().st_size for p in source.iterdir())
        print(f"corpus: WikiText-2 valid+test, {articles} articles, {size / 1e6:.2f} MB; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        results = {}
        for workers in args.workers:
            started = time.perf_counter()
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
            with cluster, Client(cluster) as client:
                startup = time.perf_counter() - started
                cold = run_once(client, source, work / "sink", args)
                warm = min((run_once(client, source, work / "sink", args) for _ in range(args.repeats)),
                           key=lambda r: r["seconds"])
                worker_rss = client.run(peak_rss_bytes)
            best = warm
            entry = {
                "workers": workers,
                "cluster_start_s": round(startup, 2),
                "cold_s": round(cold["seconds"], 2),
                "warm_s": round(best["seconds"], 2),
                "source_tokens": best["source_tokens"],
                "output_tokens": best["output_tokens"],
                "pairs": best["pairs"],
                "source_tokens_per_s": round(best["source_tokens"] / best["seconds"]),
                "output_tokens_per_s": round(best["output_tokens"] / best["seconds"]),
                "pairs_per_s": round(best["pairs"] / best["seconds"]),
                "cold_source_tokens_per_s": round(cold["source_tokens"] / cold["seconds"]),
                "peak_worker_rss_mib": round(max(worker_rss.values()) / 2**20, 1),
                "client_rss_mib": round(peak_rss_bytes() / 2**20, 1),
            }
            results[workers] = entry
            print(f"{workers} worker(s): warm {entry['warm_s']:.2f} s -> {entry['source_tokens_per_s']:,} source "
                  f"tokens/s, {entry['output_tokens_per_s']:,} output tokens/s, {entry['pairs_per_s']:,} pairs/s; "
                  f"cold {entry['cold_s']:.2f} s (+{entry['cluster_start_s']:.2f} s cluster start); "
                  f"peak worker RSS {entry['peak_worker_rss_mib']} MiB")
        print(json.dumps({
            "benchmark": "preprocess_throughput",
            "corpus": "wikitext-2 valid+test",
            "masking": "dynamic" if args.dynamic else "static",
            "target_seq_length": args.target_seq_length,
            "duplicate_factor": args.duplicate_factor,
            "num_blocks": args.num_blocks,
            "results": list(results.values()),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
