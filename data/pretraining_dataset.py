"""Pre-training data loader: LDDL Parquet or reference HDF5 shards -> masked BERT batches, sharded and resumable.

How an epoch is laid out (every rank and every DataLoader worker computes the same plan from the shard list, the
seed and the epoch, so nothing is communicated):

1. Shards are grouped by bin (unbinned data is one bin). Per bin, the shard list is shuffled with an RNG seeded by
   ``(seed, epoch)`` (identical on every rank) and read as one concatenated stream of N samples.
2. Rank ``r`` takes the contiguous slice ``[r * n, (r + 1) * n)`` of that stream, ``n = N // world_size``. Every rank
   therefore gets exactly the same number of samples and batches (DDP needs equal step counts) whatever the number
   of shards; the ``N % world_size`` (< world_size) samples at the end of the shuffled stream are left out of that
   epoch only (a different few each epoch). With balanced shards whose count divides ``world_size`` this is the
   reference's ``files[rank::world_size]`` assignment up to relabelling, and each rank reads only its own files.
3. The rank's stream is shuffled in blocks of ``shuffle_buffer_size`` samples (a uniform permutation inside each
   block, seeded per block), standing in for LDDL's shuffle buffer of the same size, and cut into batches of
   ``batch_size`` (the last batch of a bin may be smaller).
4. Binned data: the order in which the bins' batches are drawn is a random interleaving seeded by ``(seed, epoch)``
   (each step picks a bin with probability proportional to its remaining batches, as LDDL does); it depends only on
   per-bin counts, which are identical on every rank, so every rank draws the same bin at each step.

The rank's batch sequence is thus a pure function of (shards, seed, epoch, rank, world_size, batch_size): it does not
depend on ``num_workers``. Worker ``w`` of ``W`` builds batches ``start + w, start + w + W, ...`` and the DataLoader
hands them out round-robin, i.e. in order. The price is that each worker reads every shard of its rank (it keeps
only the blocks it needs in memory); the gain is that results are identical for any ``num_workers`` and a resume
only needs the number of batches consumed, with no skipping through data.

Batches are dicts of CPU tensors: ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels`` ([B, S] int64,
``labels`` -1 where not masked) and ``next_sentence_labels`` ([B] int64, 1 = random next). S is the batch's longest
sequence rounded up to ``sequence_length_alignment``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tokenization import load_vocab

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

STATE_VERSION = 1
PAIR_COLUMNS = ("A", "B", "is_random_next")
STATIC_MASK_COLUMNS = ("masked_lm_positions", "masked_lm_labels")
HDF5_KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels")
IGNORE_INDEX = -1

_PARQUET_NAME = re.compile(r"\.parquet(?:_(\d+))?$")  # shard-3.parquet, or shard-3.parquet_<bin_id> when binned
_HDF5_NAME = re.compile(r"\.(?:hdf5|h5)$")
_NUM_SAMPLES_FILE = ".num_samples.json"  # LDDL's balance step: shard basename -> number of samples

# Independent RNG streams: every random decision is seeded by (seed, epoch, stream, ...), never by a shared state.
_FILE_ORDER, _BIN_ORDER, _BLOCK_ORDER, _MASKING = range(4)


class ShardError(ValueError):
    """A shard is unreadable, truncated, has the wrong schema or does not match the vocabulary; names the file."""


# --------------------------------------------------------------------------------------------------------------------
# Shard discovery
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One shard file: its path, number of samples and bin id (0 when the data is not binned)."""

    path: str
    num_samples: int
    bin_id: int = 0


@dataclass(frozen=True)
class ShardSet:
    """The shards of a pre-training directory, in a world-identical (sorted) order."""

    input_dir: str
    format: str  # "parquet" or "hdf5"
    shards: tuple[Shard, ...]
    binned: bool
    static_masking: bool  # Parquet with masked_lm_* columns, or HDF5 (always statically masked)

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)


