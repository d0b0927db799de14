"""TinyBERT data augmentation (Jiao et al. 2020, section 3.2): N copies of every training example, words replaced
by BERT masked-LM predictions (single-piece words) or GloVe nearest neighbours (multi-piece words).

GLUE: reads ``train.tsv`` of a task folder and writes ``train_aug.tsv`` with the same header and columns, each
example followed by its N copies; only the task's text columns change (labels are kept). SQuAD: reads a SQuAD JSON
file and writes one in which each paragraph is followed by N copies with words outside every answer replaced
(``--squad_augment context``, the reference's choice) or each question by N reworded questions (``question``);
copied questions get the id ``<id>_aug<k>`` and every ``answer_start`` is moved to where its text now sits.

A word is a run of ASCII letters that is not a stop word; the text around the replaced words (case, spacing,
punctuation) is kept as written, and a replacement takes the case of the word it replaces. As in the reference
(NVIDIA's distillation/data_augmentation.py, after TinyBERT's code), the masked-LM input is the text with the word
masked followed by the text itself, ``[CLS] masked [SEP] original [SEP]``; unlike it, the word itself is never a
candidate, so every replacement changes the text and about ``p`` of the candidate words change in each copy.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from data.glue import PROCESSORS, get_processor  # noqa: E402
from data.squad import json_text, load_squad_json  # noqa: E402
from file_utils import PathLike, atomic_write  # noqa: E402
from modeling import BertForMaskedLM  # noqa: E402
from tokenization import VOCAB_NAME, BertTokenizer, load_vocab  # noqa: E402

logger = logging.getLogger("data_augmentation")

SQUAD_TASK = "squad"
TASKS = (*PROCESSORS, SQUAD_TASK)
TASK_ALIASES = {"squadv1.1": SQUAD_TASK}  # the reference's name of the SQuAD task
DEFAULT_N = 30
# The reference's per-task copy counts (its `default_params`, after TinyBERT); other tasks take DEFAULT_N.
REFERENCE_N = {"cola": 30, "mnli": 10, "mnli-mm": 10, "mrpc": 30, "sst-2": 20, "sts-b": 30, "qqp": 10, "qnli": 20,
               "rte": 30, SQUAD_TASK: 15}
# The reference's stop-word list (NLTK's English list), its entries that can be words here (letters only).
STOP_WORDS = frozenset("""
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
    it its itself they them their theirs themselves this that these those am is are was were be been being have has
    had having do does did doing a an the and but if or because as until while of at by for with about against
    between into through during before after above below to from up down in out on off over under again further
    then once here there all any both each few more most other some such no nor not only own same so than too very
    s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven isn ma mightn mustn
    needn shan shouldn wasn weren won wouldn
