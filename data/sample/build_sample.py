"""Build the bundled demo corpus (``data/sample/source/en/*.txt``) from WikiText-2 and BERT's sample_text.txt.

Run from the repository root (``python -m data.sample.build_sample --wikitext ... --sample-text ...``); the output
is committed, so users never need to run it. The same converters serve the preprocessing benchmark.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
_TOP_HEADING = re.compile(r"^= [^=].* =$")
_SUB_HEADING = re.compile(r"^(= ){2,}.*( =){2,}$")
# WikiText's tokenizer split numbers and hyphenated words with @-@ style markers; join them back.
_JOINERS = {" @-@ ": "-", " @,@ ": ",", " @.@ ": "."}


def wikitext_articles(lines: Iterable[str]) -> list[tuple[str, str]]:
    """``(title, text)`` per article of a WikiText file: paragraphs joined by spaces, section headings dropped."""
    articles: list[tuple[str, list[str]]] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if _TOP_HEADING.match(line) and not _SUB_HEADING.match(line):
            articles.append((line.strip("= ").strip(), []))
        elif _SUB_HEADING.match(line):
            continue
        elif articles:
            for marker, joined in _JOINERS.items():
                line = line.replace(marker, joined)
            articles[-1][1].append(line)
    return [(title, " ".join(paragraphs)) for title, paragraphs in articles if paragraphs]


def google_documents(lines: Iterable[str]) -> list[str]:
    """Documents of a Google-format file (one sentence per line, blank line between documents), each on one line."""
    documents: list[list[str]] = [[]]
    for raw in lines:
        line = raw.strip()
        if line:
            documents[-1].append(line)
        elif documents[-1]:
            documents.append([])
    return [" ".join(sentences) for sentences in documents if sentences]


def write_source(path: Path, prefix: str, texts: Sequence[str]) -> int:
    """Write texts in the LDDL source format (``<prefix>-<n> text`` per line); returns bytes written."""
    data = "".join(f"{prefix}-{i} {text}\n" for i, text in enumerate(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data, encoding="utf-8")
    return len(data.encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the two sources into ``--output-dir`` (default ``data/sample/source/en``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wikitext", required=True, help="WikiText-2 valid.txt (tokenised version).")
    parser.add_argument("--sample-text", required=True, help="google-research/bert sample_text.txt.")
    parser.add_argument("--output-dir", default=str(HERE / "source" / "en"), help="Where the source files go.")
    parser.add_argument("--max-bytes", type=int, default=600_000, help="Stop adding WikiText articles past this size.")
    args = parser.parse_args(argv)
    articles = wikitext_articles(Path(args.wikitext).read_text(encoding="utf-8").splitlines())
    kept, size = [], 0
    for _, text in articles:
        if size + len(text) > args.max_bytes:
            break
        kept.append(text)
        size += len(text) + 1
    out = Path(args.output_dir)
    wiki_bytes = write_source(out / "wikitext2_valid.txt", "wikitext2-valid", kept)
    sample_docs = google_documents(Path(args.sample_text).read_text(encoding="utf-8").splitlines())
    sample_bytes = write_source(out / "bert_sample_text.txt", "bert-sample", sample_docs)
    print(f"{len(kept)} WikiText-2 articles ({wiki_bytes} bytes), {len(sample_docs)} sample documents "
          f"({sample_bytes} bytes) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
