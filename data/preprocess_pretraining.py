"""Preprocess source text into LDDL-format BERT pre-training Parquet shards on Dask (reference section 6.3 step 2).

Input: LDDL "source" files, one document per line, the first whitespace-separated token being the document id
(``wiki-<id> text ...``, as ``data.extract_wikipedia`` writes). Output under ``--sink``: balanced
``shard-<i>.parquet`` files (binned: ``shard-<i>.parquet_<bin_id>``) and ``.num_samples.json``, with LDDL's
schema: ``A``, ``B`` (space-joined WordPieces), ``is_random_next`` (bool), ``num_tokens`` (uint16, len(A) +
len(B) + 3), with ``--masking`` also ``masked_lm_positions`` (``np.save`` bytes of a uint16 array of positions in
``[CLS] A [SEP] B [SEP]``) and ``masked_lm_labels`` (space-joined original tokens), and with ``--bin-size`` also
``bin_id`` (int64; bin b holds sequences of ``b*bin_size+1 .. (b+1)*bin_size`` tokens).
With ``--output-format hdf5`` each partition becomes instead one reference era-A file ``training_<i>.hdf5``
(the reference layout of ``data.formats``, statically masked, at most ``--max-predictions-per-seq``):
the sharded HDF5 that the reference's bertPrep.py made, from the same source files and pipeline.

Pipeline (each step runs per partition on the workers; no step gathers the corpus anywhere):
  1. split the source files into ``--num-blocks`` line-aligned byte ranges; read each, keep each document with
     probability ``--sample-ratio`` and give it a random shuffle key;
  2. shuffle documents across partitions (a Dask DataFrame shuffle on the key), so every partition, and hence the
     documents "random next" segments are drawn from, is a uniform sample of the corpus;
  3. per partition: sort by key (order independent of task timing), split sentences, WordPiece-tokenize in batches
     (Rust), build ``--duplicate-factor`` rounds of Google's NSP pairs, shuffle, optionally mask, and stream them
     to ``part.<i>.parquet`` in row groups;
  4. balance the parts into ``--num-blocks`` shards of equal size (``data.balance_shards``).
Unlike LDDL, the result is deterministic for a given seed, input and ``--num-blocks``.

Clusters: by default a LocalCluster of ``--local-n-workers`` processes is started here. On several nodes, start a
scheduler and workers yourself (``dask scheduler --scheduler-file F`` and ``dask worker --scheduler-file F`` under
``srun``, or dask-jobqueue) with the repository on their ``PYTHONPATH`` and ``--sink`` on a shared filesystem, then
pass ``--scheduler-file F`` (or ``--scheduler-address``); or run this script under ``mpirun``/``srun --mpi`` with
``--schedule mpi`` (needs ``dask-mpi``: rank 0 is the scheduler, rank 1 runs this script, the others are workers).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from data import balance_shards
from data.formats import (
    hdf5_blocks,
    hdf5_file_name,
    lddl_schema,
    lddl_table,
    parquet_writers,
    partition_file_names,
    write_hdf5,
)
from data.instances import Instances, TokenizedDocuments, create_instances, mask_pairs, pair_tokens, tokenize_documents
from data.sentences import get_sentence_splitter
from file_utils import PathLike
from tokenization import load_wordpiece

if TYPE_CHECKING:  # imported lazily at run time: workers that only build partitions need neither
    import pandas as pd
    from dask.distributed import Client

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO_ROOT / "vocab" / "vocab"
ROW_GROUP_SIZE = 16384  # pairs per Parquet row group; bounds the memory of the string-building step


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything a worker needs to turn one partition of documents into shards (pickled to the workers)."""

    sink: str
    vocab_file: str
    do_lower_case: bool = True
    target_seq_length: int = 128
    short_seq_prob: float = 0.1
    duplicate_factor: int = 5
    sample_ratio: float = 0.9
    seed: int = 12345
    masking: bool = False
    masked_lm_ratio: float = 0.15
    bin_size: int | None = None
    sentence_splitter: str = "auto"
    output_format: str = "parquet"
    max_predictions_per_seq: int | None = None

    @property
    def num_bins(self) -> int | None:
        return None if self.bin_size is None else self.target_seq_length // self.bin_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag for inconsistent settings."""
        if self.target_seq_length < 5:
            raise ValueError(f"--target-seq-length must be at least 5, got {self.target_seq_length}")
        if self.target_seq_length > np.iinfo(np.uint16).max:
            raise ValueError(f"--target-seq-length must fit num_tokens' uint16, got {self.target_seq_length}")
        if self.bin_size is not None and (self.bin_size <= 0 or self.target_seq_length % self.bin_size):
            raise ValueError(
                f"--bin-size {self.bin_size} must be a positive divisor of --target-seq-length {self.target_seq_length}"
            )
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"--sample-ratio must be in (0, 1], got {self.sample_ratio}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}")
        if not 0.0 < self.masked_lm_ratio < 1.0:
            raise ValueError(f"--masked-lm-ratio must be in (0, 1), got {self.masked_lm_ratio}")
        if self.duplicate_factor < 1:
            raise ValueError(f"--duplicate-factor must be at least 1, got {self.duplicate_factor}")
        if self.output_format not in ("parquet", "hdf5"):
            raise ValueError(f"--output-format must be parquet or hdf5, got {self.output_format!r}")
        if self.output_format == "hdf5" and self.max_predictions_per_seq is None:
            raise ValueError("--output-format hdf5 needs --max-predictions-per-seq "
                             "(the reference uses 20 for 128, 80 for 512)")
        if self.output_format == "hdf5" and self.bin_size is not None:
            raise ValueError("--bin-size applies to Parquet output only (HDF5 rows are padded to --target-seq-length)")
        if self.output_format == "parquet" and self.max_predictions_per_seq is not None and not self.masking:
            raise ValueError("--max-predictions-per-seq caps static masking: "
                             "it needs --masking (or --output-format hdf5)")
        if self.max_predictions_per_seq is not None and self.max_predictions_per_seq < 1:
            raise ValueError(f"--max-predictions-per-seq must be positive, got {self.max_predictions_per_seq}")
        if not Path(self.vocab_file).is_file():
            raise ValueError(f"--vocab-file {self.vocab_file} does not exist (a WordPiece vocab.txt path is required)")
        get_sentence_splitter(self.sentence_splitter)