""".split())
WORD = re.compile(r"[A-Za-z]+")
CHUNK_TEXTS = 1024  # texts whose candidates are found together: enough masked words to fill many batches


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block: the reference's names, plus input/output paths for GLUE and SQuAD."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    required.add_argument("--pretrained_bert_model", required=True,
                          help="Model with its masked-LM head (a BertForPreTraining/BertForMaskedLM folder, "
                               "reference .pt or Hugging Face folder); config.json beside it unless --config_file.")
    required.add_argument("--task_name", required=True,
                          help=f"One of {', '.join(TASKS)} (case-insensitive; SQuADv1.1 means squad).")
    other = parser.add_argument_group("other")
    other.add_argument("--vocab_file", default=None,
                       help="WordPiece vocabulary; default: vocab.txt in --pretrained_bert_model or beside it.")
    other.add_argument("--config_file", default=None, help="BERT config JSON; default: config.json beside the weights.")
    other.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=None,
                       help="Lower-case text for the tokenizer; default: yes unless the vocabulary has upper case.")
    other.add_argument("--glove_embs", default=None,
                       help="GloVe text file ('word v1 v2 ...' per line) for words of several WordPieces; without "
                            "it those words are kept.")
    other.add_argument("--glove_vocab_size", type=int, default=100000,
                       help="Read only the first this many GloVe words (the reference's 100000; 0 reads all).")
    other.add_argument("--input_dir", default=None, help="GLUE task folder holding train.tsv.")
    other.add_argument("--output_dir", default=None,
                       help="Folder for train_aug.tsv (GLUE); default: --input_dir, as the reference writes.")
    other.add_argument("--input_file", default=None, help="SQuAD JSON training file (--task_name squad).")
    other.add_argument("--output_file", default=None, help="SQuAD JSON file to write (--task_name squad).")
    other.add_argument("--glue_dir", default=None,
                       help="The reference's data folder: GLUE input is <glue_dir>/<task_name>/train.tsv, SQuAD "
                            "<glue_dir>/train-v1.1.json -> train-v1.1_aug.json; explicit paths take precedence.")
    other.add_argument("--squad_augment", choices=("context", "question"), default="context",
                       help="SQuAD: copy each paragraph with words outside the answers replaced, or each question.")
    other.add_argument("--N", type=int, default=None,
                       help=f"Augmented copies per example (the original is kept too); default: the reference's "
                            f"per-task value ({', '.join(f'{k} {v}' for k, v in REFERENCE_N.items())}), else "
                            f"{DEFAULT_N}.")
    other.add_argument("--M", type=int, default=15, help="Candidates per word: top-M masked-LM or GloVe words.")
    other.add_argument("--p", type=float, default=0.4, help="Probability of replacing each candidate word in a copy.")
    other.add_argument("--seed", type=int, default=42, help="Seed of the replacement draws.")
    other.add_argument("--max_seq_length", type=int, default=128,
                       help="Tokens per masked-LM input [CLS] masked [SEP] original [SEP]; longer texts are seen "
                            "through a window around the masked word.")
    other.add_argument("--batch_size", type=int, default=64, help="Masked words per masked-LM forward pass.")
    other.add_argument("--amp", action="store_true", help="fp16 autocast for the masked LM (CUDA only).")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    return parser.parse_args(argv)


def resolve_arguments(args: argparse.Namespace) -> None:
    """Normalise the task name, fill the reference's defaults and check the flags; raise ValueError naming a flag."""
    given = args.task_name
    task = given.lower()
    args.task_name = TASK_ALIASES.get(task, task)
    if args.task_name not in TASKS:
        raise ValueError(f"unknown --task_name {task!r}; valid: {', '.join(TASKS)} (or SQuADv1.1)")
    if args.N is None:
        args.N = REFERENCE_N.get(args.task_name, DEFAULT_N)
    for name, value, low in (("--N", args.N, 0), ("--M", args.M, 1), ("--batch_size", args.batch_size, 1),
                             ("--max_seq_length", args.max_seq_length, 5), ("--glove_vocab_size",
                                                                            args.glove_vocab_size, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0.0 <= args.p <= 1.0:
        raise ValueError(f"--p must be a probability in [0, 1], got {args.p}")
    glue_dir = Path(args.glue_dir) if args.glue_dir else None
    if args.task_name == SQUAD_TASK:
        if glue_dir is not None:
            args.input_file = args.input_file or str(glue_dir / "train-v1.1.json")
            args.output_file = args.output_file or str(glue_dir / "train-v1.1_aug.json")
        if not args.input_file or not args.output_file:
            raise ValueError("--task_name squad needs --input_file and --output_file (or --glue_dir)")
        if args.input_dir or args.output_dir:
            raise ValueError("--input_dir/--output_dir are for GLUE tasks; SQuAD takes --input_file/--output_file")
    else:
        if glue_dir is not None and not args.input_dir:
            # The reference's folder names are the task's own spelling (SST-2, CoLA): try that, then lower case.
            spelled = glue_dir / given
            args.input_dir = str(spelled if spelled.is_dir() else glue_dir / args.task_name)
        if not args.input_dir:
            raise ValueError(f"--task_name {args.task_name} needs --input_dir (the task folder holding train.tsv)")
        if args.input_file or args.output_file:
            raise ValueError("--input_file/--output_file are for --task_name squad; GLUE takes --input_dir")
        args.output_dir = args.output_dir or args.input_dir
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("data_augmentation.py runs as one process (every rank would write the same file); start it "
                         "with python, not torchrun")


# ----------------------------------------------------------------------------------------------------------------
# Words, candidates and copies


@dataclass
class Word:
    """A replaceable word of a text: its character span and its replacement candidates (best first)."""

    start: int
    end: int
    candidates: list[str] = field(default_factory=list)


def _joins(char: str) -> bool:
    """Whether ``char`` next to a run of ASCII letters makes it part of a longer word (digits, accents, ``_``)."""
    return char.isalnum() or char == "_" or unicodedata.combining(char) != 0


def word_spans(text: str, protected: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """Character spans of the replaceable words of ``text``: whole ASCII-letter words, not stop words, overlapping no
    ``protected`` span (SQuAD answers). BERT's basic tokenizer splits at each span's ends, so a span is a whole word."""
    spans = []
    for match in WORD.finditer(text):
        start, end = match.span()
        if (start > 0 and _joins(text[start - 1])) or (end < len(text) and _joins(text[end])):
            continue
        if match.group().lower() in STOP_WORDS:
            continue
        if any(start < p_end and p_start < end for p_start, p_end in protected):
            continue
        spans.append((start, end))
    return spans


def match_case(candidate: str, original: str) -> str:
    """``candidate`` in the case pattern of ``original``: Title, UPPER (two letters or more) or as predicted."""
    if len(original) > 1 and original.isupper():
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


def apply_replacements(text: str, replacements: Sequence[tuple[int, int, str]]) -> str:
    """``text`` with each ``(start, end, new)`` span (sorted, not overlapping) replaced by ``new``."""
    parts, position = [], 0
    for start, end, new in replacements:
        parts += [text[position:start], new]
        position = end
    parts.append(text[position:])
    return "".join(parts)


def shift_offset(offset: int, replacements: Sequence[tuple[int, int, str]]) -> int:
    """Where character ``offset`` of the text moves after ``replacements`` that end at or before it."""
    return offset + sum(len(new) - (end - start) for start, end, new in replacements if end <= offset)


def sample_copy(text: str, words: Sequence[Word], p: float,
                rng: np.random.Generator) -> tuple[str, list[tuple[int, int, str]]]:
    """One augmented copy: each word with candidates is replaced with probability ``p`` by one of them, uniformly.

    Two uniform draws per word, whatever the outcome, so the draws of later copies do not depend on this one's.
    Returns (new text, the replacements made as sorted ``(start, end, new)``).
    """
    replace = rng.random(len(words)) < p
    picks = rng.random(len(words))
    replacements = []
    for word, chosen, pick in zip(words, replace, picks):
        if chosen:
            new = word.candidates[int(pick * len(word.candidates))]
            replacements.append((word.start, word.end, match_case(new, text[word.start:word.end])))
    return apply_replacements(text, replacements), replacements


class GloveNeighbours:
    """Unit-normalised GloVe vectors and the M nearest words by cosine similarity, cached per word."""

    def __init__(self, words: list[str], vectors: torch.Tensor) -> None:
        self.words = words
        self.index = {}
        for i, word in enumerate(words):
            self.index.setdefault(word, i)
        self.vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)  # [W, D]; zero rows stay zero
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def load(cls, path: PathLike, max_words: int = 0) -> GloveNeighbours:
        """Read a GloVe text file (``word v1 ... vD`` per line, D from the first line; ``max_words`` > 0 reads only
        that many). A malformed line is a ValueError naming ``file:line``; a word2vec count header is skipped."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--glove_embs {path}: file not found")
        words: list[str] = []
        rows: list[np.ndarray] = []
        dim = 0
        with open(path, encoding="utf-8", errors="strict") as handle:
            try:
                for line_number, line in enumerate(handle, 1):
                    fields = line.split()
                    if not fields:
                        continue
                    if line_number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                        continue  # word2vec's "<words> <dimension>" header
                    if not dim:
                        dim = len(fields) - 1
                        if dim < 1:
                            raise ValueError(f"--glove_embs {path}:{line_number}: a word without a vector")
                    if len(fields) < dim + 1:
                        raise ValueError(f"--glove_embs {path}:{line_number}: expected a word and {dim} numbers "
                                         f"(as on the first line), found {len(fields)} fields")
                    try:
                        rows.append(np.asarray(fields[-dim:], dtype=np.float32))
                    except ValueError as exc:
                        raise ValueError(f"--glove_embs {path}:{line_number}: {exc}") from None
                    words.append(" ".join(fields[:-dim]))  # a few GloVe words (840B) contain spaces
                    if max_words and len(words) == max_words:
                        break
            except UnicodeDecodeError as exc:
                raise ValueError(f"--glove_embs {path}: not UTF-8 text ({exc.reason})") from None
        if not words:
            raise ValueError(f"--glove_embs {path}: no word vectors in the file")
        logger.info("GloVe: %d words of dimension %d from %s", len(words), dim, path)
        return cls(words, torch.from_numpy(np.stack(rows)))

    def neighbours(self, words: Sequence[str], m: int) -> dict[str, list[str]]:
        """The ``m`` nearest letters-only words to each of ``words`` (itself excluded, any case), best first; [] for
        a word GloVe lacks (looked up as written, then lower-cased). Uncached words go by matrix products."""
        todo = sorted({w for w in words if w not in self._cache})
        known = [(w, self.index.get(w, self.index.get(w.lower()))) for w in todo]
        for word, i in known:
            if i is None:
                self._cache[word] = []
        known = [(w, i) for w, i in known if i is not None]
        for group in _chunks(known, 256):  # [256, W] similarities at a time: 100 MB for 100000 GloVe words
            rows = torch.tensor([i for _, i in group])
            similarity = self.vectors[rows] @ self.vectors.T  # [Q, W]
            similarity[torch.arange(len(group)), rows] = -float("inf")
            # Some of the nearest are numbers, punctuation or the word in another case: look a little further.
            top = similarity.topk(min(4 * m + 8, len(self.words)), dim=1).indices.tolist()
            for (word, _), order in zip(group, top):
                found = [self.words[j] for j in order
                         if WORD.fullmatch(self.words[j]) and self.words[j].lower() != word.lower()]
                self._cache[word] = found[:m]
        return {w: self._cache[w] for w in words}


@dataclass
class AugmentStats:
    """Counts for the final log line."""

    texts: int = 0
    words: int = 0  # words with candidates
    mlm_words: int = 0
    glove_words: int = 0
    kept_words: int = 0  # replaceable words without candidates (several pieces, no GloVe vector)
    replaced: int = 0
    copies_words: int = 0  # words with candidates summed over the copies made


class Augmentor:
    """Finds the replacement candidates of many texts at once: one batched masked-LM pass for all their
    single-piece words, one GloVe lookup for the rest."""

    def __init__(self, model: BertForMaskedLM, tokenizer: BertTokenizer, glove: GloveNeighbours | None, m: int,
                 max_seq_length: int, batch_size: int, device: torch.device, precision: utils.Precision) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.glove = glove
        self.m = m
        self.window = (max_seq_length - 3) // 2  # tokens of each copy of the text in [CLS] masked [SEP] text [SEP]
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        vocab = tokenizer.vocab
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        # Candidate tokens: whole words of letters ("##" pieces, specials and [unusedN] are not), other rows -inf.
        valid = torch.zeros(model.config.padded_vocab_size, dtype=torch.bool)
        valid[[i for token, i in vocab.items() if WORD.fullmatch(token)]] = True
        self.invalid = (~valid).to(device)
        self.stats = AugmentStats()

    def candidates(self, texts: Sequence[str],
                   protected: Sequence[Sequence[tuple[int, int]]] | None = None) -> list[list[Word]]:
        """For each text, its replaceable words that have candidates, in text order (see ``word_spans``)."""
        spans = [word_spans(t, protected[i] if protected else ()) for i, t in enumerate(texts)]
        segments = []  # per text: the gap before each word, the word, ..., the tail
        for text, text_spans in zip(texts, spans):
            position = 0
            for start, end in text_spans:
                segments += [text[position:start], text[start:end]]
                position = end
            segments.append(text[position:])
        encoded = iter(self.tokenizer.batch_encode(segments))
        queries: list[tuple[int, int, list[int], int]] = []  # (text, word, text ids, piece position)
        several: list[tuple[int, int, str]] = []  # (text, word, word) of words of several pieces
        words: list[list[Word]] = []
        for t, (text, text_spans) in enumerate(zip(texts, spans)):
            ids: list[int] = []
            pieces = []
            for _ in text_spans:
                ids += next(encoded)
                word_ids = next(encoded)
                pieces.append((len(ids), len(word_ids)))
                ids += word_ids
            ids += next(encoded)
            words.append([Word(start, end) for start, end in text_spans])
            for j, ((start, end), (position, count)) in enumerate(zip(text_spans, pieces)):
                if count == 1:
                    queries.append((t, j, ids, position))
                else:
                    several.append((t, j, text[start:end]))
        for (t, j, _, _), found in zip(queries, self._masked_lm(queries)):
            words[t][j].candidates = found
        if self.glove is not None and several:
            table = self.glove.neighbours([w for _, _, w in several], self.m)
            for t, j, word in several:
                words[t][j].candidates = table[word]
        self.stats.texts += len(texts)
        self.stats.mlm_words += len(queries)
        self.stats.glove_words += len(several) if self.glove is not None else 0
        kept = [[w for w in text_words if w.candidates] for text_words in words]
        with_candidates = sum(len(k) for k in kept)
        self.stats.words += with_candidates
        self.stats.kept_words += sum(len(s) for s in spans) - with_candidates
        return kept

    def _masked_lm(self, queries: Sequence[tuple[int, int, list[int], int]]) -> list[list[str]]:
        """Top-M masked-LM words at each query's position, batched by length; never the word itself."""
        inputs = []
        for _, _, ids, position in queries:
            width = min(len(ids), self.window)
            first = min(max(position - width // 2, 0), len(ids) - width)
            window = ids[first:first + width]
            masked = list(window)
            masked[position - first] = self.mask_id
            inputs.append(([self.cls_id, *masked, self.sep_id, *window, self.sep_id], width,
                           1 + position - first, ids[position]))
        results: list[list[str]] = [[] for _ in queries]
        order = sorted(range(len(inputs)), key=lambda q: len(inputs[q][0]))
        ids_to_tokens = self.tokenizer.ids_to_tokens
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin:begin + self.batch_size]
            length = max(len(inputs[q][0]) for q in batch)
            input_ids = torch.zeros(len(batch), length, dtype=torch.long)
            segment_ids = torch.zeros_like(input_ids)
            attention = torch.zeros_like(input_ids)
            for row, q in enumerate(batch):
                tokens, width, _, _ = inputs[q]
                input_ids[row, :len(tokens)] = torch.tensor(tokens)
                segment_ids[row, width + 2:len(tokens)] = 1
                attention[row, :len(tokens)] = 1
            positions = torch.tensor([inputs[q][2] for q in batch], device=self.device)
            rows = torch.arange(len(batch), device=self.device)
            with torch.inference_mode(), utils.autocast(self.precision, self.device):
                hidden, _ = self.model.bert(input_ids.to(self.device), segment_ids.to(self.device),
                                            attention.to(self.device))  # [B, S, H]
                # The vocabulary projection only at the masked position: [B, H] -> [B, V].
                logits = self.model.cls["predictions"](hidden[rows, positions]).float()
                logits.masked_fill_(self.invalid, -float("inf"))
                top = logits.topk(min(self.m + 4, logits.shape[1]), dim=1)  # room for the word itself, any case
            for row, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                original = ids_to_tokens.get(inputs[batch[row]][3], "").lower()
                found = [ids_to_tokens[i] for v, i in zip(values, indices)
                         if v != -float("inf") and ids_to_tokens[i].lower() != original]
                results[batch[row]] = found[:self.m]
        return results

    def copies(self, text: str, words: Sequence[Word], n: int, p: float,
               rng: np.random.Generator) -> list[tuple[str, list[tuple[int, int, str]]]]:
        """``n`` augmented copies of ``text`` (see ``sample_copy``), counted in the stats."""
        made = [sample_copy(text, words, p, rng) for _ in range(n)]
        self.stats.replaced += sum(len(replacements) for _, replacements in made)
        self.stats.copies_words += n * len(words)
        return made


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for begin in range(0, len(items), size):
        yield items[begin:begin + size]


# ----------------------------------------------------------------------------------------------------------------
# GLUE


def augment_glue(task_name: str, input_dir: PathLike, output_dir: PathLike, augmentor: Augmentor, n: int, p: float,
                 rng: np.random.Generator) -> tuple[Path, int, int]:
    """Write ``train_aug.tsv``: the header (if the task has one), then each example followed by its ``n`` copies,
    only the task's text columns changed. Returns (output path, examples read, rows written)."""
    processor = get_processor(task_name)
    path = Path(input_dir) / processor.train_file
    if not path.is_file():
        raise FileNotFoundError(f"--input_dir {input_dir}: no {processor.train_file} (the {task_name} training set)")
    processor.get_train_examples(input_dir)  # checks columns and labels, naming the file and line
    layout = processor.train_layout
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    header = rows.pop(0) if layout.header else None
    names = [c for c in (layout.text_a, layout.text_b) if c is not None]
    columns = [header.index(c) if isinstance(c, str) else c for c in names]
    output = Path(output_dir) / "train_aug.tsv"
    written = 0
    with atomic_write(output, "w", encoding="utf-8", newline="") as out:
        if header is not None:
            out.write("\t".join(header) + "\n")
        chunk_rows = max(1, CHUNK_TEXTS // len(columns))
        for done, chunk in enumerate(_chunks(rows, chunk_rows)):
            words = augmentor.candidates([row[c] for row in chunk for c in columns])
            for r, row in enumerate(chunk):
                copies = [list(row) for _ in range(n + 1)]
                for k, column in enumerate(columns):
                    made = augmentor.copies(row[column], words[r * len(columns) + k], n, p, rng)
                    for copy, (text, _) in zip(copies[1:], made):
                        copy[column] = text
                out.write("".join("\t".join(copy) + "\n" for copy in copies))
                written += len(copies)
            logger.info("%s: %d/%d examples", task_name, min((done + 1) * chunk_rows, len(rows)), len(rows))
    return output, len(rows), written


# ----------------------------------------------------------------------------------------------------------------
# SQuAD


def _answer_lists(qa: dict) -> list[str]:
    return [key for key in ("answers", "plausible_answers") if isinstance(qa.get(key), list)]


def answer_spans(paragraph: dict) -> list[tuple[int, int]]:
    """Character spans of every answer (and SQuAD v2.0 plausible answer) of a paragraph's questions."""
    return [(a["answer_start"], a["answer_start"] + len(a["text"]))
            for qa in paragraph["qas"] for key in _answer_lists(qa) for a in qa[key]]


def _copied_qa(qa: dict, k: int, replacements: Sequence[tuple[int, int, str]] = (),
               question: str | None = None) -> dict:
    """Copy ``k`` of a question: id ``<id>_aug<k>``, answers moved by the context ``replacements``."""
    copy = {**qa, "id": f"{qa['id']}_aug{k}"}
    if question is not None:
        copy["question"] = question
    for key in _answer_lists(qa):
        copy[key] = [{**a, "answer_start": shift_offset(a["answer_start"], replacements)} for a in qa[key]]
    return copy


def augment_paragraphs(paragraphs: Sequence[dict], augmentor: Augmentor, n: int, p: float, mode: str,
                       rng: np.random.Generator) -> list[dict]:
    """The output paragraphs of ``paragraphs``: in ``context`` mode each is followed by its ``n`` copies (words
    outside the answers replaced), in ``question`` mode each question is followed, in its paragraph, by ``n``
    copies."""
    out: list[dict] = []
    if mode == "context":
        words = augmentor.candidates([pg["context"] for pg in paragraphs], [answer_spans(pg) for pg in paragraphs])
        for paragraph, context_words in zip(paragraphs, words):
            out.append(paragraph)
            made = augmentor.copies(paragraph["context"], context_words, n, p, rng)
            for k, (context, replacements) in enumerate(made, 1):
                out.append({**paragraph, "context": context,
                            "qas": [_copied_qa(qa, k, replacements) for qa in paragraph["qas"]]})
        return out
    questions = [qa["question"] for pg in paragraphs for qa in pg["qas"]]
    words = iter(augmentor.candidates(questions))
    for paragraph in paragraphs:
        qas = []
        for qa in paragraph["qas"]:
            made = augmentor.copies(qa["question"], next(words), n, p, rng)
            qas += [qa] + [_copied_qa(qa, k, question=text) for k, (text, _) in enumerate(made, 1)]
        out.append({**paragraph, "qas": qas})
    return out


def augment_squad(input_file: PathLike, output_file: PathLike, augmentor: Augmentor, n: int, p: float, mode: str,
                  rng: np.random.Generator) -> tuple[int, int]:
    """Write the augmented SQuAD file, one article at a time. Returns (questions read, questions written)."""
    dataset = load_squad_json(input_file)
    articles = dataset["data"]
    rest = {k: v for k, v in dataset.items() if k != "data"}
    read = written = 0
    with atomic_write(output_file, "w", encoding="utf-8", newline="\n") as out:
        out.write(json_text(rest)[:-1] + (", " if rest else "") + '"data": [')
        for a, article in enumerate(articles):
            paragraphs = []
            for chunk in _chunks(article["paragraphs"], max(1, CHUNK_TEXTS // 8)):
                paragraphs += augment_paragraphs(chunk, augmentor, n, p, mode, rng)
            read += sum(len(pg["qas"]) for pg in article["paragraphs"])
            written += sum(len(pg["qas"]) for pg in paragraphs)
            out.write((", " if a else "") + json_text({**article, "paragraphs": paragraphs}))
            logger.info("squad: %d/%d articles, %d questions written", a + 1, len(articles), written)
        out.write("]}\n")
    return read, written


# ----------------------------------------------------------------------------------------------------------------
# Model and entry point


def vocab_is_uncased(vocab_file: PathLike) -> bool:
    """Whether a vocabulary is an uncased model's: no upper-case letter outside its ``[SPECIAL]`` tokens."""
    return not any(re.search("[A-Z]", t) and not re.fullmatch(r"\[.*\]", t) for t in load_vocab(vocab_file))


def load_masked_lm(args: argparse.Namespace) -> tuple[BertForMaskedLM, BertTokenizer]:
    """The masked LM and its tokenizer; refuses a model without a trained MLM head or whose vocabulary differs."""
    path = Path(args.pretrained_bert_model)
    if not path.exists():
        raise FileNotFoundError(f"--pretrained_bert_model {path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    vocab_file = Path(args.vocab_file) if args.vocab_file else folder / VOCAB_NAME
    if not vocab_file.is_file():
        raise FileNotFoundError(f"--vocab_file {vocab_file}: file not found" if args.vocab_file else
                                f"no {VOCAB_NAME} in {folder}; pass --vocab_file")
    model = BertForMaskedLM.from_pretrained(path, args.config_file)
    missing_head = [k for k in model.load_report.missing if k.startswith("cls.predictions.")]
    if missing_head:
        raise ValueError(f"--pretrained_bert_model {path} has no masked-LM head (missing {', '.join(missing_head)}); "
                         "augmentation needs a pre-trained BertForPreTraining/BertForMaskedLM, not an encoder-only or "
                         "fine-tuned model")
    lower = args.do_lower_case
    tokenizer = BertTokenizer(vocab_file, do_lower_case=vocab_is_uncased(vocab_file) if lower is None else lower)
    missing_tokens = [t for t in ("[CLS]", "[SEP]", "[MASK]") if t not in tokenizer.vocab]
    if missing_tokens:
        raise ValueError(f"--vocab_file {vocab_file} lacks {', '.join(missing_tokens)}")
    model.config.check_fits(len(tokenizer), args.max_seq_length,
                            config_file=args.config_file or f"the config of {path}", vocab_file=vocab_file)
    return model, tokenizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Augment one task's training set as the flags say; returns the summary that is logged."""
    started = time.time()
    resolve_arguments(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    if args.amp and device.type != "cuda":
        raise ValueError("--amp (fp16 autocast) needs a CUDA device; drop it on the CPU")
    precision: utils.Precision = "fp16" if args.amp else "fp32"
    glove = GloveNeighbours.load(args.glove_embs, args.glove_vocab_size) if args.glove_embs else None
    if args.task_name == SQUAD_TASK:
        load_squad_json(args.input_file)  # a bad input file fails before the model loads
    model, tokenizer = load_masked_lm(args)
    model.to(device)
    augmentor = Augmentor(model, tokenizer, glove, args.M, args.max_seq_length, args.batch_size, device, precision)
    rng = np.random.default_rng(args.seed)
    summary: dict[str, Any] = {"task_name": args.task_name, "N": args.N, "M": args.M, "p": args.p}
    if args.task_name == SQUAD_TASK:
        read, written = augment_squad(args.input_file, args.output_file, augmentor, args.N, args.p,
                                      args.squad_augment, rng)
        summary.update(output=args.output_file, questions_read=read, questions_written=written)
    else:
        output, read, written = augment_glue(args.task_name, args.input_dir, args.output_dir, augmentor, args.N,
                                             args.p, rng)
        summary.update(output=str(output), examples_read=read, rows_written=written)
    stats = augmentor.stats
    summary.update(texts=stats.texts, candidate_words=stats.words, masked_lm_words=stats.mlm_words,
                   glove_words=stats.glove_words, words_without_candidates=stats.kept_words,
                   replaced_fraction=round(stats.replaced / max(stats.copies_words, 1), 4),
                   seconds=round(time.time() - started, 1), device=str(device))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files or models end the run with one error line and exit status 1."""
    args = parse_arguments(argv)
    utils.configure_logging(True)
    try:
        summary = run(args)
    except utils.USER_ERRORS as exc:
        return utils.report_error("data_augmentation.py", exc)
    logger.info("done: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