def find_shards(input_dir: PathLike) -> ShardSet:
    """List and validate the shards under ``input_dir`` (searched recursively, like LDDL).

    Parquet: ``*.parquet`` (balanced: ``shard-<idx>.parquet``) or binned ``*.parquet_<bin_id>``; the footer of every
    file is read to get its row count and check the LDDL schema, and the counts are checked against any
    ``.num_samples.json``. HDF5: ``*.hdf5`` / ``*.h5`` in the reference layout; when some names contain "training"
    only those are used, as the reference does for a ``bertPrep`` directory that also holds test shards.

    Raises:
        FileNotFoundError: the directory is missing or holds no shards (the message names it).
        ShardError: a shard is unreadable/truncated, has the wrong schema, or disagrees with ``.num_samples.json``;
            or the directory mixes formats, binned and unbinned, or statically and dynamically masked shards.
    """
    root = os.fspath(input_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"pre-training input directory {root!r} does not exist or is not a directory")
    parquet: list[tuple[str, Optional[int]]] = []
    hdf5: list[str] = []
    counts_files: list[str] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            if name == _NUM_SAMPLES_FILE:
                counts_files.append(path)
            elif name.startswith("."):
                continue
            elif match := _PARQUET_NAME.search(name):
                parquet.append((path, None if match.group(1) is None else int(match.group(1))))
            elif _HDF5_NAME.search(name):
                hdf5.append(path)
    if parquet and hdf5:
        raise ShardError(f"{root} holds both Parquet ({parquet[0][0]}) and HDF5 ({hdf5[0]}) shards; "
                         "point --input_dir at one format")
    if not parquet and not hdf5:
        raise FileNotFoundError(f"no pre-training shards (*.parquet, *.parquet_<bin_id>, *.hdf5, *.h5) found under "
                                f"{root!r}; run data/preprocess_pretraining.py first or fix --input_dir")
    if hdf5:
        training = [path for path in hdf5 if "training" in os.path.basename(path)]
        paths = training or hdf5
        with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
            sizes = list(pool.map(_inspect_hdf5, paths))
        shards = tuple(Shard(path, size) for path, size in zip(paths, sizes))
        shard_set = ShardSet(root, "hdf5", shards, binned=False, static_masking=True)
    else:
        binned = [path for path, bin_id in parquet if bin_id is not None]
        if binned and len(binned) != len(parquet):
            plain = next(path for path, bin_id in parquet if bin_id is None)
            raise ShardError(f"{root} mixes binned ({binned[0]}) and unbinned ({plain}) Parquet shards")
        with ThreadPoolExecutor(max_workers=min(8, len(parquet))) as pool:
            inspected = list(pool.map(_inspect_parquet, [path for path, _ in parquet]))
        statics = {static for _, static in inspected}
        if len(statics) > 1:
            with_cols = next(p for (p, _), (_, s) in zip(parquet, inspected) if s)
            without = next(p for (p, _), (_, s) in zip(parquet, inspected) if not s)
            raise ShardError(f"{root} mixes statically masked ({with_cols}) and unmasked ({without}) shards")
        shards = tuple(Shard(path, size, bin_id or 0) for (path, bin_id), (size, _) in zip(parquet, inspected))
        shard_set = ShardSet(root, "parquet", shards, binned=bool(binned), static_masking=statics.pop())
    _check_recorded_counts(shard_set.shards, counts_files)
    return shard_set


def _inspect_parquet(path: str) -> tuple[int, bool]:
    """Return (rows, has static masking columns) from the footer; raise ShardError naming the file when bad."""
    try:
        handle = pq.ParquetFile(path)
        try:
            schema, rows = handle.schema_arrow, handle.metadata.num_rows
        finally:
            handle.close()
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ShardError(f"{path}: not a readable Parquet file (truncated or corrupt?): {err}") from err
    missing = [column for column in PAIR_COLUMNS if column not in schema.names]
    if missing:
        raise ShardError(f"{path}: missing column(s) {missing}; expected the LDDL schema A, B (space-joined "
                         f"WordPiece tokens), is_random_next [, masked_lm_positions, masked_lm_labels]; "
                         f"found {schema.names}")
    for column in ("A", "B"):
        if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
            raise ShardError(f"{path}: column {column!r} is {schema.field(column).type}, expected string")
    present = [column in schema.names for column in STATIC_MASK_COLUMNS]
    if any(present) and not all(present):
        raise ShardError(f"{path}: has only one of the static masking columns {list(STATIC_MASK_COLUMNS)}")
    return rows, all(present)


def _inspect_hdf5(path: str) -> int:
    """Return the number of instances of a reference-layout HDF5 shard; raise ShardError naming the file."""
    try:
        with h5py.File(path, "r") as handle:
            missing = [key for key in HDF5_KEYS if key not in handle]
            shapes = {key: handle[key].shape for key in HDF5_KEYS if key in handle}
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from err
    if missing:
        raise ShardError(f"{path}: missing dataset(s) {missing}; expected the reference layout {list(HDF5_KEYS)}")
    rows = shapes["input_ids"][0]
    sequence_shape = shapes["input_ids"]
    predictions_shape = shapes["masked_lm_positions"]
    if (len(sequence_shape) != 2 or shapes["input_mask"] != sequence_shape or shapes["segment_ids"] != sequence_shape
            or len(predictions_shape) != 2 or predictions_shape[0] != rows
            or shapes["masked_lm_ids"] != predictions_shape or shapes["next_sentence_labels"] != (rows,)):
        raise ShardError(f"{path}: inconsistent dataset shapes {shapes}")
    return rows


