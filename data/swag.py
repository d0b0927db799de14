"""SWAG reader (the authors' ``train.csv`` / ``val.csv`` / ``test.csv``) and multiple-choice features."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from data.glue import truncate_seq_pair
from file_utils import PathLike, utf8_error

NUM_CHOICES = 4
ENDINGS = tuple(f"ending{i}" for i in range(NUM_CHOICES))
# Columns the reader uses, found by name in the header (the file's first column, the row index, has no name).
TEXT_COLUMNS = ("fold-ind", "sent1", "sent2", *ENDINGS)


class SwagDataError(ValueError):
    """A SWAG file is missing or malformed; the message names the file (and line, where there is one)."""


@dataclass
class SwagExample:
    """One question: a context, the start of the next sentence and its four candidate endings.

    ``swag_id`` is the ``fold-ind`` column, as the reference takes it; ``label`` (0-3) is None for unlabelled rows.
    """

    swag_id: str
    context_sentence: str  # sent1
    start_ending: str  # sent2, shared by every ending
    endings: list[str]
    label: int | None = None


@dataclass
class SwagFeatures:
    """Model inputs of one example: per choice, ``[CLS] context [SEP] start + ending [SEP]`` zero-padded to the
    sequence length (the reference's field names); ``label`` is the right choice, or None."""

    example_id: str
    input_ids: list[list[int]]  # [C][S]
    input_mask: list[list[int]]
    segment_ids: list[list[int]]
    label: int | None


def read_swag_examples(path: PathLike, labelled: bool = True) -> list[SwagExample]:
    """Read a SWAG CSV file; ``labelled`` requires a ``label`` column (train and val; the test file has none).

    Columns are found by header name, so files with or without the leading row-index column both work. Every row
    must have as many fields as the header (an unquoted comma is reported, not silently shifted into the next
    column), and labels must be 0-3. Errors name the file and the line the row starts on.
    """
    path = Path(path)
    if not path.is_file():
        raise SwagDataError(f"SWAG file not found: {path}")
    examples: list[SwagExample] = []
    line = 1  # where the record being read starts
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, strict=True)  # a stray quote is an error, not text glued to a field
            header = next(reader, None)
            if header is None:
                raise SwagDataError(f"{path}: empty file, expected a header line")
            columns = {name.strip(): i for i, name in enumerate(header)}
            wanted = TEXT_COLUMNS + (("label",) if labelled else ())
            missing = [name for name in wanted if name not in columns]
            if missing:
                raise SwagDataError(f"{path}: header has no column {', '.join(missing)} (found {header}); "
                                    "is this a SWAG train.csv or val.csv file?")
            index = {name: columns[name] for name in wanted}
            line = reader.line_num + 1
            for row in reader:
                if row:  # a blank line (e.g. a trailing one) holds no example
                    examples.append(_example(row, index, len(header), labelled, path, line))
                line = reader.line_num + 1
    except csv.Error as exc:  # a stray or unclosed quote, a field over csv.field_size_limit(), ...
        raise SwagDataError(f"{path}, line {line}: not valid CSV ({exc})") from None
    except UnicodeDecodeError:
        problem = utf8_error(path)
        if problem:
            raise SwagDataError(f"{path}, {problem}") from None
        raise
    return examples


def _example(row: list[str], index: dict[str, int], num_columns: int, labelled: bool, path: Path,
             line: int) -> SwagExample:
    if len(row) != num_columns:
        raise SwagDataError(f"{path}, line {line}: expected {num_columns} comma-separated fields as in the header, "
                            f"found {len(row)} (a field with a comma must be in double quotes)")
    label = None
    if labelled:
        text = row[index["label"]].strip()
        if text not in {str(i) for i in range(NUM_CHOICES)}:
            raise SwagDataError(f"{path}, line {line}: label {text!r} is not one of 0..{NUM_CHOICES - 1}")
        label = int(text)
    return SwagExample(swag_id=row[index["fold-ind"]], context_sentence=row[index["sent1"]],
                       start_ending=row[index["sent2"]], endings=[row[index[name]] for name in ENDINGS], label=label)


class _Tokenizer(Protocol):
    vocab: dict[str, int]

    def batch_encode(self, texts: list[str]) -> list[list[int]]: ...


def convert_examples_to_features(examples: Sequence[SwagExample], tokenizer: _Tokenizer,
                                 max_seq_length: int) -> list[SwagFeatures]:
    """Tokenize each example into ``NUM_CHOICES`` sequences, as the reference (and GPT's multiple-choice format).

    Choice i is ``[CLS] context [SEP] start_ending + ending_i [SEP]``: segment 0 up to the first ``[SEP]``, segment 1
    after it. A pair too long for ``max_seq_length`` is trimmed one token at a time from the end of its longer side
    (``truncate_seq_pair``, the reference's rule), so a long context gives way before a short ending does.
    """
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for [CLS] and two [SEP]s")
    cls_id, sep_id = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    texts = [text for ex in examples for text in (ex.context_sentence, ex.start_ending, *ex.endings)]
    ids = tokenizer.batch_encode(texts)
    per_example = 2 + NUM_CHOICES
    features = []
    for n, example in enumerate(examples):
        context, start, *endings = ids[n * per_example:(n + 1) * per_example]
        input_ids, input_mask, segment_ids = [], [], []
        for ending in endings:
            a, b = list(context), [*start, *ending]  # copies: the context is trimmed anew for every ending
            truncate_seq_pair(a, b, max_seq_length - 3)
            tokens = [cls_id, *a, sep_id, *b, sep_id]
            pad = max_seq_length - len(tokens)
            input_ids.append(tokens + [0] * pad)
            input_mask.append([1] * len(tokens) + [0] * pad)
            segment_ids.append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * pad)
        features.append(SwagFeatures(example.swag_id, input_ids, input_mask, segment_ids, example.label))
    return features


def features_to_tensors(features: Sequence[SwagFeatures]) -> dict[str, torch.Tensor]:
    """Stack features into ``BertForMultipleChoice``'s keyword tensors: ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (int64 ``[N, C, S]``) and, when every example is labelled, ``labels`` (int64 ``[N]``)."""
    if not features:
        raise ValueError("no features to stack (the input file held no examples)")
    out = {
        "input_ids": torch.tensor([f.input_ids for f in features], dtype=torch.long),
        "token_type_ids": torch.tensor([f.segment_ids for f in features], dtype=torch.long),
        "attention_mask": torch.tensor([f.input_mask for f in features], dtype=torch.long),
    }
    if all(f.label is not None for f in features):
        out["labels"] = torch.tensor([f.label for f in features], dtype=torch.long)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose highest-scoring choice is the labelled one (logits ``[N, C]``, labels ``[N]``)."""
    return float((logits.argmax(dim=1) == labels).float().mean())
