"""Google BERT's sentence-pair (NSP) and masked-LM instance builder on flat token-id arrays.

One implementation serves both output formats (``data.formats``): ``create_pretraining_data`` (HDF5, reference
era A) and ``preprocess_pretraining`` (LDDL Parquet, era B). It follows google-research/bert
``create_pretraining_data.py`` (reference section 6.1) decision for decision, but never copies tokens around: a
document set is one int32 array plus sentence and document offsets, and an instance is four numbers (where segment
A and B start and how long they are), because A and B are always contiguous runs of whole sentences and truncation
only trims their ends. Truncation, masking and the final layout are then vectorised over all instances with NumPy
(``data.ragged``), so the only per-item Python loop is the reference's walk over sentences.

Randomness: the sentence walk uses ``random.Random`` (cheap scalar draws), the vectorised steps a NumPy
``Generator``; both are seeded by the caller, so a run is reproducible for a given seed and input order. The
random streams differ from the reference's, the distributions do not: per-token front/back truncation coin
flips are drawn as one binomial per segment, and the 80/10/10 choice as one uniform per masked position.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from data.ragged import gather, lengths_of, offsets_of, ragged_arange

# The reference's preprocessors (LDDL, and BertTokenizer(max_len=512) in era A) cut sentences at 512 tokens.
MAX_SENTENCE_TOKENS = 512


@dataclass
class TokenizedDocuments:
    """Documents as sentences of WordPiece ids, stored flat.

    Attributes:
        tokens: int32 [T], the ids of every sentence back to back.
        sentence_offsets: int64 [S + 1]; sentence s is ``tokens[sentence_offsets[s]:sentence_offsets[s + 1]]``.
        document_offsets: int64 [D + 1]; document d is sentences ``document_offsets[d]`` up to ``[d + 1]``.
    """

    tokens: np.ndarray
    sentence_offsets: np.ndarray
    document_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.document_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1


def tokenize_documents(
    documents: Sequence[Sequence[str]],
    encode: Callable[[list[str]], list[list[int]]],
    max_sentence_tokens: int = MAX_SENTENCE_TOKENS,
    batch_size: int = 16384,
) -> TokenizedDocuments:
    """Tokenize documents (lists of sentence strings) into a ``TokenizedDocuments``.

    Sentences that tokenize to nothing are dropped, then documents left without sentences (as the reference
    does); sentences longer than ``max_sentence_tokens`` are cut. ``encode`` maps a batch of strings to lists of
    ids without special tokens (``tokenization.BertTokenizer.batch_encode``); it is called on ``batch_size``
    sentences at a time so the Python lists it returns stay small.
    """
    texts = [sentence for document in documents for sentence in document]
    lengths = np.empty(len(texts), dtype=np.int64)
    chunks: list[np.ndarray] = []
    for begin in range(0, len(texts), batch_size):
        encoded = encode(texts[begin : begin + batch_size])
        batch_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        if max_sentence_tokens:
            for i in np.flatnonzero(batch_lengths > max_sentence_tokens):  # rare: cut only those
                encoded[i] = encoded[i][:max_sentence_tokens]
            np.minimum(batch_lengths, max_sentence_tokens, out=batch_lengths)
        lengths[begin : begin + len(encoded)] = batch_lengths
        chunks.append(
            np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(batch_lengths.sum()))
        )
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)

    kept = lengths > 0
    doc_of_sentence = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    sentences_per_doc = np.bincount(doc_of_sentence[kept], minlength=len(documents))
    sentences_per_doc = sentences_per_doc[sentences_per_doc > 0]
    sentence_offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(lengths[kept], out=sentence_offsets[1:])
    document_offsets = np.zeros(len(sentences_per_doc) + 1, dtype=np.int64)
    np.cumsum(sentences_per_doc, out=document_offsets[1:])
    return TokenizedDocuments(tokens, sentence_offsets, document_offsets)


@dataclass
class Instances:
    """Sentence pairs as token ranges into ``TokenizedDocuments.tokens`` (all arrays have one entry per pair).

    Segment A of pair i is ``tokens[a_start[i]:a_start[i] + a_len[i]]``, B likewise; ``is_random_next`` is the NSP
    label (True: B was drawn from another document).
    """

    a_start: np.ndarray
    a_len: np.ndarray
    b_start: np.ndarray
    b_len: np.ndarray
    is_random_next: np.ndarray

    def __len__(self) -> int:
        return len(self.a_start)

    @property
    def num_tokens(self) -> np.ndarray:
        """Sequence length of each pair including [CLS] and both [SEP]s."""
        return self.a_len + self.b_len + 3

    def take(self, index: np.ndarray) -> Instances:
        """The pairs at ``index`` (an integer or boolean index array), in that order."""
        return Instances(
            self.a_start[index], self.a_len[index], self.b_start[index], self.b_len[index], self.is_random_next[index]
        )


def create_instances(
    documents: TokenizedDocuments,
    max_seq_length: int,
    short_seq_prob: float,
    dupe_factor: int,
    rng: random.Random,
    np_rng: np.random.Generator,
) -> Instances:
    """Build shuffled, truncated NSP pairs from every document, ``dupe_factor`` times over.

    Per document (google-research/bert ``create_instances_from_document``): with probability ``short_seq_prob``
    the target length is uniform in [2, max_seq_length - 3], else max_seq_length - 3. Sentences are gathered
    into a chunk until it reaches the target (or the document ends); A takes a random number of the chunk's
    leading sentences; B is the rest of the chunk, or, with probability 1/2 (always for a one-sentence chunk),
    a run of sentences from a random other document starting at a random sentence, in which case the unused
    sentences of the chunk are put back. Pairs are then truncated to max_seq_length - 3 tokens by trimming the
    longer segment from a random end, and shuffled.

    Deviation kept from the reference: when there is only one document, the "random" B comes from that same
    document and is still labelled random-next (as Google; LDDL relabels it), since B does not follow A.
    """
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length must be at least 5 ([CLS] A [SEP] B [SEP]), got {max_seq_length}")
    max_num_tokens = max_seq_length - 3
    so = documents.sentence_offsets.tolist()
    do = documents.document_offsets.tolist()
    n_docs = len(do) - 1
    a_start: list[int] = []
    a_end_tok: list[int] = []
    b_start: list[int] = []
    b_end_tok: list[int] = []
    is_random: list[bool] = []
    uniform, randint = rng.random, rng.randint

    for _ in range(dupe_factor):
        for d in range(n_docs):
            first, end = do[d], do[d + 1]
            target = max_num_tokens
            if uniform() < short_seq_prob:
                target = randint(2, max_num_tokens)
            chunk_start = i = first
            while i < end:
                if i == end - 1 or so[i + 1] - so[chunk_start] >= target:
                    n_chunk = i - chunk_start + 1
                    a_sentences = randint(1, n_chunk - 1) if n_chunk >= 2 else 1
                    a_s, a_e = so[chunk_start], so[chunk_start + a_sentences]
                    if n_chunk == 1 or uniform() < 0.5:
                        other = d
                        if n_docs > 1:
                            for _ in range(10):
                                other = randint(0, n_docs - 1)
                                if other != d:
                                    break
                        first_sentence = randint(do[other], do[other + 1] - 1)
                        # B grows sentence by sentence until it reaches target - len(A) tokens or its document ends.
                        stop = bisect.bisect_left(
                            so, so[first_sentence] + target - (a_e - a_s), first_sentence + 1, do[other + 1]
                        )
                        b_s, b_e, random_next = so[first_sentence], so[stop], True
                        i = chunk_start + a_sentences - 1  # put the unused sentences back
                    else:
                        b_s, b_e, random_next = a_e, so[i + 1], False
                    a_start.append(a_s)
                    a_end_tok.append(a_e)
                    b_start.append(b_s)
                    b_end_tok.append(b_e)
                    is_random.append(random_next)
                    chunk_start = i + 1
                i += 1

    a_s_arr = np.asarray(a_start, dtype=np.int64)
    b_s_arr = np.asarray(b_start, dtype=np.int64)
    instances = Instances(
        a_s_arr,
        np.asarray(a_end_tok, dtype=np.int64) - a_s_arr,
        b_s_arr,
        np.asarray(b_end_tok, dtype=np.int64) - b_s_arr,
        np.asarray(is_random, dtype=bool),
    )
    truncate_pairs(instances, max_num_tokens, np_rng)
    return instances.take(np_rng.permutation(len(instances)))


def truncated_lengths(a_len: np.ndarray, b_len: np.ndarray, max_num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Final segment lengths of the reference's ``truncate_seq_pair`` loop, in closed form.

    The loop removes one token at a time from the longer segment (B on ties) until the pair fits. So the longer
    side shrinks alone until it is level with the other side (B: one below A), and from then on the two shrink
    alternately, ending at ``ceil(max/2)`` for A and ``floor(max/2)`` for B.
    """
    excess = a_len + b_len - max_num_tokens
    over = excess > 0
    a_only = over & (a_len > b_len) & (a_len - b_len >= excess)
    b_only = over & (a_len <= b_len) & (b_len - a_len + 1 >= excess)
    both = over & ~a_only & ~b_only
    a_new = np.where(a_only, a_len - excess, a_len)
    b_new = np.where(b_only, b_len - excess, b_len)
    a_new = np.where(both, (max_num_tokens + 1) // 2, a_new)
    b_new = np.where(both, max_num_tokens // 2, b_new)
    return a_new, b_new


def truncate_pairs(instances: Instances, max_num_tokens: int, np_rng: np.random.Generator) -> None:
    """Trim pairs in place to ``max_num_tokens`` (A + B); each removed token comes off the front or back with p=1/2."""
    a_new, b_new = truncated_lengths(instances.a_len, instances.b_len, max_num_tokens)
    instances.a_start += np_rng.binomial(instances.a_len - a_new, 0.5)
    instances.b_start += np_rng.binomial(instances.b_len - b_new, 0.5)
    instances.a_len, instances.b_len = a_new, b_new


@dataclass
class PairTokens:
    """Token ids of segments A and B of every pair, ragged (row i of A is ``a_ids[a_offsets[i]:a_offsets[i+1]]``)."""

    a_ids: np.ndarray
    a_offsets: np.ndarray
    b_ids: np.ndarray
    b_offsets: np.ndarray

    @property
    def a_len(self) -> np.ndarray:
        return lengths_of(self.a_offsets)

    @property
    def b_len(self) -> np.ndarray:
        return lengths_of(self.b_offsets)


def pair_tokens(documents: TokenizedDocuments, instances: Instances) -> PairTokens:
    """Copy out the A and B token ids of ``instances`` (a fresh array, so masking can edit it)."""
    return PairTokens(
        gather(documents.tokens, instances.a_start, instances.a_len),
        offsets_of(instances.a_len),
        gather(documents.tokens, instances.b_start, instances.b_len),
        offsets_of(instances.b_len),
    )


@dataclass
class MaskedLM:
    """Static masking result, ragged per pair: sorted positions in ``[CLS] A [SEP] B [SEP]`` and original ids."""

    positions: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray


def mask_pairs(
    pairs: PairTokens,
    np_rng: np.random.Generator,
    masked_lm_prob: float,
    vocab_size: int,
    mask_id: int,
    max_predictions_per_seq: int | None = None,
) -> MaskedLM:
    """Apply BERT's static masking to ``pairs`` in place and return what was masked.

    Per pair (google-research/bert ``create_masked_lm_predictions``): ``n = min(max_predictions_per_seq,
    max(1, round(len * masked_lm_prob)))`` positions, where len counts [CLS] and both [SEP]s, are drawn without
    replacement among the non-special tokens; each becomes [MASK] with p=0.8, stays itself with p=0.1, or becomes a
    uniformly random vocabulary id with p=0.1. ``max_predictions_per_seq=None`` means no cap (LDDL).
    """
    a_len, b_len = pairs.a_len, pairs.b_len
    n_candidates = a_len + b_len
    n_predict = np.maximum(1, np.rint((n_candidates + 3) * masked_lm_prob).astype(np.int64))
    if max_predictions_per_seq is not None:
        n_predict = np.minimum(n_predict, max_predictions_per_seq)
    n_predict = np.minimum(n_predict, n_candidates)

    rows, r = ragged_arange(n_candidates)
    # A random order of each pair's candidates: sort by pair + a uniform fraction (pair index in the integer part,
    # so pairs stay grouped; with < 2**20 pairs per call 32+ bits of the fraction remain), keep each pair's first
    # n_predict. The keys arrive nearly sorted, which makes this ~10x faster than a two-key lexsort.
    order = np.argsort(rows + np_rng.random(len(rows)))
    rank = np.empty_like(order)
    rank[order] = r
    chosen = np.flatnonzero(rank < n_predict[rows])  # ascending, so sorted by pair then position
    rows, r = rows[chosen], r[chosen]

    in_a = r < a_len[rows]
    positions = np.where(in_a, r + 1, r + 2)  # skip [CLS], and the [SEP] after A
    a_index = pairs.a_offsets[rows[in_a]] + r[in_a]
    b_index = pairs.b_offsets[rows[~in_a]] + (r[~in_a] - a_len[rows[~in_a]])
    labels = np.empty(len(rows), dtype=pairs.a_ids.dtype)
    labels[in_a] = pairs.a_ids[a_index]
    labels[~in_a] = pairs.b_ids[b_index]

    draw = np_rng.random(len(rows))
    replacement = labels.copy()
    replacement[draw < 0.8] = mask_id
    random_word = draw >= 0.9
    replacement[random_word] = np_rng.integers(0, vocab_size, int(random_word.sum()))
    pairs.a_ids[a_index] = replacement[in_a]
    pairs.b_ids[b_index] = replacement[~in_a]
    return MaskedLM(positions, labels, offsets_of(np.bincount(rows, minlength=len(a_len))))
