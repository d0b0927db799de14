"""Create BERT pre-training instances in the reference HDF5 format (reference section 6.1, era A).

Input: one sentence per line, a blank line between documents (google-research/bert format); ``--input_file`` is
a file or a directory whose ``*.txt`` files are read in name order, each file starting a new document.
Output: one HDF5 file in the reference layout (``data.formats``): gzip-compressed datasets ``input_ids`` int32
[N, max_seq_length], ``input_mask`` int8, ``segment_ids`` int8, ``masked_lm_positions`` int32
[N, max_predictions_per_seq], ``masked_lm_ids`` int32 and ``next_sentence_labels`` int8 [N] (1 = random next),
zero-padded, written to a temporary name and renamed.

The instances come from ``data.instances``, the same implementation as the Parquet pipeline. Memory: the corpus is
held as int32 token ids (about 4 bytes per token, not a Python string per token as in the reference, whose
instance creation was OOM-killed on big shards), and the HDF5 datasets are filled in blocks.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data.formats import hdf5_blocks, write_hdf5
from data.instances import create_instances, tokenize_documents
from file_utils import PathLike
from tokenization import load_wordpiece

WRITE_BLOCK = 65536  # instances laid out and written per step


def input_files(path: PathLike) -> list[Path]:
    """``path`` itself, or the ``*.txt`` files of directory ``path`` in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
        if files:
            return files
        raise FileNotFoundError(f"--input_file {path} is a directory without .txt files")
    raise FileNotFoundError(f"--input_file {path} does not exist")


def read_documents(files: Sequence[Path]) -> Iterator[list[str]]:
    """Documents (lists of sentence lines) of Google-format files; blank lines and file ends close a document."""
    for path in files:
        document: list[str] = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if line:
                    document.append(line)
                elif document:
                    yield document
                    document = []
        if document:
            yield document


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The reference ``create_pretraining_data.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocab.txt the model is trained with.")
    required.add_argument("--input_file", required=True,
                          help="Input text: a file, or a directory of .txt files (one sentence per line).")
    required.add_argument("--output_file", required=True, help="HDF5 file to write.")
    other = parser.add_argument_group("other")
    other.add_argument("--max_seq_length", type=int, default=128,
                       help="Tokens per instance including [CLS] and two [SEP]s; shorter ones are zero-padded.")
    other.add_argument("--dupe_factor", type=int, default=10,
                       help="How many times instances are built from each document (each time with new randomness).")
    other.add_argument("--max_predictions_per_seq", type=int, default=20,
                       help="Cap on masked positions per instance; also the width of the masked_lm_* datasets.")
    other.add_argument("--masked_lm_prob", type=float, default=0.15,
                       help="Fraction of each instance's tokens masked (80%% [MASK], 10%% random, 10%% kept).")
    other.add_argument("--short_seq_prob", type=float, default=0.1,
                       help="Probability that a document's target length is drawn uniformly from [2, max-3].")
    other.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=True,
                       help="Lower-case and strip accents (uncased vocab; default on, as the reference).")
    other.add_argument("--random_seed", type=int, default=12345, help="Seed of every random choice.")
    args = parser.parse_args(argv)
    if args.max_seq_length < 5:
        parser.error(f"--max_seq_length must be at least 5, got {args.max_seq_length}")
    if args.max_predictions_per_seq < 1:
        parser.error(f"--max_predictions_per_seq must be positive, got {args.max_predictions_per_seq}")
    if args.dupe_factor < 1:
        parser.error(f"--dupe_factor must be positive, got {args.dupe_factor}")
    if not 0.0 < args.masked_lm_prob < 1.0:
        parser.error(f"--masked_lm_prob must be in (0, 1), got {args.masked_lm_prob}")
    if not 0.0 <= args.short_seq_prob <= 1.0:
        parser.error(f"--short_seq_prob must be in [0, 1], got {args.short_seq_prob}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    try:
        files = input_files(args.input_file)
        if not Path(args.vocab_file).is_file():
            raise FileNotFoundError(f"--vocab_file {args.vocab_file} does not exist")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    encode, vocabulary = load_wordpiece(os.path.abspath(args.vocab_file), args.do_lower_case)
    documents = tokenize_documents(list(read_documents(files)), encode)
    if len(documents) == 0:
        print(f"error: --input_file {args.input_file} holds no text", file=sys.stderr)
        return 2
    rng = random.Random(args.random_seed)
    np_rng = np.random.default_rng(args.random_seed)
    instances = create_instances(
        documents, args.max_seq_length, args.short_seq_prob, args.dupe_factor, rng, np_rng
    )
    blocks = hdf5_blocks(documents, instances, vocabulary, np_rng, args.masked_lm_prob, args.max_seq_length,
                         args.max_predictions_per_seq, WRITE_BLOCK)
    write_hdf5(args.output_file, blocks, len(instances), args.max_seq_length, args.max_predictions_per_seq)
    print(
        f"{len(documents)} documents, {documents.num_tokens} tokens -> {len(instances)} instances in "
        f"{args.output_file} ({time.perf_counter() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