def _check_recorded_counts(shards: Sequence[Shard], counts_files: Sequence[str]) -> None:
    """Cross-check row counts against LDDL's ``.num_samples.json`` files (a stale one means shards changed)."""
    recorded: dict[str, tuple[str, int]] = {}
    for counts_file in counts_files:
        try:
            with open(counts_file, encoding="utf-8") as handle:
                table = json.load(handle)
        except (OSError, ValueError) as err:
            raise ShardError(f"{counts_file}: unreadable sample-count file: {err}") from err
        directory = os.path.dirname(counts_file)
        for name, count in table.items():
            recorded[os.path.join(directory, name)] = (counts_file, int(count))
    for shard in shards:
        if shard.path in recorded and recorded[shard.path][1] != shard.num_samples:
            counts_file, count = recorded[shard.path]
            raise ShardError(f"{shard.path}: holds {shard.num_samples} samples but {counts_file} records {count}; "
                             "the shards changed after balancing (regenerate the counts or the shards)")


# --------------------------------------------------------------------------------------------------------------------
# Vocabulary and reading rows
# --------------------------------------------------------------------------------------------------------------------

class Vocab:
    """Maps space-joined WordPiece strings to ids in bulk with Arrow kernels (no per-token Python)."""

    def __init__(self, vocab: Mapping[str, int], name: str = "vocab") -> None:
        missing = [token for token in ("[CLS]", "[SEP]", "[MASK]") if token not in vocab]
        if missing:
            raise ValueError(f"{name}: the vocabulary lacks the special token(s) {missing}")
        self.name = name
        self.value_set = pa.array(list(vocab.keys()), type=pa.string())
        self.ids = np.fromiter(vocab.values(), dtype=np.int32, count=len(vocab))
        self.size = int(self.ids.max()) + 1
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.pad_id = vocab.get("[PAD]", 0)

    @classmethod
    def from_file(cls, vocab_file: PathLike) -> "Vocab":
        return cls(load_vocab(vocab_file), name=os.fspath(vocab_file))  # reference reading rules (tokenization.py)

    def encode(self, strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Split each string on whitespace and look the tokens up.

        Returns the flat ids (int32) and row offsets (int64, length rows + 1). Raises ValueError listing tokens
        that are not in the vocabulary (data made with another vocab).
        """
        lists = pc.utf8_split_whitespace(strings)
        flat = lists.flatten()
        offsets = lists.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
        if not keep.all():  # "" and surrounding spaces split into empty tokens; str.split() drops them
            flat = flat.filter(pa.array(keep))
            offsets = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])[offsets]
        index = pc.index_in(flat, value_set=self.value_set)
        if index.null_count:
            unknown = pc.unique(flat.filter(pc.is_null(index))).to_pylist()[:5]
            raise ValueError(f"tokens not in the vocabulary {self.name}: {unknown} (made with another vocab file?)")
        return self.ids[index.to_numpy()], offsets


def _lengths(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])


def _within(lengths: np.ndarray) -> np.ndarray:
    """For ragged rows of the given lengths, each element's index inside its row: [2, 3] -> [0, 1, 0, 1, 2]."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(_offsets(lengths)[:-1], lengths)


def _ragged_take(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select ragged rows: returns the selected rows' flat values and their offsets."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return values[np.repeat(starts, lengths) + _within(lengths)], _offsets(lengths)


@dataclass
class _PairRows:
    """Rows of Parquet sentence pairs as flat token-id arrays (+ static masking, when the shard has it)."""

    a_ids: np.ndarray
    a_offsets: np.ndarray
    b_ids: np.ndarray
    b_offsets: np.ndarray
    next_sentence: np.ndarray
    positions: Optional[np.ndarray] = None  # static masking: positions in [CLS] A [SEP] B [SEP]
    positions_offsets: Optional[np.ndarray] = None
    label_ids: Optional[np.ndarray] = None  # the original ids at those positions

    def take(self, rows: np.ndarray) -> "_PairRows":
        a, a_off = _ragged_take(self.a_ids, self.a_offsets, rows)
        b, b_off = _ragged_take(self.b_ids, self.b_offsets, rows)
        if self.positions is None:
            return _PairRows(a, a_off, b, b_off, self.next_sentence[rows])
        positions, p_off = _ragged_take(self.positions, self.positions_offsets, rows)
        labels, _ = _ragged_take(self.label_ids, self.positions_offsets, rows)
        return _PairRows(a, a_off, b, b_off, self.next_sentence[rows], positions, p_off, labels)

    @staticmethod
    def concat(parts: Sequence["_PairRows"]) -> "_PairRows":
        if len(parts) == 1:
            return parts[0]

        def join(values: str, offsets: str) -> tuple[np.ndarray, np.ndarray]:
            return (np.concatenate([getattr(p, values) for p in parts]),
                    _offsets(np.concatenate([_lengths(getattr(p, offsets)) for p in parts])))

        a, a_off = join("a_ids", "a_offsets")
        b, b_off = join("b_ids", "b_offsets")
        nsp = np.concatenate([p.next_sentence for p in parts])
        if parts[0].positions is None:
            return _PairRows(a, a_off, b, b_off, nsp)
        positions, p_off = join("positions", "positions_offsets")
        return _PairRows(a, a_off, b, b_off, nsp, positions, p_off, np.concatenate([p.label_ids for p in parts]))


@dataclass
class _FixedRows:
    """Rows of a reference HDF5 shard: fixed-length, already masked."""

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray
    next_sentence_labels: np.ndarray

    def take(self, rows: np.ndarray) -> "_FixedRows":
        return _FixedRows(*(array[rows] for array in self.__dict__.values()))

    @staticmethod
    def concat(parts: Sequence["_FixedRows"]) -> "_FixedRows":
        if len(parts) == 1:
            return parts[0]
        return _FixedRows(*(np.concatenate(arrays) for arrays in zip(*(p.__dict__.values() for p in parts))))


def _decode_npy_rows(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Decode LDDL's per-row ``np.save`` bytes of mask positions; headers are parsed once per distinct header."""
    headers: dict[bytes, tuple[np.dtype, int]] = {}
    arrays = []
    for blob in blobs:
        if blob is None or blob[:6] != b"\x93NUMPY":
            raise ValueError("masked_lm_positions holds a value that is not a serialized numpy array")
        size_bytes = 2 if blob[6] == 1 else 4
        data_start = 8 + size_bytes + int.from_bytes(blob[8:8 + size_bytes], "little")
        header = blob[:data_start]
        if header not in headers:
            stream = io.BytesIO(header)
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(stream)
            if len(shape) != 1 or dtype.kind not in "iu":
                raise ValueError(f"masked_lm_positions must be 1-D integer arrays, found shape {shape} {dtype}")
            headers[header] = (dtype, shape[0])
        dtype, count = headers[header]
        arrays.append(np.frombuffer(blob, dtype=dtype, count=count, offset=data_start))
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return flat, _offsets(lengths)


def _pair_rows_from_table(table: pa.Table, vocab: Vocab, static: bool,
                          max_seq_length: Optional[int]) -> _PairRows:
    """Convert Parquet rows to ids and check them (raises ValueError; the caller adds the file name)."""
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    for name in (*PAIR_COLUMNS, *(STATIC_MASK_COLUMNS if static else ())):
        if columns[name].null_count:
            raise ValueError(f"column {name!r} has {columns[name].null_count} null value(s)")
    a, a_off = vocab.encode(columns["A"])
    b, b_off = vocab.encode(columns["B"])
    nsp = columns["is_random_next"].to_numpy(zero_copy_only=False).astype(np.int64)
    totals = _lengths(a_off) + _lengths(b_off) + 3
    if max_seq_length is not None and len(totals) and totals.max() > max_seq_length:
        raise ValueError(f"{int((totals > max_seq_length).sum())} sample(s) have up to {int(totals.max())} tokens "
                         f"with [CLS]/[SEP], more than --max_seq_length {max_seq_length}")
    if not static:
        return _PairRows(a, a_off, b, b_off, nsp)
    positions, p_off = _decode_npy_rows(columns["masked_lm_positions"].to_pylist())
    labels, l_off = vocab.encode(columns["masked_lm_labels"])
    if not np.array_equal(_lengths(p_off), _lengths(l_off)):
        raise ValueError("masked_lm_positions and masked_lm_labels disagree on the number of predictions")
    row_totals = np.repeat(totals, _lengths(p_off))
    if len(positions) and ((positions <= 0) | (positions >= row_totals - 1)).any():
        raise ValueError("masked_lm_positions points outside the sample's tokens (or at [CLS]/the final [SEP])")
    return _PairRows(a, a_off, b, b_off, nsp, positions, p_off, labels)


def _fixed_rows_from_arrays(arrays: dict[str, np.ndarray], max_seq_length: Optional[int]) -> _FixedRows:
    """Check HDF5 rows (raises ValueError; the caller adds the file name)."""
    rows = _FixedRows(*(np.asarray(arrays[key]) for key in HDF5_KEYS))
    width = rows.input_ids.shape[1]
    lengths = rows.input_mask.astype(np.int64).sum(axis=1)
    if max_seq_length is not None and len(lengths) and lengths.max() > max_seq_length:
        raise ValueError(f"samples have up to {int(lengths.max())} tokens, more than --max_seq_length "
                         f"{max_seq_length}")
    if rows.masked_lm_positions.size and (rows.masked_lm_positions.min() < 0
                                          or rows.masked_lm_positions.max() >= width):
        raise ValueError(f"masked_lm_positions outside [0, {width})")
    return rows


class _ShardReader:
    """Reads row ranges of shards inside one worker; keeps recent Parquet tables, as consecutive pieces share them."""

    def __init__(self, shard_set: ShardSet, vocab: Optional[Vocab], max_seq_length: Optional[int]) -> None:
        self.shard_set = shard_set
        self.vocab = vocab
        self.max_seq_length = max_seq_length
        self._tables: dict[str, pa.Table] = {}
        # Binned data alternates between bins: keep each bin's current file (and one more) between its pieces.
        self._max_tables = len({shard.bin_id for shard in shard_set.shards}) + 1

    def read(self, shard: Shard, lo: int, hi: int) -> Union[_PairRows, _FixedRows]:
        try:
            if self.shard_set.format == "hdf5":
                with h5py.File(shard.path, "r") as handle:
                    arrays = {key: handle[key][lo:hi] for key in HDF5_KEYS}
                return _fixed_rows_from_arrays(arrays, self.max_seq_length)
            table = self._table(shard)
            return _pair_rows_from_table(table.slice(lo, hi - lo), self.vocab, self.shard_set.static_masking,
                                         self.max_seq_length)
        except ShardError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise ShardError(f"{shard.path}: {err}") from err

    def _table(self, shard: Shard) -> pa.Table:
        if shard.path not in self._tables:
            columns = list(PAIR_COLUMNS) + (list(STATIC_MASK_COLUMNS) if self.shard_set.static_masking else [])
            table = pq.read_table(shard.path, columns=columns)
            if table.num_rows != shard.num_samples:
                raise ShardError(f"{shard.path}: holds {table.num_rows} rows, {shard.num_samples} when listed; "
                                 "the shard changed during training")
            if len(self._tables) >= self._max_tables:
                self._tables.pop(next(iter(self._tables)))
            self._tables[shard.path] = table
        return self._tables[shard.path]


# --------------------------------------------------------------------------------------------------------------------
# Batch assembly and masking
# --------------------------------------------------------------------------------------------------------------------

def _aligned_length(longest: int, alignment: int, limit: Optional[int]) -> int:
    """Round up to the alignment (Tensor Cores like multiples of 8), not past ``limit`` when one is set."""
    length = -(-longest // alignment) * alignment
    return min(length, limit) if limit is not None and limit >= longest else length


def _mask_dynamic(input_ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, probability: float,
                  vocab: Vocab, max_predictions: Optional[int]) -> np.ndarray:
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


def _assemble_pairs(rows: _PairRows, vocab: Vocab, rng: Optional[np.random.Generator], probability: float,
                    max_predictions: Optional[int], alignment: int, limit: Optional[int]) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] + padding, built with index arithmetic over the flat id arrays (B rows, S columns)."""
    a_len, b_len = _lengths(rows.a_offsets), _lengths(rows.b_offsets)
    batch = len(a_len)
    total = a_len + b_len + 3
    width = _aligned_length(int(total.max()), alignment, limit)
    row = np.arange(batch)
    input_ids = np.full((batch, width), vocab.pad_id, dtype=np.int64)  # [B, S]
    input_ids[:, 0] = vocab.cls_id
    input_ids[np.repeat(row, a_len), 1 + _within(a_len)] = rows.a_ids
    input_ids[row, a_len + 1] = vocab.sep_id
    input_ids[np.repeat(row, b_len), np.repeat(a_len + 2, b_len) + _within(b_len)] = rows.b_ids
    input_ids[row, total - 1] = vocab.sep_id
    column = np.arange(width)[None, :]
    attention_mask = column < total[:, None]
    token_type_ids = (column >= (a_len + 2)[:, None]) & attention_mask  # 1 from the first B token to the last [SEP]
    if rows.positions is not None:
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        labels[np.repeat(row, _lengths(rows.positions_offsets)), rows.positions] = rows.label_ids
    else:
        candidates = attention_mask.copy()
        candidates[:, 0] = False
        candidates[row, a_len + 1] = False
        candidates[row, total - 1] = False
        labels = _mask_dynamic(input_ids, candidates, rng, probability, vocab, max_predictions)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(token_type_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "next_sentence_labels": torch.from_numpy(rows.next_sentence.astype(np.int64)),
    }


def _assemble_fixed(rows: _FixedRows, alignment: int, limit: Optional[int]) -> dict[str, torch.Tensor]:
    """Reference HDF5 rows: labels rebuilt from the masked positions, as the reference loader does; the padding
    columns past the batch's longest (aligned) sequence are cut off."""
    batch, full_width = rows.input_ids.shape
    longest = int(rows.input_mask.astype(np.int64).sum(axis=1).max())
    width = min(full_width, _aligned_length(longest, alignment, limit))
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


# --------------------------------------------------------------------------------------------------------------------
# The epoch plan
# --------------------------------------------------------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass
class _BinPlan:
    """This rank's samples of one bin for one epoch, as pieces: row ranges of shards cut at shuffle-block edges."""

    index: int  # position of the bin in the sorted bin ids
    num_samples: int  # samples of this bin for this rank
    piece_shard: np.ndarray  # shard index of each piece
    piece_rows: np.ndarray  # [P, 2] row range [lo, hi) inside the shard
    piece_start: np.ndarray  # [P + 1] position of each piece in the rank's stream


@dataclass
class _EpochPlan:
    bins: list[_BinPlan]
    step_bin: np.ndarray  # [J] which bin the rank's batch j is drawn from
    step_batch: np.ndarray  # [J] which batch of that bin


class PretrainingDataset(IterableDataset):
    """Yields this rank's batches of one epoch (``epoch``), from batch ``start_batch`` on; see the module docstring.

    Inside a DataLoader worker ``w`` of ``W`` it yields batches ``start_batch + w :: W`` so that the DataLoader's
    round-robin hands all batches out in order.
    """

    def __init__(self, shard_set: ShardSet, vocab: Optional[Vocab], *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 12345, masked_lm_prob: float = 0.15,
                 max_seq_length: Optional[int] = None, max_predictions_per_seq: Optional[int] = None,
                 sequence_length_alignment: int = 8, shuffle_buffer_size: int = 16384) -> None:
        super().__init__()
        if shard_set.format == "parquet" and vocab is None:
            raise ValueError("--vocab_file is required to read Parquet shards (they hold WordPiece strings)")
        self.shard_set = shard_set
        self.vocab = vocab
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.max_predictions_per_seq = max_predictions_per_seq
        self.alignment = sequence_length_alignment
        self.block_size = shuffle_buffer_size
        self.bin_ids = sorted({shard.bin_id for shard in shard_set.shards})
        totals = [sum(s.num_samples for s in shard_set.shards if s.bin_id == b) for b in self.bin_ids]
        self.samples_per_rank = [total // world_size for total in totals]
        self.dropped_per_epoch = sum(totals) - world_size * sum(self.samples_per_rank)
        self.num_batches = sum(math.ceil(n / batch_size) for n in self.samples_per_rank)
        if self.num_batches == 0:
            raise ValueError(f"{shard_set.input_dir} holds {sum(totals)} samples, too few for {world_size} ranks")
        self.epoch = 0
        self.start_batch = 0

    def plan(self, epoch: int) -> _EpochPlan:
        """This rank's layout of ``epoch`` (pure function of the configuration and the epoch)."""
        bins = []
        for index, bin_id in enumerate(self.bin_ids):
            members = [i for i, shard in enumerate(self.shard_set.shards) if shard.bin_id == bin_id]
            order = np.asarray(members)[_rng(self.seed, epoch, _FILE_ORDER, bin_id).permutation(len(members))]
            counts = np.array([self.shard_set.shards[i].num_samples for i in order], dtype=np.int64)
            bins.append(self._bin_plan(index, order, _offsets(counts), self.samples_per_rank[index]))
        per_bin = np.array([math.ceil(b.num_samples / self.batch_size) for b in bins], dtype=np.int64)
        step_bin = np.repeat(np.arange(len(bins)), per_bin)
        if len(bins) > 1:  # a uniform interleaving == drawing bins with probability proportional to batches left
            step_bin = _rng(self.seed, epoch, _BIN_ORDER).permutation(step_bin)
        order = np.argsort(step_bin, kind="stable")
        step_batch = np.empty_like(step_bin)
        step_batch[order] = np.arange(len(step_bin)) - np.repeat(_offsets(per_bin)[:-1], per_bin)
        return _EpochPlan(bins, step_bin, step_batch)

    def _bin_plan(self, index: int, shard_order: np.ndarray, stream_offsets: np.ndarray, n: int) -> _BinPlan:
        lo, hi = self.rank * n, (self.rank + 1) * n
        shards, ranges, starts = [], [], []
        for k, shard in enumerate(shard_order):
            begin, end = max(lo, stream_offsets[k]), min(hi, stream_offsets[k + 1])
            cut = begin
            while cut < end:  # split at shuffle-block edges so a worker holds only the blocks it is using
                block_end = min(end, lo + ((cut - lo) // self.block_size + 1) * self.block_size)
                shards.append(int(shard))
                ranges.append((cut - stream_offsets[k], block_end - stream_offsets[k]))
                starts.append(cut - lo)
                cut = block_end
        starts.append(n)
        return _BinPlan(index, n, np.asarray(shards, dtype=np.int64),
                        np.asarray(ranges, dtype=np.int64).reshape(-1, 2), np.asarray(starts, dtype=np.int64))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_batches(self.epoch, range(self.start_batch + worker, self.num_batches, workers))

    def iter_batches(self, epoch: int, steps: Sequence[int]) -> Iterator[dict[str, torch.Tensor]]:
        """Build the rank's batches ``steps`` (increasing) of ``epoch``."""
        plan = self.plan(epoch)
        reader = _ShardReader(self.shard_set, self.vocab, self.max_seq_length)
        pieces: dict[tuple[int, int], Union[_PairRows, _FixedRows]] = {}
        blocks: dict[tuple[int, int], np.ndarray] = {}
        for step in steps:
            bin_plan = plan.bins[plan.step_bin[step]]
            first = int(plan.step_batch[step]) * self.batch_size
            last = min(first + self.batch_size, bin_plan.num_samples)
            # This and later batches of the bin start in block `oldest` or after: drop what lies before it.
            oldest = first // self.block_size
            for key in [key for key in blocks if key[0] == bin_plan.index and key[1] < oldest]:
                del blocks[key]
            for key in [key for key in pieces if key[0] == bin_plan.index
                        and bin_plan.piece_start[key[1]] // self.block_size < oldest]:
                del pieces[key]
            stream = np.sort(self._shuffled(epoch, bin_plan, np.arange(first, last), blocks))
            piece_of = np.searchsorted(bin_plan.piece_start, stream, side="right") - 1
            parts = []
            for piece in np.unique(piece_of):
                key = (bin_plan.index, int(piece))
                if key not in pieces:
                    shard = self.shard_set.shards[bin_plan.piece_shard[piece]]
                    pieces[key] = reader.read(shard, *map(int, bin_plan.piece_rows[piece]))
                parts.append(pieces[key].take(stream[piece_of == piece] - bin_plan.piece_start[piece]))
            if self.shard_set.format == "hdf5":
                yield _assemble_fixed(_FixedRows.concat(parts), self.alignment, self.max_seq_length)
            else:
                rng = _rng(self.seed, epoch, _MASKING, self.rank, step)
                yield _assemble_pairs(_PairRows.concat(parts), self.vocab, rng, self.masked_lm_prob,
                                      self.max_predictions_per_seq, self.alignment, self.max_seq_length)

    def _shuffled(self, epoch: int, bin_plan: _BinPlan, positions: np.ndarray,
                  blocks: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
        """Map batch positions to stream positions through the per-block permutations."""
        block = positions // self.block_size
        out = np.empty_like(positions)
        for b in np.unique(block):
            key = (bin_plan.index, int(b))
            if key not in blocks:
                size = min(self.block_size, bin_plan.num_samples - int(b) * self.block_size)
                blocks[key] = _rng(self.seed, epoch, _BLOCK_ORDER, self.rank, bin_plan.index, b).permutation(size)
            selected = block == b
            out[selected] = b * self.block_size + blocks[key][positions[selected] - b * self.block_size]
        return out


# --------------------------------------------------------------------------------------------------------------------
# The loader the trainer uses
# --------------------------------------------------------------------------------------------------------------------

_STATE_CONFIG_KEYS = ("seed", "world_size", "batch_size", "shuffle_buffer_size", "num_samples", "num_shards")


class PretrainingDataLoader:
    """Epoch-aware, resumable iterator over a rank's pre-training batches.

    ``iter(loader)`` runs the rest of the current epoch (all of it after a fresh start) and then advances ``epoch``;
    call it again for the next epoch, or use ``batches()``, an endless generator over epochs. ``len(loader)`` is the
    number of batches per epoch, the same on every rank. Keep one live iterator at a time.

    ``state_dict()`` counts the batches handed out so far (a batch counts as consumed when it is yielded), so save it
    after the step that used the last batch; the trainer in ``utils.train_loop`` takes batches without prefetching.
    """

    def __init__(self, dataset: PretrainingDataset, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batches_consumed = 0  # batches of `epoch` handed out
        self.samples_consumed = 0  # sequences in those batches (this rank)

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches_consumed >= len(self):
            self._next_epoch()
        self.dataset.epoch, self.dataset.start_batch = self.epoch, self.batches_consumed
        # A private generator: creating a DataLoader iterator otherwise draws from torch's global RNG, which would
        # shift the trainer's dropout masks and break bitwise resume (all randomness here is seeded explicitly).
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.epoch))
        for batch in loader:
            self.batches_consumed += 1
            self.samples_consumed += int(batch["input_ids"].shape[0])
            yield batch
        if self.batches_consumed != len(self):
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches_consumed} of {len(self)} batches")
        self._next_epoch()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches, epoch after epoch (``epoch`` advances as each one ends)."""
        while True:
            yield from self

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batches_consumed = 0
        self.samples_consumed = 0

    def state_dict(self) -> dict[str, int]:
        """The data position as plain ints (loads with ``weights_only=True``); identical on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self.samples_consumed,
            "seed": self.dataset.seed,
            "world_size": self.dataset.world_size,
            "batch_size": self.dataset.batch_size,
            "shuffle_buffer_size": self.dataset.block_size,
            "num_samples": self.dataset.shard_set.num_samples,
            "num_shards": len(self.dataset.shard_set.shards),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next batches are the ones an uninterrupted run would have produced.

        Raises ValueError naming the keys when the state was saved with another seed, world size, batch size,
        shuffle buffer or data set (the remaining samples would not be those the saved run had left).
        """
        missing = [key for key in ("epoch", "batches_consumed", *_STATE_CONFIG_KEYS) if key not in state]
        if missing:
            raise ValueError(f"data loader state lacks {missing}")
        current = self.state_dict()
        changed = {key: (state[key], current[key]) for key in _STATE_CONFIG_KEYS if int(state[key]) != current[key]}
        if changed:
            detail = ", ".join(f"{key} saved {saved} now {now}" for key, (saved, now) in changed.items())
            raise ValueError(f"cannot resume the data position exactly: {detail}")
        if not 0 <= int(state["batches_consumed"]) <= len(self):
            raise ValueError(f"data loader state has batches_consumed={state['batches_consumed']}, "
                             f"but an epoch has {len(self)} batches")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        self.samples_consumed = int(state.get("samples_consumed", 0))


def get_pretraining_data_loader(input_dir: PathLike, *, vocab_file: Optional[PathLike], batch_size: int,
                                rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 12345,
                                masked_lm_prob: float = 0.15, max_seq_length: Optional[int] = None,
                                max_predictions_per_seq: Optional[int] = None, sequence_length_alignment: int = 8,
                                shuffle_buffer_size: int = 16384, pin_memory: bool = False,
                                start_state: Optional[Mapping[str, Any]] = None) -> PretrainingDataLoader:
    """Build the loader for ``input_dir`` (Parquet or HDF5 shards, detected by file names).

    Args:
        input_dir: directory of shards (searched recursively).
        vocab_file: WordPiece vocabulary, one token per line; needed for Parquet (HDF5 holds ids already).
        batch_size: sequences per batch on this rank (micro-batch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: DataLoader worker processes; 0 builds batches in this process. Results do not depend on it.
        seed: base seed of every random choice (shard order, shuffling, bin order, masking).
        masked_lm_prob: dynamic masking probability (Parquet without masked_lm_* columns).
        max_seq_length: if set, a sample longer than this is an error naming its shard; batches are not padded past it.
        max_predictions_per_seq: if set, caps dynamic masking per sequence (static masks are used as stored).
        sequence_length_alignment: batches are padded to their longest sequence rounded up to this.
        shuffle_buffer_size: samples per shuffle block (LDDL's default buffer size).
        pin_memory: pin batches for faster host-to-GPU copies.
        start_state: a ``state_dict()`` to continue from.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("seed", seed, 0),
                             ("sequence_length_alignment", sequence_length_alignment, 1),
                             ("shuffle_buffer_size", shuffle_buffer_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0.0 <= masked_lm_prob <= 1.0:
        raise ValueError(f"masked_lm_prob must be in [0, 1], got {masked_lm_prob}")
    if max_predictions_per_seq is not None and max_predictions_per_seq < 1:
        raise ValueError(f"max_predictions_per_seq must be >= 1, got {max_predictions_per_seq}")
    shard_set = find_shards(input_dir)
    vocab = Vocab.from_file(vocab_file) if vocab_file is not None else None
    dataset = PretrainingDataset(
        shard_set, vocab, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
        masked_lm_prob=masked_lm_prob, max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq, sequence_length_alignment=sequence_length_alignment,
        shuffle_buffer_size=shuffle_buffer_size)
    logger.info("%s: %d %s shard(s)%s, %d samples (%s masking); %d batches of %d per epoch on each of %d rank(s), "
                "%d sample(s) left out per epoch so ranks stay equal",
                shard_set.input_dir, len(shard_set.shards), shard_set.format,
                f" in {len(dataset.bin_ids)} bins" if shard_set.binned else "", shard_set.num_samples,
                "static" if shard_set.static_masking else "dynamic", dataset.num_batches, batch_size, world_size,
                dataset.dropped_per_epoch)
    loader = PretrainingDataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader
