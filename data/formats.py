"""The two on-disk formats of pre-training shards, reference HDF5 and LDDL Parquet: names, layouts, writers, checks.

The writers (``create_pretraining_data``, ``preprocess_pretraining``, ``balance_shards``) and the loader
(``data.shards``) import this module and never each other, so each format is defined in one place.

Reference HDF5 (reference section 6.1, era A): one file of six gzip-compressed datasets, zero-padded and statically
masked: ``input_ids`` int32 [N, L], ``input_mask`` int8 [N, L], ``segment_ids`` int8 [N, L] (1 from the first B token
through the last [SEP]), ``masked_lm_positions`` and ``masked_lm_ids`` int32 [N, P] (0 is padding: position 0 is
[CLS], never masked) and ``next_sentence_labels`` int8 [N] (1 = random next).

LDDL Parquet (reference section 6.3, era B): columns ``A``, ``B`` (space-joined WordPieces), ``is_random_next``
(bool), ``num_tokens`` (uint16, len(A) + len(B) + 3); with static masking also ``masked_lm_positions`` (``np.save``
bytes of a uint16 array of positions in ``[CLS] A [SEP] B [SEP]``) and ``masked_lm_labels`` (space-joined original
tokens); when binned also ``bin_id`` (int64; bin b holds sequences of ``b*bin_size+1 .. (b+1)*bin_size`` tokens).
Balanced shards are ``shard-<i>.parquet`` (binned: ``shard-<i>.parquet_<bin_id>``) with ``.num_samples.json`` (file
name -> samples) beside them; the pipeline's parts before balancing are ``part.<i>.parquet[_<bin_id>]``. While
``data.balance_shards`` moves new shards in and old parts out, ``.balance-commit.json`` lies beside them, and the
loader refuses the directory until a rerun of the balancing has finished.

Every file is written to a temporary name and renamed when complete (``file_utils.atomic_path``).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.instances import Instances, MaskedLM, PairTokens, TokenizedDocuments, mask_pairs, pair_tokens
from data.ragged import lengths_of, offsets_of, pair_layout, ragged_arange
from file_utils import PathLike, atomic_path, atomic_write


class ShardError(ValueError):
    """A shard is unreadable, truncated, has the wrong schema or does not match the vocabulary; names the file."""


# --------------------------------------------------------------------------------------------------------------------
# Reference HDF5
# --------------------------------------------------------------------------------------------------------------------

HDF5_DTYPES = {
    "input_ids": "i4",
    "input_mask": "i1",
    "segment_ids": "i1",
    "masked_lm_positions": "i4",
    "masked_lm_ids": "i4",
    "next_sentence_labels": "i1",
}
"""The reference's datasets, in their order, and their dtypes."""

_HDF5_NAME = re.compile(r"\.(?:hdf5|h5)$")


def is_hdf5_name(name: str) -> bool:
    """True for an HDF5 shard's file name (``*.hdf5`` or ``*.h5``, not hidden)."""
    return not name.startswith(".") and _HDF5_NAME.search(name) is not None


def hdf5_file_name(index: int) -> str:
    """Name of partition ``index``'s HDF5 file ("training" in it, as the reference's era-A loader selects files)."""
    return f"training_{index}.hdf5"


