"""Extract article text from a MediaWiki XML dump into LDDL source files (reference section 6.3 step 1).

``python -m data.extract_wikipedia --input enwiki-latest-pages-articles.xml.bz2 --output-dir wikipedia/source/en``
writes ``<output-dir>/<i>.txt``: one article per line, ``wiki-<page id> `` followed by the article's paragraphs
joined by spaces (title dropped), which is what LDDL's "prepare source" step produces from wikiextractor output
and what ``data.preprocess_pretraining --wikipedia`` reads.

How, and why it differs from the reference (which shells out to wikiextractor, then rewrites its output):
  * one pass, constant memory: the dump is streamed (bz2 decompressed on the fly) through ``iterparse``, and each
    page element is released as soon as it is read, so a 20 GB dump never sits in memory;
  * parallel: the reading process hands batches of pages to ``--num-workers`` processes that clean the markup,
    with a bounded number of batches in flight (a slow pool cannot make the reader buffer the dump), and writes
    their results in dump order;
  * kept: main-namespace (ns 0) pages that are not redirects or disambiguation pages;
  * markup is parsed with ``mwparserfromhell`` (MIT; wikiextractor is AGPL). Dropped: templates (except the few
    that stand for words: convert, lang, nowrap), references,
    tables, comments, math/code-like tags, files/images, categories, interlanguage links, section headings, list
    and indented lines (fragments, not prose), and everything from a trailing "See also"/"References"/"External
    links"/"Notes"/"Further reading" section on. Kept: prose, with link text in place of links;
  * every output file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import bz2
import collections
import contextlib
import importlib.util
import itertools
import multiprocessing
import multiprocessing.pool
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from file_utils import PathLike, atomic_write

ARTICLE_NAMESPACE = 0
# Sections after which an article holds only lists of links and citations.
STOP_SECTIONS = frozenset(
    """see also|references|external links|further reading|notes|footnotes|bibliography|sources|citations|
    notes and references|references and notes|works cited|selected bibliography|publications|discography|
    filmography""".replace("\n", "").replace("    ", "").split("|")
)
# Tags whose content is not running prose.
DROP_TAGS = frozenset(
    """ref references table gallery math chem ce score timeline syntaxhighlight source pre code imagemap graph
    mapframe maplink templatestyles noinclude includeonly onlyinclude poem hiero inputbox categorytree nowiki
    """.split()
)
DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
_DISAMBIGUATION = re.compile(r"disambig|^(dab|hndis|geodis|set index|surname|given name)$")
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)
# Comments and references are removed before parsing: they are a large share of article wikitext and parsing is
# the slow step. A reference cannot contain another <ref>, so the non-greedy match is exact.
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REFERENCE = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_DANGLING_OPEN = re.compile(r"\(\s*[,;:]\s*")  # "(; 1950)" left by a removed template -> "(1950)"
_DANGLING_CLOSE = re.compile(r"\s*[,;:]\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_SPACES = re.compile(r"\s+")
_LIST_LINE = "\x01"  # marks lines that began with a list or indentation marker
_HEADING_LINE = "\x02"  # marks a section heading line


@dataclass
class Page:
    """One ``<page>`` of the dump (only what extraction needs)."""

    page_id: int
    namespace: int
    title: str
    text: str
    redirect: bool


def _local(tag: str) -> str:
    """Tag name without its XML namespace ("{http://www.mediawiki.org/xml/export-0.10/}page" -> "page")."""
    return tag.rsplit("}", 1)[-1]


def iter_pages(stream: IO[bytes]) -> Iterator[Page]:
    """Stream pages from a MediaWiki export in constant memory (each page is cleared from the tree once read)."""
    root = None
    for event, element in ET.iterparse(stream, events=("start", "end")):
        if root is None:
            root = element
            continue
        if event != "end" or _local(element.tag) != "page":
            continue
        page_id, namespace, title, text, redirect = -1, ARTICLE_NAMESPACE, "", "", False
        for child in element:
            name = _local(child.tag)
            if name == "id":
                page_id = int(child.text or -1)
            elif name == "ns":
                namespace = int(child.text or 0)
            elif name == "title":
                title = child.text or ""
            elif name == "redirect":
                redirect = True
            elif name == "revision":
                for part in child:
                    if _local(part.tag) == "text":
                        text = part.text or ""
        root.clear()  # drop this page (and anything before it) from the tree
        yield Page(page_id, namespace, title, text, redirect)


def open_dump(path: PathLike) -> IO[bytes]:
    """Open a dump for streaming: ``.bz2`` is decompressed on the fly, anything else is read as XML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist")
    return bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")


