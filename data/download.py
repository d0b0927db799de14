"""Download the raw data: Wikipedia dump, SQuAD v1.1/v2.0, GLUE (MRPC built as GLUE builds it), uncased vocab.

This is the reference's ``bertPrep.py --action download --dataset X`` step (plus LDDL's ``download_wikipedia``),
on top of :func:`file_utils.download_file`: every file is streamed to ``<name>.partial`` and renamed when complete,
an interrupted download resumes on the next run, finished files are not fetched again, known digests are checked,
and archives are unpacked with :func:`file_utils.safe_extract`.

Layout under the working directory (``$BERT_PREP_WORKING_DIR``, as in the reference)::

    wikipedia/wikicorpus-<lang>.xml.bz2
    download/squad/v1.1/{train-v1.1.json, dev-v1.1.json, evaluate-v1.1.py}   (and v2.0)
    download/glue/<TASK>/...           CoLA SST-2 QQP STS-B MNLI QNLI RTE WNLI, MRPC/{train,dev,test}.tsv
    download/google_pretrained_weights/uncased_L-24_H-1024_A-16/vocab.txt

A mirror (``--mirror`` or ``$BERT_DATA_MIRROR``: an http(s)/s3 base URL or a local folder) replaces every
upstream address by ``<mirror>/<mirror path>``, with the mirror paths listed in :data:`MIRROR_LAYOUT`; use it
for offline clusters, for upstream hosts that moved, and in tests.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python data/download.py` as well as `python -m data.download`
    sys.path.insert(0, str(REPO))

from file_utils import DownloadError, PathLike, atomic_write, download_file, is_remote, safe_extract  # noqa: E402

logger = logging.getLogger(__name__)

MIRROR_ENV = "BERT_DATA_MIRROR"


@dataclass(frozen=True)
class Remote:
    """One file to fetch: upstream sources tried in order, its path under a mirror, and digests when known."""

    urls: tuple[str, ...]
    mirror_path: str
    md5: str | None = None
    sha256: str | None = None


def _wikipedia(lang: str) -> Remote:
    name = f"{lang}wiki-latest-pages-articles.xml.bz2"
    # "latest" changes monthly, so no digest; the resume is pinned to the dump's ETag instead (file_utils).
    return Remote((f"https://dumps.wikimedia.org/{lang}wiki/latest/{name}",), f"wikipedia/{name}")


_SQUAD_SITE = "https://rajpurkar.github.io/SQuAD-explorer/dataset"
_CODALAB = "https://worksheets.codalab.org/rest/bundles"
# md5 digests as published with the reference's squad_download.sh and torchtext.
SQUAD: dict[str, dict[str, Remote]] = {
    "v1.1": {
        "train-v1.1.json": Remote((f"{_SQUAD_SITE}/train-v1.1.json",), "squad/v1.1/train-v1.1.json",
                                  md5="981b29407e0affa3b1b156f72073b945"),
        "dev-v1.1.json": Remote((f"{_SQUAD_SITE}/dev-v1.1.json",), "squad/v1.1/dev-v1.1.json",
                                md5="3e85deb501d4e538b6bc56f786231552"),
        "evaluate-v1.1.py": Remote((f"{_CODALAB}/0xbcd57bee090b421c982906709c8c27e1/contents/blob/",),
                                   "squad/v1.1/evaluate-v1.1.py", md5="afb04912d18ff20696f7f88eed49bea9"),
    },
    "v2.0": {
        "train-v2.0.json": Remote((f"{_SQUAD_SITE}/train-v2.0.json",), "squad/v2.0/train-v2.0.json",
                                  md5="62108c273c268d70893182d5cf8df740"),
        "dev-v2.0.json": Remote((f"{_SQUAD_SITE}/dev-v2.0.json",), "squad/v2.0/dev-v2.0.json",
                                md5="246adae8b7002f8679c027697b0b7cf8"),
        "evaluate-v2.0.py": Remote((f"{_CODALAB}/0x6b567e1cf2e041ec80d7098f031c5c9e/contents/blob/",),
                                   "squad/v2.0/evaluate-v2.0.py", md5="ff23213bed5516ea4a6d9edb6cd7d627"),
    },
}

_GLUE_SITE = "https://dl.fbaipublicfiles.com/glue/data"
# Task folder -> archive name on GLUE's hosting (QQP and QNLI are served under their revised names).
GLUE_ARCHIVES: dict[str, str] = {
    "CoLA": "CoLA.zip", "SST-2": "SST-2.zip", "QQP": "QQP-clean.zip", "STS-B": "STS-B.zip",
    "MNLI": "MNLI.zip", "QNLI": "QNLIv2.zip", "RTE": "RTE.zip", "WNLI": "WNLI.zip",
}
GLUE_TASKS: tuple[str, ...] = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI")

# GLUE never hosted MRPC (licence): its script takes the MSR corpus files from SentEval's hosting and GLUE's list of
# dev pairs, and builds train/dev/test.tsv itself (see format_mrpc).
MRPC: dict[str, Remote] = {
    "msr_paraphrase_train.txt": Remote(
        ("https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",),
        "mrpc/msr_paraphrase_train.txt"),
    "msr_paraphrase_test.txt": Remote(
        ("https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",),
        "mrpc/msr_paraphrase_test.txt"),
    "dev_ids.tsv": Remote(
        ("https://firebasestorage.googleapis.com/v0/b/mtl-sentence-representations.appspot.com/o/"
         "data%2Fmrpc_dev_ids.tsv?alt=media&token=ec5c0836-31d5-48f4-b431-7480817f1adc",
         "https://raw.githubusercontent.com/nyu-mll/GLUE-baselines/master/glue_data/MRPC/dev_ids.tsv"),
        "mrpc/dev_ids.tsv", md5="7ab59a1b04bd7cb773f98a0717106c9b"),
}

# Google's uncased WordPiece vocab (BERT-base and -large share it). The copy bundled in this repo is tried first
# (same digest, no network); then two public hosts of the identical file.
VOCAB = Remote(
    (str(REPO / "vocab" / "vocab"),
     "https://huggingface.co/google-bert/bert-large-uncased/resolve/main/vocab.txt",
     "https://s3.amazonaws.com/models.huggingface.co/bert/bert-large-uncased-vocab.txt"),
    "vocab/vocab.txt",
    md5="64800d5d8528ce344256daf115d4965e",
    sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
)
VOCAB_PATH = Path("download/google_pretrained_weights/uncased_L-24_H-1024_A-16/vocab.txt")
"""Where the reference's fine-tuning configs look for the vocab, relative to the working directory."""

