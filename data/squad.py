"""SQuAD v1.1/v2.0: reading, sliding-window features, post-processing to answers, and the official metrics."""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from file_utils import PathLike, atomic_write
from tokenization import BasicTokenizer

logger = logging.getLogger(__name__)

# The reference splits contexts on these characters only (U+202F, narrow no-break space, occurs in SQuAD).
_WHITESPACE = " \t\r\n\u202f"
_WHITESPACE_RE = re.compile(f"[{_WHITESPACE}]+")
_WHITESPACE_CODES = np.array([ord(c) for c in _WHITESPACE], dtype=np.uint32)


class SquadFormatError(ValueError):
    """A SQuAD JSON file is unreadable or malformed; the message names the file and the JSON path at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Reading examples
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SquadExample:
    """One question about one paragraph, with the paragraph split into whitespace-separated words.

    ``start_position`` / ``end_position`` are word indices into ``doc_tokens`` (training only; -1 when the question
    is impossible or the file was read for prediction). Questions of the same paragraph share ``doc_tokens``.
    """

    qas_id: str
    question_text: str
    doc_tokens: list[str]
    orig_answer_text: str = ""
    start_position: int = -1
    end_position: int = -1
    is_impossible: bool = False


def is_whitespace(char: str) -> bool:
    """Whether ``char`` separates words of a context (the reference's set, including U+202F)."""
    return char in _WHITESPACE


def split_context(context: str) -> tuple[list[str], np.ndarray]:
    """Split a context into words and map every character to the index of its word.

    A whitespace character maps to the word before it (-1 before the first word), as in the reference; the
    loop over characters is replaced by a cumulative sum over word starts.

    Returns:
        (doc_tokens, char_to_word_offset) where char_to_word_offset is an int64 array of len(context).
    """
    doc_tokens = [word for word in _WHITESPACE_RE.split(context) if word]
    codes = np.frombuffer(context.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    space = np.isin(codes, _WHITESPACE_CODES)
    starts = ~space
    starts[1:] &= space[:-1]
    return doc_tokens, np.cumsum(starts, dtype=np.int64) - 1


def _fail(path: Path, where: str, message: str) -> SquadFormatError:
    return SquadFormatError(f"{path}: {where}: {message}")


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """``obj[key]`` checked for presence and type, or a SquadFormatError naming the JSON path."""
    if not isinstance(obj, dict):
        raise _fail(path, where, f"expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise _fail(path, where, f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, (str, int)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(path, f"{where}.{key}", f"expected {names}, found {type(value).__name__}")
    return value


def load_squad_json(input_file: PathLike, unique_ids: bool = False) -> dict:
    """Read a SQuAD JSON file and check its structure (articles, paragraphs, questions, answer offsets).

    With ``unique_ids`` (prediction: answers are keyed by question id) a question id used twice is an error too.

    Raises:
        SquadFormatError: the file is missing or not JSON, a required key is absent or of the wrong type, an
            answer's ``answer_start`` (plus its text) falls outside its context, or (``unique_ids``) an id repeats.
            The message names the file and the JSON path, e.g. ``data[0].paragraphs[3].qas[1].answers[0].answer_start``.
    """
    path = Path(input_file)
    try:
        with open(path, encoding="utf-8") as handle:
            dataset = json.load(handle)
    except FileNotFoundError:
        raise SquadFormatError(f"{path}: file not found") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an integer of > 4300 digits, deep nesting
        raise SquadFormatError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    seen_ids: dict[str, str] = {}
    articles = _field(dataset, "data", list, path, "<root>")
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{a}]")):
            where_p = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, path, where_p)
            for q, qa in enumerate(_field(paragraph, "qas", list, path, where_p)):
                where_q = f"{where_p}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), path, where_q))
                if unique_ids and seen_ids.setdefault(qid, where_q) != where_q:
                    raise _fail(path, f"{where_q}.id", f"question id {qid!r} is used by {seen_ids[qid]} too; "
                                "predictions are keyed by id, so ids must be unique")
                _field(qa, "question", str, path, where_q)
                if "is_impossible" in qa and not isinstance(qa["is_impossible"], bool):
                    raise _fail(path, f"{where_q}.is_impossible", "expected true or false")
                if "answers" not in qa:
                    continue
                for n, answer in enumerate(_field(qa, "answers", list, path, where_q)):
                    where_a = f"{where_q}.answers[{n}]"
                    text = _field(answer, "text", str, path, where_a)
                    start = _field(answer, "answer_start", int, path, where_a)
                    if start < 0 or start + len(text) > len(context):
                        raise _fail(path, f"{where_a}.answer_start",
                                    f"{start} (+ {len(text)} characters of answer text) is outside the context "
                                    f"of {len(context)} characters")
    return dataset


def read_squad_examples(input_file: PathLike, is_training: bool,
                        version_2_with_negative: bool = False) -> tuple[list[SquadExample], int]:
    """Read a SQuAD file into examples.

    For training, each answerable question takes its first answer (the official training sets have exactly one;
    dev sets list several, all equally valid) and examples whose answer text can't be found in the whitespace
    words around ``answer_start`` (after collapsing whitespace) are skipped, counted and logged, as in the
    reference. With ``version_2_with_negative`` a question marked ``is_impossible`` gets no answer span.

    Returns:
        (examples, num_skipped)

    Raises:
        SquadFormatError: malformed file (see ``load_squad_json``; for prediction, question ids must be unique),
            or a training question without answers that is not marked impossible under --version_2_with_negative.
    """
    path = Path(input_file)
    dataset = load_squad_json(path, unique_ids=not is_training)
    examples: list[SquadExample] = []
    skipped = 0
    for a, article in enumerate(dataset["data"]):
        for p, paragraph in enumerate(article["paragraphs"]):
            context = paragraph["context"]
            doc_tokens, char_to_word = split_context(context)
            for q, qa in enumerate(paragraph["qas"]):
                example = SquadExample(qas_id=str(qa["id"]), question_text=qa["question"], doc_tokens=doc_tokens)
                if is_training:
                    example.is_impossible = bool(qa.get("is_impossible", False)) and version_2_with_negative
                    if not example.is_impossible:
                        answers = qa.get("answers") or []
                        if not answers:
                            hint = "" if version_2_with_negative else \
                                " (a SQuAD v2.0 file needs --version_2_with_negative)"
                            raise _fail(path, f"data[{a}].paragraphs[{p}].qas[{q}]",
                                        f"training question {example.qas_id!r} has no answer{hint}")
                        answer = answers[0]
                        text, start = answer["text"], answer["answer_start"]
                        cleaned = " ".join(text.split())
                        if cleaned:
                            # max(., 0): an answer starting on leading whitespace belongs to the first word.
                            first = max(int(char_to_word[start]), 0)
                            last = int(char_to_word[start + len(text) - 1])
                            actual = " ".join(doc_tokens[first:last + 1])
                        if not cleaned or actual.find(cleaned) == -1:
                            skipped += 1
                            logger.warning("%s: skipping question %s: answer %r not found in the context words",
                                           path, example.qas_id, text)
                            continue
                        example.orig_answer_text = text
                        example.start_position, example.end_position = first, last
                examples.append(example)
    if skipped:
        logger.warning("%s: skipped %d training question(s) whose answer could not be recovered", path, skipped)
    return examples, skipped


# ----------------------------------------------------------------------------------------------------------------
# Features: [CLS] query [SEP] doc window [SEP]
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class QAFeature:
    """One window of one example as model input, plus what post-processing needs to map it back to words.

    The sequence is ``[CLS] query [SEP] doc[span_start : span_start + span_length] [SEP]``; the doc tokens start at
    ``doc_offset`` = len(query) + 2. Segment ids are 0 before ``doc_offset`` and 1 from there on.
    """

    unique_id: int
    example_index: int
    doc_span_index: int
    input_ids: np.ndarray  # [L] int32, unpadded
    doc_offset: int
    span_start: int
    token_to_orig: np.ndarray  # [span_length] word index of each doc token of the window
    token_is_max_context: np.ndarray  # [span_length] bool: this window is the best one for that token
    start_position: int = 0
    end_position: int = 0
    is_impossible: bool = False

    @property
    def span_length(self) -> int:
        return len(self.token_to_orig)


def doc_spans(num_tokens: int, max_tokens_for_doc: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) windows over ``num_tokens`` doc tokens; each window starts ``min(length, doc_stride)``
    after the previous one and the last one ends at the end of the document (the reference's loop)."""
    spans = []
    start = 0
    while start < num_tokens:
        length = min(num_tokens - start, max_tokens_for_doc)
        spans.append((start, length))
        if start + length == num_tokens:
            break
        start += min(length, doc_stride)
    return spans


def max_context_owner(spans: Sequence[tuple[int, int]], num_tokens: int) -> np.ndarray:
    """For every doc token, the index of the window where it has the most context.

    A token's score in a window is min(tokens left of it, tokens right of it) + 0.01 * window length (Google
    BERT's ``_check_is_max_context``); the first window with the highest score wins ties.
    """
    owner = np.full(num_tokens, -1, dtype=np.int64)
    best = np.full(num_tokens, -np.inf)
    for index, (start, length) in enumerate(spans):
        end = start + length - 1
        position = np.arange(start, end + 1)
        score = np.minimum(position - start, end - position) + 0.01 * length
        better = score > best[start:end + 1]
        owner[start:end + 1][better] = index
        best[start:end + 1][better] = score[better]
    return owner


def improve_answer_span(doc_ids: Sequence[int], start: int, end: int, answer_ids: Sequence[int]) -> tuple[int, int]:
    """Shrink [start, end] to the tightest sub-token span equal to the tokenized answer.

    Word-level positions can include extra sub-tokens: for the answer "1895" in "(1895-1943)." the word maps
    to "( 1895 - 1943 ) ." and the tighter span "1895" matches the tokenized answer exactly. Comparing token ids
    is the same as comparing the reference's joined token strings.
    """
    answer = list(answer_ids)
    for new_start in range(start, end + 1):
        for new_end in range(end, new_start - 1, -1):
            if list(doc_ids[new_start:new_end + 1]) == answer:
                return new_start, new_end
    return start, end


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """WordPiece ids of each text through the tokenizer's fast batch path (no special tokens added)."""
    return tokenizer.batch_encode(texts) if texts else []


def convert_examples_to_features(examples: Sequence[SquadExample], tokenizer: Any, max_seq_length: int,
                                 doc_stride: int, max_query_length: int, is_training: bool) -> list[QAFeature]:
    """Tokenize examples and cut each document into overlapping windows that fit ``max_seq_length``.

    Every distinct context word, every question and every answer is tokenized once through the tokenizer's fast
    batch path (words are tokenized independently in the reference too, so this is the same result).
    Training windows that don't contain the answer, and impossible questions, point start and end at [CLS] (0).
    A training question whose answer words give no tokens at all (only control characters, say) has no span to
    point at: it gets no features, and a warning names it. ``unique_id`` counts from 1000000000 as in the reference.
    """
    if max_seq_length - max_query_length - 3 <= 0:
        raise ValueError(f"--max_seq_length {max_seq_length} leaves no room for the document after a query of "
                         f"--max_query_length {max_query_length} and 3 special tokens")
    if doc_stride < 1:
        raise ValueError(f"--doc_stride must be >= 1, got {doc_stride}")
    cls_id, sep_id = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    unique_docs = {id(example.doc_tokens): example.doc_tokens for example in examples}  # questions share them
    words = list(dict.fromkeys(word for doc in unique_docs.values() for word in doc))
    word_ids = dict(zip(words, _encode(tokenizer, words)))
    queries = _encode(tokenizer, [example.question_text for example in examples])
    answer_rows = [i for i, example in enumerate(examples) if is_training and not example.is_impossible]
    answers = dict(zip(answer_rows, _encode(tokenizer, [examples[i].orig_answer_text for i in answer_rows])))

    docs: dict[int, tuple[list[int], np.ndarray, np.ndarray, list[int]]] = {}
    windows: dict[tuple[int, int], tuple[list[tuple[int, int]], np.ndarray]] = {}  # (doc, query length) -> spans
    features: list[QAFeature] = []
    untokenized: list[str] = []
    unique_id = 1000000000
    for example_index, example in enumerate(examples):
        key = id(example.doc_tokens)
        if key not in docs:
            doc_ids: list[int] = []
            tok_to_orig: list[int] = []
            orig_to_tok: list[int] = []
            for word_index, word in enumerate(example.doc_tokens):
                orig_to_tok.append(len(doc_ids))
                pieces = word_ids[word]
                doc_ids.extend(pieces)
                tok_to_orig.extend([word_index] * len(pieces))
            docs[key] = (doc_ids, np.asarray(doc_ids, dtype=np.int32), np.asarray(tok_to_orig, dtype=np.int64),
                         orig_to_tok)
        doc_ids, doc_array, tok_to_orig_array, orig_to_tok = docs[key]
        query = np.asarray(queries[example_index][:max_query_length], dtype=np.int32)

        tok_start = tok_end = -1
        if is_training and not example.is_impossible:
            tok_start = orig_to_tok[example.start_position]
            if example.end_position < len(example.doc_tokens) - 1:
                tok_end = orig_to_tok[example.end_position + 1] - 1
            else:
                tok_end = len(doc_ids) - 1
            if tok_end < tok_start:  # the answer's words have no WordPiece tokens (only control characters, ...)
                untokenized.append(example.qas_id)
                continue
            tok_start, tok_end = improve_answer_span(doc_ids, tok_start, tok_end, answers[example_index])

        if (key, len(query)) not in windows:
            spans = doc_spans(len(doc_ids), max_seq_length - len(query) - 3, doc_stride)
            windows[key, len(query)] = spans, max_context_owner(spans, len(doc_ids))
        spans, owner = windows[key, len(query)]
        doc_offset = len(query) + 2
        head = np.concatenate([[cls_id], query, [sep_id]]).astype(np.int32)
        for span_index, (start, length) in enumerate(spans):
            start_position = end_position = 0
            if is_training and not example.is_impossible and start <= tok_start and tok_end <= start + length - 1:
                start_position = tok_start - start + doc_offset
                end_position = tok_end - start + doc_offset
            features.append(QAFeature(
                unique_id=unique_id, example_index=example_index, doc_span_index=span_index,
                input_ids=np.concatenate([head, doc_array[start:start + length], [sep_id]]).astype(np.int32),
                doc_offset=doc_offset, span_start=start,
                token_to_orig=tok_to_orig_array[start:start + length],
                token_is_max_context=owner[start:start + length] == span_index,
                start_position=start_position, end_position=end_position, is_impossible=example.is_impossible))
            unique_id += 1
    if untokenized:
        logger.warning("skipped %d training question(s) whose answer words give no WordPiece tokens (e.g. only "
                       "control characters): %s", len(untokenized), describe_ids(untokenized))
    return features


def features_to_tensors(features: Sequence[QAFeature], max_seq_length: int) -> dict[str, torch.Tensor]:
    """Pack features into padded tensors: what training batches and the features cache are made of.

    Returns ``input_ids`` [F, max_seq_length] int32 (zero padded), ``seq_lengths``, ``doc_offsets``,
    ``start_positions``, ``end_positions`` (each [F] int64). Masks and segment ids follow from the lengths.
    """
    count = len(features)
    input_ids = np.zeros((count, max_seq_length), dtype=np.int32)
    lengths = np.empty(count, dtype=np.int64)
    for row, feature in enumerate(features):
        lengths[row] = len(feature.input_ids)
        input_ids[row, :lengths[row]] = feature.input_ids
    return {
        "input_ids": torch.from_numpy(input_ids),
        "seq_lengths": torch.from_numpy(lengths),
        "doc_offsets": torch.tensor([f.doc_offset for f in features], dtype=torch.int64),
        "start_positions": torch.tensor([f.start_position for f in features], dtype=torch.int64),
        "end_positions": torch.tensor([f.end_position for f in features], dtype=torch.int64),
    }


def model_inputs(input_ids: torch.Tensor, seq_lengths: torch.Tensor, doc_offsets: torch.Tensor,
                 trim: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for rows of packed features: ids, segment ids and attention mask, all [B, T] int64.

    With ``trim`` the batch is cut to its longest row (T = max length in the batch): padding columns are masked
    out anyway, so the real positions' logits are unchanged and the work drops with the padding.
    """
    width = int(seq_lengths.max()) if trim and len(seq_lengths) else input_ids.shape[1]
    positions = torch.arange(width)
    attention_mask = positions[None, :] < seq_lengths[:, None]  # [B, T]
    token_type_ids = (positions[None, :] >= doc_offsets[:, None]) & attention_mask
    return {"input_ids": input_ids[:, :width].long(), "token_type_ids": token_type_ids.long(),
            "attention_mask": attention_mask.long()}


def predict_logits(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batch_size: int, device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   progress: Callable[[Iterable], Iterable] | None = None,
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of every packed feature (``features_to_tensors``), in feature order.

    Features are run longest first in batches of ``batch_size``, each batch cut to its longest row: similar lengths
    share a batch, so little padding is computed; results are put back in feature order. Row i's arrays are
    float32 of length ``seq_lengths[i]``.
    """
    lengths = tensors["seq_lengths"]
    order = torch.argsort(lengths, descending=True, stable=True)
    starts: list[np.ndarray | None] = [None] * len(order)
    ends: list[np.ndarray | None] = [None] * len(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in (progress(batches) if progress else batches):
                inputs = model_inputs(tensors["input_ids"][rows], lengths[rows], tensors["doc_offsets"][rows])
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                with autocast():
                    start_logits, end_logits = model(inputs["input_ids"], inputs["token_type_ids"],
                                                     inputs["attention_mask"])
                start_logits = start_logits.float().cpu().numpy()
                end_logits = end_logits.float().cpu().numpy()
                for k, row in enumerate(rows.tolist()):
                    starts[row] = start_logits[k, :lengths[row]]
                    ends[row] = end_logits[k, :lengths[row]]
    finally:
        model.train(was_training)
    return starts, ends  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Post-processing: logits -> answer text and n-best lists
# ----------------------------------------------------------------------------------------------------------------


def _strip_spaces(text: str) -> tuple[str, list[int]]:
    """``text`` without spaces, and for each kept character its index in ``text``."""
    return text.replace(" ", ""), [i for i, char in enumerate(text) if char != " "]


def get_final_text(pred_text: str, orig_text: str, do_lower_case: bool, basic_tokenizer: Any = None,
                   verbose_logging: bool = False) -> str:
    """Project a normalized predicted span back onto the original text.

    ``pred_text`` comes from WordPiece tokens (lower-cased, punctuation split off), ``orig_text`` is the original
    words the span covers, which may hold extra characters ("Steve Smith's" for the prediction "steve smith").
    Both are aligned character by character after BasicTokenizer normalization with spaces removed; when that
    fails (different lengths, prediction not found) the original words are returned, as in Google BERT.
    """
    basic_tokenizer = basic_tokenizer or BasicTokenizer(do_lower_case=do_lower_case)
    tok_text = " ".join(basic_tokenizer.tokenize(orig_text))
    start = tok_text.find(pred_text)
    if start == -1:
        if verbose_logging:
            logger.info("unable to find text %r in %r", pred_text, orig_text)
        return orig_text
    end = start + len(pred_text) - 1
    orig_ns, orig_ns_to_s = _strip_spaces(orig_text)
    tok_ns, tok_ns_to_s = _strip_spaces(tok_text)
    if len(orig_ns) != len(tok_ns):
        if verbose_logging:
            logger.info("length not equal after stripping spaces: %r vs %r", orig_ns, tok_ns)
        return orig_text
    tok_s_to_ns = {s: ns for ns, s in enumerate(tok_ns_to_s)}
    if start not in tok_s_to_ns or end not in tok_s_to_ns:
        if verbose_logging:
            logger.info("could not map the span of %r back to %r", pred_text, orig_text)
        return orig_text
    orig_start = orig_ns_to_s[tok_s_to_ns[start]]
    orig_end = orig_ns_to_s[tok_s_to_ns[end]]
    return orig_text[orig_start:orig_end + 1]


class _WordCachedBasicTokenizer:
    """BasicTokenizer over texts made of context words joined by single spaces, tokenizing each distinct word once.

    Basic tokenization never joins across whitespace, so tokenizing the joined words equals joining the words'
    tokens; post-processing calls it for every n-best candidate, over the same words again and again.
    """

    def __init__(self, basic: BasicTokenizer) -> None:
        self.basic = basic
        self.cache: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for word in text.split(" "):
            if word not in self.cache:
                self.cache[word] = self.basic.tokenize(word)
            tokens.extend(self.cache[word])
        return tokens


def _softmax(scores: Sequence[float]) -> list[float]:
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(score - top) for score in scores]
    total = sum(exps)
    return [value / total for value in exps]


def _top_indices(logits: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest logits, largest first; ties keep the lower index first (a stable sort)."""
    return np.argsort(-logits, kind="stable")[:n]


@dataclass
class SquadPredictions:
    """Post-processing output, keyed by question id (insertion order = example order)."""

    answers: dict[str, str] = field(default_factory=dict)
    nbest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    null_odds: dict[str, float] = field(default_factory=dict)  # v2 only: null score - best non-null score


def compute_predictions(examples: Sequence[SquadExample], features: Sequence[QAFeature],
                        start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], tokenizer: Any, *,
                        n_best_size: int = 20, max_answer_length: int = 30, do_lower_case: bool = True,
                        version_2_with_negative: bool = False, null_score_diff_threshold: float = 0.0,
                        verbose_logging: bool = False) -> SquadPredictions:
    """Turn per-window start/end logits into an answer and an n-best list for every example.

    For each window: the ``n_best_size`` best start and end positions; pairs are kept when both lie in the
    window's doc tokens, the start is in its max-context window, end >= start and the span has at most
    ``max_answer_length`` tokens. All windows' candidates are ranked by start + end logit, de-WordPieced, mapped
    back to the original text (``get_final_text``) and de-duplicated; probabilities are a softmax over the kept
    n-best. With v2 the null answer (the lowest [CLS] score over the windows) joins the n-best, and the question is
    answered "" when null score - best non-null score > ``null_score_diff_threshold``.

    Differences from the reference, on purpose: logits of padding positions are not ranked (they could only take
    candidate slots and be filtered out), and when no valid span exists the answer is "" rather than the text
    "empty" (the null-odds still treat it as a zero-logit span, as the reference does).

    ``start_logits[i]`` / ``end_logits[i]`` hold at least ``len(features[i].input_ids)`` logits of window i.
    Question ids must be unique (``ValueError`` otherwise), as the results are keyed by them.
    """
    repeated = [qid for qid, count in collections.Counter(e.qas_id for e in examples).items() if count > 1]
    if repeated:
        raise ValueError(f"question ids repeat ({describe_ids(repeated)}): predictions are keyed by id")
    basic = _WordCachedBasicTokenizer(BasicTokenizer(do_lower_case=do_lower_case))
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for index, feature in enumerate(features):
        by_example[feature.example_index].append(index)
    result = SquadPredictions()
    for example_index, example in enumerate(examples):
        candidates: list[tuple[float, float, int, int, int]] = []  # (start_logit, end_logit, feature, start, end)
        null_score, null_start, null_end = math.inf, 0.0, 0.0
        for index in by_example.get(example_index, []):
            feature = features[index]
            length = len(feature.input_ids)
            starts = np.asarray(start_logits[index][:length], dtype=np.float64)
            ends = np.asarray(end_logits[index][:length], dtype=np.float64)
            if version_2_with_negative and starts[0] + ends[0] < null_score:
                null_score, null_start, null_end = float(starts[0] + ends[0]), float(starts[0]), float(ends[0])
            start_grid, end_grid = np.meshgrid(_top_indices(starts, n_best_size), _top_indices(ends, n_best_size),
                                               indexing="ij")  # start-major, as the reference's nested loops
            start_grid, end_grid = start_grid.ravel(), end_grid.ravel()
            first, last = feature.doc_offset, feature.doc_offset + feature.span_length - 1
            valid = (start_grid >= first) & (start_grid <= last) & (end_grid >= first) & (end_grid <= last)
            valid &= (end_grid >= start_grid) & (end_grid - start_grid + 1 <= max_answer_length)
            valid &= feature.token_is_max_context[np.clip(start_grid - first, 0, feature.span_length - 1)]
            for s, e in zip(start_grid[valid].tolist(), end_grid[valid].tolist()):
                candidates.append((float(starts[s]), float(ends[e]), index, s, e))
        if version_2_with_negative and math.isfinite(null_score):
            candidates.append((null_start, null_end, -1, 0, 0))
        # Python's sort is stable, so equal totals keep window order, as in the reference.
        candidates.sort(key=lambda c: c[0] + c[1], reverse=True)

        nbest: list[tuple[str, float, float]] = []
        seen: set[str] = set()
        for start_logit, end_logit, index, s, e in candidates:
            if len(nbest) >= n_best_size:
                break
            if index >= 0:
                feature = features[index]
                pieces = tokenizer.convert_ids_to_tokens(feature.input_ids[s:e + 1].tolist())
                tok_text = " ".join(pieces).replace(" ##", "").replace("##", "")
                tok_text = " ".join(tok_text.strip().split())
                orig_first = int(feature.token_to_orig[s - feature.doc_offset])
                orig_last = int(feature.token_to_orig[e - feature.doc_offset])
                orig_text = " ".join(example.doc_tokens[orig_first:orig_last + 1])
                text = get_final_text(tok_text, orig_text, do_lower_case, basic, verbose_logging)
            else:
                text = ""
            if text in seen:
                continue
            seen.add(text)
            nbest.append((text, start_logit, end_logit))
        if version_2_with_negative and "" not in seen and math.isfinite(null_score):
            nbest.append(("", null_start, null_end))
        if not nbest:
            nbest.append(("", 0.0, 0.0))

        probabilities = _softmax([s + e for _, s, e in nbest])
        result.nbest[example.qas_id] = [
            {"text": text, "probability": prob, "start_logit": s, "end_logit": e}
            for (text, s, e), prob in zip(nbest, probabilities)]
        best_non_null = next((entry for entry in nbest if entry[0]), None)
        if not version_2_with_negative:
            result.answers[example.qas_id] = nbest[0][0]
            continue
        best_text, best_start, best_end = best_non_null if best_non_null else ("", 0.0, 0.0)
        score_diff = (null_score if math.isfinite(null_score) else 0.0) - best_start - best_end
        result.null_odds[example.qas_id] = score_diff
        result.answers[example.qas_id] = "" if score_diff > null_score_diff_threshold else best_text
    return result


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def has_lone_surrogates(value: Any) -> bool:
    """Whether a string, or any string key or value nested in dicts and lists, holds a lone surrogate.

    JSON may spell one (``"\\ud800"``) and ``json.load`` returns it, but it is not Unicode text: encoding it as
    UTF-8 fails, so such text can be read and trained on but not written as UTF-8 or printed.
    """
    if isinstance(value, str):
        return _SURROGATE_RE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogates(k) or has_lone_surrogates(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogates(v) for v in value)
    return False


def json_text(content: Any, indent: int | None = None) -> str:
    """``json.dumps`` with non-ASCII text kept as it is, except lone surrogates, written as ``\\uXXXX`` escapes
    (what ``ensure_ascii=True`` writes for them): the result is valid JSON that encodes as UTF-8 and reads back
    to the same strings."""
    # Outside strings JSON is ASCII, so every surrogate found is inside a string, where its escape is valid.
    return escape_lone_surrogates(json.dumps(content, indent=indent, ensure_ascii=False))


def escape_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by its ``\\uXXXX`` escape, so that it can be encoded and printed."""
    return _SURROGATE_RE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def describe_ids(ids: Sequence[str], limit: int = 10) -> str:
    """Question ids for a log line, each in ``repr`` form (which escapes surrogates), at most ``limit`` of them."""
    shown = ", ".join(repr(qid) for qid in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def write_predictions(predictions: SquadPredictions, output_dir: PathLike,
                      version_2_with_negative: bool = False) -> dict[str, Path]:
    """Write predictions.json, nbest_predictions.json and (v2) null_odds.json atomically as UTF-8; return their paths.

    Questions whose id, answer or n-best texts hold lone surrogates (from ``\\ud800``-style escapes in the input
    JSON) are still written, with those characters as ``\\uXXXX`` escapes (``json_text``); one warning names them.
    """
    output_dir = Path(output_dir)
    files = {"predictions": (output_dir / "predictions.json", predictions.answers),
             "nbest_predictions": (output_dir / "nbest_predictions.json", predictions.nbest)}
    if version_2_with_negative:
        files["null_odds"] = (output_dir / "null_odds.json", predictions.null_odds)
    affected = [qid for qid in dict.fromkeys([*predictions.answers, *predictions.nbest, *predictions.null_odds])
                if has_lone_surrogates([qid, predictions.answers.get(qid), predictions.nbest.get(qid)])]
    if affected:
        logger.warning("%d question(s) have lone surrogates (\\ud800-style escapes that are not Unicode text) in "
                       "their id or predicted text: %s; they are written as \\uXXXX escapes in %s",
                       len(affected), describe_ids(affected), output_dir)
    for path, content in files.values():
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(json_text(content, indent=4) + "\n")
    return {name: path for name, (path, _) in files.items()}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the official SQuAD v1.1 and v2.0 metrics
# ----------------------------------------------------------------------------------------------------------------

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """v1.1 exact match: the normalized strings are equal."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """v1.1 token F1 between normalized strings (0 when no token is shared, including an empty side)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _iter_qas(dataset: dict | list) -> Iterable[dict]:
    articles = dataset["data"] if isinstance(dataset, dict) else dataset
    for article in articles:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def evaluate_v1(dataset: dict | list, predictions: dict[str, str]) -> dict[str, float]:
    """The official v1.1 evaluation: mean over questions of the best EM and F1 against any gold answer, in %.

    A question without a prediction scores 0 (and is logged), as in the official script.
    """
    exact = f1 = 0.0
    total = 0
    for qa in _iter_qas(dataset):
        total += 1
        qid = str(qa["id"])
        if qid not in predictions:
            logger.warning("unanswered question %s will receive score 0", qid)
            continue
        golds = [answer["text"] for answer in qa.get("answers", [])]
        prediction = predictions[qid]
        exact += max((exact_match_score(prediction, gold) for gold in golds), default=0)
        f1 += max((f1_score(prediction, gold) for gold in golds), default=0.0)
    return {"exact_match": 100.0 * exact / total if total else 0.0, "f1": 100.0 * f1 / total if total else 0.0}


def get_tokens(text: str) -> list[str]:
    """v2.0: the normalized tokens of an answer (none for an empty answer)."""
    return normalize_answer(text).split() if text else []


def compute_exact(gold: str, prediction: str) -> int:
    """v2.0 exact match as 0/1."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def compute_f1(gold: str, prediction: str) -> float:
    """v2.0 token F1; when either side is empty (no answer) it is 1 if both are empty, else 0."""
    gold_tokens, pred_tokens = get_tokens(gold), get_tokens(prediction)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    return f1_score(prediction, gold)


def get_raw_scores(dataset: dict | list, predictions: dict[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    """v2.0 per-question EM and F1, max over the gold answers; an impossible question's only gold answer is "".

    A question without a prediction scores 0 and is logged (the official script drops it from the total instead,
    and then fails on the HasAns/NoAns breakdowns).
    """
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    for qa in _iter_qas(dataset):
        qid = str(qa["id"])
        golds = [answer["text"] for answer in qa.get("answers", []) if normalize_answer(answer["text"])] or [""]
        if qid not in predictions:
            logger.warning("missing prediction for %s (scored 0)", qid)
            exact[qid], f1[qid] = 0, 0.0
            continue
        prediction = predictions[qid]
        exact[qid] = max(compute_exact(gold, prediction) for gold in golds)
        f1[qid] = max(compute_f1(gold, prediction) for gold in golds)
    return exact, f1


def apply_no_ans_threshold(scores: dict[str, float], na_probs: dict[str, float], qid_to_has_ans: dict[str, bool],
                           na_prob_thresh: float) -> dict[str, float]:
    """Score a question as answered "no answer" when its no-answer probability exceeds the threshold."""
    return {qid: float(not qid_to_has_ans[qid]) if na_probs.get(qid, 0.0) > na_prob_thresh else score
            for qid, score in scores.items()}


def make_eval_dict(exact: dict[str, float], f1: dict[str, float],
                   qid_list: Sequence[str] | None = None) -> dict[str, float]:
    """Mean EM and F1 in % (over ``qid_list`` when given) and the question count."""
    qids = list(exact) if qid_list is None else list(qid_list)
    total = len(qids)
    return {"exact": 100.0 * sum(exact[k] for k in qids) / total if total else 0.0,
            "f1": 100.0 * sum(f1[k] for k in qids) / total if total else 0.0,
            "total": total}


def find_best_thresh(predictions: dict[str, str], scores: dict[str, float], na_probs: dict[str, float],
                     qid_to_has_ans: dict[str, bool]) -> tuple[float, float]:
    """The no-answer threshold that maximizes the score, and that score in %.

    Starting from "answer nothing" (every impossible question right), questions are switched to their prediction
    in order of increasing no-answer probability; the best running total wins (the official algorithm).
    """
    current = best = sum(1 for has_ans in qid_to_has_ans.values() if not has_ans)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            current += scores[qid]
        elif predictions.get(qid):
            current -= 1
        if current > best:
            best, best_thresh = current, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate_v2(dataset: dict | list, predictions: dict[str, str], na_probs: dict[str, float] | None = None,
                na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The official v2.0 evaluation: exact/f1/total, HasAns_* and NoAns_* breakdowns, and, when ``na_probs`` (the
    null_odds.json contents) is given, best_exact/best_f1 with their thresholds."""
    qid_to_has_ans = {str(qa["id"]): bool(qa.get("answers")) for qa in _iter_qas(dataset)}
    has_ans = [qid for qid, has in qid_to_has_ans.items() if has]
    no_ans = [qid for qid, has in qid_to_has_ans.items() if not has]
    probs = na_probs if na_probs is not None else {qid: 0.0 for qid in predictions}
    exact_raw, f1_raw = get_raw_scores(dataset, predictions)
    exact = apply_no_ans_threshold(exact_raw, probs, qid_to_has_ans, na_prob_thresh)
    f1 = apply_no_ans_threshold(f1_raw, probs, qid_to_has_ans, na_prob_thresh)
    out = make_eval_dict(exact, f1)
    for prefix, qids in (("HasAns", has_ans), ("NoAns", no_ans)):
        if qids:
            for key, value in make_eval_dict(exact, f1, qids).items():
                out[f"{prefix}_{key}"] = value
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact_raw, na_probs,
                                                                       qid_to_has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, qid_to_has_ans)
    return out


def evaluate(dataset: dict | list, predictions: dict[str, str], version_2_with_negative: bool,
             na_probs: dict[str, float] | None = None) -> dict[str, float]:
    """Run the metric of the dataset's version; both results carry ``exact_match`` and ``f1`` keys for logging.

    Raises:
        SquadFormatError: a question has no ``answers`` list (a file without gold answers can't be scored).
    """
    unscored = next((str(qa["id"]) for qa in _iter_qas(dataset) if not isinstance(qa.get("answers"), list)), None)
    if unscored is not None:
        raise SquadFormatError(f"question {unscored} has no 'answers' list: evaluation needs the gold answers")
    if not version_2_with_negative:
        return evaluate_v1(dataset, predictions)
    result = evaluate_v2(dataset, predictions, na_probs)
    return {"exact_match": result["exact"], **result}
