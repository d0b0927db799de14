"""Tests for the pre-training loader (data/pretraining_dataset.py, data/shards.py, data/batches.py): batch layout,
masking, sharding, determinism, resume and bad shards."""
from __future__ import annotations

import collections
import io
import json
import random
import re
from itertools import islice
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, shared_path
from tokenizers import BertWordPieceTokenizer

from data import create_pretraining_data, preprocess_pretraining
from data.formats import ShardError
from data.pretraining_dataset import get_pretraining_data_loader

VOCAB_FILE = REPO / "vocab" / "vocab"
VOCAB = {line.rstrip("\n"): i for i, line in enumerate(VOCAB_FILE.read_text(encoding="utf-8").splitlines(True))}
CLS, SEP, MASK, PAD = VOCAB["[CLS]"], VOCAB["[SEP]"], VOCAB["[MASK]"], VOCAB["[PAD]"]
KEYS = ["input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_labels"]

Pair = tuple[tuple[str, ...], tuple[str, ...], bool]


# ---------------------------------------------------------------------------------------------------------------------
# Building shards from real text
# ---------------------------------------------------------------------------------------------------------------------

def sentence_pairs(text: str, max_pairs: int, seed: int = 0, max_tokens: int = 40) -> list[Pair]:
    """Tokenize sentences and pair each with its successor or (half the time) a random one; all pairs distinct."""
    sentences = [s for s in re.split(r"(?<=[.!?;:])\s+", text) if len(s.split()) >= 3]
    tokenizer = BertWordPieceTokenizer(str(VOCAB_FILE), lowercase=True)
    tokens = [tuple(e.tokens[:max_tokens]) for e in tokenizer.encode_batch(sentences, add_special_tokens=False)]
    tokens = [t for t in tokens if t and "[SEP]" not in t]
    rng = random.Random(seed)
    pairs, seen = [], set()
    for i in range(len(tokens) - 1):
        random_next = rng.random() < 0.5
        a, b = tokens[i], tokens[rng.randrange(len(tokens))] if random_next else tokens[i + 1]
        if (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b, random_next))
    return pairs[:max_pairs]


def repo_pairs() -> list[Pair]:
    """Pairs from text shipped in the repository, so these tests run in a fresh clone."""
    text = " ".join((REPO / "vocab" / name).read_text(encoding="utf-8") for name in ("LICENSE", "README.md"))
    return sentence_pairs(text, max_pairs=1000)


def static_mask(pair: Pair, rng: random.Random) -> tuple[str, str, bytes, str]:
    """Google-style static masking of one pair: returns masked A, masked B, positions (np.save bytes), labels."""
    a, b, _ = pair
    tokens = ["[CLS]", *a, "[SEP]", *b, "[SEP]"]
    candidates = [i for i, t in enumerate(tokens) if t not in ("[CLS]", "[SEP]")]
    positions = sorted(rng.sample(candidates, max(1, round(len(tokens) * 0.15))))
    labels = [tokens[p] for p in positions]
    for p in positions:
        draw = rng.random()
        tokens[p] = "[MASK]" if draw < 0.8 else (tokens[p] if draw < 0.9 else rng.choice(list(VOCAB)[1000:]))
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(positions, dtype=np.uint16))
    return " ".join(tokens[1:len(a) + 1]), " ".join(tokens[len(a) + 2:-1]), buffer.getvalue(), " ".join(labels)


