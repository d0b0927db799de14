"""Tests for data/formats.py and data/ragged.py: the on-disk layouts and the ragged-array helpers they are built on."""
from __future__ import annotations

import io

import h5py
import numpy as np
import pytest

from data.formats import (
    HDF5_DTYPES,
    decode_npy_rows,
    inspect_hdf5,
    is_parquet_name,
    padded_features,
    parquet_bin_id,
    partition_file_names,
    serialize_uint16,
    shard_file_name,
    write_hdf5,
)
from data.instances import MaskedLM, PairTokens
from data.ragged import gather, offsets_of, pair_layout, ragged_arange, take_rows

CLS, SEP = 101, 102


def test_ragged_helpers():
    lengths = np.array([2, 0, 3])
    assert offsets_of(lengths).tolist() == [0, 2, 2, 5]
    rows, within = ragged_arange(lengths)
    assert rows.tolist() == [0, 0, 2, 2, 2] and within.tolist() == [0, 1, 0, 1, 2]
    values = np.arange(10, 20)
    assert gather(values, np.array([5, 0, 1]), lengths).tolist() == [15, 16, 11, 12, 13]
    taken, taken_offsets = take_rows(values, np.array([0, 2, 2, 5]), np.array([2, 0, 2]))
    assert taken.tolist() == [12, 13, 14, 10, 11, 12, 13, 14] and taken_offsets.tolist() == [0, 3, 5, 8]


def test_pair_layout_is_cls_a_sep_b_sep_then_padding():
    ids, mask, types = pair_layout(np.array([1, 2, 3]), np.array([0, 2, 3]), np.array([7, 8, 9]),
                                   np.array([0, 1, 3]), 8, CLS, SEP, pad_id=-5)
    assert ids.tolist() == [[CLS, 1, 2, SEP, 7, SEP, -5, -5], [CLS, 3, SEP, 8, 9, SEP, -5, -5]]
    assert mask.astype(int).tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]] * 2
    assert types.astype(int).tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]]


def test_serialized_positions_are_np_save_bytes_and_read_back():
    values = np.array([3, 7, 9, 1, 2], dtype=np.int64)
    offsets = np.array([0, 3, 3, 5])
    blobs = serialize_uint16(values, offsets)
    for blob, expected in zip(blobs, ([3, 7, 9], [], [1, 2])):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(expected, dtype=np.uint16))
        assert blob == buffer.getvalue()
        assert np.load(io.BytesIO(blob)).dtype == np.uint16
    decoded, decoded_offsets = decode_npy_rows(blobs)
    assert decoded.tolist() == values.tolist() and decoded_offsets.tolist() == offsets.tolist()
    other = io.BytesIO()
    np.save(other, np.array([4, 5], dtype=np.int32))  # LDDL may store another integer type
    assert decode_npy_rows([other.getvalue()])[0].tolist() == [4, 5]
    with pytest.raises(ValueError, match="not a serialized numpy array"):
        decode_npy_rows([b"plain bytes"])


def test_file_names():
    assert shard_file_name(3) == "shard-3.parquet" and shard_file_name(3, 1) == "shard-3.parquet_1"
    assert partition_file_names(2, None) == ["part.2.parquet"]
    assert partition_file_names(2, 2) == ["part.2.parquet_0", "part.2.parquet_1"]
    assert is_parquet_name("shard-3.parquet_1") and not is_parquet_name(".shard-3.parquet.0a1b2c3d.tmp")
    assert parquet_bin_id("shard-3.parquet_12") == 12 and parquet_bin_id("shard-3.parquet") is None


def features(n: int) -> dict[str, np.ndarray]:
    pairs = PairTokens(np.arange(1, 1 + 2 * n), np.arange(0, 2 * n + 1, 2), np.arange(50, 50 + n), np.arange(n + 1))
    masked = MaskedLM(np.ones(n, np.int64), np.arange(1, 2 * n, 2), np.arange(n + 1))
    return padded_features(pairs, masked, np.arange(n) % 2 == 1, 8, 2, CLS, SEP)


def test_hdf5_writer_round_trip_and_no_file_on_failure(tmp_path):
    rows = features(3)
    assert rows["input_ids"][0].tolist() == [CLS, 1, 2, SEP, 50, SEP, 0, 0]
    assert rows["masked_lm_positions"].tolist() == [[1, 0]] * 3 and rows["masked_lm_ids"][:, 0].tolist() == [1, 3, 5]
    path = tmp_path / "training_0.hdf5"
    write_hdf5(path, iter([rows]), 3, 8, 2)
    assert inspect_hdf5(str(path)) == 3
    with h5py.File(path) as handle:
        assert list(handle) == sorted(HDF5_DTYPES)
        for name, dtype in HDF5_DTYPES.items():
            assert handle[name].dtype == np.dtype(dtype) and np.array_equal(handle[name][:], rows[name])
    with pytest.raises(RuntimeError, match="wrote 3 instances"):
        write_hdf5(tmp_path / "short.hdf5", iter([rows]), 4, 8, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_0.hdf5"]