def padded_features(
    pairs: PairTokens,
    masked: MaskedLM,
    is_random_next: np.ndarray,
    max_seq_length: int,
    max_predictions_per_seq: int,
    cls_id: int,
    sep_id: int,
) -> dict[str, np.ndarray]:
    """Lay pairs out as the reference HDF5 rows: ``[CLS] A [SEP] B [SEP]`` zero-padded, masks zero-padded.

    Returns one array per dataset of :data:`HDF5_DTYPES`, N rows each (L = ``max_seq_length``, P =
    ``max_predictions_per_seq``).
    """
    a_len, b_len = pairs.a_len, pairs.b_len
    n = len(a_len)
    if n and int((a_len + b_len).max()) + 3 > max_seq_length:
        raise ValueError(f"a pair is longer than max_seq_length={max_seq_length}")
    input_ids, input_mask, segment_ids = pair_layout(pairs.a_ids, pairs.a_offsets, pairs.b_ids, pairs.b_offsets,
                                                     max_seq_length, cls_id, sep_id, pad_id=0, dtype=np.int32)
    counts = lengths_of(masked.offsets)
    if n and int(counts.max(initial=0)) > max_predictions_per_seq:
        raise ValueError(f"a pair has more than max_predictions_per_seq={max_predictions_per_seq} masked positions")
    masked_lm_positions = np.zeros((n, max_predictions_per_seq), dtype=np.int32)
    masked_lm_ids = np.zeros((n, max_predictions_per_seq), dtype=np.int32)
    rows, within = ragged_arange(counts)
    masked_lm_positions[rows, within] = masked.positions
    masked_lm_ids[rows, within] = masked.labels
    return {
        "input_ids": input_ids,
        "input_mask": input_mask.astype(np.int8),
        "segment_ids": segment_ids.astype(np.int8),
        "masked_lm_positions": masked_lm_positions,
        "masked_lm_ids": masked_lm_ids,
        "next_sentence_labels": is_random_next.astype(np.int8),
    }


