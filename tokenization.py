"""WordPiece tokenization for BERT: the reference's Python tokenizer and an identical batch path on `tokenizers`."""
from __future__ import annotations

import collections
import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from file_utils import PathLike, atomic_write

logger = logging.getLogger(__name__)

VOCAB_NAME = "vocab.txt"
UNK_TOKEN = "[UNK]"
# The reference's default ``never_split``: BERT's special tokens are never lower-cased or split.
SPECIAL_TOKENS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")


def load_vocab(vocab_file: PathLike) -> collections.OrderedDict[str, int]:
    """Read a WordPiece vocabulary: one token per line, the token's id is its 0-based line number.

    As in the reference, each line is stripped of surrounding whitespace, and when a token occurs twice the later
    line wins (the earlier id then maps to no token); a warning names such duplicates.

    Raises:
        FileNotFoundError: there is no file at ``vocab_file``.
        ValueError: the file is not UTF-8 text, or holds no lines.
    """
    path = Path(vocab_file)
    if not path.is_file():
        hint = " (it is a directory: pass the vocab.txt inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"vocabulary file not found: {path}{hint}")
    vocab: collections.OrderedDict[str, int] = collections.OrderedDict()
    duplicates = []
    try:
        # Text mode splits lines on \n, \r\n and \r only (str.splitlines would also split on U+2028 etc.).
        with open(path, encoding="utf-8") as reader:
            for index, line in enumerate(reader):
                token = line.strip()
                if token in vocab:
                    duplicates.append(token)
                vocab[token] = index
    except UnicodeDecodeError as exc:
        raise ValueError(f"vocabulary file {path} is not UTF-8 text: {exc}") from exc
    if not vocab:
        raise ValueError(f"vocabulary file {path} is empty: expected one WordPiece token per line")
    if duplicates:
        logger.warning("vocabulary file %s repeats %d token(s), e.g. %r; the last occurrence of each gives its id",
                       path, len(duplicates), duplicates[:5])
    return vocab


def whitespace_tokenize(text: str) -> list[str]:
    """Split ``text`` on runs of whitespace (``str.split``); an empty or blank string gives ``[]``.

    Kept under the reference's name for parity with its API; new code can call ``text.split()``.
    """
    return text.split()


def is_whitespace(char: str) -> bool:
    """True for space, tab, newline, carriage return and Unicode space separators (category Zs)."""
    # \t, \n and \r are control characters to Unicode, but BERT treats them as whitespace.
    if char in " \t\n\r":
        return True
    return unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    """True for characters of any Unicode "other" category (Cc, Cf, Cn, Co, Cs) except tab, newline, return."""
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """True for Unicode punctuation (category P*) and for every ASCII character that is not a letter or digit.

    BERT counts ASCII symbols such as ``$``, ``^``, ``+`` and `````` as punctuation although Unicode puts them in
    the symbol categories, so that they are always split off.
    """
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def is_chinese_char(cp: int) -> bool:
    """True if code point ``cp`` is a CJK Unified Ideograph (the blocks BERT splits into one token per character).

    Hangul, Hiragana and Katakana are not included: those scripts separate words with spaces.
    """
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def strip_accents(text: str) -> str:
    """Decompose ``text`` (NFD) and drop the non-spacing marks (category Mn): "café" -> "cafe"."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def split_on_punctuation(text: str) -> list[str]:
    """Split ``text`` so that every punctuation character is a token of its own: "don't!" -> ["don", "'", "t", "!"]."""
    pieces: list[str] = []
    word_start = 0
    for i, char in enumerate(text):
        if is_punctuation(char):
            if word_start < i:
                pieces.append(text[word_start:i])
            pieces.append(char)
            word_start = i + 1
    if word_start < len(text):
        pieces.append(text[word_start:])
    return pieces


class BasicTokenizer:
    """Clean text, split CJK characters, lower-case and strip accents, then split on whitespace and punctuation.

    Args:
        do_lower_case: lower-case the text and strip its accents (uncased models).
        never_split: words left whole, neither lower-cased nor split, when they occur as a whitespace-delimited
            word; ``None`` means BERT's special tokens (the reference's default).
        tokenize_chinese_chars: put every CJK ideograph in a token of its own.
    """

    def __init__(self, do_lower_case: bool = True, never_split: Iterable[str] | None = None,
                 tokenize_chinese_chars: bool = True) -> None:
        self.do_lower_case = do_lower_case
        self.never_split = frozenset(SPECIAL_TOKENS if never_split is None else never_split)
        self.tokenize_chinese_chars = tokenize_chinese_chars

    def tokenize(self, text: str) -> list[str]:
        """Return the words and punctuation marks of ``text``, in order."""
        text = self._clean_text(text)
        if self.tokenize_chinese_chars:
            text = self._space_chinese_chars(text)
        tokens: list[str] = []
        for word in whitespace_tokenize(text):
            if self.do_lower_case and word not in self.never_split:
                word = strip_accents(word.lower())
            if word in self.never_split:
                tokens.append(word)
            else:
                tokens.extend(split_on_punctuation(word))
        return tokens

    @staticmethod
    def _clean_text(text: str) -> str:
        """Drop NUL, U+FFFD and control characters; turn every whitespace character into a plain space."""
        if text.isascii() and text.isprintable():
            return text
        out = []
        for char in text:
            if char in "\x00\ufffd" or is_control(char):
                continue
            out.append(" " if is_whitespace(char) else char)
        return "".join(out)

    @staticmethod
    def _space_chinese_chars(text: str) -> str:
        """Surround every CJK ideograph with spaces so that each becomes a word."""
        if text.isascii():
            return text
        return "".join(f" {c} " if is_chinese_char(ord(c)) else c for c in text)


class WordpieceTokenizer:
    """Split words into WordPiece sub-words by greedy longest-match-first against the vocabulary.

    "unaffable" -> ["un", "##aff", "##able"]: a piece that does not start its word carries the ``##`` prefix. A word
    that cannot be covered by vocabulary pieces, or that is longer than ``max_input_chars_per_word`` characters,
    becomes a single ``unk_token``.
    """

    def __init__(self, vocab: Container[str], unk_token: str = UNK_TOKEN,
                 max_input_chars_per_word: int = 100) -> None:
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text: str) -> list[str]:
        """Return the word pieces of each whitespace-separated word of ``text`` (already basic-tokenized)."""
        pieces: list[str] = []
        for word in whitespace_tokenize(text):
            pieces.extend(self._split_word(word))
        return pieces

    def _split_word(self, word: str) -> list[str]:
        """Word pieces of one word without whitespace, or ``[unk_token]``."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces


class BertTokenizer:
    """End-to-end BERT tokenizer: basic tokenization then WordPiece, with the reference's API.

    ``never_split`` tokens (default: BERT's special tokens) are cut out of the text wherever they occur,
    case-sensitively, before anything else, and kept whole: "the [MASK]." -> ["the", "[MASK]", "."]. This is what
    HF ``transformers`` and ``tokenizers`` do; the reference only spared them as whitespace-delimited words (it gives
    "[", "mask", "]", "." there). A ``never_split`` token outside the vocabulary goes through WordPiece as written
    (not lower-cased).

    ``tokenize`` is the pure-Python path; ``batch_tokenize``/``batch_encode`` run many texts through the Rust
    ``tokenizers`` library on all cores and give identical output (see ``_batch``).

    Args:
        vocab_file: vocabulary file, one token per line.
        do_lower_case: lower-case and strip accents (True for uncased models).
        never_split: tokens never lower-cased or split; ``None`` means BERT's special tokens.
        max_len: ``convert_tokens_to_ids`` and ``batch_encode`` raise ``ValueError`` for longer sequences (default: no
            limit). Kept for parity with the reference's API; the project's scripts do not set it.
        tokenize_chinese_chars: put every CJK ideograph in a token of its own.
    """

    def __init__(self, vocab_file: PathLike, do_lower_case: bool = True, never_split: Iterable[str] | None = None,
                 max_len: int | None = None, tokenize_chinese_chars: bool = True) -> None:
        self.vocab_file = str(vocab_file)
        self.vocab = load_vocab(vocab_file)
        if UNK_TOKEN not in self.vocab:
            raise ValueError(f"vocabulary file {vocab_file} has no {UNK_TOKEN} token, which WordPiece needs")
        self.ids_to_tokens = collections.OrderedDict((index, token) for token, index in self.vocab.items())
        self.do_lower_case = do_lower_case
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.max_len = int(1e12) if max_len is None else max_len
        self.never_split = tuple(t for t in (SPECIAL_TOKENS if never_split is None else never_split) if t)
        # never_split tokens are cut out before basic tokenization, so the inner BasicTokenizer spares nothing: a
        # word that only becomes "[MASK]" after cleaning (e.g. "[MA\x00SK]") is split like any other.
        self.basic_tokenizer = BasicTokenizer(do_lower_case, never_split=(),
                                              tokenize_chinese_chars=tokenize_chinese_chars)
        self.wordpiece_tokenizer = WordpieceTokenizer(self.vocab, unk_token=UNK_TOKEN)
        # Longest first, so that of two never_split tokens starting at the same place the longer one is cut out.
        self._never_split_re = (
            re.compile("|".join(re.escape(t) for t in sorted(set(self.never_split), key=len, reverse=True)))
            if self.never_split else None
        )
        # never_split tokens outside the vocabulary have no Rust counterpart: texts holding one take the Python path.
        self._oov_never_split = tuple(t for t in self.never_split if t not in self.vocab)
        self._fast: Tokenizer | None = None
        self._char_is_safe: dict[str, bool] = {}

    @classmethod
    def from_pretrained(cls, path: PathLike, **kwargs) -> BertTokenizer:
        """Load from a vocabulary file or from a folder that holds ``vocab.txt``; ``kwargs`` go to the constructor.

        Nothing is downloaded: model names such as "bert-base-uncased" are not resolved. Kept for parity with the
        reference's API; the project's scripts construct ``BertTokenizer(vocab_file)`` directly.
        """
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_NAME
        return cls(path, **kwargs)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Return the WordPiece tokens of ``text`` (no [CLS]/[SEP] added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        tokens: list[str] = []
        for segment, is_never_split in self._split_never_split(text):
            if is_never_split:
                tokens.extend([segment] if segment in self.vocab else self.wordpiece_tokenizer.tokenize(segment))
                continue
            for word in self.basic_tokenizer.tokenize(segment):
                tokens.extend(self.wordpiece_tokenizer._split_word(word))
        return tokens

    def _split_never_split(self, text: str) -> Iterator[tuple[str, bool]]:
        """Yield ``(segment, is_never_split_token)`` pieces that concatenate back to ``text``."""
        if self._never_split_re is None:
            yield text, False
            return
        start = 0
        for match in self._never_split_re.finditer(text):
            if match.start() > start:
                yield text[start:match.start()], False
            yield match.group(), True
            start = match.end()
        if start < len(text):
            yield text[start:], False

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        """Map tokens to ids.

        Reference API, kept for parity (with ``tokenize`` it is the per-text path); the project's code encodes with
        ``batch_encode``, which gives the same ids.

        Raises:
            KeyError: a token is not in the vocabulary.
            ValueError: more than ``max_len`` tokens (the model could not index their positions).
        """
        try:
            ids = [self.vocab[token] for token in tokens]
        except KeyError as exc:
            raise KeyError(f"token {exc.args[0]!r} is not in the vocabulary {self.vocab_file}") from None
        self._check_length(len(ids))
        return ids

    def _check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"token sequence length {length} is longer than max_len={self.max_len} of this BERT tokenizer; "
                "running it through BERT would index past its position embeddings"
            )

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Map ids to tokens; an id with no token raises ``KeyError`` naming it."""
        try:
            return [self.ids_to_tokens[index] for index in ids]
        except KeyError as exc:
            raise KeyError(f"id {exc.args[0]!r} is not in the vocabulary {self.vocab_file} "
                           f"({len(self.vocab)} tokens)") from None

    def save_vocabulary(self, directory: PathLike) -> str:
        """Write ``directory/vocab.txt`` (atomically) so that ``load_vocab`` reads back this exact vocabulary.

        Kept for parity with the reference's API (nothing in the project calls it). Returns the path written.
        """
        path = Path(directory) / VOCAB_NAME
        by_id = sorted(self.ids_to_tokens.items())
        lines = []
        # An id left without a token by a duplicate line is filled with the token of the next id: on reading, the
        # later line wins, so the filler maps back to its own id and the gap stays a gap.
        position = 0
        for index, token in by_id:
            lines.extend([token] * (index - position + 1))
            position = index + 1
        with atomic_write(path, "w") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
        return str(path)

    # ---- batch path on the Rust `tokenizers` library -------------------------------------------------------------

    def batch_tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """Tokenize many texts at once on all cores; ``batch_tokenize(t)[i] == tokenize(t[i])`` for every input."""
        return self._batch(texts, ids=False)

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (no [CLS]/[SEP]); equal to ``convert_tokens_to_ids(tokenize(text))``."""
        return self._batch(texts, ids=True)

    def _batch(self, texts: Sequence[str], ids: bool) -> list:
        """Run ``texts`` through the Rust tokenizer, except the rare ones it would tokenize differently.

        The Rust normalizer and pre-tokenizer implement the same rules as ``BasicTokenizer`` but not always the same
        way: Python's ``str.lower`` turns a word-final sigma into "ς" (Rust gives "σ"), Python's Unicode tables may be
        of another version, and never_split tokens outside the vocabulary have no Rust counterpart. Each distinct
        non-ASCII character is therefore checked once against both implementations (``_unsafe_chars``), and texts
        holding a character on which they disagree, or an out-of-vocabulary never_split token, take the Python path.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        fast = self._fast_tokenizer()
        chars: set[str] = set()
        for text in texts:
            if not text.isascii():
                chars.update(text)
        unsafe = self._unsafe_chars(chars) if chars else set()
        slow = [
            i for i, text in enumerate(texts)
            if (unsafe and not text.isascii() and not unsafe.isdisjoint(text))
            or any(t in text for t in self._oov_never_split)
        ]
        results: list = [None] * len(texts)
        for i in slow:
            tokens = self.tokenize(texts[i])
            results[i] = [self.vocab[t] for t in tokens] if ids else tokens
        slow_set = set(slow)
        fast_index = [i for i in range(len(texts)) if i not in slow_set]
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets but also leaves .tokens empty: ids only.
        encode = getattr(fast, "encode_batch_fast", fast.encode_batch) if ids else fast.encode_batch
        encodings = encode([texts[i] for i in fast_index], add_special_tokens=False)
        for i, encoding in zip(fast_index, encodings):
            results[i] = encoding.ids if ids else encoding.tokens
        if ids:
            for result in results:
                self._check_length(len(result))
        return results

    def _fast_tokenizer(self) -> Tokenizer:
        """Build (once) the Rust tokenizer with this tokenizer's vocabulary and settings, and no special-token
        post-processing."""
        if self._fast is None:
            fast = Tokenizer(models.WordPiece(dict(self.vocab), unk_token=UNK_TOKEN,
                                              max_input_chars_per_word=self.wordpiece_tokenizer.max_input_chars_per_word))
            fast.normalizer = normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=self.tokenize_chinese_chars,
                strip_accents=self.do_lower_case, lowercase=self.do_lower_case)
            fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            # In-vocabulary never_split tokens are cut from the raw text, like _split_never_split; ids are unchanged.
            fast.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                                special=True)
                                     for t in self.never_split if t in self.vocab])
            self._fast = fast
        return self._fast

    def _unsafe_chars(self, chars: set[str]) -> set[str]:
        """The characters of ``chars`` that the Rust and Python paths treat differently (results are cached).

        A character is checked alone and next to a letter on each side (the contexts that change lower-casing,
        such as a final sigma), comparing ``BasicTokenizer`` with the Rust normalizer and pre-tokenizer.
        """
        fast = self._fast_tokenizer()
        for char in chars - self._char_is_safe.keys():
            safe = True
            for probe in (char, "a" + char, char + "a", "a" + char + "a"):
                try:
                    rust = [w for w, _ in fast.pre_tokenizer.pre_tokenize_str(fast.normalizer.normalize_str(probe))]
                except Exception:  # e.g. a lone surrogate, which Rust strings cannot hold
                    safe = False
                    break
                if rust != self.basic_tokenizer.tokenize(probe):
                    safe = False
                    break
            self._char_is_safe[char] = safe
        return {c for c in chars if not self._char_is_safe[c]}


@functools.lru_cache(maxsize=4)
def load_wordpiece(vocab_file: str,
                   do_lower_case: bool = True) -> tuple[Callable[[list[str]], list[list[int]]], list[str]]:
    """``(batch_encode, vocabulary)`` for a WordPiece vocab file, loaded once per process (per Dask worker).

    ``batch_encode`` is :meth:`BertTokenizer.batch_encode` (strings to id lists without [CLS]/[SEP], on the Rust
    ``tokenizers`` library); ``vocabulary[i]`` is the token of id i. The pre-training data writers use it.

    Raises:
        ValueError: the vocabulary lacks [CLS], [SEP] or [MASK].
    """
    tokenizer = BertTokenizer(vocab_file, do_lower_case=do_lower_case)
    vocabulary = [tokenizer.ids_to_tokens[i] for i in range(len(tokenizer.ids_to_tokens))]
    missing = [t for t in ("[CLS]", "[SEP]", "[MASK]") if t not in tokenizer.vocab]
    if missing:
        raise ValueError(f"vocab file {vocab_file} lacks the special tokens {missing}")
    return tokenizer.batch_encode, vocabulary
