"""Property tests (hypothesis) for the readers of untrusted text: the SQuAD reader and features (data/squad.py), the
GLUE readers and features (data/glue.py) and the WordPiece tokenizer (tokenization.py).

Inputs are random unicode (lone surrogates, control characters, combining marks, CJK, emoji, BERT's special
tokens) and random JSON / TSV shapes (missing keys, wrong types, nested junk, bytes that are not UTF-8). The
properties: nothing fails except with the documented clear error naming the file, and valid input keeps the basic
invariants (ids inside the vocabulary, ids and tokens round trip, answer offsets inside their context).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data import glue, squad
from tokenization import BertTokenizer

VOCAB = REPO / "vocab" / "vocab"
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's files (hypothesis runs each test many times; a function-scoped tmp_path
    would be shared by all those runs anyway)."""
    return tmp_path_factory.mktemp("properties")


def fresh_folder(workdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workdir))


@pytest.fixture(scope="module")
def tokenizers() -> dict[bool, BertTokenizer]:
    """The repository's vocabulary, loaded once: uncased (True) and cased (False)."""
    return {lower: BertTokenizer(VOCAB, do_lower_case=lower) for lower in (True, False)}


# --------------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------------

ODD_CHARACTERS = [
    "\ud800", "\udfff", "\udc80",  # lone surrogates (valid in JSON escapes, not in UTF-8)
    "\x00", "\x07", "\x1f", "\x7f", "\x85", "\u200b", "\u200d", "\ufeff", "\ufffd",  # controls, format, replacement
    "\t", "\n", "\r", "\u202f", "\u00a0", "\u3000", "\u2028",  # whitespace of many kinds
    "\u0301", "\u0308", "\u20dd", "e\u0301", "\u00e9", "\u0130", "\u03a3", "\u1e9e", "\ufb01",  # marks, case quirks
    "\u4e2d", "\u6587", "\U00020000", "\u3042", "\uac00",  # CJK ideographs, kana, hangul
    "\U0001f600", "\U0001f469\u200d\U0001f4bb", "\U0001f1fa\U0001f1f8",  # emoji, ZWJ sequence, flag
    "[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "##", "[MA", "SK]", "\u00bf", "'", '"', ".", "-",
]
WORDS = ["the", "Normans", "don't", "naïve", "café", "1895", "U.S.", "unaffable", "ΣΊΣΥΦΟΣ", "straße"]

pieces = st.one_of(st.sampled_from(ODD_CHARACTERS), st.sampled_from(WORDS), st.characters(),
                   st.characters(categories=["Cs", "Cc", "Cf", "Mn", "Lo", "So", "Zs"]), st.just(" "))
texts = st.lists(pieces, max_size=24).map("".join)
"""Random unicode with what breaks text code: surrogates, controls, marks, CJK, emoji, special tokens."""

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), texts)
json_junk = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(texts, inner, max_size=3), max_leaves=6)


