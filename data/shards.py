"""Pre-training shards as the loader sees them: a directory's shards, listed and checked, and their rows as ids.

``find_shards`` lists a directory of Parquet or HDF5 shards (``data.formats``) and checks every file's footer or
layout before training starts; ``ShardReader`` reads row ranges inside a worker and turns them into flat id arrays
(``PairRows`` for Parquet sentence pairs, ``FixedRows`` for HDF5 rows), checking them against the vocabulary and
``--max_seq_length``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.formats import (
    BALANCE_COMMIT_FILE,
    HDF5_DTYPES,
    NUM_SAMPLES_FILE,
    PAIR_COLUMNS,
    STATIC_MASK_COLUMNS,
    ShardError,
    decode_npy_rows,
    inspect_hdf5,
    inspect_parquet,
    is_hdf5_name,
    is_parquet_name,
    parquet_bin_id,
    read_hdf5_rows,
    read_num_samples,
    read_parquet_table,
)
from data.ragged import lengths_of, offsets_of, take_rows
from file_utils import PathLike
from tokenization import load_vocab


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
            the directory mixes formats, binned and unbinned, or statically and dynamically masked shards; or a
            balancing of it was interrupted (``data.balance_shards`` completes it).
    """
    root = os.fspath(input_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"pre-training input directory {root!r} does not exist or is not a directory")
    parquet: list[tuple[str, int | None]] = []
    hdf5: list[str] = []
    counts_files: list[str] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            if name == NUM_SAMPLES_FILE:
                counts_files.append(path)
            elif name == BALANCE_COMMIT_FILE:
                raise ShardError(f"{path}: a balancing of these shards was interrupted half-way (old and new shards "
                                 f"are both present); run python -m data.balance_shards again to complete it")
            elif is_parquet_name(name):
                parquet.append((path, parquet_bin_id(name)))
            elif is_hdf5_name(name):
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
            sizes = list(pool.map(inspect_hdf5, paths))
        shards = tuple(Shard(path, size) for path, size in zip(paths, sizes))
        shard_set = ShardSet(root, "hdf5", shards, binned=False, static_masking=True)
    else:
        binned = [path for path, bin_id in parquet if bin_id is not None]
        if binned and len(binned) != len(parquet):
            plain = next(path for path, bin_id in parquet if bin_id is None)
            raise ShardError(f"{root} mixes binned ({binned[0]}) and unbinned ({plain}) Parquet shards")
        with ThreadPoolExecutor(max_workers=min(8, len(parquet))) as pool:
            inspected = list(pool.map(inspect_parquet, [path for path, _ in parquet]))
        statics = {static for _, static in inspected}
        if len(statics) > 1:
            with_cols = next(p for (p, _), (_, s) in zip(parquet, inspected) if s)
            without = next(p for (p, _), (_, s) in zip(parquet, inspected) if not s)
            raise ShardError(f"{root} mixes statically masked ({with_cols}) and unmasked ({without}) shards")
        shards = tuple(Shard(path, size, bin_id or 0) for (path, bin_id), (size, _) in zip(parquet, inspected))
        shard_set = ShardSet(root, "parquet", shards, binned=bool(binned), static_masking=statics.pop())
    _check_recorded_counts(shard_set.shards, counts_files)
    return shard_set


def _check_recorded_counts(shards: Sequence[Shard], counts_files: Sequence[str]) -> None:
    """Cross-check row counts against LDDL's ``.num_samples.json`` files (a stale one means shards changed)."""
    recorded: dict[str, tuple[str, int]] = {}
    for counts_file in counts_files:
        try:
            table = read_num_samples(counts_file)
        except (OSError, ValueError) as err:
            raise ShardError(f"{counts_file}: unreadable sample-count file: {err}") from err
        directory = os.path.dirname(counts_file)
        for name, count in table.items():
            recorded[os.path.join(directory, name)] = (counts_file, count)
    for shard in shards:
        if shard.path in recorded and recorded[shard.path][1] != shard.num_samples:
            counts_file, count = recorded[shard.path]
            raise ShardError(f"{shard.path}: holds {shard.num_samples} samples but {counts_file} records {count}; "
                             "the shards changed after balancing (regenerate the counts or the shards)")