# ----------------------------------------------------------------------------------------------------------------
# Reading source text
# ----------------------------------------------------------------------------------------------------------------


def find_source_files(path: PathLike, lang: str | None = None) -> list[Path]:
    """All ``*.txt`` files under a source directory, sorted; ``<path>/<lang>`` is used when it exists (LDDL layout)."""
    root = Path(path)
    if lang and (root / lang).is_dir():
        root = root / lang
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"source path {path} does not exist")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt source files under {root}")
    return files


def plan_blocks(files: Sequence[Path], num_blocks: int | None = None,
                block_size: int | None = None) -> list[tuple[str, int, int]]:
    """Cut files into byte ranges ``(path, start, end)`` of about ``block_size`` bytes (or total / ``num_blocks``)."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    if block_size is None:
        block_size = max(1, math.ceil(total / max(1, num_blocks or 1)))
    blocks = []
    for path, size in zip(files, sizes):
        for start in range(0, max(size, 1), block_size):
            blocks.append((str(path), start, min(start + block_size, size)))
    return blocks


def read_block_lines(path: str, start: int, end: int) -> list[str]:
    """Lines whose first byte lies in ``[start, end)`` (so consecutive blocks share no line and miss none)."""
    lines = []
    with open(path, "rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # finish the line that straddles `start`; it belongs to the previous block
        while handle.tell() < end:
            line = handle.readline()
            if not line:
                break
            lines.append(line.decode("utf-8", errors="replace"))
    return lines


def read_block(block: tuple[str, int, int], block_index: int, sample_ratio: float, seed: int) -> pd.DataFrame:
    """One block as a DataFrame ``{key, text}``: sampled documents (id stripped) with random shuffle keys."""
    import pandas as pd

    rng = np.random.default_rng([seed, block_index])
    texts = []
    for line in read_block_lines(*block):
        line = line.strip()
        if not line:
            continue
        _, _, text = line.partition(" ")  # the first token is the document id (LDDL source format)
        texts.append(text.strip())
    keep = rng.random(len(texts)) < sample_ratio
    texts = [t for t, k in zip(texts, keep) if k and t]
    keys = rng.integers(0, np.iinfo(np.int64).max, len(texts), dtype=np.int64)
    return pd.DataFrame({"key": keys, "text": pd.Series(texts, dtype=object)})


# ----------------------------------------------------------------------------------------------------------------
# One partition -> Parquet
# ----------------------------------------------------------------------------------------------------------------


def build_partition(texts: Sequence[str], index: int, config: PreprocessConfig) -> dict[str, Any]:
    """Turn one partition's documents into pairs and write its Parquet file(s) under ``config.sink``.

    Returns ``{"files": {name: rows}, "documents": ..., "tokens": ..., "pairs": ...}`` for reporting.
    """
    encode, vocabulary = load_wordpiece(config.vocab_file, config.do_lower_case)
    split = get_sentence_splitter(config.sentence_splitter)
    documents = tokenize_documents([split(text) for text in texts], encode)
    rng = random.Random(f"{config.seed}-{index}")
    np_rng = np.random.default_rng([config.seed, index, 1])
    instances = create_instances(
        documents, config.target_seq_length, config.short_seq_prob, config.duplicate_factor, rng, np_rng
    )
    if config.output_format == "hdf5":
        return _write_hdf5_partition(documents, instances, index, config, vocabulary, np_rng)
    vocab = pa.array(vocabulary, type=pa.string())
    mask_id = vocabulary.index("[MASK]") if config.masking else -1
    names = partition_file_names(index, config.num_bins)
    rows = [0] * len(names)
    paths = [Path(config.sink) / name for name in names]
    with parquet_writers(paths, lddl_schema(config.masking, config.bin_size is not None)) as writers:
        for begin in range(0, len(instances), ROW_GROUP_SIZE):
            chunk = instances.take(np.arange(begin, min(begin + ROW_GROUP_SIZE, len(instances))))
            pairs = pair_tokens(documents, chunk)
            masked = None
            if config.masking:
                masked = mask_pairs(pairs, np_rng, config.masked_lm_ratio, len(vocabulary), mask_id,
                                    config.max_predictions_per_seq)
            table = lddl_table(pairs, chunk.is_random_next, vocab, masked, config.bin_size, config.num_bins)
            if config.bin_size is None:
                writers[0].write_table(table)
                rows[0] += table.num_rows
                continue
            column = table.column("bin_id").to_numpy()
            for b, writer in enumerate(writers):
                selected = table.filter(pa.array(column == b))
                if selected.num_rows:
                    writer.write_table(selected)
                    rows[b] += selected.num_rows
    return {
        "files": dict(zip(names, rows)),
        "documents": len(documents),
        "tokens": documents.num_tokens,
        "pairs": len(instances),
    }


def _write_hdf5_partition(documents: TokenizedDocuments, instances: Instances, index: int, config: PreprocessConfig,
                          vocabulary: list[str], np_rng: np.random.Generator) -> dict[str, Any]:
    """Write a partition's pairs as one reference-format HDF5 file (always statically masked); skip if empty."""
    name = hdf5_file_name(index)
    if len(instances):
        blocks = hdf5_blocks(documents, instances, vocabulary, np_rng, config.masked_lm_ratio, config.target_seq_length,
                             config.max_predictions_per_seq, ROW_GROUP_SIZE)
        write_hdf5(Path(config.sink) / name, blocks, len(instances), config.target_seq_length,
                   config.max_predictions_per_seq)
    return {
        "files": {name: len(instances)} if len(instances) else {},
        "documents": len(documents),
        "tokens": documents.num_tokens,
        "pairs": len(instances),
    }