MIRROR_LAYOUT: tuple[str, ...] = (
    *(_wikipedia(lang).mirror_path for lang in ("en", "zh")),
    *(remote.mirror_path for files in SQUAD.values() for remote in files.values()),
    *(f"glue/{archive}" for archive in GLUE_ARCHIVES.values()),
    *(remote.mirror_path for remote in MRPC.values()),
    VOCAB.mirror_path,
)
"""Every path a mirror must provide (relative to its base) for ``--dataset all`` plus ``wikicorpus_zh``."""


def fetch(remote: Remote, dest: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Download ``remote`` to ``dest`` from the mirror if given, else from its upstream sources in order."""
    sources = (_mirrored(mirror, remote.mirror_path),) if mirror else remote.urls
    failures: list[str] = []
    for source in sources:
        try:
            return download_file(source, dest, sha256=remote.sha256, md5=remote.md5, progress=progress)
        except (DownloadError, FileNotFoundError) as exc:
            if len(sources) == 1:
                raise
            logger.warning("could not get %s from %s: %s", Path(dest).name, source, exc)
            failures.append(f"{source}: {exc}")
    raise DownloadError(f"no source could provide {dest}:\n  " + "\n  ".join(failures))


def _mirrored(mirror: str, mirror_path: str) -> str:
    if is_remote(mirror) or mirror.startswith("file://"):
        return f"{mirror.rstrip('/')}/{mirror_path}"
    return str(Path(mirror).expanduser() / mirror_path)


def download_wikipedia(outdir: PathLike, lang: str = "en", mirror: str | None = None,
                       progress: bool = True) -> Path:
    """Fetch the ``<lang>`` Wikipedia articles dump (about 22 GB for en) to ``wikipedia/wikicorpus-<lang>.xml.bz2``."""
    return fetch(_wikipedia(lang), Path(outdir) / "wikipedia" / f"wikicorpus-{lang}.xml.bz2", mirror, progress)


def download_squad(outdir: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch SQuAD v1.1 and v2.0 train/dev JSON and the official evaluation scripts to ``download/squad/``."""
    squad_dir = Path(outdir) / "download" / "squad"
    for version, files in SQUAD.items():
        for name, remote in files.items():
            fetch(remote, squad_dir / version / name, mirror, progress)
    return squad_dir


def download_glue_task(task: str, outdir: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch one GLUE task into ``download/glue/<task>/`` (MRPC via :func:`download_mrpc`); skip it if present.

    The archive is unpacked safely into a temporary folder and its single top-level folder renamed into place, so
    a task folder exists only when complete; the archive is deleted afterwards.
    """
    if task == "MRPC":
        return download_mrpc(outdir, mirror, progress)
    if task not in GLUE_ARCHIVES:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    glue_dir = Path(outdir) / "download" / "glue"
    target = glue_dir / task
    if target.is_dir():
        logger.info("%s already present, skipping", target)
        return target
    archive_name = GLUE_ARCHIVES[task]
    archive = fetch(Remote((f"{_GLUE_SITE}/{archive_name}",), f"glue/{archive_name}"), glue_dir / archive_name,
                    mirror, progress)
    with tempfile.TemporaryDirectory(prefix=f".{task}.", dir=glue_dir) as tmp:
        root = safe_extract(archive, Path(tmp) / "contents")
        entries = [entry for entry in root.iterdir() if entry.name != "__MACOSX"]
        os.replace(entries[0] if len(entries) == 1 and entries[0].is_dir() else root, target)
    archive.unlink()
    logger.info("%s ready in %s", task, target)
    return target


def download_glue(outdir: PathLike, tasks: Sequence[str] = GLUE_TASKS, mirror: str | None = None,
                  progress: bool = True) -> Path:
    """Fetch the given GLUE tasks (default: all nine) into ``download/glue/``."""
    for task in tasks:
        download_glue_task(task, outdir, mirror, progress)
    return Path(outdir) / "download" / "glue"


def download_mrpc(outdir: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch the MSR paraphrase corpus and GLUE's dev ids, then build GLUE's MRPC ``train/dev/test.tsv``."""
    mrpc_dir = Path(outdir) / "download" / "glue" / "MRPC"
    for name, remote in MRPC.items():
        fetch(remote, mrpc_dir / name, mirror, progress)
    format_mrpc(mrpc_dir, mrpc_dir)
    return mrpc_dir


class MrpcFormatError(ValueError):
    """An MSR paraphrase or dev-ids file is malformed; the message names the file and line."""


def _read_lines(path: Path) -> list[str]:
    # utf-8, not utf-8-sig: GLUE keeps the corpus's byte-order mark in the header it copies to train/dev.tsv.
    # newline=None: universal newlines, so CRLF copies of the corpus give the same output.
    with open(path, encoding="utf-8", newline=None) as handle:
        return handle.readlines()


def _mrpc_rows(path: Path) -> tuple[str, list[list[str]]]:
    """Header line and 5-field rows (quality, id1, id2, string1, string2) of an MSR paraphrase file."""
    lines = _read_lines(path)
    if not lines:
        raise MrpcFormatError(f"{path} is empty")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 5:
            raise MrpcFormatError(f"{path}:{number}: expected 5 tab-separated fields, found {len(fields)}")
        rows.append(fields)
    header = lines[0] if lines[0].endswith("\n") else lines[0] + "\n"
    return header, rows


def format_mrpc(source_dir: PathLike, out_dir: PathLike) -> None:
    """Build GLUE's MRPC files from ``msr_paraphrase_{train,test}.txt`` and ``dev_ids.tsv`` in ``source_dir``.

    As GLUE's ``download_glue_data.py``: pairs of the training corpus listed in ``dev_ids.tsv`` (as ``id1<TAB>id2``)
    go to ``dev.tsv``, the rest to ``train.tsv``, both under the corpus's own header line and in corpus order;
    ``test.tsv`` holds the test corpus with its quality column replaced by a 0-based ``index``. Every row is
    whitespace-stripped and rejoined with tabs. Files are written atomically.
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    dev_ids = set()
    for number, line in enumerate(_read_lines(source_dir / "dev_ids.tsv"), start=1):
        ids = line.strip().split("\t")
        if ids == [""]:
            continue
        if len(ids) != 2:
            raise MrpcFormatError(f"{source_dir / 'dev_ids.tsv'}:{number}: expected two tab-separated ids")
        dev_ids.add((ids[0], ids[1]))
    header, rows = _mrpc_rows(source_dir / "msr_paraphrase_train.txt")
    train = [header] + ["\t".join(row) + "\n" for row in rows if (row[1], row[2]) not in dev_ids]
    dev = [header] + ["\t".join(row) + "\n" for row in rows if (row[1], row[2]) in dev_ids]
    _, test_rows = _mrpc_rows(source_dir / "msr_paraphrase_test.txt")
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"] + [
        "\t".join([str(index), *row[1:]]) + "\n" for index, row in enumerate(test_rows)]
    for name, lines in (("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)):
        with atomic_write(out_dir / name, "wb") as handle:
            handle.write("".join(lines).encode("utf-8"))
    logger.info("MRPC: %d train, %d dev, %d test pairs in %s", len(train) - 1, len(dev) - 1, len(test) - 1, out_dir)


def download_vocab(outdir: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch the uncased vocab (digest-checked) to the path the reference's configs use (:data:`VOCAB_PATH`)."""
    return fetch(VOCAB, Path(outdir) / VOCAB_PATH, mirror, progress)


def _glue_only(task: str) -> Callable[[Path, str | None, bool], Path]:
    return lambda outdir, mirror, progress: download_glue_task(task, outdir, mirror, progress)


DATASETS: dict[str, Callable[[Path, str | None, bool], Path]] = {
    "wikicorpus_en": lambda outdir, mirror, progress: download_wikipedia(outdir, "en", mirror, progress),
    "wikicorpus_zh": lambda outdir, mirror, progress: download_wikipedia(outdir, "zh", mirror, progress),
    "squad": download_squad,
    "glue": lambda outdir, mirror, progress: download_glue(outdir, GLUE_TASKS, mirror, progress),
    **{task.lower(): _glue_only(task) for task in GLUE_TASKS},
    "vocab": download_vocab,
}
ALL = ("wikicorpus_en", "squad", "glue", "vocab")


def download_dataset(name: str, outdir: PathLike, mirror: str | None = None, progress: bool = True) -> Path:
    """Download one dataset by its CLI name (see :data:`DATASETS`); return the file or folder it produced."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join([*DATASETS, 'all'])}")
    return DATASETS[name](Path(outdir), mirror, progress)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.download",
        description="Download raw datasets (the reference's `bertPrep.py --action download --dataset X`). "
                    "Reruns skip finished files and resume interrupted ones.",
        epilog="Mirror layout (paths under --mirror): " + ", ".join(MIRROR_LAYOUT))
    parser.add_argument("--dataset", nargs="+", required=True, choices=[*DATASETS, "all"], metavar="NAME",
                        help=f"one or more of: {', '.join([*DATASETS, 'all'])}; 'all' = {' '.join(ALL)}")
    parser.add_argument("--outdir", default=os.environ.get("BERT_PREP_WORKING_DIR", "data"),
                        help="working directory that receives wikipedia/ and download/ "
                             "(default: $BERT_PREP_WORKING_DIR, else ./data)")
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or None,
                        help=f"base URL (http, https, s3) or local folder replacing every upstream host, laid out "
                             f"as listed below (default: ${MIRROR_ENV})")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(dict.fromkeys(n for name in args.dataset for n in (ALL if name == "all" else (name,))))
    try:
        for name in names:
            logger.info("%s -> %s", name, download_dataset(name, args.outdir, args.mirror, not args.no_progress))
    except (OSError, ValueError) as exc:  # DownloadError, ChecksumError, UnsafeArchiveError, MrpcFormatError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