def _render(wikicode) -> str:
    """Plain text of parsed wikicode, with list lines and headings marked for ``clean_wikitext``."""
    from mwparserfromhell import nodes

    out: list[str] = []
    for node in wikicode.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Wikilink):
            out.append(_render_link(node))
        elif isinstance(node, nodes.ExternalLink):
            if node.title is not None:
                out.append(_render(node.title))
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, nodes.Heading):
            out.append(f"\n{_HEADING_LINE}{_render(node.title).strip()}\n")
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in ("li", "dt", "dd") and node.wiki_markup:
                out.append(_LIST_LINE)
            elif tag == "br":
                out.append(" ")
            elif tag not in DROP_TAGS and node.contents is not None:
                out.append(_render(node.contents))
        elif isinstance(node, nodes.Template):
            out.append(_render_template(node))
        # Comments, template arguments and anything else carry no prose.
    return "".join(out)


def _render_template(template) -> str:
    """The inline text of the few templates that stand for words in running prose; empty for all others.

    ``{{convert|10|km|mi}}`` -> "10 km", ``{{lang|fr|mot}}`` / ``{{lang-fr|mot}}`` -> "mot", ``{{nowrap|x}}`` -> "x".
    """
    name = str(template.name).strip().lower()
    positional = [p for p in template.params if not p.showkey]
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{_render(positional[0].value).strip()} {_render(positional[1].value).strip()}"
    if name == "lang" and len(positional) >= 2:
        return _render(positional[1].value)
    if (name.startswith("lang-") or name in ("nowrap", "nobr")) and positional:
        return _render(positional[0].value)
    return ""


def _render_link(link) -> str:
    """Text of an internal link; empty for files, categories and interlanguage links."""
    title = str(link.title).strip()
    leading_colon = title.startswith(":")
    title = title.lstrip(":")
    prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
    if prefix in DROP_LINK_NAMESPACES and not leading_colon:
        return ""
    if link.text is None and not leading_colon and _LANGUAGE_PREFIX.match(prefix):
        return ""
    if link.text is not None:
        return _render(link.text)
    return title.lstrip("#")


def is_disambiguation(wikicode) -> bool:
    """True if the page carries a disambiguation-type template ({{disambiguation}}, {{dab}}, {{hndis}}, ...)."""
    for template in wikicode.filter_templates(recursive=False):
        if _DISAMBIGUATION.search(str(template.name).strip().lower()):
            return True
    return False