def hdf5_blocks(
    documents: TokenizedDocuments,
    instances: Instances,
    vocabulary: Sequence[str],
    np_rng: np.random.Generator,
    masked_lm_prob: float,
    max_seq_length: int,
    max_predictions_per_seq: int,
    block_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Statically mask ``instances`` and lay them out as HDF5 rows, ``block_size`` instances at a time.

    ``vocabulary[i]`` is the token of id i. The blocks are built as :func:`write_hdf5` consumes them, so memory holds
    one block of rows, never the whole file.
    """
    token_id = {token: i for i, token in enumerate(vocabulary)}
    for begin in range(0, len(instances), block_size):
        chunk = instances.take(np.arange(begin, min(begin + block_size, len(instances))))
        pairs = pair_tokens(documents, chunk)
        masked = mask_pairs(pairs, np_rng, masked_lm_prob, len(vocabulary), token_id["[MASK]"],
                            max_predictions_per_seq)
        yield padded_features(pairs, masked, chunk.is_random_next, max_seq_length, max_predictions_per_seq,
                              token_id["[CLS]"], token_id["[SEP]"])


def write_hdf5(path: PathLike, features: Iterator[dict[str, np.ndarray]], num_instances: int,
               max_seq_length: int, max_predictions_per_seq: int) -> None:
    """Write feature blocks (from :func:`hdf5_blocks`) into the six gzip datasets of the reference format, atomically.

    Raises:
        RuntimeError: the blocks hold other than ``num_instances`` rows (nothing is written then).
    """
    shapes = {
        "input_ids": (num_instances, max_seq_length),
        "input_mask": (num_instances, max_seq_length),
        "segment_ids": (num_instances, max_seq_length),
        "masked_lm_positions": (num_instances, max_predictions_per_seq),
        "masked_lm_ids": (num_instances, max_predictions_per_seq),
        "next_sentence_labels": (num_instances,),
    }
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        datasets = {
            name: out.create_dataset(name, shape=shapes[name], dtype=dtype, compression="gzip")
            for name, dtype in HDF5_DTYPES.items()
        }
        row = 0
        for block in features:
            n = len(block["next_sentence_labels"])
            for name, dataset in datasets.items():
                dataset[row : row + n] = block[name]
            row += n
        if row != num_instances:
            raise RuntimeError(f"wrote {row} instances to {path}, expected {num_instances}")


def inspect_hdf5(path: str) -> int:
    """Return the number of instances of a reference-layout HDF5 shard; raise ShardError naming the file."""
    try:
        with h5py.File(path, "r") as handle:
            missing = [key for key in HDF5_DTYPES if key not in handle]
            shapes = {key: handle[key].shape for key in HDF5_DTYPES if key in handle}
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from err
    if missing:
        raise ShardError(f"{path}: missing dataset(s) {missing}; expected the reference layout {list(HDF5_DTYPES)}")
    rows = shapes["input_ids"][0]
    sequence_shape = shapes["input_ids"]
    predictions_shape = shapes["masked_lm_positions"]
    if (len(sequence_shape) != 2 or shapes["input_mask"] != sequence_shape or shapes["segment_ids"] != sequence_shape
            or len(predictions_shape) != 2 or predictions_shape[0] != rows
            or shapes["masked_lm_ids"] != predictions_shape or shapes["next_sentence_labels"] != (rows,)):
        raise ShardError(f"{path}: inconsistent dataset shapes {shapes}")
    return rows


def read_hdf5_rows(path: str, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows ``[lo, hi)`` of every dataset of a reference HDF5 shard."""
    with h5py.File(path, "r") as handle:
        return {key: handle[key][lo:hi] for key in HDF5_DTYPES}


# --------------------------------------------------------------------------------------------------------------------
# LDDL Parquet
# --------------------------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("A", "B", "is_random_next")
STATIC_MASK_COLUMNS = ("masked_lm_positions", "masked_lm_labels")
NUM_SAMPLES_FILE = ".num_samples.json"  # LDDL's balance step: shard basename -> number of samples
BALANCE_COMMIT_FILE = ".balance-commit.json"  # present while data.balance_shards moves shards in and inputs out

_PARQUET_NAME = re.compile(r"\.parquet(?:_(\d+))?$")  # shard-3.parquet, or shard-3.parquet_<bin_id> when binned


def lddl_schema(masking: bool, binned: bool) -> pa.Schema:
    """The LDDL Parquet schema (reference section 6.3) for the given options, in LDDL's column order."""
    fields = [
        pa.field("A", pa.string()),
        pa.field("B", pa.string()),
        pa.field("is_random_next", pa.bool_()),
        pa.field("num_tokens", pa.uint16()),
    ]
    if masking:
        fields += [pa.field("masked_lm_positions", pa.binary()), pa.field("masked_lm_labels", pa.string())]
    if binned:
        fields.append(pa.field("bin_id", pa.int64()))
    return pa.schema(fields)


def is_parquet_name(name: str) -> bool:
    """True for a Parquet shard's file name: ``*.parquet`` or binned ``*.parquet_<bin_id>``, not hidden."""
    return not name.startswith(".") and _PARQUET_NAME.search(name) is not None


def parquet_bin_id(name: str) -> int | None:
    """The bin id of a ``*.parquet_<bin_id>`` file name; None for an unbinned ``*.parquet``."""
    match = _PARQUET_NAME.search(name)
    return None if match is None or match.group(1) is None else int(match.group(1))


def shard_file_name(index: int, bin_id: int | None = None) -> str:
    """Name of balanced shard ``index``: ``shard-<i>.parquet``, or ``shard-<i>.parquet_<bin_id>`` of one bin."""
    return f"shard-{index}.parquet" + ("" if bin_id is None else f"_{bin_id}")


def partition_file_names(index: int, num_bins: int | None) -> list[str]:
    """Names of the (pre-balancing) files of partition ``index``: ``part.<i>.parquet`` or one per bin."""
    base = f"part.{index}.parquet"
    return [base] if num_bins is None else [f"{base}_{b}" for b in range(num_bins)]


def parquet_files(directory: PathLike) -> list[Path]:
    """Parquet shards directly under ``directory``, sorted by name with numbers compared as numbers (2 < 10).

    Hidden files (temporaries) are skipped.
    """
    def natural(path: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    return sorted((p for p in Path(directory).iterdir() if p.is_file() and is_parquet_name(p.name)), key=natural)


def num_rows(path: PathLike) -> int:
    """Sample count of a Parquet file, from its footer (the data is not read)."""
    return pq.read_metadata(path).num_rows


def bin_ids(num_tokens: np.ndarray, bin_size: int, num_bins: int) -> np.ndarray:
    """LDDL's bin of each sequence length: ``(num_tokens - 1) // bin_size``, capped at the last bin."""
    return np.minimum((np.asarray(num_tokens, dtype=np.int64) - 1) // bin_size, num_bins - 1)


def write_num_samples(directory: PathLike, counts: dict[str, int]) -> None:
    """Write ``directory/.num_samples.json`` (file basename -> samples), atomically."""
    with atomic_write(Path(directory) / NUM_SAMPLES_FILE, "w") as handle:
        json.dump(counts, handle, indent=0, sort_keys=True)


def read_num_samples(path: PathLike) -> dict[str, int]:
    """The counts of a ``.num_samples.json`` file; raises OSError or ValueError when it is unreadable."""
    with open(path, encoding="utf-8") as handle:
        return {name: int(count) for name, count in json.load(handle).items()}


@functools.cache
def _npy_header(length: int) -> bytes:
    """The bytes ``np.save`` writes before the data of a length-``length`` uint16 vector (cached per length)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(length, dtype="<u2"))
    return buffer.getvalue()[: -2 * length] if length else buffer.getvalue()


def serialize_uint16(values: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Each ragged row of ``values`` as the ``np.save`` bytes of a uint16 array (what LDDL stores and np.load reads)."""
    data = values.astype("<u2").tobytes()
    return [_npy_header(int(end - start)) + data[2 * start : 2 * end] for start, end in zip(offsets[:-1], offsets[1:])]


def decode_npy_rows(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Read back :func:`serialize_uint16` rows (any 1-D integer ``np.save`` bytes) as int64 values and offsets.

    Headers are parsed once per distinct header. Raises ValueError for a value that is not such an array.
    """
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
    return flat, offsets_of(lengths)


def _join_tokens(vocab: pa.Array, ids: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """Space-join the vocabulary strings of each ragged row of ids (all in Arrow's C++ kernels)."""
    tokens = vocab.take(pa.array(ids, type=pa.int32()))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), tokens), " ")


def lddl_table(
    pairs: PairTokens,
    is_random_next: np.ndarray,
    vocab: pa.Array,
    masked: MaskedLM | None = None,
    bin_size: int | None = None,
    num_bins: int | None = None,
) -> pa.Table:
    """Pairs as an Arrow table with the LDDL schema (``bin_id`` added when ``bin_size`` is given).

    ``vocab`` is the vocabulary as an Arrow string array (element i is the token of id i).
    """
    num_tokens = pairs.a_len + pairs.b_len + 3
    columns: dict[str, pa.Array] = {
        "A": _join_tokens(vocab, pairs.a_ids, pairs.a_offsets),
        "B": _join_tokens(vocab, pairs.b_ids, pairs.b_offsets),
        "is_random_next": pa.array(is_random_next, type=pa.bool_()),
        "num_tokens": pa.array(num_tokens.astype(np.uint16), type=pa.uint16()),
    }
    if masked is not None:
        columns["masked_lm_positions"] = pa.array(serialize_uint16(masked.positions, masked.offsets), pa.binary())
        columns["masked_lm_labels"] = _join_tokens(vocab, masked.labels, masked.offsets)
    if bin_size is not None:
        columns["bin_id"] = pa.array(bin_ids(num_tokens, bin_size, num_bins), type=pa.int64())
    return pa.table(columns, schema=lddl_schema(masked is not None, bin_size is not None))


@contextlib.contextmanager
def parquet_writers(paths: Sequence[PathLike], schema: pa.Schema) -> Iterator[list[pq.ParquetWriter]]:
    """One ``ParquetWriter`` per path, each writing a temporary file beside its path.

    When the block succeeds every file is closed and renamed to its path; when it fails none is (the temporaries
    are removed).
    """
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path in paths]
        yield [stack.enter_context(pq.ParquetWriter(os.fspath(tmp), schema)) for tmp in temporaries]


def write_parquet(table: pa.Table, path: PathLike) -> None:
    """Write ``table`` as one Parquet file, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, os.fspath(tmp))


def inspect_parquet(path: str) -> tuple[int, bool]:
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


def read_parquet_table(path: str, static_masking: bool) -> pa.Table:
    """The loader's columns of a Parquet shard: the pair columns, and the static masking ones if it has them."""
    return pq.read_table(path, columns=list(PAIR_COLUMNS) + (list(STATIC_MASK_COLUMNS) if static_masking else []))