def _build_partition_frame(frame: pd.DataFrame, index: int, config: PreprocessConfig) -> dict[str, Any]:
    """``build_partition`` on a shuffled DataFrame partition, ordered by shuffle key so the output is deterministic."""
    frame = frame.sort_values("key", kind="stable")
    return build_partition(frame["text"].tolist(), index, config)


# ----------------------------------------------------------------------------------------------------------------
# The Dask pipeline
# ----------------------------------------------------------------------------------------------------------------


def preprocess(
    config: PreprocessConfig,
    sources: Sequence[Path],
    client: Client,
    num_blocks: int | None = None,
    block_size: int | None = None,
    balance: bool = True,
    num_shards: int | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline on a ``dask.distributed`` client; returns counts and the ``.num_samples.json`` map.

    ``num_blocks`` (or ``block_size`` in bytes) sets the number of partitions; the parts are then balanced into
    ``num_shards`` shards (default: the number of partitions) unless ``balance`` is False.
    """
    import dask
    import dask.dataframe as dd
    import pandas as pd

    config.validate()
    files = [f for source in sources for f in ([source] if Path(source).is_file() else find_source_files(source))]
    blocks = plan_blocks(files, num_blocks=num_blocks, block_size=block_size)
    partitions = num_blocks or len(blocks)
    sink = Path(config.sink)
    sink.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in sink.iterdir() if ".parquet" in p.name or p.suffix == ".hdf5")
    if stale:
        raise FileExistsError(f"--sink {sink} already holds shard files ({stale[:3]}...); use an empty directory")

    meta = pd.DataFrame({"key": pd.Series([], dtype=np.int64), "text": pd.Series([], dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_map(
            read_block,
            blocks,
            list(range(len(blocks))),
            sample_ratio=config.sample_ratio,
            seed=config.seed,
            meta=meta,
            enforce_metadata=False,
        )
        frame = frame.shuffle("key", npartitions=partitions)
        tasks = [
            dask.delayed(_build_partition_frame)(part, i, config) for i, part in enumerate(frame.to_delayed())
        ]
        results = client.compute(tasks, sync=True)

    report: dict[str, Any] = {
        "partitions": partitions,
        "documents": sum(r["documents"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "pairs": sum(r["pairs"] for r in results),
    }
    report["files"] = {name: rows for r in results for name, rows in r["files"].items()}
    if balance and config.output_format == "parquet":
        report["num_samples"] = balance_shards.balance_shards(
            sink, num_shards or partitions, map_fn=lambda fn, items: client.gather(client.map(fn, items, pure=False))
        )
    return report


def make_client(args: argparse.Namespace) -> Client:
    """A ``dask.distributed`` client: a new LocalCluster, or an existing scheduler (address, file, or dask-mpi)."""
    import logging

    from dask.distributed import Client, LocalCluster

    # The P2P shuffle logs every shuffle's start and end at WARNING level; they are not problems.
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
    if args.scheduler_file:
        return Client(scheduler_file=args.scheduler_file)
    if args.scheduler_address:
        return Client(args.scheduler_address)
    if args.schedule == "mpi":
        try:
            from dask_mpi import initialize
        except ImportError as exc:
            raise RuntimeError("--schedule mpi needs the dask-mpi and mpi4py packages (pip install dask-mpi)") from exc
        # Rank 0 becomes the scheduler and ranks >= 2 workers (they never return); rank 1 runs the rest of main().
        initialize(local_directory=args.local_directory, nanny=False)
        return Client()
    cluster = LocalCluster(
        n_workers=args.local_n_workers,
        threads_per_worker=args.local_threads_per_worker,
        memory_limit=args.local_memory_limit,
        local_directory=args.local_directory,
        dashboard_address=":0",  # any free port: several pipelines may run on one machine
    )
    return Client(cluster)


def parse_bytes(text: str) -> int:
    """``"512"``, ``"64K"``, ``"32M"``, ``"1G"`` -> bytes (binary units, as LDDL's n[KMG] flags)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    try:
        value = int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (examples: 1048576, 64M, 1G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"byte count must be positive, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The LDDL ``preprocess_bert_pretrain`` flags (plus scheduler-connection and balancing options)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_argument_group("input and output")
    sources.add_argument("--wikipedia", type=str, default=None,
                         help="Wikipedia 'source' directory (LDDL layout: <dir>/<lang>/*.txt, or a folder of .txt).")
    sources.add_argument("--books", type=str, default=None,
                         help="Another source directory of the same format (one '<id> text' document per line).")
    sources.add_argument("--common-crawl", type=str, default=None,
                         help="Another source directory of the same format (one '<id> text' document per line).")
    sources.add_argument("--wikipedia-lang", type=str, default="en",
                         help="Subdirectory of --wikipedia to read when it exists (LDDL: source/<lang>).")
    sources.add_argument("--sink", type=str, required=True,
                         help="Output directory (must hold no Parquet files yet); gets the shards and "
                              ".num_samples.json.")
    sources.add_argument("--output-format", choices=["parquet", "hdf5"], default="parquet",
                         help="parquet: LDDL shards (era B); hdf5: reference era-A files, statically masked, one per "
                              "partition.")
    sources.add_argument("--vocab-file", type=str, default=str(DEFAULT_VOCAB),
                         help="WordPiece vocab.txt path (no hub ids: nothing is downloaded); default: bundled uncased "
                              "vocab.")
    sources.add_argument("--do-lower-case", action=argparse.BooleanOptionalAction, default=True,
                         help="Lower-case and strip accents before WordPiece (must match the vocab; default on).")

    pairs = parser.add_argument_group("pairs and masking")
    pairs.add_argument("--target-seq-length", type=int, default=128,
                       help="Maximum tokens of '[CLS] A [SEP] B [SEP]' (128 for phase 1, 512 for phase 2).")
    pairs.add_argument("--short-seq-prob", type=float, default=0.1,
                       help="Probability that a document's target length is drawn uniformly from [2, target-3].")
    pairs.add_argument("--duplicate-factor", type=int, default=5,
                       help="How many times pairs are built from each document (each time with new randomness).")
    pairs.add_argument("--sample-ratio", type=float, default=0.9,
                       help="Fraction of documents kept (a seeded Bernoulli draw per document).")
    pairs.add_argument("--seed", type=int, default=12345,
                       help="Seed of every random choice; the output is reproducible for a seed, input and "
                            "--num-blocks.")
    pairs.add_argument("--masking", action=argparse.BooleanOptionalAction, default=False,
                       help="Static masking in the shards (adds masked_lm_positions/labels); default: dynamic, in the "
                            "loader.")
    pairs.add_argument("--masked-lm-ratio", type=float, default=0.15,
                       help="Fraction of each sequence's tokens masked with --masking (80%% [MASK], 10%% random, 10%% "
                            "kept).")
    pairs.add_argument("--max-predictions-per-seq", type=int, default=None,
                       help="Cap on masked positions per sequence (LDDL: none); required for, and the width of, HDF5.")
    pairs.add_argument("--bin-size", type=int, default=None,
                       help="Sequence-length bin width (must divide --target-seq-length); writes one file per bin.")
    pairs.add_argument("--sentence-splitter", choices=["auto", "blingfire", "regex"], default="auto",
                       help="Sentence splitter: blingfire (no model download), regex, or auto (blingfire if "
                            "installed).")

    sharding = parser.add_argument_group("partitioning and shards")
    size = sharding.add_mutually_exclusive_group()
    size.add_argument("--num-blocks", type=int, default=None,
                      help="Number of partitions, and of output shards (default: one per 32 MiB of source text).")
    size.add_argument("--block-size", type=parse_bytes, default=None, metavar="n[KMG]",
                      help="Source bytes per partition instead of --num-blocks (e.g. 64M).")
    sharding.add_argument("--num-shards", type=int, default=None,
                          help="Balance into this many shards instead of one per partition.")
    sharding.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                          help="Balance the Parquet parts into equal shards at the end (default on; see "
                               "data.balance_shards).")

    cluster = parser.add_argument_group("dask cluster")
    cluster.add_argument("--schedule", choices=["local", "mpi"], default="local",
                         help="local: start a LocalCluster here; mpi: dask-mpi under mpirun/srun (rank 0 scheduler).")
    cluster.add_argument("--scheduler-address", type=str, default=None,
                         help="Join a running scheduler (e.g. tcp://host:8786) instead of starting one.")
    cluster.add_argument("--scheduler-file", type=str, default=None,
                         help="Join the scheduler described by this file (dask-scheduler --scheduler-file, SLURM "
                              "jobs).")
    cluster.add_argument("--local-n-workers", type=int, default=os.cpu_count() or 1,
                         help="Worker processes of the LocalCluster.")
    cluster.add_argument("--local-threads-per-worker", type=int, default=1,
                         help="Threads per LocalCluster worker process.")
    cluster.add_argument("--local-memory-limit", type=str, default="auto",
                         help="Memory limit per LocalCluster worker, e.g. 2GB ('auto': system memory / workers).")
    cluster.add_argument("--local-directory", type=str, default=None,
                         help="Scratch directory of the workers (shuffle spill files).")
    args = parser.parse_args(argv)
    if not (args.wikipedia or args.books or args.common_crawl):
        parser.error("at least one of --wikipedia, --books, --common-crawl is required")
    if args.num_blocks is not None and args.num_blocks < 1:
        parser.error(f"--num-blocks must be positive, got {args.num_blocks}")
    if args.num_shards is not None and (args.num_shards < 1 or not args.balance):
        parser.error("--num-shards must be positive and needs --balance")
    return args


DEFAULT_BLOCK_BYTES = 32 << 20


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    config = PreprocessConfig(
        sink=os.path.abspath(args.sink),
        vocab_file=os.path.abspath(args.vocab_file),
        do_lower_case=args.do_lower_case,
        target_seq_length=args.target_seq_length,
        short_seq_prob=args.short_seq_prob,
        duplicate_factor=args.duplicate_factor,
        sample_ratio=args.sample_ratio,
        seed=args.seed,
        masking=args.masking,
        masked_lm_ratio=args.masked_lm_ratio,
        bin_size=args.bin_size,
        sentence_splitter=args.sentence_splitter,
        output_format=args.output_format,
        max_predictions_per_seq=args.max_predictions_per_seq,
    )
    try:
        config.validate()
        sources = []
        if args.wikipedia:
            wiki = Path(args.wikipedia)
            sources.append(wiki / args.wikipedia_lang if (wiki / args.wikipedia_lang).is_dir() else wiki)
        sources += [Path(p) for p in (args.books, args.common_crawl) if p]
        for source in sources:
            find_source_files(source)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    block_size = args.block_size
    if args.num_blocks is None and block_size is None:
        block_size = DEFAULT_BLOCK_BYTES
    print(f"preprocess_pretraining config: {asdict(config)}", flush=True)
    started = time.perf_counter()
    with make_client(args) as client:
        report = preprocess(
            config, sources, client, num_blocks=args.num_blocks, block_size=block_size,
            balance=args.balance, num_shards=args.num_shards,
        )
    elapsed = time.perf_counter() - started
    shards = report.get("num_samples", report["files"])
    print(
        f"{report['documents']} documents, {report['tokens']} tokens -> {report['pairs']} pairs in "
        f"{report['partitions']} partitions, {len(shards)} files under {config.sink} ({elapsed:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    # Run the module under its import name, so that Dask pickles its functions by reference
    # ("data.preprocess_pretraining.read_block"), which a scheduler and workers started elsewhere can import.
    from data.preprocess_pretraining import main as module_main

    sys.exit(module_main())