def clean_wikitext(text: str) -> list[str]:
    """Paragraphs of prose of an article's wikitext (see the module docstring for what is kept)."""
    import mwparserfromhell

    wikicode = mwparserfromhell.parse(_REFERENCE.sub("", _COMMENT.sub("", text)))
    if is_disambiguation(wikicode):
        return []
    paragraphs = []
    for line in _render(wikicode).split("\n"):
        line = line.strip()
        if not line:
            continue
        if line.startswith(_HEADING_LINE):
            if line[1:].strip().lower() in STOP_SECTIONS:
                break
            continue
        if line.startswith(_LIST_LINE) or line.startswith(("{|", "|", "!", "{{", "}}")):
            continue
        line = _MAGIC_WORD.sub("", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _DANGLING_CLOSE.sub(")", _DANGLING_OPEN.sub("(", line))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if line:
            paragraphs.append(line)
    return paragraphs


def source_line(page: Page) -> str | None:
    """The LDDL source line of a page (``wiki-<id> paragraphs...``), or None if the page is not kept."""
    if page.namespace != ARTICLE_NAMESPACE or page.redirect or _REDIRECT.match(page.text):
        return None
    paragraphs = clean_wikitext(page.text)
    if not paragraphs:
        return None
    return f"wiki-{page.page_id} " + " ".join(paragraphs)


def clean_batch(pages: Sequence[Page]) -> tuple[list[str], collections.Counter]:
    """Worker task: source lines of kept pages, and counts of why the others were skipped."""
    lines, stats = [], collections.Counter()
    for page in pages:
        if page.namespace != ARTICLE_NAMESPACE:
            stats["skipped_namespace"] += 1
            continue
        if page.redirect or _REDIRECT.match(page.text):
            stats["skipped_redirect"] += 1
            continue
        try:
            line = source_line(page)
        except Exception as exc:  # a malformed page must not stop a multi-hour run; it is counted and reported
            stats["errors"] += 1
            print(f"warning: page {page.page_id} ({page.title!r}) failed to parse: {exc}", file=sys.stderr)
            continue
        if line is None:
            stats["skipped_empty_or_disambiguation"] += 1
        else:
            lines.append(line)
            stats["articles"] += 1
    return lines, stats


def write_text_shards(lines: Iterable[str], output_dir: PathLike, shard_bytes: int) -> list[Path]:
    """Write ``lines`` to ``<output_dir>/<i>.txt``, starting a new file past ``shard_bytes``; return the files.

    Each file is written under a temporary name and renamed when complete: if ``lines`` raises, the files finished
    so far stay and the one being written is removed.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    lines = iter(lines)
    for first in lines:  # the next file's first line is read only after the previous file is complete
        path = output_dir / f"{len(paths)}.txt"
        with atomic_write(path, "w", encoding="utf-8", newline="\n") as handle:
            size = 0
            for line in itertools.chain([first], lines):
                handle.write(line + "\n")
                size += len(line) + 1
                if size >= shard_bytes:
                    break
        paths.append(path)
    return paths


def _batches(pages: Iterable[Page], batch_bytes: int) -> Iterator[list[Page]]:
    batch, size = [], 0
    for page in pages:
        batch.append(page)
        size += len(page.text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cleaned_lines(pages: Iterable[Page], num_workers: int, batch_bytes: int, max_articles: int | None,
                   stats: collections.Counter) -> Iterator[str]:
    """Source lines of the kept pages, in dump order, at most ``max_articles``; ``stats`` counts the lines handed out
    ("written") and why the other pages were skipped. ``num_workers`` processes clean the markup (0: this one)."""
    batches = _batches(pages, batch_bytes)
    pool = multiprocessing.get_context("spawn").Pool(num_workers) if num_workers > 0 else None
    try:
        results = map(clean_batch, batches) if pool is None else _in_order(pool, batches, 4 * num_workers)
        for lines, counts in results:
            stats.update(counts)
            for line in lines:
                if max_articles is not None and stats["written"] >= max_articles:
                    return
                stats["written"] += 1
                yield line
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _in_order(pool: multiprocessing.pool.Pool, batches: Iterable[list[Page]],
              window: int) -> Iterator[tuple[list[str], collections.Counter]]:
    """``clean_batch`` of each batch on the pool, in order, with at most ``window`` batches in flight (so a slow
    pool never makes the reader buffer the dump)."""
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(clean_batch, (batch,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@dataclass
class ExtractionReport:
    """Counts of one extraction run."""

    files: list[str] = field(default_factory=list)
    stats: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0


def extract(
    input_path: PathLike,
    output_dir: PathLike,
    num_workers: int = os.cpu_count() or 1,
    shard_bytes: int = 128 << 20,
    max_articles: int | None = None,
    batch_bytes: int = 1 << 20,
) -> ExtractionReport:
    """Extract the articles of a dump into LDDL source files; see the module docstring.

    ``num_workers=0`` cleans in this process (no pool). ``max_articles`` stops after that many articles.
    """
    if importlib.util.find_spec("mwparserfromhell") is None:  # fail here, not once per page in the workers
        raise ImportError("Wikipedia extraction needs mwparserfromhell: pip install mwparserfromhell")
    started = time.perf_counter()
    existing = sorted(Path(output_dir).glob("*.txt")) if Path(output_dir).is_dir() else []
    if existing:
        raise FileExistsError(f"--output-dir {output_dir} already holds .txt files ({existing[0].name}...)")
    report = ExtractionReport()
    with open_dump(input_path) as stream, contextlib.closing(
            _cleaned_lines(iter_pages(stream), num_workers, batch_bytes, max_articles, report.stats)) as lines:
        report.files = [str(p) for p in write_text_shards(lines, output_dir, shard_bytes)]
    report.seconds = time.perf_counter() - started
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The extraction flags (LDDL's --extract-shard-size is --shard-size-mb here)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="The dump: *-pages-articles.xml.bz2 (or an uncompressed .xml).")
    parser.add_argument("--output-dir", required=True,
                        help="Directory for <i>.txt source files (LDDL: <outdir>/source/<lang>); must hold none yet.")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                        help="Processes cleaning markup (0: clean in the reading process).")
    parser.add_argument("--shard-size-mb", type=float, default=128,
                        help="Start a new source file after this many MiB of text.")
    parser.add_argument("--max-articles", type=int, default=None,
                        help="Stop after writing this many articles (smoke tests; default: all).")
    args = parser.parse_args(argv)
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.shard_size_mb <= 0:
        parser.error(f"--shard-size-mb must be positive, got {args.shard_size_mb}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    try:
        report = extract(args.input, args.output_dir, args.num_workers, int(args.shard_size_mb * (1 << 20)),
                         args.max_articles)
    except (FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ET.ParseError as exc:
        print(f"error: --input {args.input} is not a well-formed MediaWiki XML dump: {exc}", file=sys.stderr)
        return 2
    stats = dict(sorted(report.stats.items()))
    print(f"{stats.get('written', 0)} articles -> {len(report.files)} files in {args.output_dir} "
          f"({report.seconds:.1f} s); {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
