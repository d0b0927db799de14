"""The reference's ``data/bertPrep.py`` command line, run by this project's data modules.

For scripts that call ``python data/bertPrep.py --action A --dataset D``: each supported pair runs the nearest
project function, under ``$BERT_PREP_WORKING_DIR`` (default ``./data``); any other pair is an error that lists what
is supported. The new pipeline (Parquet shards, LDDL layout) is ``data/create_datasets_from_start.sh``.

======================  =======================================  ==================================================
--action                --dataset                                runs
======================  =======================================  ==================================================
download                wikicorpus_en, wikicorpus_zh             ``data.download.download_wikipedia`` ->
                                                                 ``wikipedia/wikicorpus-<lang>.xml.bz2``
download                squad                                    ``download_squad`` -> ``download/squad/v1.1, v2.0``
download                mrpc, sst-2                              ``download_glue_task`` -> ``download/glue/<TASK>``
download                google_pretrained_weights                ``download_vocab``: only the uncased vocab.txt, in
                                                                 the reference's place (the TF checkpoints cannot be
                                                                 loaded here); this is what the era-A pipeline used
download                all                                      each of the above; bookscorpus and
                                                                 nvidia_pretrained_weights are skipped (warning)
text_formatting         wikicorpus_en                            ``data.extract_wikipedia.extract`` ->
                                                                 ``wikipedia/source/en/<i>.txt`` (one article per
                                                                 line after its ``wiki-<id>``; the folder
                                                                 create_datasets_from_start.sh uses)
sharding                wikicorpus_en; with --input_files also   sentence splitting (``data.sentences``) and
                        bookscorpus, books_wiki_en_corpus        balanced training/test text shards
create_hdf5_files       the datasets of sharding                 ``data.create_pretraining_data`` on every shard
======================  =======================================  ==================================================

Folders are the reference's: ``sharded_training_shards_<n>_test_shards_<m>_fraction_<f>/<dataset>/
<dataset>_{training,test}_<i>.txt`` (one sentence per line, a blank line after each article: Google's input
format) and ``hdf5_lower_case_<l>_seq_len_<s>_max_pred_<p>_masked_lm_prob_<m>_random_seed_<r>_dupe_factor_<d>/
<dataset>/<dataset>_{training,test}_<i>.hdf5``. Every file is written under a temporary name and renamed, and a
rerun of create_hdf5_files skips the HDF5 files already complete. Sharding holds the corpus in memory, as the
reference did; for all of Wikipedia the Dask pipeline (``data.preprocess_pretraining --output-format hdf5``) scales.
"""
from __future__ import annotations

