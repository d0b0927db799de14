"""Tokens per second of the Python (`tokenize`) and batch (`batch_encode`) paths of tokenization.BertTokenizer."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tokenization import BertTokenizer  # noqa: E402

DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def best_of(repeats: int, fn) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` calls of ``fn`` (the least disturbed by other processes), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text_file", type=Path, default=DEFAULT_TEXT,
                        help="UTF-8 text, one passage per line (blank lines skipped); default WikiText-2 valid.")
    parser.add_argument("--vocab_file", type=Path, default=REPO / "vocab" / "vocab",
                        help="WordPiece vocabulary, one token per line.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per path; the fastest is reported.")
    args = parser.parse_args()
    if not args.text_file.is_file():
        sys.exit(f"--text_file {args.text_file} not found (WikiText-2 lives in ../shared/data beside the repo)")
    if args.repeats < 1:
        sys.exit(f"--repeats must be at least 1, got {args.repeats}")

    with open(args.text_file, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    characters = sum(len(line) for line in lines)

    tokenizer = BertTokenizer(args.vocab_file)
    slow_s, slow_ids = best_of(args.repeats,
                               lambda: [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t)) for t in lines])
    tokenizer.batch_encode(lines[:8])  # build the Rust tokenizer outside the timing
    fast_s, fast_ids = best_of(args.repeats, lambda: tokenizer.batch_encode(lines))
    if fast_ids != slow_ids:
        sys.exit("batch_encode and tokenize disagree on this text: please report it as a bug")
    tokens = sum(len(ids) for ids in slow_ids)

    print(f"text: {args.text_file} ({len(lines)} lines, {characters} characters, {tokens} tokens)")
    print(f"cpus: {os.cpu_count()}, best of {args.repeats}")
    print(f"python tokenize+convert: {slow_s:8.3f} s  {tokens / slow_s:12,.0f} tokens/s")
    print(f"batch_encode (tokenizers): {fast_s:6.3f} s  {tokens / fast_s:12,.0f} tokens/s  "
          f"({slow_s / fast_s:.1f}x)")
    print(json.dumps({"benchmark": "tokenizer_throughput", "text_file": str(args.text_file), "lines": len(lines),
                      "tokens": tokens, "cpus": os.cpu_count(), "slow_tokens_per_s": round(tokens / slow_s),
                      "fast_tokens_per_s": round(tokens / fast_s), "speedup": round(slow_s / fast_s, 2)}))


if __name__ == "__main__":
    main()