def mostly(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy``, or now and then any JSON value (a wrong type, nested junk)."""
    return st.one_of(strategy, strategy, strategy, json_junk)


def json_object(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """A JSON object with these keys (each value sometimes junk), or one missing some of them."""
    return st.one_of(st.fixed_dictionaries({k: mostly(v) for k, v in fields.items()}),
                     st.fixed_dictionaries({k: mostly(v) for k, v in fields.items()}),
                     st.fixed_dictionaries({}, optional={k: mostly(v) for k, v in fields.items()}))


@st.composite
def squad_paragraphs(draw: st.DrawFn, valid: bool = False) -> dict:
    """A paragraph whose answers mostly point into its context (answer_start at a real position of the text);
    unless ``valid``, keys go missing and values turn into junk now and then."""
    context = draw(texts)
    questions = []
    for _ in range(draw(st.integers(0, 3))):
        answers = []
        for _ in range(draw(st.integers(0, 2 if context or not valid else 0))):
            if context and (valid or draw(st.booleans())):
                start = draw(st.integers(0, len(context) - 1))
                end = draw(st.integers(start + 1, len(context)))
                answers.append({"text": context[start:end], "answer_start": start})
            else:
                answers.append(draw(json_object({"text": texts, "answer_start": st.integers(-3, 40)})))
        question = {"id": draw(st.one_of(texts, st.integers())), "question": draw(texts), "answers": answers,
                    "is_impossible": not answers if valid else draw(st.booleans())}
        if not valid:
            question = draw(st.one_of(st.just(question), st.just(question), json_object({
                "id": st.just(question["id"]), "question": st.just(question["question"]),
                "answers": st.just(answers), "is_impossible": st.booleans()})))
        questions.append(question)
    paragraph = {"context": context, "qas": questions}
    if valid:
        return paragraph
    return draw(st.one_of(st.just(paragraph), st.just(paragraph),
                          json_object({"context": st.just(context), "qas": st.just(questions)})))


squad_documents = st.one_of(
    st.lists(squad_paragraphs(valid=True), max_size=3).map(
        lambda paragraphs: {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}),
    json_object({"version": st.just("v2.0"),
                 "data": st.lists(json_object({"title": texts, "paragraphs": st.lists(squad_paragraphs(),
                                                                                     max_size=3)}),
                                  max_size=2)}),
    json_junk,
)
"""Well-formed SQuAD JSON, SQuAD-shaped JSON (keys missing, values of the wrong type, junk nested anywhere), or any
JSON value."""


def write_json(workdir: Path, document: object, raw_prefix: bytes = b"") -> Path:
    """``document`` as a JSON file (surrogates as \\u escapes, as json.dumps writes them), in a fresh folder."""
    path = fresh_folder(workdir) / "input.json"
    path.write_bytes(raw_prefix + json.dumps(document).encode("ascii"))
    return path


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=st.lists(texts, min_size=1, max_size=6), lower=st.booleans())
def test_tokenizer_paths_agree_and_stay_in_the_vocabulary(tokenizers, batch, lower):
    tokenizer = tokenizers[lower]
    tokens = [tokenizer.tokenize(text) for text in batch]
    assert tokenizer.batch_tokenize(batch) == tokens  # the Rust batch path equals the reference path
    ids = tokenizer.batch_encode(batch)
    for text_tokens, text_ids in zip(tokens, ids):
        assert all(token in tokenizer.vocab for token in text_tokens)
        assert all(0 <= i < len(tokenizer.vocab) for i in text_ids)
        assert text_ids == tokenizer.convert_tokens_to_ids(text_tokens)
        assert tokenizer.convert_ids_to_tokens(text_ids) == text_tokens  # ids and tokens round trip
    assert tokenizer.batch_encode(batch[::-1]) == ids[::-1]  # each text's ids do not depend on its neighbours


@SETTINGS
@given(text=texts)
def test_basic_tokenizer_output_is_clean(tokenizers, text):
    words = tokenizers[True].basic_tokenizer.tokenize(text)
    for word in words:
        assert word and not any(char.isspace() for char in word)
        assert not any(char in "\x00\ufffd" or "\ud800" <= char <= "\udfff" for char in word)


# --------------------------------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------------------------------


def check_squad_examples(document: dict, examples: list[squad.SquadExample], is_training: bool) -> None:
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                for answer in qa.get("answers", []):  # loading checked every offset: it lands in the context
                    start = answer["answer_start"]
                    assert 0 <= start and start + len(answer["text"]) <= len(paragraph["context"])
    for item in examples:
        assert isinstance(item.qas_id, str) and isinstance(item.question_text, str)
        if is_training and not item.is_impossible:
            assert 0 <= item.start_position <= item.end_position < len(item.doc_tokens)
            words = " ".join(item.doc_tokens[item.start_position:item.end_position + 1])
            assert " ".join(item.orig_answer_text.split()) in words
        else:
            assert item.start_position == item.end_position == -1


@SETTINGS
@given(document=squad_documents, is_training=st.booleans(), v2=st.booleans())
def test_squad_reader_fails_only_with_squad_format_error(workdir, document, is_training, v2):
    path = write_json(workdir, document)
    try:
        examples, skipped = squad.read_squad_examples(path, is_training=is_training, version_2_with_negative=v2)
    except squad.SquadFormatError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        return
    assert skipped >= 0
    check_squad_examples(document, examples, is_training)


@SETTINGS
@given(raw=st.binary(max_size=40))
@example(raw=b"[" * 100_000)  # nesting deeper than the recursion limit
@example(raw=b"1" * 5000)  # an integer longer than int() accepts (4300 digits)
@example(raw=b"\xff\xfe")  # not UTF-8
def test_squad_reader_names_the_file_for_bytes_that_are_not_json(workdir, raw):
    path = write_json(workdir, {"data": []}, raw_prefix=raw)  # junk bytes before a valid document
    try:
        squad.load_squad_json(path)
    except squad.SquadFormatError as exc:
        assert str(exc).startswith(f"{path}: ")


@SETTINGS
@given(paragraphs=st.lists(squad_paragraphs(valid=True), min_size=1, max_size=3), is_training=st.booleans(),
       lower=st.booleans(), max_seq_length=st.integers(24, 64), doc_stride=st.integers(1, 16))
def test_squad_features_keep_their_invariants(workdir, tokenizers, paragraphs, is_training, lower, max_seq_length,
                                              doc_stride):
    questions = [qa for paragraph in paragraphs for qa in paragraph["qas"]]
    for number, qa in enumerate(questions):  # prediction needs unique ids (the reader test covers repeats)
        qa["id"] = f"{qa['id']}#{number}"
    document = {"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}
    path = write_json(workdir, document)
    examples, _ = squad.read_squad_examples(path, is_training=is_training, version_2_with_negative=True)
    tokenizer = tokenizers[lower]
    features = squad.convert_examples_to_features(examples, tokenizer, max_seq_length, doc_stride, 16, is_training)
    cls_id, sep_id = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    for feature in features:
        ids = feature.input_ids
        assert len(ids) <= max_seq_length and ids[0] == cls_id and ids[-1] == sep_id
        assert ids[feature.doc_offset - 1] == sep_id and 0 <= ids.min() and ids.max() < len(tokenizer.vocab)
        assert len(ids) == feature.doc_offset + feature.span_length + 1
        doc_tokens = examples[feature.example_index].doc_tokens
        assert ((0 <= feature.token_to_orig) & (feature.token_to_orig < len(doc_tokens))).all()
        if feature.start_position or feature.end_position:  # an answer in this window: inside its doc tokens
            assert feature.doc_offset <= feature.start_position <= feature.end_position < len(ids) - 1
    # Post-processing any logits gives an answer per question, made of its context's words.
    rng = np.random.default_rng(0)
    starts = [rng.normal(size=len(f.input_ids)).astype(np.float32) for f in features]
    ends = [rng.normal(size=len(f.input_ids)).astype(np.float32) for f in features]
    predictions = squad.compute_predictions(examples, features, starts, ends, tokenizer, do_lower_case=lower,
                                            version_2_with_negative=True)
    for item in examples:
        answer = predictions.answers[item.qas_id]
        assert answer == "" or answer in " ".join(item.doc_tokens)
    files = squad.write_predictions(predictions, path.parent / "out", version_2_with_negative=True)
    assert json.loads(files["predictions"].read_bytes().decode("utf-8")) == predictions.answers


# --------------------------------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------------------------------

cells = texts.map(lambda text: text.replace("\t", " ").replace("\n", " ").replace("\r", " "))
"""A TSV cell: random unicode without the tab and line separators (raw ones are tried separately)."""


def layout_columns(layout: glue._Layout) -> list[str]:
    return [name for name in (layout.guid, layout.text_a, layout.text_b, layout.label) if isinstance(name, str)]


@st.composite
def glue_files(draw: st.DrawFn) -> tuple[glue.DataProcessor, str, bytes, int | None]:
    """A processor, a split, the bytes of that split's TSV file (mostly the right layout, with random text,
    labels that are sometimes wrong, rows of the wrong width, now and then raw junk bytes in front) and the number
    of examples it holds if it is read (None after junk bytes)."""
    processor = glue.get_processor(draw(st.sampled_from(sorted(glue.PROCESSORS))))
    split = draw(st.sampled_from(["train", "dev", "test"]))
    layout = {"train": processor.train_layout, "dev": processor.dev_layout or processor.train_layout,
              "test": processor.test_layout}[split]
    if layout.header:
        header = layout_columns(layout) + draw(st.lists(cells, max_size=2))
        header = draw(st.permutations(header))
        if draw(st.integers(0, 9)) == 0:
            header = draw(st.lists(cells, min_size=1, max_size=4))
        width = len(header)
    else:
        header, width = None, layout.num_columns
    labels = list(processor.labels) or ["0.5", "4", "-1e3", "nan", "inf", "x"]
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        row = draw(st.lists(cells, min_size=width, max_size=width))
        label_at = (header.index(layout.label) if header and layout.label in header else
                    layout.label if isinstance(layout.label, int) else None)
        if label_at is not None and draw(st.integers(0, 4)):
            row[label_at] = draw(st.sampled_from(labels))
        if draw(st.integers(0, 9)) == 0:
            row = row[:-1] if row and draw(st.booleans()) else [*row, "extra"]
        rows.append(row)
    lines = ([["\t".join(header)]] if header is not None else []) + [["\t".join(row)] for row in rows]
    text = "".join(line[0] + draw(st.sampled_from(["\n", "\n", "\r\n"])) for line in lines)
    if draw(st.integers(0, 4)):  # mostly text that UTF-8 can hold
        text = re.sub("[\ud800-\udfff]", "?", text)
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
    expected: int | None = sum(1 for row in rows if "\t".join(row))  # a blank line holds no example
    if draw(st.integers(0, 9)) == 0:
        data, expected = draw(st.binary(max_size=30)) + data, None
    return processor, split, data, expected


@SETTINGS
@given(case=glue_files(), max_seq_length=st.integers(3, 24), lower=st.booleans())
def test_glue_readers_fail_only_with_glue_data_error(workdir, tokenizers, case, max_seq_length, lower):
    processor, split, data, expected = case
    folder = fresh_folder(workdir)
    file_name = {"train": processor.train_file, "dev": processor.dev_file, "test": processor.test_file}[split]
    path = folder / file_name
    path.write_bytes(data)
    try:
        examples = processor.get_examples(folder, split)
    except glue.GlueDataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert expected is None or len(examples) == expected
    for item in examples:
        assert item.guid.startswith(f"{split}-")
        if split == "test":
            assert item.label is None
        elif processor.is_regression:
            assert math.isfinite(float(item.label))
        else:
            assert item.label in processor.labels
    if not examples:
        return
    tokenizer = tokenizers[lower]
    features, label_map = glue.convert_examples_to_features(examples, processor.get_labels(), max_seq_length,
                                                            tokenizer)
    for item, feature in zip(examples, features):
        assert len(feature.input_ids) == len(feature.input_mask) == len(feature.segment_ids) == max_seq_length
        length = sum(feature.input_mask)
        assert feature.input_mask == [1] * length + [0] * (max_seq_length - length)
        assert feature.input_ids[0] == tokenizer.vocab["[CLS]"] and feature.input_ids[length - 1] == \
            tokenizer.vocab["[SEP]"]
        assert all(0 <= i < len(tokenizer.vocab) for i in feature.input_ids)
        if item.label is not None and not processor.is_regression:
            assert feature.label_id == label_map[item.label]
    tensors = glue.features_to_tensors(features)
    assert tensors["input_ids"].shape == (len(features), max_seq_length)