import argparse
import heapq
import logging
import os
import random
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python data/bertPrep.py`, as the reference is called, as well as `-m data.bertPrep`
    sys.path.insert(0, str(REPO))

from data import download, extract_wikipedia  # noqa: E402
from data.sentences import get_sentence_splitter  # noqa: E402
from file_utils import atomic_write  # noqa: E402

logger = logging.getLogger("bertPrep")

ACTIONS = ("download", "text_formatting", "sharding", "create_tfrecord_files", "create_hdf5_files")
DATASETS = ("bookscorpus", "wikicorpus_en", "wikicorpus_zh", "books_wiki_en_corpus", "google_pretrained_weights",
            "nvidia_pretrained_weights", "mrpc", "sst-2", "squad", "all")
WIKI_LANG = {"wikicorpus_en": "en", "wikicorpus_zh": "zh"}
GLUE_TASK = {"mrpc": "MRPC", "sst-2": "SST-2"}
DOWNLOADS = ("wikicorpus_en", "wikicorpus_zh", "google_pretrained_weights", "mrpc", "sst-2", "squad")
SHARDABLE = ("wikicorpus_en", "bookscorpus", "books_wiki_en_corpus")
SUPPORTED = {
    "download": (*DOWNLOADS, "all"),
    "text_formatting": ("wikicorpus_en",),
    "sharding": SHARDABLE,
    "create_tfrecord_files": (),
    "create_hdf5_files": SHARDABLE,
}
# Why a pair has no counterpart here (the message of its error).
NO_COUNTERPART = {
    ("download", "bookscorpus"): "this project has no BookCorpus downloader; it pre-trains on Wikipedia (your own "
                                 "text can go to sharding with --input_files)",
    ("download", "books_wiki_en_corpus"): "this project has no BookCorpus downloader; download wikicorpus_en",
    ("download", "nvidia_pretrained_weights"): "the reference's downloader for them is not implemented either; "
                                               "NVIDIA's checkpoints are published on NGC",
    ("text_formatting", "wikicorpus_zh"): "Chinese text needs segmentation this project does not do (the reference "
                                          "refuses it too)",
    ("create_tfrecord_files", None): "TFRecord output is for TensorFlow (the reference's PyTorch release refuses it "
                                     "too); use create_hdf5_files",
}


class UnsupportedError(ValueError):
    """An action/dataset pair of the reference that has no counterpart in this project."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The reference's flags and defaults (``--segmentation_method`` names this project's sentence splitters)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--action", required=True, choices=ACTIONS, help="The step to run.")
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="The dataset to run it on.")
    parser.add_argument("--input_files", default=None,
                        help="Sharding input: comma-separated text files, one article per line (default for "
                             "wikicorpus_en: the text_formatting output).")
    parser.add_argument("--n_training_shards", type=int, default=256, help="Training text shards (and HDF5 files).")
    parser.add_argument("--n_test_shards", type=int, default=256, help="Test text shards (and HDF5 files).")
    parser.add_argument("--fraction_test_set", type=float, default=0.1,
                        help="Share of the sentences that go to the test shards (whole articles, at least one a "
                             "shard).")
    parser.add_argument("--segmentation_method", default="auto", choices=("auto", "blingfire", "regex", "nltk"),
                        help="Sentence splitter of sharding: Bling Fire when installed (auto), or the regex one. "
                             "NLTK (the reference's) is refused: it downloads its model at run time.")
    parser.add_argument("--n_processes", type=int, default=4,
                        help="Processes of text_formatting (markup cleaning) and create_hdf5_files (one shard each).")
    parser.add_argument("--random_seed", type=int, default=12345,
                        help="Seed of the article order in sharding and of every HDF5 file's instances.")
    parser.add_argument("--dupe_factor", type=int, default=5, help="Instance rounds built from each document.")
    parser.add_argument("--masked_lm_prob", type=float, default=0.15, help="Fraction of the tokens masked.")
    parser.add_argument("--max_seq_length", type=int, default=512, help="Tokens per instance, special ones included.")
    parser.add_argument("--max_predictions_per_seq", type=int, default=20, help="Cap on masked tokens per instance.")
    parser.add_argument("--do_lower_case", type=int, default=1, help="1 (any number > 0): uncased vocab; 0: cased.")
    parser.add_argument("--vocab_file", default=None, help="WordPiece vocab.txt; required by create_hdf5_files.")
    parser.add_argument("--skip_wikiextractor", type=int, default=0,
                        help="1: do not extract in text_formatting, only check that wikipedia/source/en holds the "
                             "articles.")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Layout:
    """The reference's folders under the working directory, named by the settings that shape their content."""

    root: Path
    args: argparse.Namespace

    def dump(self, lang: str) -> Path:
        return self.root / "wikipedia" / f"wikicorpus-{lang}.xml.bz2"

    def source(self, lang: str) -> Path:
        return self.root / "wikipedia" / "source" / lang

    @property
    def extracted_marker(self) -> Path:
        return self.root / "wikipedia" / ".extracted"  # create_datasets_from_start.sh's "extraction finished"

    def sharded(self, dataset: str) -> Path:
        a = self.args
        return self.root / (f"sharded_training_shards_{a.n_training_shards}_test_shards_{a.n_test_shards}_"
                            f"fraction_{a.fraction_test_set}") / dataset

    def hdf5(self, dataset: str) -> Path:
        a = self.args
        return self.root / (f"hdf5_lower_case_{a.do_lower_case}_seq_len_{a.max_seq_length}_max_pred_"
                            f"{a.max_predictions_per_seq}_masked_lm_prob_{a.masked_lm_prob}_random_seed_"
                            f"{a.random_seed}_dupe_factor_{a.dupe_factor}") / dataset

    def shard_names(self, dataset: str) -> list[str]:
        """``<dataset>_training_<i>`` then ``<dataset>_test_<i>``, the reference's shard names (no suffix)."""
        return [f"{dataset}_training_{i}" for i in range(self.args.n_training_shards)] + \
               [f"{dataset}_test_{i}" for i in range(self.args.n_test_shards)]


def check_supported(action: str, dataset: str) -> None:
    """Raise ``UnsupportedError`` for a pair without a counterpart, saying why and what ``action`` supports."""
    if dataset in SUPPORTED[action]:
        return
    reason = NO_COUNTERPART.get((action, dataset)) or NO_COUNTERPART.get((action, None))
    supported = ", ".join(SUPPORTED[action]) or "none"
    raise UnsupportedError(f"--action {action} --dataset {dataset} has no counterpart in this project"
                           f"{': ' + reason if reason else ''}. Supported with --action {action}: {supported}")


# ---------------------------------------------------------------------------------------------------------------
# download, text_formatting
# ---------------------------------------------------------------------------------------------------------------


def download_one(dataset: str, root: Path, mirror: str | None) -> Path:
    """Fetch one dataset with ``data.download`` (resumable, digest-checked); returns what it wrote."""
    if dataset in WIKI_LANG:
        return download.download_wikipedia(root, WIKI_LANG[dataset], mirror)
    if dataset in GLUE_TASK:
        return download.download_glue_task(GLUE_TASK[dataset], root, mirror)
    if dataset == "squad":
        return download.download_squad(root, mirror)
    logger.warning("google_pretrained_weights: fetching only the uncased vocab.txt (Google's TensorFlow checkpoints "
                   "cannot be loaded by this project)")
    return download.download_vocab(root, mirror)


def run_download(dataset: str, layout: Layout) -> None:
    """``--action download``; ``all`` fetches every dataset that has a downloader here."""
    mirror = os.environ.get(download.MIRROR_ENV) or None
    names = DOWNLOADS if dataset == "all" else (dataset,)
    if dataset == "all":
        logger.warning("--dataset all: skipping bookscorpus and nvidia_pretrained_weights (no counterpart here)")
    for name in names:
        logger.info("%s -> %s", name, download_one(name, layout.root, mirror))


def run_text_formatting(dataset: str, layout: Layout, args: argparse.Namespace) -> None:
    """``--action text_formatting --dataset wikicorpus_en``: the dump's articles, one per line."""
    lang = WIKI_LANG[dataset]
    source = layout.source(lang)
    if args.skip_wikiextractor:
        if not any(source.glob("*.txt")):
            raise FileNotFoundError(f"--skip_wikiextractor 1: {source} holds no extracted articles (*.txt)")
        logger.info("--skip_wikiextractor 1: using the articles in %s", source)
        return
    if layout.extracted_marker.is_file():
        logger.info("%s is complete (%s present): skipping", source, layout.extracted_marker)
        return
    dump = layout.dump(lang)
    if not dump.is_file():
        raise FileNotFoundError(f"no Wikipedia dump at {dump}: run --action download --dataset {dataset} first")
    report = extract_wikipedia.extract(dump, source, num_workers=args.n_processes)
    layout.extracted_marker.touch()
    logger.info("%d articles -> %d files in %s", report.stats.get("written", 0), len(report.files), source)


# ---------------------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------------------


def read_articles(dataset: str, layout: Layout, input_files: str | None) -> list[str]:
    """Article texts: from --input_files (one article per line, the reference's formatted files), else for
    wikicorpus_en from the text_formatting output (one article per line after its ``wiki-<id>`` word)."""
    if input_files:
        files, drop_id = [Path(name) for name in input_files.split(",")], False
    elif dataset == "wikicorpus_en":
        source = layout.source("en")
        files = sorted(source.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))  # 0.txt, 1.txt, ..., 10.txt
        drop_id = True
        if not files:
            raise FileNotFoundError(f"no articles in {source}: run --action text_formatting --dataset {dataset} "
                                    "first, or pass --input_files")
    else:
        raise ValueError(f"--dataset {dataset} needs --input_files (text files, one article per line): this "
                         "project downloads no BookCorpus")
    articles = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"--input_files: {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if drop_id:
                    parts = line.split(maxsplit=1)
                    line = parts[1] if len(parts) == 2 else ""
                if line.strip():
                    articles.append(line.strip())
    return articles


def assign_articles(sizes: Sequence[int], n_training: int, n_test: int, fraction_test: float,
                    seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Deal articles (given their sentence counts) into training and test shards; returns article indices per shard.

    The articles are taken in a seeded random order; the first ones go to the test set until it holds
    ``fraction_test`` of the sentences (and at least one article a test shard), the rest to training. Within each
    set, the longest article goes to the shard with the fewest sentences so far, so the shards end up even.
    """
    if len(sizes) < n_training + n_test:
        raise ValueError(f"{len(sizes)} articles cannot fill {n_training} training + {n_test} test shards: lower "
                         "--n_training_shards / --n_test_shards or add text")
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    target, taken, count = fraction_test * sum(sizes), 0, 0
    while count < len(order) - n_training and (count < n_test or taken < target):
        taken += sizes[order[count]]
        count += 1

    def deal(articles: list[int], num_shards: int) -> list[list[int]]:
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        heap = [(0, i) for i in range(num_shards)]
        for article in sorted(articles, key=lambda a: -sizes[a]):
            total, shard = heapq.heappop(heap)
            shards[shard].append(article)
            heapq.heappush(heap, (total + sizes[article], shard))
        return shards

    return deal(order[count:], n_training), deal(order[:count], n_test)


def run_sharding(dataset: str, layout: Layout, args: argparse.Namespace,
                 splitter: Callable[[str], list[str]]) -> list[Path]:
    """``--action sharding``: articles split into sentences and dealt into the reference's text shards."""
    articles = [splitter(text) for text in read_articles(dataset, layout, args.input_files)]
    articles = [sentences for sentences in articles if sentences]
    training, test = assign_articles([len(s) for s in articles], args.n_training_shards, args.n_test_shards,
                                     args.fraction_test_set, args.random_seed)
    folder = layout.sharded(dataset)
    paths = []
    for name, shard in zip(layout.shard_names(dataset), training + test):
        path = folder / f"{name}.txt"
        with atomic_write(path, "w", encoding="utf-8", newline="\n") as handle:
            for article in shard:
                handle.write("".join(f"{sentence}\n" for sentence in articles[article]) + "\n")
        paths.append(path)
    sentences = sum(len(s) for s in articles)
    logger.info("%d articles, %d sentences -> %d training + %d test shards in %s", len(articles), sentences,
                len(training), len(test), folder)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# create_hdf5_files
# ---------------------------------------------------------------------------------------------------------------


def create_hdf5(argv: list[str]) -> int:
    """``data.create_pretraining_data`` on one shard (a worker's task); its exit status."""
    from data import create_pretraining_data

    try:
        return create_pretraining_data.main(argv)
    except SystemExit as exc:  # its flag errors exit; a worker must return
        return int(exc.code or 0)


def run_create_hdf5_files(dataset: str, layout: Layout, args: argparse.Namespace) -> list[Path]:
    """``--action create_hdf5_files``: one reference-layout HDF5 file per text shard, ``--n_processes`` at a time."""
    if not args.vocab_file:
        raise ValueError("--action create_hdf5_files needs --vocab_file (e.g. download/google_pretrained_weights/"
                         "uncased_L-24_H-1024_A-16/vocab.txt under the working directory)")
    if not Path(args.vocab_file).is_file():
        raise FileNotFoundError(f"--vocab_file {args.vocab_file} does not exist")
    checks = {"--max_seq_length must be >= 5": args.max_seq_length < 5,
              "--max_predictions_per_seq must be >= 1": args.max_predictions_per_seq < 1,
              "--dupe_factor must be >= 1": args.dupe_factor < 1,
              "--masked_lm_prob must be in (0, 1)": not 0.0 < args.masked_lm_prob < 1.0}
    for message, bad in checks.items():
        if bad:
            raise ValueError(message)
    sharded, out = layout.sharded(dataset), layout.hdf5(dataset)
    names = layout.shard_names(dataset)
    missing = [name for name in names if not (sharded / f"{name}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} text shards are missing from {sharded}, e.g. "
                                f"{missing[0]}.txt: run --action sharding with the same --n_training_shards, "
                                "--n_test_shards and --fraction_test_set first")
    settings = ["--vocab_file", str(args.vocab_file), "--do_lower_case" if args.do_lower_case > 0 else
                "--no-do_lower_case", "--max_seq_length", str(args.max_seq_length), "--max_predictions_per_seq",
                str(args.max_predictions_per_seq), "--masked_lm_prob", str(args.masked_lm_prob), "--random_seed",
                str(args.random_seed), "--dupe_factor", str(args.dupe_factor)]
    todo = [name for name in names if not (out / f"{name}.hdf5").is_file()]
    if len(todo) < len(names):
        logger.info("%d of %d HDF5 files are already in %s: skipping them", len(names) - len(todo), len(names), out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [["--input_file", str(sharded / f"{name}.txt"), "--output_file", str(out / f"{name}.hdf5"), *settings]
             for name in todo]
    if args.n_processes > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(args.n_processes, len(tasks)), mp_context=get_context("spawn")) as pool:
            statuses = list(pool.map(create_hdf5, tasks))
    else:
        statuses = [create_hdf5(task) for task in tasks]
    failed = [name for name, status in zip(todo, statuses) if status != 0]
    if failed:
        raise ValueError(f"data.create_pretraining_data failed on {len(failed)} shard(s), e.g. {sharded}/"
                         f"{failed[0]}.txt (its message is above)")
    return [out / f"{name}.hdf5" for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; an unsupported pair or a failed step prints one line and returns 1."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(os.environ.get("BERT_PREP_WORKING_DIR", "data"))
    layout = Layout(root, args)
    logger.info("Working directory: %s; action: %s; dataset: %s", root, args.action, args.dataset)
    try:
        check_supported(args.action, args.dataset)
        for flag in ("n_training_shards", "n_test_shards", "n_processes"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        if not 0.0 <= args.fraction_test_set < 1.0:
            raise ValueError(f"--fraction_test_set must be in [0, 1), got {args.fraction_test_set}")
        if args.action == "download":
            run_download(args.dataset, layout)
        elif args.action == "text_formatting":
            run_text_formatting(args.dataset, layout, args)
        elif args.action == "sharding":
            if args.segmentation_method == "nltk":
                raise ValueError("--segmentation_method nltk is not available (NLTK downloads its sentence model at "
                                 "run time); use auto, blingfire or regex")
            run_sharding(args.dataset, layout, args, get_sentence_splitter(args.segmentation_method))
        else:
            run_create_hdf5_files(args.dataset, layout, args)
    except (OSError, ValueError, ImportError) as exc:  # DownloadError, ChecksumError, FileExistsError, ...
        print(f"bertPrep.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