def write_parquet_shards(directory: Path, pairs: list[Pair], sizes: list[int], *, static: bool = False,
                         bin_size: int | None = None, num_bins: int = 1) -> Path:
    """LDDL layout: shard-<i>.parquet (or shard-<i>.parquet_<bin> per bin) + .num_samples.json."""
    directory.mkdir(parents=True, exist_ok=True)
    assert sum(sizes) == len(pairs)
    rng = random.Random(1)
    counts, start = {}, 0
    for index, size in enumerate(sizes):
        chunk = pairs[start:start + size]
        start += size
        rows = {"A": [], "B": [], "is_random_next": [], "num_tokens": [], "masked_lm_positions": [],
                "masked_lm_labels": [], "bin_id": []}
        for pair in chunk:
            a, b = " ".join(pair[0]), " ".join(pair[1])
            if static:
                a, b, positions, labels = static_mask(pair, rng)
                rows["masked_lm_positions"].append(positions)
                rows["masked_lm_labels"].append(labels)
            num_tokens = len(pair[0]) + len(pair[1]) + 3
            rows["A"].append(a)
            rows["B"].append(b)
            rows["is_random_next"].append(pair[2])
            rows["num_tokens"].append(num_tokens)
            rows["bin_id"].append(min((num_tokens - 1) // bin_size, num_bins - 1) if bin_size else 0)
        columns = {"A": pa.array(rows["A"], pa.string()), "B": pa.array(rows["B"], pa.string()),
                   "is_random_next": pa.array(rows["is_random_next"], pa.bool_()),
                   "num_tokens": pa.array(rows["num_tokens"], pa.uint16())}
        if static:
            columns["masked_lm_positions"] = pa.array(rows["masked_lm_positions"], pa.binary())
            columns["masked_lm_labels"] = pa.array(rows["masked_lm_labels"], pa.string())
        table = pa.table(columns)
        if bin_size is None:
            pq.write_table(table, directory / f"shard-{index}.parquet")
            counts[f"shard-{index}.parquet"] = table.num_rows
        else:
            bins = np.asarray(rows["bin_id"])
            for bin_id in range(num_bins):
                name = f"shard-{index}.parquet_{bin_id}"
                pq.write_table(table.filter(pa.array(bins == bin_id)), directory / name)
                counts[name] = int((bins == bin_id).sum())
    (directory / ".num_samples.json").write_text(json.dumps(counts), encoding="utf-8")
    return directory


def write_hdf5_shard(path: Path, pairs: list[Pair], seq_len: int = 96, max_pred: int = 12) -> dict[str, np.ndarray]:
    """Reference layout (section 6.1): fixed-length, statically masked, zero padded."""
    rng = random.Random(2)
    n = len(pairs)
    arrays = {"input_ids": np.zeros((n, seq_len), "i4"), "input_mask": np.zeros((n, seq_len), "i1"),
              "segment_ids": np.zeros((n, seq_len), "i1"), "masked_lm_positions": np.zeros((n, max_pred), "i4"),
              "masked_lm_ids": np.zeros((n, max_pred), "i4"), "next_sentence_labels": np.zeros(n, "i1")}
    for row, (a, b, random_next) in enumerate(pairs):
        tokens = ["[CLS]", *a, "[SEP]", *b, "[SEP]"]
        ids = [VOCAB[t] for t in tokens]
        candidates = [i for i, t in enumerate(tokens) if t not in ("[CLS]", "[SEP]")]
        positions = sorted(rng.sample(candidates, min(max_pred, max(1, round(len(tokens) * 0.15)))))
        arrays["masked_lm_positions"][row, :len(positions)] = positions
        arrays["masked_lm_ids"][row, :len(positions)] = [ids[p] for p in positions]
        for p in positions:
            ids[p] = MASK
        arrays["input_ids"][row, :len(ids)] = ids
        arrays["input_mask"][row, :len(ids)] = 1
        arrays["segment_ids"][row, len(a) + 2:len(ids)] = 1
        arrays["next_sentence_labels"][row] = random_next
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value, compression="gzip")
    return arrays


def pair_key(pair: Pair) -> tuple:
    return tuple(VOCAB[t] for t in pair[0]), tuple(VOCAB[t] for t in pair[1]), int(pair[2])


def decode(batch: dict[str, torch.Tensor], alignment: int = 8) -> list[tuple]:
    """Check one unmasked batch's layout and return its samples as (A ids, B ids, is_random_next)."""
    assert sorted(batch) == sorted(KEYS)
    assert all(t.dtype == torch.long for t in batch.values())
    ids, types, mask = (batch[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask"))
    rows, width = ids.shape
    assert batch["labels"].shape == (rows, width) and batch["next_sentence_labels"].shape == (rows,)
    lengths = mask.sum(axis=1)
    assert width % alignment == 0 and width - alignment < lengths.max() <= width  # padded to the longest, aligned
    samples = []
    for row in range(rows):
        n = lengths[row]
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()
        assert (ids[row, n:] == PAD).all() and (types[row, n:] == 0).all()
        first_b = int(np.argmax(types[row]))  # token types: 0 for [CLS] A [SEP], 1 from the first B token
        assert (types[row, :first_b] == 0).all() and (types[row, first_b:n] == 1).all()
        assert ids[row, 0] == CLS and ids[row, first_b - 1] == SEP and ids[row, n - 1] == SEP
        samples.append((tuple(ids[row, 1:first_b - 1]), tuple(ids[row, first_b:n - 1]),
                        int(batch["next_sentence_labels"][row])))
    return samples


def loader(directory: Path, **kwargs):
    kwargs.setdefault("batch_size", 8)
    return get_pretraining_data_loader(directory, vocab_file=VOCAB_FILE, **kwargs)


def same_batches(left: list[dict], right: list[dict]) -> bool:
    return len(left) == len(right) and all(
        sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(left, right))


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    result = repo_pairs()
    assert len(result) >= 40
    return result


@pytest.fixture(scope="module")
def shards(pairs, tmp_path_factory) -> Path:
    """7 unequal shards (7 divides neither 2 ranks nor 2 x 2 readers); an even total so 2 ranks lose nothing."""
    chosen = pairs[:len(pairs) // 2 * 2]
    n = len(chosen)
    sizes = [n // 7 + (3 if i % 2 else -3) for i in range(6)]
    sizes.append(n - sum(sizes))
    return write_parquet_shards(tmp_path_factory.mktemp("parquet"), chosen, sizes)


# ---------------------------------------------------------------------------------------------------------------------
# Layout and masking
# ---------------------------------------------------------------------------------------------------------------------

def test_batches_hold_each_sample_once_with_bert_layout(shards, pairs):
    data = loader(shards, batch_size=5, masked_lm_prob=0.0, shuffle_buffer_size=16)
    batches = list(data)
    assert len(batches) == len(data) == -(-sum(json.loads((shards / ".num_samples.json").read_text()).values()) // 5)
    samples = [s for batch in batches for s in decode(batch)]
    assert all((b["labels"] == -1).all() for b in batches)  # masked_lm_prob=0: nothing masked
    expected = [pair_key(p) for p in pairs[:len(samples)]]
    assert collections.Counter(samples) == collections.Counter(expected)
    assert [b["input_ids"].shape[0] for b in batches[:-1]] == [5] * (len(batches) - 1)
    assert data.epoch == 1 and data.state_dict()["batches_consumed"] == 0  # iterating ran exactly one epoch


def test_alignment_and_max_seq_length(shards):
    for alignment in (1, 8, 16):
        for batch in loader(shards, masked_lm_prob=0.0, sequence_length_alignment=alignment):
            decode(batch, alignment)
    with pytest.raises(ShardError, match=r"shard-\d\.parquet.*--max_seq_length 16"):
        list(loader(shards, max_seq_length=16))


def masking_counts(batches_masked: list[dict], batches_plain: list[dict]) -> collections.Counter:
    """Compare each masked batch with the same batch built without masking (the sample order does not depend on it)."""
    counts = collections.Counter()
    for masked, plain in zip(batches_masked, batches_plain, strict=True):
        original, labels, ids = plain["input_ids"], masked["labels"], masked["input_ids"]
        special = (original == CLS) | (original == SEP) | (plain["attention_mask"] == 0)
        chosen = labels != -1
        assert not (chosen & special).any()  # never [CLS], [SEP] or padding
        assert torch.equal(labels[chosen], original[chosen])  # labels are the original ids
        assert torch.equal(ids[~chosen], original[~chosen])  # nothing else changes
        counts["candidates"] += int((~special).sum())
        counts["chosen"] += int(chosen.sum())
        counts["mask"] += int((ids[chosen] == MASK).sum())
        counts["kept"] += int((ids[chosen] == original[chosen]).sum())
    counts["random"] = counts["chosen"] - counts["mask"] - counts["kept"]
    return counts


def check_masking_statistics(directory: Path, epochs: int) -> None:
    masked_loader = loader(directory, batch_size=32)
    plain_loader = loader(directory, batch_size=32, masked_lm_prob=0.0)
    counts = collections.Counter()
    for _ in range(epochs):
        counts += masking_counts(list(masked_loader), list(plain_loader))
    assert abs(counts["chosen"] / counts["candidates"] - 0.15) < 0.01, counts
    for kind, share in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(counts[kind] / counts["chosen"] - share) < 0.02, (kind, counts)


def test_dynamic_masking_rates_on_repo_text(shards):
    check_masking_statistics(shards, epochs=12)


def test_dynamic_masking_rates_on_wikitext(tmp_path):
    text = shared_path("wikitext-2", "valid.txt").read_text(encoding="utf-8")
    pairs = sentence_pairs(text, max_pairs=1200)
    directory = write_parquet_shards(tmp_path / "wiki", pairs, [400, 400, 400])
    check_masking_statistics(directory, epochs=1)


def test_max_predictions_per_seq_caps_dynamic_masking(shards):
    counts = [int(row.sum()) for batch in loader(shards, masked_lm_prob=0.5, max_predictions_per_seq=3)
              for row in batch["labels"] != -1]
    assert max(counts) == 3 and min(counts) >= 0


def test_static_masking_columns_are_used_as_stored(pairs, tmp_path):
    chosen = pairs[:40]
    directory = write_parquet_shards(tmp_path / "static", chosen, [20, 20], static=True)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(directory.glob("*.parquet")))
    expected = {}
    for a, b, nsp, positions, labels in zip(*(table.column(c).to_pylist() for c in (
            "A", "B", "is_random_next", "masked_lm_positions", "masked_lm_labels"))):
        ids = [CLS, *(VOCAB[t] for t in a.split()), SEP, *(VOCAB[t] for t in b.split()), SEP]
        label_row = [-1] * len(ids)
        for p, t in zip(np.load(io.BytesIO(positions)), labels.split()):
            label_row[p] = VOCAB[t]
        expected[tuple(ids)] = (tuple(label_row), int(nsp))
    seen = 0
    for batch in loader(directory, batch_size=6):
        for ids, labels, mask, nsp in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                          batch["next_sentence_labels"]):
            n = int(mask.sum())
            assert expected[tuple(ids[:n].tolist())] == (tuple(labels[:n].tolist()), int(nsp))
            assert (labels[n:] == -1).all()
            seen += 1
    assert seen == len(chosen)


def test_hdf5_reference_layout(pairs, tmp_path):
    directory = tmp_path / "hdf5"
    directory.mkdir()
    first = write_hdf5_shard(directory / "books_wiki_en_corpus_training_0.hdf5", pairs[:30])
    second = write_hdf5_shard(directory / "books_wiki_en_corpus_training_1.hdf5", pairs[30:50])
    write_hdf5_shard(directory / "books_wiki_en_corpus_test_0.hdf5", pairs[50:60])  # ignored, as the reference does
    expected = {}
    for arrays in (first, second):
        for row in range(len(arrays["input_ids"])):
            labels = np.full(96, -1)
            valid = arrays["masked_lm_positions"][row] != 0
            labels[arrays["masked_lm_positions"][row][valid]] = arrays["masked_lm_ids"][row][valid]
            expected[tuple(arrays["input_ids"][row])] = (tuple(arrays["segment_ids"][row]), tuple(labels),
                                                          int(arrays["next_sentence_labels"][row]))
    data = get_pretraining_data_loader(directory, vocab_file=None, batch_size=7)
    seen = 0
    for batch in data:
        assert sorted(batch) == sorted(KEYS) and all(t.dtype == torch.long for t in batch.values())
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width - 8 < int(batch["attention_mask"].sum(1).max()) <= width
        for ids, types, labels, nsp in zip(batch["input_ids"], batch["token_type_ids"], batch["labels"],
                                           batch["next_sentence_labels"]):
            key = tuple(ids.tolist()) + (0,) * (96 - width)
            want_types, want_labels, want_nsp = expected.pop(key)
            assert tuple(types.tolist()) == want_types[:width] and tuple(labels.tolist()) == want_labels[:width]
            assert int(nsp) == want_nsp
            seen += 1
    assert seen == 50 and not expected


# ---------------------------------------------------------------------------------------------------------------------
# Sharding, determinism and resume
# ---------------------------------------------------------------------------------------------------------------------

def test_two_ranks_two_workers_see_every_sample_exactly_once(shards, pairs):
    per_rank = []
    for rank in range(2):
        data = loader(shards, rank=rank, world_size=2, num_workers=2, batch_size=3, masked_lm_prob=0.0,
                      shuffle_buffer_size=10)
        batches = list(data)
        assert len(batches) == len(data)
        per_rank.append([s for batch in batches for s in decode(batch)])
    assert len(per_rank[0]) == len(per_rank[1])  # equal steps on every rank (DDP would hang otherwise)
    total = sum(json.loads((shards / ".num_samples.json").read_text()).values())
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == total  # nothing duplicated, nothing lost
    assert set(seen) == {pair_key(p) for p in pairs[:total]}


def test_odd_total_leaves_out_fewer_samples_than_ranks(pairs, tmp_path):
    directory = write_parquet_shards(tmp_path / "odd", pairs[:31], [10, 11, 10])
    seen = [s for rank in range(2) for batch in loader(directory, rank=rank, world_size=2, masked_lm_prob=0.0)
            for s in decode(batch)]
    assert len(seen) == len(set(seen)) == 30  # 31 // 2 per rank; the one left out changes with the epoch


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_same_batches_for_any_num_workers_and_deterministic_for_seed(shards):
    reference = list(loader(shards, batch_size=4, shuffle_buffer_size=12))
    for workers in (1, 3):
        assert same_batches(list(loader(shards, batch_size=4, shuffle_buffer_size=12, num_workers=workers)),
                            reference)
    again = loader(shards, batch_size=4, shuffle_buffer_size=12)
    assert same_batches(list(again), reference)
    assert not same_batches(list(again), reference)  # epoch 1 is shuffled and masked differently
    assert not same_batches(list(loader(shards, batch_size=4, shuffle_buffer_size=12, seed=7)), reference)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(shards, workers):
    settings = dict(batch_size=4, shuffle_buffer_size=12, num_workers=workers, rank=1, world_size=2)
    uninterrupted = loader(shards, **settings)
    per_epoch = len(uninterrupted)
    expected = list(islice(uninterrupted.batches(), 2 * per_epoch + 3))
    for cut in (3, per_epoch, per_epoch + 5):
        first = loader(shards, **settings)
        assert same_batches(list(islice(first.batches(), cut)), expected[:cut])
        state = json.loads(json.dumps(first.state_dict()))  # plain values only
        resumed = loader(shards, start_state=state, **settings)
        assert same_batches(list(islice(resumed.batches(), len(expected) - cut)), expected[cut:])
        assert resumed.epoch == 2


def test_resume_state_must_match_the_run(shards):
    state = loader(shards).state_dict()
    assert set(state) >= {"epoch", "batches_consumed", "samples_consumed", "seed", "world_size", "batch_size"}
    with pytest.raises(ValueError, match="batch_size saved 8 now 16"):
        loader(shards, batch_size=16, start_state=state)
    with pytest.raises(ValueError, match="world_size saved 1 now 2"):
        loader(shards, world_size=2, start_state=state)


def test_binned_data_draws_the_same_bin_on_every_rank(pairs, tmp_path):
    directory = write_parquet_shards(tmp_path / "binned", pairs[:len(pairs) // 2 * 2], [len(pairs) // 2] * 2,
                                     bin_size=16, num_bins=4)
    steps = []
    for rank in range(2):
        data = loader(directory, rank=rank, world_size=2, batch_size=3, masked_lm_prob=0.0, num_workers=rank)
        bins = []
        for batch in data:
            lengths = batch["attention_mask"].sum(1)
            row_bins = torch.clamp((lengths - 1) // 16, max=3)
            assert (row_bins == row_bins[0]).all()  # one bin per batch
            bins.append(int(row_bins[0]))
            decode(batch)
        steps.append(bins)
    assert steps[0] == steps[1] and len(set(steps[0])) > 1
    assert steps[0] != sorted(steps[0])  # bins are interleaved, not one after another
    resumed = loader(directory, rank=1, world_size=2, batch_size=3, masked_lm_prob=0.0,
                     start_state=dict(loader(directory, world_size=2, batch_size=3).state_dict(),
                                      batches_consumed=5))
    assert same_batches(list(resumed), list(islice(loader(directory, rank=1, world_size=2, batch_size=3,
                                                          masked_lm_prob=0.0), 5, None)))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------

def test_empty_or_missing_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        loader(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        loader(tmp_path / "missing")


def test_truncated_or_wrong_shards_are_named(pairs, tmp_path):
    directory = write_parquet_shards(tmp_path / "bad", pairs[:20], [10, 10])
    good = (directory / "shard-1.parquet").read_bytes()
    (directory / "shard-1.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardError, match=r"shard-1\.parquet.*truncated or corrupt"):
        loader(directory)

    (directory / "shard-1.parquet").write_bytes(good)
    counts = json.loads((directory / ".num_samples.json").read_text())
    (directory / ".num_samples.json").write_text(json.dumps(dict(counts, **{"shard-0.parquet": 11})))
    with pytest.raises(ShardError, match=r"shard-0\.parquet: holds 10 samples but .*num_samples\.json records 11"):
        loader(directory)

    (directory / ".num_samples.json").unlink()
    pq.write_table(pa.table({"A": ["hello"], "text": ["world"]}), directory / "shard-2.parquet")
    with pytest.raises(ShardError, match=r"shard-2\.parquet: missing column\(s\) \['B', 'is_random_next'\]"):
        loader(directory)

    pq.write_table(pa.table({"A": ["hello zzqqxx"], "B": ["world"], "is_random_next": [False]}),
                   directory / "shard-2.parquet")
    with pytest.raises(ShardError, match=r"shard-2\.parquet: tokens not in the vocabulary .*'zzqqxx'"):
        list(loader(directory))

    hdf5 = tmp_path / "hdf5"
    hdf5.mkdir()
    (hdf5 / "wiki_training_0.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ShardError, match=r"wiki_training_0\.hdf5: not a readable HDF5 file"):
        get_pretraining_data_loader(hdf5, vocab_file=None, batch_size=2)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_shard_corrupted_during_training_is_one_line_error_from_workers_too(pairs, tmp_path, workers):
    # Listing checks every footer; a shard truncated after that is found by the worker reading it, and torch would
    # re-raise its error in the main process as "Caught ShardError in DataLoader worker process 0 ..." text.
    directory = write_parquet_shards(tmp_path / "data", pairs[:40], [20, 20])
    data = loader(directory, batch_size=4, num_workers=workers)
    good = (directory / "shard-1.parquet").read_bytes()
    (directory / "shard-1.parquet").write_bytes(good[:len(good) // 2])
    with pytest.raises(ShardError) as info:
        list(data)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{directory / 'shard-1.parquet'}: ")
    assert "DataLoader worker" not in message and "Traceback" not in message
    assert 0 <= data.batches_consumed < len(data)  # the bad batch was not counted as consumed


def test_vocab_size_checks_token_ids(pairs, tmp_path):
    directory = write_parquet_shards(tmp_path / "parquet", pairs[:20], [10, 10])
    biggest = max(VOCAB[t] for pair in pairs[:20] for t in (*pair[0], *pair[1]))
    assert len(list(loader(directory, batch_size=4, vocab_size=len(VOCAB)))) == 5
    # A vocabulary file larger than the model's embedding table is refused at once.
    with pytest.raises(ValueError, match=rf"vocab_file .*vocab has ids up to {len(VOCAB) - 1}.*vocab_size 1000"):
        loader(directory, vocab_size=1000)
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        loader(directory, vocab_size=0)

    # HDF5 holds ids: one beyond the model's vocabulary is named with its shard, also from a worker.
    hdf5 = tmp_path / "hdf5"
    hdf5.mkdir()
    write_hdf5_shard(hdf5 / "a_training_0.hdf5", pairs[:10])
    write_hdf5_shard(hdf5 / "a_training_1.hdf5", pairs[10:20])
    assert len(list(get_pretraining_data_loader(hdf5, vocab_file=None, batch_size=4, vocab_size=biggest + 1))) == 5
    with h5py.File(hdf5 / "a_training_1.hdf5", "r+") as handle:
        ids = handle["input_ids"][...]
        ids[3, 2] = 40000
        handle["input_ids"][...] = ids
    for workers in (0, 1):
        data = get_pretraining_data_loader(hdf5, vocab_file=None, batch_size=4, vocab_size=30528,
                                           num_workers=workers)
        with pytest.raises(ShardError) as info:
            list(data)
        message = str(info.value)
        assert message.startswith(f"{hdf5 / 'a_training_1.hdf5'}: token id 40000 ") and "\n" not in message
        assert "30528" in message
    # Without vocab_size the ids are not checked (the model's embedding lookup would fail later).
    assert len(list(get_pretraining_data_loader(hdf5, vocab_file=None, batch_size=4))) == 5


def test_bad_arguments_name_the_argument(shards):
    with pytest.raises(ValueError, match="batch_size"):
        loader(shards, batch_size=0)
    with pytest.raises(ValueError, match="rank must be in"):
        loader(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few for 1000 ranks"):
        loader(shards, world_size=1000, rank=0)


# ---------------------------------------------------------------------------------------------------------------------
# The repository's own preprocessing output
# ---------------------------------------------------------------------------------------------------------------------

def lddl_source(directory: Path) -> Path:
    """An LDDL "source" file (one '<id> text' document per line) from paragraphs of the bundled licence."""
    text = (REPO / "vocab" / "LICENSE").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) > 20]
    directory.mkdir(parents=True)
    path = directory / "0.txt"
    path.write_text("".join(f"doc-{i} {p}\n" for i, p in enumerate(paragraphs)), encoding="utf-8")
    return path


def run_preprocess(tmp_path: Path, name: str, *flags: str) -> Path:
    sink = tmp_path / name
    source = lddl_source(tmp_path / f"{name}-source")
    assert preprocess_pretraining.main(["--wikipedia", str(source), "--sink", str(sink), "--num-blocks", "3",
                                        "--local-n-workers", "1", "--duplicate-factor", "2", "--target-seq-length",
                                        "64", "--sentence-splitter", "regex", *flags]) == 0
    return sink


def stored_rows(sink: Path) -> list[dict]:
    return [row for path in sorted(sink.glob("shard-*")) for row in pq.read_table(path).to_pylist()]


def test_loads_preprocess_pretraining_output(tmp_path):
    sink = run_preprocess(tmp_path, "dynamic")
    rows = stored_rows(sink)
    expected = collections.Counter((tuple(VOCAB[t] for t in r["A"].split()), tuple(VOCAB[t] for t in r["B"].split()),
                                    int(r["is_random_next"])) for r in rows)
    assert len(rows) == sum(json.loads((sink / ".num_samples.json").read_text()).values()) > 20
    seen = [s for rank in range(2) for batch in loader(sink, rank=rank, world_size=2, num_workers=2, batch_size=4,
                                                          masked_lm_prob=0.0, max_seq_length=64)
            for s in decode(batch)]
    assert len(seen) == len(rows) // 2 * 2 and not collections.Counter(seen) - expected
    for batch in loader(sink, batch_size=4, max_seq_length=64):
        assert (batch["labels"] != -1).any() and batch["input_ids"].shape[1] <= 64


def test_loads_statically_masked_binned_preprocess_output(tmp_path):
    sink = run_preprocess(tmp_path, "binned", "--masking", "--bin-size", "32")
    assert sorted({p.suffix for p in sink.glob("shard-*")}) == [".parquet_0", ".parquet_1"]
    expected = collections.Counter()
    for r in stored_rows(sink):
        ids = [CLS, *(VOCAB[t] for t in r["A"].split()), SEP, *(VOCAB[t] for t in r["B"].split()), SEP]
        labels = [-1] * len(ids)
        for p, t in zip(np.load(io.BytesIO(r["masked_lm_positions"])), r["masked_lm_labels"].split()):
            labels[p] = VOCAB[t]
        expected[tuple(ids), tuple(labels)] += 1
    seen = collections.Counter()
    for batch in loader(sink, batch_size=4, max_seq_length=64):
        lengths = batch["attention_mask"].sum(1)
        assert len({min(int(n - 1) // 32, 1) for n in lengths}) == 1  # one bin per batch
        for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths):
            seen[tuple(ids[:n].tolist()), tuple(labels[:n].tolist())] += 1
    assert seen == expected  # the stored masks, nothing added


def test_loads_create_pretraining_data_hdf5(tmp_path):
    text = (REPO / "vocab" / "LICENSE").read_text(encoding="utf-8")
    documents = [re.split(r"(?<=[.;:])\s+", " ".join(p.split())) for p in re.split(r"\n\s*\n", text)
                 if len(p.split()) > 20]
    source = tmp_path / "google_format.txt"
    source.write_text("\n\n".join("\n".join(d) for d in documents) + "\n", encoding="utf-8")
    output = tmp_path / "hdf5" / "licence_training_0.hdf5"
    output.parent.mkdir()
    assert create_pretraining_data.main(["--vocab_file", str(VOCAB_FILE), "--input_file", str(source),
                                         "--output_file", str(output), "--max_seq_length", "64",
                                         "--max_predictions_per_seq", "10", "--dupe_factor", "2"]) == 0
    with h5py.File(output) as handle:
        stored = {key: handle[key][:] for key in handle}
    expected = collections.Counter()
    for row in range(len(stored["input_ids"])):
        n = int(stored["input_mask"][row].sum())
        labels = np.full(n, -1)
        positions = stored["masked_lm_positions"][row]
        labels[positions[positions != 0]] = stored["masked_lm_ids"][row][positions != 0]
        expected[tuple(stored["input_ids"][row][:n]), tuple(stored["segment_ids"][row][:n]), tuple(labels),
                 int(stored["next_sentence_labels"][row])] += 1
    seen = collections.Counter()
    for batch in get_pretraining_data_loader(output.parent, vocab_file=VOCAB_FILE, batch_size=5, max_seq_length=64):
        for ids, types, labels, mask, nsp in zip(*(batch[k] for k in (
                "input_ids", "token_type_ids", "labels", "attention_mask", "next_sentence_labels"))):
            n = int(mask.sum())
            seen[tuple(ids[:n].tolist()), tuple(types[:n].tolist()), tuple(labels[:n].tolist()), int(nsp)] += 1
    assert seen == expected and sum(seen.values()) > 20