# --------------------------------------------------------------------------------------------------------------------
# Reading rows
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
    def from_file(cls, vocab_file: PathLike) -> Vocab:
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


@dataclass
class PairRows:
    """Rows of Parquet sentence pairs as flat token-id arrays (+ static masking, when the shard has it)."""

    a_ids: np.ndarray
    a_offsets: np.ndarray
    b_ids: np.ndarray
    b_offsets: np.ndarray
    next_sentence: np.ndarray
    positions: np.ndarray | None = None  # static masking: positions in [CLS] A [SEP] B [SEP]
    positions_offsets: np.ndarray | None = None
    label_ids: np.ndarray | None = None  # the original ids at those positions

    def take(self, rows: np.ndarray) -> PairRows:
        a, a_off = take_rows(self.a_ids, self.a_offsets, rows)
        b, b_off = take_rows(self.b_ids, self.b_offsets, rows)
        if self.positions is None:
            return PairRows(a, a_off, b, b_off, self.next_sentence[rows])
        positions, p_off = take_rows(self.positions, self.positions_offsets, rows)
        labels, _ = take_rows(self.label_ids, self.positions_offsets, rows)
        return PairRows(a, a_off, b, b_off, self.next_sentence[rows], positions, p_off, labels)

    @staticmethod
    def concat(parts: Sequence[PairRows]) -> PairRows:
        if len(parts) == 1:
            return parts[0]

        def join(values: str, offsets: str) -> tuple[np.ndarray, np.ndarray]:
            return (np.concatenate([getattr(p, values) for p in parts]),
                    offsets_of(np.concatenate([lengths_of(getattr(p, offsets)) for p in parts])))

        a, a_off = join("a_ids", "a_offsets")
        b, b_off = join("b_ids", "b_offsets")
        nsp = np.concatenate([p.next_sentence for p in parts])
        if parts[0].positions is None:
            return PairRows(a, a_off, b, b_off, nsp)
        positions, p_off = join("positions", "positions_offsets")
        return PairRows(a, a_off, b, b_off, nsp, positions, p_off, np.concatenate([p.label_ids for p in parts]))


@dataclass
class FixedRows:
    """Rows of a reference HDF5 shard: fixed-length, already masked."""

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray
    next_sentence_labels: np.ndarray

    def take(self, rows: np.ndarray) -> FixedRows:
        return FixedRows(*(array[rows] for array in self.__dict__.values()))

    @staticmethod
    def concat(parts: Sequence[FixedRows]) -> FixedRows:
        if len(parts) == 1:
            return parts[0]
        return FixedRows(*(np.concatenate(arrays) for arrays in zip(*(p.__dict__.values() for p in parts))))


def _pair_rows_from_table(table: pa.Table, vocab: Vocab, static: bool,
                          max_seq_length: int | None) -> PairRows:
    """Convert Parquet rows to ids and check them (raises ValueError; the caller adds the file name)."""
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    for name in (*PAIR_COLUMNS, *(STATIC_MASK_COLUMNS if static else ())):
        if columns[name].null_count:
            raise ValueError(f"column {name!r} has {columns[name].null_count} null value(s)")
    a, a_off = vocab.encode(columns["A"])
    b, b_off = vocab.encode(columns["B"])
    nsp = columns["is_random_next"].to_numpy(zero_copy_only=False).astype(np.int64)
    totals = lengths_of(a_off) + lengths_of(b_off) + 3
    if max_seq_length is not None and len(totals) and totals.max() > max_seq_length:
        raise ValueError(f"{int((totals > max_seq_length).sum())} sample(s) have up to {int(totals.max())} tokens "
                         f"with [CLS]/[SEP], more than --max_seq_length {max_seq_length}")
    if not static:
        return PairRows(a, a_off, b, b_off, nsp)
    positions, p_off = decode_npy_rows(columns["masked_lm_positions"].to_pylist())
    labels, l_off = vocab.encode(columns["masked_lm_labels"])
    if not np.array_equal(lengths_of(p_off), lengths_of(l_off)):
        raise ValueError("masked_lm_positions and masked_lm_labels disagree on the number of predictions")
    row_totals = np.repeat(totals, lengths_of(p_off))
    if len(positions) and ((positions <= 0) | (positions >= row_totals - 1)).any():
        raise ValueError("masked_lm_positions points outside the sample's tokens (or at [CLS]/the final [SEP])")
    return PairRows(a, a_off, b, b_off, nsp, positions, p_off, labels)


