"""Ragged arrays (rows of different lengths as one flat array plus offsets) and the ``[CLS] A [SEP] B [SEP]`` layout.

Row i of the ragged array ``(values, offsets)`` is ``values[offsets[i]:offsets[i + 1]]``, with int64 offsets [N + 1]
that start at 0. The instance builder, the HDF5 writer and the pre-training loader all hold tokens this way, so no
step loops over tokens in Python.
"""
from __future__ import annotations

import numpy as np


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Row offsets int64 [N + 1] of ragged rows with ``lengths`` [N]."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def lengths_of(offsets: np.ndarray) -> np.ndarray:
    """Row lengths [N] of ragged rows with ``offsets`` [N + 1]."""
    return np.diff(offsets)


def ragged_arange(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged rows of ``lengths``: the row of each element and its index within that row.

    ``[2, 3] -> ([0, 0, 1, 1, 1], [0, 1, 0, 1, 2])``.
    """
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(len(rows), dtype=np.int64) - offsets_of(lengths)[rows]


def gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``values[starts[i]:starts[i] + lengths[i]]`` over i, without a Python loop."""
    rows, within = ragged_arange(lengths)
    return values[starts[rows] + within]


def take_rows(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` (in that order) of the ragged array ``(values, offsets)``, as a new ragged array."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return gather(values, starts, lengths), offsets_of(lengths)


def pair_layout(a_ids: np.ndarray, a_offsets: np.ndarray, b_ids: np.ndarray, b_offsets: np.ndarray, width: int,
                cls_id: int, sep_id: int, pad_id: int = 0,
                dtype: np.dtype = np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay sentence pairs out as BERT input rows: ``[CLS] A [SEP] B [SEP]``, then ``pad_id`` up to ``width``.

    Args:
        a_ids, a_offsets: segment A of each pair, ragged (N rows).
        b_ids, b_offsets: segment B of each pair, ragged (N rows).
        width: row length S; at least the longest pair's length + 3.

    Returns:
        ``input_ids`` [N, S] of ``dtype``; ``attention_mask`` bool [N, S], True on the pair's tokens; and
        ``token_type_ids`` bool [N, S], True from the first B token through the final [SEP].
    """
    a_len, b_len = lengths_of(a_offsets), lengths_of(b_offsets)
    total = a_len + b_len + 3
    pair = np.arange(len(a_len))
    input_ids = np.full((len(a_len), width), pad_id, dtype=dtype)  # [N, S]
    input_ids[:, 0] = cls_id
    rows, within = ragged_arange(a_len)
    input_ids[rows, 1 + within] = a_ids
    input_ids[pair, a_len + 1] = sep_id
    rows, within = ragged_arange(b_len)
    input_ids[rows, a_len[rows] + 2 + within] = b_ids
    input_ids[pair, total - 1] = sep_id
    column = np.arange(width)[None, :]  # [1, S]
    attention_mask = column < total[:, None]
    token_type_ids = (column >= (a_len + 2)[:, None]) & attention_mask
    return input_ids, attention_mask, token_type_ids
