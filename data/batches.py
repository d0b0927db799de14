"""Batch assembly and masking: rows read from shards -> the model's padded int64 tensors.

Parquet pairs are laid out as ``[CLS] A [SEP] B [SEP]`` and masked here (dynamically, unless the shard holds static
masks); HDF5 rows arrive laid out and masked and only lose the padding columns past the batch's longest sequence.
"""
from __future__ import annotations

import numpy as np
import torch

from data.ragged import lengths_of, pair_layout
from data.shards import FixedRows, PairRows, Vocab

IGNORE_INDEX = -1  # label of the positions that are not predicted (the reference's value)


def aligned_length(longest: int, alignment: int, limit: int | None) -> int:
    """Round up to the alignment (Tensor Cores like multiples of 8), not past ``limit`` when one is set."""
    length = -(-longest // alignment) * alignment
    return min(length, limit) if limit is not None and limit >= longest else length


def mask_dynamic(input_ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, probability: float,
                 vocab: Vocab, max_predictions: int | None) -> np.ndarray:
    """BERT masking in place: each candidate is chosen with ``probability``; of those 80% become [MASK], 10% a
    random id, 10% stay. Returns labels (the original id where chosen, -1 elsewhere). With ``max_predictions``,
    rows with more choices keep a uniformly random subset of that size."""
    draw = rng.random(input_ids.shape)
    chosen = candidates & (draw < probability)
    if max_predictions is not None and (chosen.sum(axis=1) > max_predictions).any():
        # Chosen positions have draw < probability, i.i.d. uniform: keeping the smallest draws is a random subset.
        order = np.argsort(np.where(chosen, draw, 2.0), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(input_ids.shape[1]), order.shape), axis=1)
        chosen &= rank < max_predictions
    labels = np.where(chosen, input_ids, IGNORE_INDEX)
    action = rng.random(input_ids.shape)
    input_ids[chosen & (action < 0.8)] = vocab.mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    input_ids[randomised] = rng.integers(0, vocab.size, size=int(randomised.sum()))
    return labels


def assemble_pairs(rows: PairRows, vocab: Vocab, rng: np.random.Generator | None, probability: float,
                   max_predictions: int | None, alignment: int, limit: int | None) -> dict[str, torch.Tensor]:
    """Parquet pairs as ``[CLS] A [SEP] B [SEP]`` rows padded to the batch's longest (aligned) sequence; masked
    dynamically (``mask_dynamic``) unless ``rows`` holds static masks."""
    a_len, b_len = lengths_of(rows.a_offsets), lengths_of(rows.b_offsets)
    batch = len(a_len)
    total = a_len + b_len + 3
    width = aligned_length(int(total.max()), alignment, limit)
    row = np.arange(batch)
    input_ids, attention_mask, token_type_ids = pair_layout(rows.a_ids, rows.a_offsets, rows.b_ids, rows.b_offsets,
                                                            width, vocab.cls_id, vocab.sep_id, vocab.pad_id)
    if rows.positions is not None:
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        labels[np.repeat(row, lengths_of(rows.positions_offsets)), rows.positions] = rows.label_ids
    else:
        candidates = attention_mask.copy()
        candidates[:, 0] = False
        candidates[row, a_len + 1] = False
        candidates[row, total - 1] = False
        labels = mask_dynamic(input_ids, candidates, rng, probability, vocab, max_predictions)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "next_sentence_labels": torch.from_numpy(rows.next_sentence.astype(np.int64)),
    }


def assemble_fixed(rows: FixedRows, alignment: int, limit: int | None) -> dict[str, torch.Tensor]:
    """Reference HDF5 rows: labels rebuilt from the masked positions, as the reference loader does; the padding
    columns past the batch's longest (aligned) sequence are cut off."""
    batch, full_width = rows.input_ids.shape
    longest = int(rows.input_mask.astype(np.int64).sum(axis=1).max())
    width = min(full_width, aligned_length(longest, alignment, limit))
    positions = rows.masked_lm_positions.astype(np.int64)
    # Position 0 is [CLS] and never masked: the first 0 ends the list (the rest is padding).
    valid = np.cumprod(positions != 0, axis=1).astype(bool)
    labels = np.full((batch, full_width), IGNORE_INDEX, dtype=np.int64)
    labels[np.nonzero(valid)[0], positions[valid]] = rows.masked_lm_ids[valid]
    return {
        "input_ids": torch.from_numpy(rows.input_ids[:, :width].astype(np.int64)),
        "token_type_ids": torch.from_numpy(rows.segment_ids[:, :width].astype(np.int64)),
        "attention_mask": torch.from_numpy(rows.input_mask[:, :width].astype(np.int64)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels[:, :width])),
        "next_sentence_labels": torch.from_numpy(rows.next_sentence_labels.astype(np.int64)),
    }
