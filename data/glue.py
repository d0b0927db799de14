"""GLUE task readers (every task, in the official download's file layout), feature conversion and metrics."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from file_utils import PathLike, utf8_error


class GlueDataError(ValueError):
    """A GLUE file is missing or malformed; the message names the file (and line, where there is one)."""


@dataclass
class InputExample:
    """One sentence (``text_b`` None) or sentence pair; ``label`` is None for the unlabelled test split."""

    guid: str
    text_a: str
    text_b: str | None = None
    label: str | None = None


@dataclass
class InputFeatures:
    """Model inputs of one example, padded to ``max_seq_length`` (the reference's field names).

    ``label_id`` is a class index, a float for regression (STS-B), or None for unlabelled examples.
    """

    input_ids: list[int]
    input_mask: list[int]
    segment_ids: list[int]
    label_id: int | float | None


@dataclass(frozen=True)
class _Layout:
    """Where one split's fields sit in its TSV file.

    Files with a header are read by column *name*, which also checks that the right file was given (MNLI's train
    and dev files, for instance, differ in column count but share these names). CoLA's train and dev files have
    no header and are read by position. ``guid`` is a column name; when None the guid is the 0-based line index
    in the file, as the reference numbers rows (so the first data row under a header is ``<split>-1``).
    """

    text_a: str | int
    text_b: str | int | None = None
    label: str | int | None = None
    guid: str | None = None
    header: bool = True
    num_columns: int | None = None  # required column count for header-less files


class DataProcessor:
    """Reads one GLUE task's ``train.tsv``, dev and test files from a task folder (e.g. ``glue_data/MRPC``).

    Subclasses only declare data: the label set, the file names and each split's ``_Layout``.
    Every file is read as UTF-8 (a leading byte-order mark is dropped: MRPC ships with one) with
    ``csv.QUOTE_NONE``: GLUE texts contain bare ``"`` characters that are not CSV quoting.
    """

    task_name: str = ""
    labels: tuple[str, ...] = ("0", "1")
    is_regression: bool = False
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    test_file: str = "test.tsv"
    train_layout: _Layout
    dev_layout: _Layout | None = None  # None: same as train_layout
    test_layout: _Layout

    def get_labels(self) -> list[str]:
        """Label strings in class-index order; empty for a regression task."""
        return [] if self.is_regression else list(self.labels)

    @property
    def num_labels(self) -> int:
        """Width of the classifier head: 1 for regression."""
        return 1 if self.is_regression else len(self.labels)

    def get_train_examples(self, data_dir: PathLike) -> list[InputExample]:
        """Labelled examples of the training split."""
        return self._read(Path(data_dir) / self.train_file, "train", self.train_layout)

    def get_dev_examples(self, data_dir: PathLike) -> list[InputExample]:
        """Labelled examples of the dev split (GLUE's public evaluation set)."""
        return self._read(Path(data_dir) / self.dev_file, "dev", self.dev_layout or self.train_layout)

    def get_test_examples(self, data_dir: PathLike) -> list[InputExample]:
        """Unlabelled examples of the test split; guids carry the file's index column, as GLUE submissions need."""
        return self._read(Path(data_dir) / self.test_file, "test", self.test_layout)

    def get_examples(self, data_dir: PathLike, split: str) -> list[InputExample]:
        """Examples of ``split`` (``train``, ``dev`` or ``test``)."""
        readers = {"train": self.get_train_examples, "dev": self.get_dev_examples, "test": self.get_test_examples}
        if split not in readers:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(readers)}")
        return readers[split](data_dir)

    def _read(self, path: Path, split: str, layout: _Layout) -> list[InputExample]:
        if not path.is_file():
            raise GlueDataError(f"{self.task_name}: {split} file not found: {path}")
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                return self._read_rows(path, split, layout, csv.reader(handle, delimiter="\t",
                                                                        quoting=csv.QUOTE_NONE))
        except UnicodeDecodeError:
            problem = utf8_error(path)
            if problem:
                raise GlueDataError(f"{path}, {problem}") from None
            raise
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise GlueDataError(f"{path}: unreadable TSV: {exc}") from None

    def _read_rows(self, path: Path, split: str, layout: _Layout, reader: Any) -> list[InputExample]:
        """Examples from the rows of ``reader`` (a ``csv.reader`` over ``path``) laid out as ``layout``."""
        examples = []
        if layout.header:
            header = next(reader, None)
            if header is None:
                raise GlueDataError(f"{path}: empty file, expected a header line")
            columns = {name: i for i, name in enumerate(header)}
            num_columns = len(header)

            def index(name: str | int | None) -> int | None:
                if name is None or isinstance(name, int):
                    return name
                if name not in columns:
                    raise GlueDataError(
                        f"{path}: header has no column {name!r} (found {header}); is this the {self.task_name} "
                        f"{split} file?"
                    )
                return columns[name]
        else:
            num_columns = layout.num_columns

            def index(name: str | int | None) -> int | None:
                return name  # header-less layouts give positions

        a, b, lab, gid = index(layout.text_a), index(layout.text_b), index(layout.label), index(layout.guid)
        line_index = 1 if layout.header else 0
        for row in reader:
            if not row:  # a blank line (e.g. a trailing one) holds no example
                line_index += 1
                continue
            if len(row) != num_columns:
                raise GlueDataError(
                    f"{path}, line {reader.line_num}: expected {num_columns} tab-separated columns, "
                    f"found {len(row)}"
                )
            label = None if lab is None else row[lab].strip()
            if label is not None:
                self._check_label(label, path, reader.line_num)
            guid = f"{split}-{row[gid] if gid is not None else line_index}"
            examples.append(InputExample(guid, row[a], None if b is None else row[b], label))
            line_index += 1
        return examples

    def _check_label(self, label: str, path: Path, line: int) -> None:
        if self.is_regression:
            try:
                value = float(label)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise GlueDataError(f"{path}, line {line}: label {label!r} is not a finite number")
        elif label not in self.labels:
            raise GlueDataError(f"{path}, line {line}: label {label!r} is not one of {list(self.labels)}")


_INDEX_SENTENCE = _Layout(text_a="sentence", guid="index")  # CoLA and SST-2 test files


class ColaProcessor(DataProcessor):
    """CoLA: train/dev have no header (source, label, original label, sentence); test has ``index, sentence``."""

    task_name = "cola"
    train_layout = _Layout(text_a=3, label=1, header=False, num_columns=4)
    test_layout = _INDEX_SENTENCE


class Sst2Processor(DataProcessor):
    """SST-2: ``sentence, label`` (tokenised, lower-cased text); test has ``index, sentence``."""

    task_name = "sst-2"
    train_layout = _Layout(text_a="sentence", label="label")
    test_layout = _INDEX_SENTENCE


class MrpcProcessor(DataProcessor):
    """MRPC: ``Quality, #1 ID, #2 ID, #1 String, #2 String``; test has ``index`` in place of ``Quality``."""

    task_name = "mrpc"
    train_layout = _Layout(text_a="#1 String", text_b="#2 String", label="Quality")
    test_layout = _Layout(text_a="#1 String", text_b="#2 String", guid="index")


class StsbProcessor(DataProcessor):
    """STS-B (regression, scores 0-5): ``index, genre, ..., sentence1, sentence2, score``; test lacks ``score``."""

    task_name = "sts-b"
    is_regression = True
    labels = ()
    train_layout = _Layout(text_a="sentence1", text_b="sentence2", label="score", guid="index")
    test_layout = _Layout(text_a="sentence1", text_b="sentence2", guid="index")


class QqpProcessor(DataProcessor):
    """QQP: ``id, qid1, qid2, question1, question2, is_duplicate``; test has ``id, question1, question2``."""

    task_name = "qqp"
    train_layout = _Layout(text_a="question1", text_b="question2", label="is_duplicate", guid="id")
    test_layout = _Layout(text_a="question1", text_b="question2", guid="id")


class MnliProcessor(DataProcessor):
    """MNLI matched: ``index, promptID, ..., sentence1, sentence2, ..., gold_label``.

    Train has one annotator label column, dev five, test none; the columns used are found by name.
    """

    task_name = "mnli"
    labels = ("contradiction", "entailment", "neutral")
    dev_file = "dev_matched.tsv"
    test_file = "test_matched.tsv"
    train_layout = _Layout(text_a="sentence1", text_b="sentence2", label="gold_label", guid="index")
    test_layout = _Layout(text_a="sentence1", text_b="sentence2", guid="index")


class MnliMismatchedProcessor(MnliProcessor):
    """MNLI mismatched: same files as MNLI but evaluated on ``dev_mismatched.tsv`` / ``test_mismatched.tsv``."""

    task_name = "mnli-mm"
    dev_file = "dev_mismatched.tsv"
    test_file = "test_mismatched.tsv"


class QnliProcessor(DataProcessor):
    """QNLI: ``index, question, sentence, label``; test lacks ``label``."""

    task_name = "qnli"
    labels = ("entailment", "not_entailment")
    train_layout = _Layout(text_a="question", text_b="sentence", label="label", guid="index")
    test_layout = _Layout(text_a="question", text_b="sentence", guid="index")


class RteProcessor(DataProcessor):
    """RTE: ``index, sentence1, sentence2, label``; test lacks ``label``."""

    task_name = "rte"
    labels = ("entailment", "not_entailment")
    train_layout = _Layout(text_a="sentence1", text_b="sentence2", label="label", guid="index")
    test_layout = _Layout(text_a="sentence1", text_b="sentence2", guid="index")


class WnliProcessor(RteProcessor):
    """WNLI: RTE's layout with labels ``0``/``1``."""

    task_name = "wnli"
    labels = ("0", "1")


PROCESSORS: dict[str, type[DataProcessor]] = {
    p.task_name: p
    for p in (
        ColaProcessor, Sst2Processor, MrpcProcessor, StsbProcessor, QqpProcessor, MnliProcessor,
        MnliMismatchedProcessor, QnliProcessor, RteProcessor, WnliProcessor,
    )
}


def get_processor(task_name: str) -> DataProcessor:
    """The processor for ``task_name`` (case-insensitive); an unknown name is an error listing the valid ones."""
    key = task_name.lower()
    if key not in PROCESSORS:
        raise ValueError(f"unknown GLUE task {task_name!r}; valid tasks: {', '.join(PROCESSORS)}")
    return PROCESSORS[key]()


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


class _Tokenizer(Protocol):
    vocab: Any

    def batch_encode(self, texts: list[str]) -> list[list[int]]: ...


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
    """Shorten a pair in place until it fits ``max_length``, one token at a time from the longer sequence.

    Trimming the longer one keeps as much of the shorter text as possible (a token of a short text carries
    more of its meaning); on a tie the second sequence loses a token, as in the reference.
    """
    while len(tokens_a) + len(tokens_b) > max_length:
        if len(tokens_a) > len(tokens_b):
            tokens_a.pop()
        else:
            tokens_b.pop()


def convert_examples_to_features(
    examples: Sequence[InputExample], label_list: Sequence[str], max_seq_length: int, tokenizer: _Tokenizer
) -> tuple[list[InputFeatures], dict[str, int]]:
    """Tokenize examples into ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` features, zero-padded.

    Args:
        examples: from a processor.
        label_list: the processor's ``get_labels()``; empty means regression (the label is parsed as a float).
        max_seq_length: length of every feature, special tokens included (at least 3 for pairs, 2 for singles).
        tokenizer: a ``tokenization.BertTokenizer``; its ``batch_encode`` fast path tokenizes all texts at once.

    Returns:
        ``(features, label_map)`` with ``label_map`` label string -> class index (the reference's return value).
        Segment ids are 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``; the mask is 1 on real tokens.
    """
    has_pair = any(ex.text_b is not None for ex in examples)
    if max_seq_length < (3 if has_pair else 2):
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for any token besides [CLS]/[SEP]")
    label_map = {label: i for i, label in enumerate(label_list)}
    cls_id, sep_id = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    ids_a = tokenizer.batch_encode([ex.text_a for ex in examples])
    pair_rows = [i for i, ex in enumerate(examples) if ex.text_b is not None]
    ids_b: list[list[int] | None] = [None] * len(examples)
    for row, ids in zip(pair_rows, tokenizer.batch_encode([examples[i].text_b for i in pair_rows])):
        ids_b[row] = ids

    features = []
    for ex, a, b in zip(examples, ids_a, ids_b):
        a = list(a)
        if b is None:
            del a[max_seq_length - 2:]
            input_ids = [cls_id, *a, sep_id]
            segment_ids = [0] * len(input_ids)
        else:
            b = list(b)
            truncate_seq_pair(a, b, max_seq_length - 3)
            input_ids = [cls_id, *a, sep_id, *b, sep_id]
            segment_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        pad = max_seq_length - len(input_ids)
        features.append(
            InputFeatures(
                input_ids=input_ids + [0] * pad,
                input_mask=[1] * len(input_ids) + [0] * pad,
                segment_ids=segment_ids + [0] * pad,
                label_id=_label_id(ex.label, label_map),
            )
        )
    return features, label_map


def _label_id(label: str | None, label_map: dict[str, int]) -> int | float | None:
    if label is None:
        return None
    if not label_map:
        return float(label)
    if label not in label_map:
        raise ValueError(f"label {label!r} is not one of {list(label_map)}")
    return label_map[label]


def features_to_tensors(features: Sequence[InputFeatures]) -> dict[str, torch.Tensor]:
    """Stack features into the model's keyword tensors: ``input_ids``, ``token_type_ids``, ``attention_mask``
    (int64, ``[N, S]``) and, when every feature is labelled, ``labels`` (int64 ``[N]``, or float32 for regression).
    """
    if not features:
        raise ValueError("no features to stack (the input file held no examples)")
    out = {
        "input_ids": torch.tensor([f.input_ids for f in features], dtype=torch.long),
        "token_type_ids": torch.tensor([f.segment_ids for f in features], dtype=torch.long),
        "attention_mask": torch.tensor([f.input_mask for f in features], dtype=torch.long),
    }
    labels = [f.label_id for f in features]
    if all(label is not None for label in labels):
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        out["labels"] = torch.tensor(labels, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics (numpy only; the formulas follow sklearn / scipy definitions and the tests compare against them)
# ---------------------------------------------------------------------------------------------------------------


def simple_accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1_score(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2TP / (2TP + FP + FN); 0 when there is no positive at all."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; binary MCC for two classes).

    With confusion matrix C, c = trace, s = total, t = true counts per class, p = predicted counts per class:
    MCC = (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)); 0 when a denominator factor is 0 (sklearn's convention).
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    y_true, y_pred = encoded[: len(labels)], encoded[len(labels):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (y_true, y_pred), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = (s * s - p @ p) * (s * s - t @ t)
    return 0.0 if denominator == 0 else float((c * s - t @ p) / math.sqrt(denominator))


def pearson_corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant (as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return math.nan if denominator == 0 else float(xc @ yc) / denominator


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])  # first position of each run of ties
    group = np.cumsum(starts) - 1  # 0-based tie-group id per sorted position
    bounds = np.concatenate([np.flatnonzero(starts), [len(x)]])  # group g spans sorted positions [b[g], b[g+1])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = 0.5 * (bounds[group] + 1 + bounds[group + 1])  # mean of ranks b[g]+1 .. b[g+1]
    return ranks


def spearman_corr(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the tie-averaged ranks."""
    return pearson_corr(rankdata(x), rankdata(y))


def acc_and_f1(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MRPC/QQP metrics: accuracy, F1 of the positive class, and their mean."""
    acc, f1 = simple_accuracy(preds, labels), f1_score(preds, labels)
    return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}


def pearson_and_spearman(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """STS-B metrics: Pearson and Spearman correlation and their mean."""
    pearson, spearman = pearson_corr(preds, labels), spearman_corr(preds, labels)
    return {"pearson": pearson, "spearmanr": spearman, "corr": (pearson + spearman) / 2}


def compute_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's official metrics for ``task_name``, keyed as the reference's results.

    Classification tasks report ``acc``; MRPC and QQP add ``f1`` and ``acc_and_f1``; CoLA adds ``mcc``;
    STS-B (regression, ``preds`` are scores) reports ``pearson``, ``spearmanr`` and ``corr``.
    """
    processor = get_processor(task_name)
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    if processor.is_regression:
        return pearson_and_spearman(preds, labels)
    if processor.task_name in ("mrpc", "qqp"):
        return acc_and_f1(preds, labels)
    metrics = {"acc": simple_accuracy(preds, labels)}
    if processor.task_name == "cola":
        metrics["mcc"] = matthews_corrcoef(preds, labels)
    return metrics