def _fixed_rows_from_arrays(arrays: dict[str, np.ndarray], max_seq_length: int | None) -> FixedRows:
    """Check HDF5 rows (raises ValueError; the caller adds the file name)."""
    rows = FixedRows(*(np.asarray(arrays[key]) for key in HDF5_DTYPES))
    width = rows.input_ids.shape[1]
    lengths = rows.input_mask.astype(np.int64).sum(axis=1)
    if max_seq_length is not None and len(lengths) and lengths.max() > max_seq_length:
        raise ValueError(f"samples have up to {int(lengths.max())} tokens, more than --max_seq_length "
                         f"{max_seq_length}")
    if rows.masked_lm_positions.size and (rows.masked_lm_positions.min() < 0
                                          or rows.masked_lm_positions.max() >= width):
        raise ValueError(f"masked_lm_positions outside [0, {width})")
    return rows


def _check_ids(arrays: Sequence[np.ndarray], vocab_size: int, lo: int, hi: int) -> None:
    """Raise ValueError (the caller adds the file name) when a token id is outside ``[0, vocab_size)``."""
    for ids in arrays:
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise ValueError(f"token id {bad} in rows [{lo}, {hi}) is outside the model's vocabulary of "
                             f"{vocab_size} ids (shard made with another vocab file?)")


class ShardReader:
    """Reads row ranges of shards inside one worker; keeps recent Parquet tables, as consecutive pieces share them."""

    def __init__(self, shard_set: ShardSet, vocab: Vocab | None, max_seq_length: int | None,
                 vocab_size: int | None = None) -> None:
        self.shard_set = shard_set
        self.vocab = vocab
        self.max_seq_length = max_seq_length
        self.vocab_size = vocab_size
        self._tables: dict[str, pa.Table] = {}
        # Binned data alternates between bins: keep each bin's current file (and one more) between its pieces.
        self._max_tables = len({shard.bin_id for shard in shard_set.shards}) + 1

    def read(self, shard: Shard, lo: int, hi: int) -> PairRows | FixedRows:
        """Rows ``[lo, hi)`` of ``shard`` as checked ids; any problem is a one-line ShardError naming the file."""
        try:
            if self.shard_set.format == "hdf5":
                rows: PairRows | FixedRows = _fixed_rows_from_arrays(read_hdf5_rows(shard.path, lo, hi),
                                                                     self.max_seq_length)
                id_arrays = (rows.input_ids, rows.masked_lm_ids)
            else:
                table = self._table(shard)
                rows = _pair_rows_from_table(table.slice(lo, hi - lo), self.vocab, self.shard_set.static_masking,
                                             self.max_seq_length)
                id_arrays = (rows.a_ids, rows.b_ids, *(() if rows.label_ids is None else (rows.label_ids,)))
            if self.vocab_size is not None:
                _check_ids(id_arrays, self.vocab_size, lo, hi)
            return rows
        except ShardError:
            raise
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            raise ShardError(f"{shard.path}: {' '.join(str(err).split())}") from err

    def _table(self, shard: Shard) -> pa.Table:
        if shard.path not in self._tables:
            table = read_parquet_table(shard.path, self.shard_set.static_masking)
            if table.num_rows != shard.num_samples:
                raise ShardError(f"{shard.path}: holds {table.num_rows} rows, {shard.num_samples} when listed; "
                                 "the shard changed during training")
            if len(self._tables) >= self._max_tables:
                self._tables.pop(next(iter(self._tables)))
            self._tables[shard.path] = table
        return self._tables[shard.path]
