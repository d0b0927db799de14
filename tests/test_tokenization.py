"""Tests for tokenization.py: each component on a tiny vocabulary, then the real vocabulary against transformers."""
from __future__ import annotations

import csv
import inspect
import json
import logging
import pickle
from pathlib import Path

import pytest
from conftest import REPO, shared_path

from tokenization import (
    BasicTokenizer,
    BertTokenizer,
    WordpieceTokenizer,
    is_control,
    is_punctuation,
    is_whitespace,
    load_vocab,
    whitespace_tokenize,
)

# google-research/bert tokenization_test.py's vocabulary: ids follow list order.
TINY_VOCAB = ["[UNK]", "[CLS]", "[SEP]", "want", "##want", "##ed", "wa", "un", "runn", "##ing", ","]
BUNDLED_VOCAB = REPO / "vocab" / "vocab"

# Inputs on which a Python re-implementation and the Rust library are most likely to part ways.
EDGE_TEXTS = [
    "",
    "   \t\n ",
    "UNwant\u00e9d,running",
    "Hello, World! the [MASK]. [CLS]x[SEP]y [mask] [MASK]",
    "[MA\x00SK] [UNK]! [[MASK]] [PAD][PAD]",
    "nul\x00 replacement\ufffd bell\x07 zero\u200bwidth bom\ufeff del\x7f",
    "tab\there\r\nline\u2028sep\u2029para\u0085nel nbsp\u00a0ideo\u3000space\x0bvt\x0cff",
    "caf\u00e9 nai\u0308ve \u00c5ngstr\u00f6m e\u0301\u0301 \u0130stanbul \u00df STRASSE \ufb01ne",
    "\u039f\u0394\u039f\u03a3 \u03c3\u03bf\u03c6\u03af\u03b1 \u03a3",
    "\u4f60\u597d\u4e16\u754c abc\u4e2d\u6587def \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4",
    "$5.00 + 3^2 = `x` ~user @home #tag {a|b} 50% <unk> @-@",
    "emoji \U0001f600\U0001f44d\U0001f3fd ok \u0378unassigned \ue000private",
    "lone \ud800 surrogate",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101 + " " + "want" * 30,
    "unwanted" * 12 + " ,,,,, " + "runn" + "ing" * 40,
]


@pytest.fixture
def tiny_vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token in TINY_VOCAB), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bundled_tokenizer() -> BertTokenizer:
    return BertTokenizer(BUNDLED_VOCAB)


# ---- components on the tiny vocabulary --------------------------------------------------------------------------

def test_load_vocab_ids_are_line_numbers(tiny_vocab_file: Path) -> None:
    vocab = load_vocab(tiny_vocab_file)
    assert list(vocab) == TINY_VOCAB
    assert list(vocab.values()) == list(range(len(TINY_VOCAB)))


def test_load_vocab_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_vocab.txt"
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        load_vocab(missing)
    with pytest.raises(FileNotFoundError, match="no_such_vocab.txt"):
        BertTokenizer(missing)
    with pytest.raises(FileNotFoundError, match="directory"):
        load_vocab(tmp_path)


def test_load_vocab_empty_or_binary_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_vocab(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"[UNK]\n\xff\xfe\n")
    with pytest.raises(ValueError, match="binary.txt.*UTF-8"):
        load_vocab(binary)


def test_load_vocab_duplicate_token_later_line_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dup.txt"
    path.write_text("[UNK]\nwant\n,\nwant\r\n  un  \n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="tokenization"):
        vocab = load_vocab(path)
    assert dict(vocab) == {"[UNK]": 0, "want": 3, ",": 2, "un": 4}
    assert "dup.txt" in caplog.text and "want" in caplog.text


def test_whitespace_tokenize() -> None:
    assert whitespace_tokenize(" \t a  b\nc \r") == ["a", "b", "c"]
    assert whitespace_tokenize("   ") == []


def test_basic_tokenizer_lower() -> None:
    tokenizer = BasicTokenizer(do_lower_case=True)
    assert tokenizer.tokenize(" \tHeLLo!how  \n Are yoU?  ") == ["hello", "!", "how", "are", "you", "?"]
    assert tokenizer.tokenize("H\u00e9llo") == ["hello"]


def test_basic_tokenizer_no_lower() -> None:
    tokenizer = BasicTokenizer(do_lower_case=False)
    assert tokenizer.tokenize(" \tHeLLo!how  \n Are yoU?  ") == ["HeLLo", "!", "how", "Are", "yoU", "?"]
    assert tokenizer.tokenize("H\u00e9llo") == ["H\u00e9llo"]


def test_basic_tokenizer_chinese() -> None:
    tokenizer = BasicTokenizer()
    assert tokenizer.tokenize("ah\u535a\u63a8zz") == ["ah", "\u535a", "\u63a8", "zz"]
    assert BasicTokenizer(tokenize_chinese_chars=False).tokenize("ah\u535a\u63a8zz") == ["ah\u535a\u63a8zz"]


def test_basic_tokenizer_cleans_text() -> None:
    tokenizer = BasicTokenizer()
    assert tokenizer.tokenize("a\x00b\ufffdc\x07d\u200be\u00a0f\u3000g") == ["abcde", "f", "g"]
    assert tokenizer.tokenize("") == []


def test_basic_tokenizer_never_split_whole_words_only() -> None:
    tokenizer = BasicTokenizer()  # the reference default spares BERT's special tokens
    assert tokenizer.tokenize("a [MASK] b [MASK].") == ["a", "[MASK]", "b", "[", "mask", "]", "."]
    assert BasicTokenizer(never_split=["Don't"]).tokenize("Don't don't") == ["Don't", "don", "'", "t"]
    assert BasicTokenizer(never_split=[]).tokenize("[MASK]") == ["[", "mask", "]"]


def test_wordpiece_tokenizer(tiny_vocab_file: Path) -> None:
    tokenizer = WordpieceTokenizer(load_vocab(tiny_vocab_file))
    assert tokenizer.tokenize("") == []
    assert tokenizer.tokenize("unwanted running") == ["un", "##want", "##ed", "runn", "##ing"]
    assert tokenizer.tokenize("unwantedX running") == ["[UNK]", "runn", "##ing"]


def test_wordpiece_tokenizer_long_word_is_unknown() -> None:
    tokenizer = WordpieceTokenizer({"[UNK]": 0, "a": 1, "##a": 2}, max_input_chars_per_word=5)
    assert tokenizer.tokenize("aaaaa") == ["a", "##a", "##a", "##a", "##a"]
    assert tokenizer.tokenize("aaaaaa") == ["[UNK]"]


def test_is_whitespace() -> None:
    for char in " \t\r\n\u00a0\u3000":
        assert is_whitespace(char), repr(char)
    for char in "A-\x00\u200b":
        assert not is_whitespace(char), repr(char)


def test_is_control() -> None:
    for char in "\u0005\x00\x7f\u200b\ufeff\u0378":
        assert is_control(char), repr(char)
    for char in "A \t\r\n\U0001f4a9":
        assert not is_control(char), repr(char)


def test_is_punctuation() -> None:
    for char in "-$`.^+~\u00bf\u3001":
        assert is_punctuation(char), repr(char)
    for char in "A 0\u00e9\U0001f600":
        assert not is_punctuation(char), repr(char)


def test_full_tokenizer_and_id_round_trip(tiny_vocab_file: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file)
    tokens = tokenizer.tokenize("UNwant\u00e9d,running")
    assert tokens == ["un", "##want", "##ed", ",", "runn", "##ing"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert ids == [7, 4, 5, 10, 8, 9]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    assert len(tokenizer) == len(TINY_VOCAB)
    assert tokenizer.ids_to_tokens[3] == "want" and tokenizer.vocab["want"] == 3


def test_full_tokenizer_unknown_token_and_id_errors(tiny_vocab_file: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file)
    with pytest.raises(KeyError, match="hello"):
        tokenizer.convert_tokens_to_ids(["want", "hello"])
    with pytest.raises(KeyError, match="99"):
        tokenizer.convert_ids_to_tokens([3, 99])
    with pytest.raises(TypeError, match="bytes"):
        tokenizer.tokenize(b"want")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenizer.batch_encode(["want", None])


def test_full_tokenizer_max_len(tiny_vocab_file: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file, max_len=3)
    assert tokenizer.convert_tokens_to_ids(["un", "##want", "##ed"]) == [7, 4, 5]
    with pytest.raises(ValueError, match="4 is longer than max_len=3"):
        tokenizer.convert_tokens_to_ids(["un", "##want", "##ed", ","])
    with pytest.raises(ValueError, match="max_len=3"):
        tokenizer.batch_encode(["unwanted,"])


def test_full_tokenizer_vocab_without_unk_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nounk.txt"
    path.write_text("want\nun\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"nounk.txt has no \[UNK\]"):
        BertTokenizer(path)


def test_full_tokenizer_never_split_cut_out_anywhere(tiny_vocab_file: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file)  # [UNK], [CLS], [SEP] are in the tiny vocab
    assert tokenizer.tokenize("[CLS]want[SEP]. [cls]") == ["[CLS]", "want", "[SEP]", "[UNK]", "[UNK]", "[UNK]",
                                                             "[UNK]"]
    # A never_split token outside the vocabulary goes through WordPiece uncased: "[MASK]" is not in the tiny vocab.
    assert tokenizer.tokenize("[MASK]") == ["[UNK]"]
    custom = BertTokenizer(tiny_vocab_file, never_split=["Want", "wa,"])
    assert custom.tokenize("Want want wa,") == ["[UNK]", "want", "[UNK]"]
    assert custom.tokenize("[CLS]") == ["[UNK]", "[UNK]", "[UNK]"]  # the custom list replaces the default


def test_full_tokenizer_no_lower_case(tiny_vocab_file: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file, do_lower_case=False)
    assert tokenizer.tokenize("unwant\u00e9d UNwanted running") == ["[UNK]", "[UNK]", "runn", "##ing"]


def test_save_vocabulary_and_from_pretrained(tiny_vocab_file: Path, tmp_path: Path) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file)
    out = tmp_path / "saved"
    written = tokenizer.save_vocabulary(out)
    assert Path(written) == out / "vocab.txt"
    assert (out / "vocab.txt").read_text(encoding="utf-8") == tiny_vocab_file.read_text(encoding="utf-8")
    assert [p.name for p in out.iterdir()] == ["vocab.txt"]  # no temporary file left behind
    from_folder = BertTokenizer.from_pretrained(out, do_lower_case=False)
    assert from_folder.vocab == tokenizer.vocab and not from_folder.do_lower_case
    assert BertTokenizer.from_pretrained(tiny_vocab_file).vocab == tokenizer.vocab
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        BertTokenizer.from_pretrained(tmp_path / "empty_dir")


def test_save_vocabulary_keeps_ids_of_a_vocab_with_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "dup.txt"
    path.write_text("[UNK]\nwant\nun\nwant\n##ed\n", encoding="utf-8")
    tokenizer = BertTokenizer(path)
    reloaded = load_vocab(tokenizer.save_vocabulary(tmp_path / "saved"))
    assert dict(reloaded) == dict(tokenizer.vocab) == {"[UNK]": 0, "un": 2, "want": 3, "##ed": 4}


# ---- the batch path gives exactly the Python path's output ------------------------------------------------------

def assert_batch_matches_python(tokenizer: BertTokenizer, texts: list[str]) -> None:
    expected = [tokenizer.tokenize(text) for text in texts]
    assert tokenizer.batch_tokenize(texts) == expected
    assert tokenizer.batch_encode(texts) == [tokenizer.convert_tokens_to_ids(tokens) for tokens in expected]


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_batch_matches_python_on_edge_cases_tiny_vocab(tiny_vocab_file: Path, do_lower_case: bool) -> None:
    tokenizer = BertTokenizer(tiny_vocab_file, do_lower_case=do_lower_case)
    assert_batch_matches_python(tokenizer, EDGE_TEXTS)
    assert tokenizer.batch_tokenize([]) == []


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_batch_matches_python_on_edge_cases_bundled_vocab(do_lower_case: bool) -> None:
    tokenizer = BertTokenizer(BUNDLED_VOCAB, do_lower_case=do_lower_case)
    assert_batch_matches_python(tokenizer, EDGE_TEXTS)
    # Each text alone too: which texts take the Python path must not depend on the rest of the batch.
    for text in EDGE_TEXTS:
        assert tokenizer.batch_tokenize([text]) == [tokenizer.tokenize(text)], repr(text)


def test_batch_matches_python_with_custom_never_split() -> None:
    tokenizer = BertTokenizer(BUNDLED_VOCAB, never_split=["[MASK]", "New York", "foo!bar", "[unused7]"])
    texts = EDGE_TEXTS + ["in New York foo!bar[unused7] New  York [CLS]", "New York", "FOO!BAR foo!bar."]
    assert_batch_matches_python(tokenizer, texts)
    # Out-of-vocabulary never_split tokens are kept whole and cased, then split by WordPiece (reference behaviour).
    assert tokenizer.tokenize("New York foo!bar") == ["[UNK]", "[UNK]", "foo", "##!", "##bar"]


def test_batch_matches_python_on_every_character() -> None:
    """Every BMP code point (and every 61st above it) between letters, alone and word-final: the Rust library's
    Unicode tables are older than Python's, so this is where the two paths would diverge."""
    tokenizer = BertTokenizer(BUNDLED_VOCAB)
    code_points = [cp for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF] + list(range(0x10000, 0x110000, 61))
    texts = []
    for start in range(0, len(code_points), 64):
        chunk = [chr(cp) for cp in code_points[start:start + 64]]
        texts.append(" ".join(f"a{c}b {c} x{c}" for c in chunk))
    assert_batch_matches_python(tokenizer, texts)


def test_batch_routes_only_disagreeing_characters_to_python(bundled_tokenizer: BertTokenizer) -> None:
    # A final capital sigma lower-cases to "ς" in Python and to "σ" in Rust; "é" is handled alike.
    assert bundled_tokenizer._unsafe_chars({"\u03a3", "\u00e9", "\u4f60"}) == {"\u03a3"}
    assert bundled_tokenizer.batch_tokenize(["\u039f\u0394\u039f\u03a3"]) == [["ο", "##δ", "##ος"]]


# ---- the bundled vocabulary (present in every clone) ------------------------------------------------------------

def test_bundled_vocab_special_ids(bundled_tokenizer: BertTokenizer) -> None:
    assert len(bundled_tokenizer) == 30522
    assert bundled_tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 100, 101,
                                                                                                      102, 103]


def test_bundled_vocab_known_sentence(bundled_tokenizer: BertTokenizer) -> None:
    text = "The quick brown fox jumped over the lazy dog's [MASK], unaffable!"
    expected = ["the", "quick", "brown", "fox", "jumped", "over", "the", "lazy", "dog", "'", "s", "[MASK]", ",",
                "una", "##ffa", "##ble", "!"]
    assert bundled_tokenizer.tokenize(text) == expected
    assert bundled_tokenizer.batch_tokenize([text]) == [expected]


# ---- parity with HF transformers ---------------------------------------------------------------------------------

def transformers_tokenizers(vocab_file: Path) -> tuple:
    """HF's pure-Python tokenizer and its `tokenizers`-backed one for ``vocab_file``, in any transformers >= 4.40.

    transformers 5 renamed the Python class BertTokenizerLegacy, made BertTokenizer an alias of BertTokenizerFast,
    and its ``vocab_file=`` argument is silently ignored (a 5-token vocabulary); ``vocab=`` takes the path.
    """
    transformers = pytest.importorskip("transformers")
    python_cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    python_tokenizer = python_cls(vocab_file=str(vocab_file))
    fast_cls = transformers.BertTokenizerFast
    if "vocab" in inspect.signature(fast_cls.__init__).parameters:
        fast_tokenizer = fast_cls(vocab=str(vocab_file))
    else:
        fast_tokenizer = fast_cls(vocab_file=str(vocab_file))
    assert len(python_tokenizer) == len(fast_tokenizer) == 30522
    return python_tokenizer, fast_tokenizer


def assert_parity_with_transformers(vocab_file: Path, texts: list[str]) -> None:
    ours = BertTokenizer(vocab_file)
    hf_python, hf_fast = transformers_tokenizers(vocab_file)
    expected = [hf_python.convert_tokens_to_ids(hf_python.tokenize(text)) for text in texts]
    assert hf_fast(texts, add_special_tokens=False)["input_ids"] == expected
    assert [ours.convert_tokens_to_ids(ours.tokenize(text)) for text in texts] == expected
    assert ours.batch_encode(texts) == expected


def test_bundled_vocab_parity_with_transformers() -> None:
    texts = ["The quick brown fox jumped over the lazy dog's [MASK], unaffable!", "Caf\u00e9 na\u00efve \u4f60\u597d",
             "Don't [CLS] stop [SEP] believin'", "$5.00 + 3^2 = `x` ~user @home #tag", ""]
    assert_parity_with_transformers(BUNDLED_VOCAB, texts)


def real_texts() -> list[str]:
    """Every sentence of SST-2 dev and MRPC dev, and the contexts and questions of the SQuAD v2.0 sample."""
    texts = []
    with open(shared_path("sst2", "dev.tsv"), encoding="utf-8", newline="") as handle:
        texts += [row["sentence"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert len(texts) == 872
    with open(shared_path("mrpc", "dev.tsv"), encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts += [row["#1 String"], row["#2 String"]]
    assert len(texts) == 872 + 2 * 408
    with open(shared_path("squad2", "haystack_small", "small.json"), encoding="utf-8") as handle:
        squad = json.load(handle)
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            texts += [qa["question"] for qa in paragraph["qas"]]
    assert len(texts) == 872 + 2 * 408 + 87 + 626
    return texts


def test_real_data_parity_with_transformers() -> None:
    vocab_file = shared_path("bert-base-uncased", "vocab.txt")
    assert_parity_with_transformers(vocab_file, real_texts())


def test_tokenizer_pickles_for_worker_processes(bundled_tokenizer: BertTokenizer) -> None:
    texts = ["Pickled for DataLoader and Dask workers: caf\u00e9 \u03a3.", "[MASK]"]
    expected = bundled_tokenizer.batch_encode(texts)  # builds the Rust tokenizer before pickling
    clone = pickle.loads(pickle.dumps(bundled_tokenizer))
    assert clone.batch_encode(texts) == expected
    assert clone.tokenize(texts[0]) == bundled_tokenizer.tokenize(texts[0])
