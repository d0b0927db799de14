"""Tests for the pre-training data pipeline: extraction, sentence splitting, instances, Parquet/HDF5 shards, balance."""
from __future__ import annotations

import bz2
import collections
import functools
import http.server
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from xml.sax.saxutils import escape

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, shared_path

from data import balance_shards, create_pretraining_data, extract_wikipedia, preprocess_pretraining
from data.formats import HDF5_DTYPES, ShardError
from data.instances import (
    create_instances,
    mask_pairs,
    pair_tokens,
    tokenize_documents,
    truncated_lengths,
)
from data.preprocess_pretraining import PreprocessConfig, preprocess
from data.sample.build_sample import wikitext_articles
from data.sentences import split_sentences_blingfire, split_sentences_regex
from data.shards import find_shards
from tokenization import load_wordpiece

VOCAB_FILE = REPO / "vocab" / "vocab"
SAMPLE_SOURCE = REPO / "data" / "sample" / "source"
SAMPLE_GOOGLE = REPO / "data" / "sample" / "sample_text.txt"
SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "[MASK]"}


@pytest.fixture(scope="module")
def client():
    """One in-process Dask cluster for the module (threads, so it starts in well under a second)."""
    from dask.distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def wordpiece():
    return load_wordpiece(str(VOCAB_FILE), True)


def run_pipeline(client, sink: Path, sources=(SAMPLE_SOURCE / "en",), num_blocks: int = 3, **overrides) -> dict:
    config = PreprocessConfig(sink=str(sink), vocab_file=str(VOCAB_FILE), **overrides)
    return preprocess(config, [Path(s) for s in sources], client, num_blocks=num_blocks)


def read_rows(sink: Path, pattern: str = "shard-*") -> list[dict]:
    return [row for path in sorted(sink.glob(pattern)) for row in pq.read_table(path).to_pylist()]


def sequence(row: dict) -> list[str]:
    """The model input of an LDDL row, built as the loader builds it: [CLS] A [SEP] B [SEP]."""
    return ["[CLS]", *row["A"].split(), "[SEP]", *row["B"].split(), "[SEP]"]


def wikitext_documents(*names: str) -> list[list[str]]:
    lines = [line for name in names
             for line in shared_path("wikitext-2", name).read_text(encoding="utf-8").splitlines()]
    return [split_sentences_blingfire(text) for _, text in wikitext_articles(lines)]


# ---------------------------------------------------------------------------------------------------------------------
# Sentence splitting
# ---------------------------------------------------------------------------------------------------------------------

TRICKY = ("Dr. Smith went to Washington, D.C. on Jan. 5. He met Mr. J. R. R. Tolkien at 3 p.m. today. "
          "It cost $3.50! Really? Yes. The U.S. Army (est. 1775) fought e.g. in Europe.")
TRICKY_SENTENCES = ["Dr. Smith went to Washington, D.C. on Jan. 5.", "He met Mr. J. R. R. Tolkien at 3 p.m. today.",
                    "It cost $3.50!", "Really?", "Yes.", "The U.S. Army (est. 1775) fought e.g. in Europe."]


@pytest.mark.parametrize("split", [split_sentences_blingfire, split_sentences_regex])
def test_sentence_splitters_handle_abbreviations_and_decimals(split):
    assert split(TRICKY) == TRICKY_SENTENCES
    assert split("") == [] and split("   ") == []
    assert split("no terminal punctuation") == ["no terminal punctuation"]


def test_sentence_splitters_agree_on_real_wikipedia_text():
    text = shared_path("wikitext-2", "test.txt").read_text(encoding="utf-8")
    paragraphs = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("=")]
    bling = [s for p in paragraphs[:300] for s in split_sentences_blingfire(p)]
    regex = [s for p in paragraphs[:300] for s in split_sentences_regex(p)]
    # Nothing is lost or invented, and the two splitters find nearly the same boundaries.
    assert "".join(bling).replace(" ", "") == "".join(regex).replace(" ", "")
    assert abs(len(bling) - len(regex)) < 0.05 * len(bling) and len(bling) > 1000
    ends = sum(s.rstrip("\"' )").endswith((".", "!", "?")) for s in bling)
    assert ends > 0.95 * len(bling)


# ---------------------------------------------------------------------------------------------------------------------
# The Google instance algorithm
# ---------------------------------------------------------------------------------------------------------------------

def test_truncated_lengths_equal_the_reference_loop():
    for a in range(1, 25):
        for b in range(1, 25):
            for limit in range(2, 40):
                x, y = a, b
                while x + y > limit:  # google-research/bert truncate_seq_pair, token by token
                    if x > y:
                        x -= 1
                    else:
                        y -= 1
                got = truncated_lengths(np.array([a]), np.array([b]), limit)
                assert (int(got[0][0]), int(got[1][0])) == (x, y), (a, b, limit)


def test_tokenize_documents_drops_empty_sentences_and_documents(wordpiece):
    encode, _ = wordpiece
    docs = tokenize_documents([["Hello world.", "   ", "Bye."], ["\u200b"], [], ["One more."]], encode)
    assert len(docs) == 2 and docs.num_sentences == 3
    assert docs.document_offsets.tolist() == [0, 2, 3]
    assert docs.tokens.dtype == np.int32 and docs.num_tokens == docs.sentence_offsets[-1]


def test_instances_follow_the_google_algorithm(wordpiece):
    encode, _ = wordpiece
    documents = create_pretraining_data.read_documents([SAMPLE_GOOGLE])
    docs = tokenize_documents(list(documents), encode)
    sentence_start = set(docs.sentence_offsets.tolist())
    doc_of_token = np.repeat(np.arange(len(docs)), np.diff(docs.sentence_offsets[docs.document_offsets]))
    for max_len in (16, 64, 128):
        inst = create_instances(docs, max_len, 0.1, 5, random.Random(1), np.random.default_rng(1))
        assert len(inst) > 20
        assert (inst.a_len >= 1).all() and (inst.b_len >= 1).all() and (inst.num_tokens <= max_len).all()
        for i in range(len(inst)):
            a0, a1 = inst.a_start[i], inst.a_start[i] + inst.a_len[i]
            b0, b1 = inst.b_start[i], inst.b_start[i] + inst.b_len[i]
            assert doc_of_token[a0] == doc_of_token[a1 - 1] and doc_of_token[b0] == doc_of_token[b1 - 1]
            if inst.is_random_next[i]:
                assert doc_of_token[b0] != doc_of_token[a0]  # three documents: the random one is always another
            else:  # the actual continuation: same document, B after A (only truncation may cut between them)
                assert doc_of_token[b0] == doc_of_token[a0] and b0 >= a1
            if inst.num_tokens[i] < max_len:  # untruncated pairs start on sentence boundaries
                assert a0 in sentence_start and b0 in sentence_start


def test_static_masking_statistics_on_wikitext(wordpiece):
    encode, vocabulary = wordpiece
    docs = tokenize_documents(wikitext_documents("valid.txt"), encode)
    inst = create_instances(docs, 128, 0.1, 3, random.Random(0), np.random.default_rng(0))
    assert abs(inst.is_random_next.mean() - 0.5) < 0.05  # NSP labels near 50/50
    pairs = pair_tokens(docs, inst)
    original_a, original_b = pairs.a_ids.copy(), pairs.b_ids.copy()
    masked = mask_pairs(pairs, np.random.default_rng(1), 0.15, len(vocabulary), vocabulary.index("[MASK]"), 20)
    counts = np.diff(masked.offsets)
    assert counts.max() <= 20 and (counts >= 1).all()
    assert abs(len(masked.positions) / inst.num_tokens.sum() - 0.15) < 0.01
    # What each chosen position became: 80% [MASK], 10% unchanged, 10% a random word.
    full_masked, full_orig = [], []
    for i in range(len(inst)):
        a = slice(pairs.a_offsets[i], pairs.a_offsets[i + 1])
        b = slice(pairs.b_offsets[i], pairs.b_offsets[i + 1])
        full_masked.append(np.concatenate([[-1], pairs.a_ids[a], [-2], pairs.b_ids[b], [-2]]))
        full_orig.append(np.concatenate([[-1], original_a[a], [-2], original_b[b], [-2]]))
    became = np.concatenate([full_masked[i][masked.positions[masked.offsets[i]:masked.offsets[i + 1]]]
                             for i in range(len(inst))])
    rows = np.repeat(np.arange(len(inst)), counts)
    assert all((full_orig[r][p] == label) for r, p, label in zip(rows[:5000], masked.positions[:5000],
                                                                 masked.labels[:5000]))
    mask_share = np.mean(became == vocabulary.index("[MASK]"))
    keep_share = np.mean(became == masked.labels)
    assert abs(mask_share - 0.8) < 0.02 and abs(keep_share - 0.1) < 0.02
    assert abs((1 - mask_share - keep_share) - 0.1) < 0.02
    # Only the chosen positions changed, and [CLS]/[SEP] never did.
    for i in range(0, len(inst), 97):
        changed = set(np.flatnonzero(full_masked[i] != full_orig[i]).tolist())
        chosen = set(masked.positions[masked.offsets[i]:masked.offsets[i + 1]].tolist())
        assert changed <= chosen and 0 not in chosen and len(full_orig[i]) - 1 not in chosen


# ---------------------------------------------------------------------------------------------------------------------
# Dask pipeline -> LDDL Parquet shards (bundled sample corpus: runs in a fresh clone)
# ---------------------------------------------------------------------------------------------------------------------

def test_parquet_shards_schema_balance_and_layout(client, tmp_path):
    sink = tmp_path / "static"
    report = run_pipeline(client, sink, num_blocks=4, masking=True, target_seq_length=128)
    files = sorted(p.name for p in sink.iterdir())
    assert files == [".num_samples.json"] + [f"shard-{i}.parquet" for i in range(4)]
    counts = json.loads((sink / ".num_samples.json").read_text())
    assert counts == report["num_samples"] and max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == report["pairs"] > 1000
    schema = pq.read_schema(sink / "shard-0.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("A", "string"), ("B", "string"), ("is_random_next", "bool"), ("num_tokens", "uint16"),
        ("masked_lm_positions", "binary"), ("masked_lm_labels", "string")]
    vocab = set(VOCAB_FILE.read_text(encoding="utf-8").split("\n"))
    rows = read_rows(sink)
    assert len(rows) == sum(counts.values())
    masked = total = 0
    for row in rows:
        tokens = sequence(row)
        assert row["num_tokens"] == len(tokens) <= 128
        positions = np.load(io.BytesIO(row["masked_lm_positions"]))
        labels = row["masked_lm_labels"].split()
        assert positions.dtype == np.uint16 and len(positions) == len(labels) >= 1
        assert list(positions) == sorted(set(positions.tolist()))
        assert all(0 < p < len(tokens) - 1 and p != len(row["A"].split()) + 1 for p in positions)
        assert set(labels) <= vocab and not set(labels) & SPECIAL
        assert set(row["A"].split()) <= vocab and set(row["B"].split()) <= vocab
        masked += len(positions)
        total += len(tokens)
    assert abs(masked / total - 0.15) < 0.01
    assert 0.4 < np.mean([r["is_random_next"] for r in rows]) < 0.65


def test_dynamic_shards_hold_no_special_tokens_and_are_deterministic(client, tmp_path):
    first = run_pipeline(client, tmp_path / "one", num_blocks=3, duplicate_factor=2, sample_ratio=0.7)
    second = run_pipeline(client, tmp_path / "two", num_blocks=3, duplicate_factor=2, sample_ratio=0.7)
    rows = read_rows(tmp_path / "one")
    assert rows == read_rows(tmp_path / "two") and first["pairs"] == second["pairs"] == len(rows)
    assert pq.read_schema(tmp_path / "one" / "shard-0.parquet").names == ["A", "B", "is_random_next", "num_tokens"]
    for row in rows:
        assert not (set(row["A"].split()) | set(row["B"].split())) & SPECIAL
        assert row["num_tokens"] == len(sequence(row)) <= 128
    other_seed = run_pipeline(client, tmp_path / "three", num_blocks=3, duplicate_factor=2, sample_ratio=0.7, seed=7)
    assert read_rows(tmp_path / "three") != rows and other_seed["pairs"] > 0


def test_binning_puts_every_sample_in_its_bin(client, tmp_path):
    sink = tmp_path / "binned"
    run_pipeline(client, sink, num_blocks=2, target_seq_length=64, bin_size=16, masking=True, duplicate_factor=2)
    counts = json.loads((sink / ".num_samples.json").read_text())
    assert sorted(counts) == sorted(f"shard-{i}.parquet_{b}" for i in range(2) for b in range(4))
    for b in range(4):
        per_bin = [counts[f"shard-{i}.parquet_{b}"] for i in range(2)]
        assert max(per_bin) - min(per_bin) <= 1
        for path in sink.glob(f"shard-*.parquet_{b}"):
            table = pq.read_table(path)
            assert table.schema.field("bin_id").type == pa.int64()
            for row in table.to_pylist():
                assert row["bin_id"] == b and b * 16 < row["num_tokens"] <= (b + 1) * 16
                assert row["num_tokens"] == len(sequence(row))


def test_hdf5_output_format_from_the_dask_pipeline(client, tmp_path):
    sink = tmp_path / "hdf5"
    report = run_pipeline(client, sink, num_blocks=2, output_format="hdf5", max_predictions_per_seq=20,
                          duplicate_factor=1)
    assert sorted(p.name for p in sink.iterdir()) == ["training_0.hdf5", "training_1.hdf5"]
    total = 0
    for path in sink.iterdir():
        with h5py.File(path) as handle:
            assert handle["input_ids"].shape[1] == 128 and handle["masked_lm_ids"].shape[1] == 20
            total += len(handle["next_sentence_labels"])
    assert total == report["pairs"]


@pytest.mark.parametrize("overrides, message", [
    ({"bin_size": 50}, "--bin-size 50"),
    ({"target_seq_length": 4}, "--target-seq-length"),
    ({"vocab_file": "/nonexistent/vocab.txt"}, "--vocab-file"),
    ({"output_format": "hdf5"}, "--max-predictions-per-seq"),
    ({"max_predictions_per_seq": 20}, "needs --masking"),
])
def test_bad_settings_name_the_flag(overrides, message, tmp_path):
    settings = {"sink": str(tmp_path), "vocab_file": str(VOCAB_FILE), **overrides}
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**settings).validate()


def test_cli_rejects_bad_input_with_exit_status_2(tmp_path, capsys):
    assert preprocess_pretraining.main(["--wikipedia", str(tmp_path / "missing"), "--sink", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        preprocess_pretraining.main(["--sink", str(tmp_path / "s")])  # no source at all


def test_sink_with_shards_is_refused(client, tmp_path):
    sink = tmp_path / "sink"
    sink.mkdir()
    (sink / "shard-0.parquet").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already holds"):
        run_pipeline(client, sink)


# ---------------------------------------------------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------------------------------------------------

def write_parts(directory: Path, sizes: list[int], row_group_size: int = 7, name: str = "part.{}.parquet") -> list[str]:
    """Parquet files of one string column holding "sample <n>", n counting up through the files; returns them all."""
    directory.mkdir(parents=True, exist_ok=True)
    texts, n = [], 0
    for i, size in enumerate(sizes):
        values = [f"sample {n + j}" for j in range(size)]
        n += size
        texts += values
        table = pa.table({"A": pa.array(values, pa.string()), "num_tokens": pa.array(range(size), pa.uint16())})
        pq.write_table(table, directory / name.format(i), row_group_size=row_group_size)
    return texts


def test_balance_keeps_every_sample_and_evens_counts(tmp_path):
    texts = write_parts(tmp_path / "parts", [50, 0, 3, 120, 9])
    counts = balance_shards.balance_shards(tmp_path / "parts", 4)
    assert sorted(counts.values()) == [45, 45, 46, 46] and sorted(counts) == [f"shard-{i}.parquet" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [".num_samples.json"] + sorted(counts)
    rows = [r for i in range(4) for r in pq.read_table(tmp_path / "parts" / f"shard-{i}.parquet").to_pylist()]
    assert [r["A"] for r in rows] == texts  # order kept, nothing lost or duplicated
    assert pq.read_schema(tmp_path / "parts" / "shard-0.parquet").field("num_tokens").type == pa.uint16()
    # Balancing balanced shards again (in place, same names) is a no-op on the content.
    assert balance_shards.balance_shards(tmp_path / "parts", 4) == counts


def test_balance_cli_drop_remainder_keep_orig_and_outdir(tmp_path):
    write_parts(tmp_path / "parts", [10, 11])
    assert balance_shards.main(["--indir", str(tmp_path / "parts"), "--num-shards", "4", "--outdir",
                                str(tmp_path / "out"), "--keep-orig", "--drop-remainder"]) == 0
    counts = json.loads((tmp_path / "out" / ".num_samples.json").read_text())
    assert list(counts.values()) == [5, 5, 5, 5]
    assert (tmp_path / "parts" / "part.0.parquet").exists()
    assert balance_shards.main(["--indir", str(tmp_path / "empty"), "--num-shards", "2"]) == 2


def samples_on_disk(directory: Path) -> collections.Counter:
    """Samples in every Parquet file under ``directory``, hidden staging folders included (not temporaries)."""
    return collections.Counter(value for path in directory.rglob("*.parquet*") if not path.name.endswith(".tmp")
                               for value in pq.read_table(path).column("A").to_pylist())


def balanced_exactly(directory: Path, texts: list[str], num_shards: int) -> bool:
    """The finished state: only the shards and their counts, every sample once, in order, nothing else left over."""
    names = [f"shard-{i}.parquet" for i in range(num_shards)]
    rows = [value for name in names for value in pq.read_table(directory / name).column("A").to_pylist()]
    counts = json.loads((directory / ".num_samples.json").read_text())
    return (sorted(p.name for p in directory.iterdir()) == sorted([".num_samples.json", *names]) and rows == texts
            and counts == {name: pq.read_metadata(directory / name).num_rows for name in names})


# Runs data.balance_shards in a child process whose first deletion of an input kills it with SIGKILL: the moment
# between moving the new shards into place and deleting the inputs. Both os.unlink and Path.unlink are wrapped, as
# Path.unlink does not call os.unlink on every Python version.
KILL_AT_FIRST_INPUT_DELETION = """
import os, pathlib, signal, sys
sys.path.insert(0, sys.argv[1])
from data import balance_shards

inputs = set(sys.argv[2].split(","))
real_unlink, real_path_unlink = os.unlink, pathlib.Path.unlink

def kill_if_input(path):
    if os.path.basename(os.fspath(path)) in inputs:
        os.kill(os.getpid(), signal.SIGKILL)

def unlink(path, *args, **kwargs):
    kill_if_input(path)
    return real_unlink(path, *args, **kwargs)

def path_unlink(self, missing_ok=False):
    kill_if_input(self)
    return real_path_unlink(self, missing_ok)

os.unlink, os.remove, pathlib.Path.unlink = unlink, unlink, path_unlink
sys.exit(balance_shards.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("name", ["part.{}.parquet", "shard-{}.parquet"], ids=["parts", "in-place-same-names"])
def test_balance_killed_between_moving_shards_in_and_deleting_inputs_loses_nothing(tmp_path, name):
    directory = tmp_path / "parts"
    texts = write_parts(directory, [50, 0, 3, 120, 9], name=name)
    inputs = sorted(p.name for p in directory.iterdir())
    child = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_INPUT_DELETION, str(REPO), ",".join(inputs),
                            "--indir", str(directory), "--num-shards", "3"], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    visible = {p.name for p in directory.iterdir() if not p.name.startswith(".")}
    assert {f"shard-{i}.parquet" for i in range(3)} <= visible  # the new shards went in first ...
    assert set(inputs) <= visible  # ... and no input was deleted before that
    in_place = [value for i in range(3) for value in pq.read_table(directory / f"shard-{i}.parquet")["A"].to_pylist()]
    assert in_place == texts  # the shards in place hold every sample
    with pytest.raises(ShardError, match="interrupted"):  # old and new shards side by side: the loader refuses
        find_shards(directory)
    counts = balance_shards.balance_shards(directory, 3)  # the rerun completes the job
    assert counts == {"shard-0.parquet": 61, "shard-1.parquet": 61, "shard-2.parquet": 60}
    assert balanced_exactly(directory, texts, 3)


def interrupt_at(monkeypatch, owner, name: str, nth: int, matches) -> None:
    """Make ``owner.name`` (``os.replace``, ``Path.unlink``) raise KeyboardInterrupt at its ``nth`` matching call."""
    real = getattr(owner, name)
    seen = []

    def wrapper(path, *args, **kwargs):
        if matches(path, *args):
            seen.append(path)
            if len(seen) == nth:
                raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def inject_failure(monkeypatch, where: str, directory: Path, inputs: list[str]) -> None:
    if where == "writing shards":  # step 1: the inputs are untouched
        real_write_shard = balance_shards.write_shard
        written = []

        def write_shard(plan):
            if written:
                raise OSError("disk full")
            written.append(plan)
            return real_write_shard(plan)

        monkeypatch.setattr(balance_shards, "write_shard", write_shard)
    elif where == "moving shards in":  # step 3: one shard moved, the others still staged
        interrupt_at(monkeypatch, os, "replace", 2, lambda source, target: Path(source).parent.name.startswith(
            ".balance-") and Path(target).parent == directory)
    else:  # step 4, after the first input is gone
        interrupt_at(monkeypatch, Path, "unlink", 2, lambda path: path.name in inputs)


@pytest.mark.parametrize("where", ["writing shards", "moving shards in", "deleting inputs"])
@pytest.mark.parametrize("name", ["part.{}.parquet", "shard-{}.parquet"], ids=["parts", "in-place-same-names"])
def test_balance_interrupted_anywhere_loses_nothing_and_a_rerun_finishes(tmp_path, monkeypatch, name, where):
    directory = tmp_path / "parts"
    texts = write_parts(directory, [50, 0, 3, 120, 9], name=name)
    with monkeypatch.context() as patch:
        inject_failure(patch, where, directory, sorted(p.name for p in directory.iterdir()))
        with pytest.raises((OSError, KeyboardInterrupt)):
            balance_shards.balance_shards(directory, 3)
    on_disk = samples_on_disk(directory)
    assert not collections.Counter(texts) - on_disk  # every sample is still in the old or the new files
    if where == "writing shards":
        assert on_disk == collections.Counter(texts) and not list(directory.glob(".*"))  # as if never run
    balance_shards.balance_shards(directory, 3)
    assert balanced_exactly(directory, texts, 3)


def test_balance_rerun_with_other_arguments_completes_then_balances_anew(tmp_path, monkeypatch):
    directory = tmp_path / "parts"
    texts = write_parts(directory, [50, 0, 3, 120, 9])
    inputs = sorted(p.name for p in directory.iterdir())
    with monkeypatch.context() as patch:
        interrupt_at(patch, Path, "unlink", 1, lambda path: path.name in inputs)
        with pytest.raises(KeyboardInterrupt):
            balance_shards.balance_shards(directory, 3)
    assert balance_shards.balance_shards(directory, 2) == {"shard-0.parquet": 91, "shard-1.parquet": 91}
    assert balanced_exactly(directory, texts, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Reference HDF5 (create_pretraining_data)
# ---------------------------------------------------------------------------------------------------------------------

def test_create_pretraining_data_writes_the_reference_hdf5_schema(tmp_path):
    output = tmp_path / "out" / "sample_training.hdf5"
    assert create_pretraining_data.main([
        "--vocab_file", str(VOCAB_FILE), "--input_file", str(SAMPLE_GOOGLE), "--output_file", str(output),
        "--max_seq_length", "128", "--max_predictions_per_seq", "20", "--dupe_factor", "5"]) == 0
    vocab = VOCAB_FILE.read_text(encoding="utf-8").split("\n")
    cls, sep, mask = vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("[MASK]")
    with h5py.File(output) as handle:
        assert sorted(handle) == sorted(HDF5_DTYPES)
        n = len(handle["next_sentence_labels"])
        for name, dtype in HDF5_DTYPES.items():
            assert handle[name].dtype == np.dtype(dtype) and handle[name].compression == "gzip"
            assert handle[name].shape[0] == n
        arrays = {name: handle[name][:] for name in handle}
    assert arrays["input_ids"].shape == (n, 128) and arrays["masked_lm_positions"].shape == (n, 20) and n > 50
    assert set(np.unique(arrays["next_sentence_labels"])) <= {0, 1}
    for row in range(n):
        ids, mask_row, segments = arrays["input_ids"][row], arrays["input_mask"][row], arrays["segment_ids"][row]
        length = int(mask_row.sum())
        assert (mask_row[:length] == 1).all() and (ids[length:] == 0).all() and (segments[length:] == 0).all()
        seps = np.flatnonzero(ids[:length] == sep)
        first_b = int(np.argmax(segments))
        assert ids[0] == cls and seps[-1] == length - 1 and ids[first_b - 1] == sep
        assert (segments[:first_b] == 0).all() and (segments[first_b:length] == 1).all()
        positions = arrays["masked_lm_positions"][row]
        count = int((positions > 0).sum())
        assert (positions[count:] == 0).all() and (arrays["masked_lm_ids"][row][count:] == 0).all()
        assert count == min(20, max(1, round(length * 0.15)))
        assert list(positions[:count]) == sorted(positions[:count]) and positions[count - 1] < length - 1
        assert first_b - 1 not in positions[:count]
    positions = arrays["masked_lm_positions"]
    masked = arrays["input_ids"][np.arange(n)[:, None], positions][positions > 0]
    assert 0.7 < np.mean(masked == mask) < 0.9


def test_create_pretraining_data_reports_missing_input(tmp_path, capsys):
    assert create_pretraining_data.main(["--vocab_file", str(VOCAB_FILE), "--input_file", str(tmp_path / "none"),
                                         "--output_file", str(tmp_path / "x.hdf5")]) == 2
    assert "--input_file" in capsys.readouterr().err
    assert not (tmp_path / "x.hdf5").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Wikipedia dump -> extraction -> shards
# ---------------------------------------------------------------------------------------------------------------------

FIXTURE_PAGES = [
    (10, 0, "Lobster", None,
     "{{Infobox animal|name=Lobster|image=Lobster.jpg}}\n'''Lobsters''' are a family of large marine "
     "[[crustacean]]s.<ref name=\"a\">{{cite web|url=http://example.org|title=Lobsters}}</ref> They live on rocky, "
     "sandy, or muddy bottoms from the [[shoreline]] to beyond the edge of the [[continental shelf]]. Lobsters are "
     "[[invertebrate]]s with a hard protective [[exoskeleton]].<!-- hidden comment --> They are about "
     "{{convert|25|cm|in}} long.\n[[File:Lobster.jpg|thumb|A lobster in [[Maine]]]]\n== Biology ==\nLobsters "
     "[[Moulting|moult]] several times a year when young. Older lobsters moult less often.\n"
     "{| class=\"wikitable\"\n|-\n! Year !! Catch\n|-\n| 2000 || 12 t\n|}\n* a list item that is dropped\n"
     "== References ==\n{{reflist}}\n[[Category:Crustaceans]]\n[[de:Hummer]]"),
    (11, 0, "Homard", "Lobster", "#REDIRECT [[Lobster]]"),
    (12, 1, "Talk:Lobster", None, "This talk page text must not be extracted."),
    (13, 0, "Mercury (disambiguation)", None,
     "'''Mercury''' may refer to:\n* [[Mercury (planet)]]\n{{disambiguation}}"),
    (14, 0, "Crab", None,
     "'''Crabs''' are [[decapod]] crustaceans of the [[infraorder]] Brachyura. They typically have a very short "
     "projecting tail. Crabs live in all the world's oceans, in fresh water, and on land.\n\nMany crabs are eaten by "
     "people. Dr. Smith studied them in the U.S. for many years. The largest is the Japanese spider crab."),
    (15, 0, "Shrimp", None,
     "'''Shrimp''' are crustaceans with elongated bodies.{{citation needed}} They swim forward by paddling with "
     "swimmerets. Shrimp are widespread and abundant. There are thousands of species. Some are fished commercially."),
]


def write_dump(path: Path, copies: int = 1) -> Path:
    """A small MediaWiki export (export-0.10 schema) with articles, a redirect, a talk page and a disambiguation."""
    parts = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n',
             "  <siteinfo><sitename>Wikipedia</sitename><dbname>enwiki</dbname></siteinfo>\n"]
    for copy in range(copies):
        for page_id, ns, title, redirect, text in FIXTURE_PAGES:
            parts.append(
                f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n"
                f"    <id>{page_id + 100 * copy}</id>\n"
                + (f'    <redirect title="{escape(redirect)}" />\n' if redirect else "")
                + f"    <revision>\n      <id>{900 + page_id}</id>\n      <model>wikitext</model>\n"
                f'      <text bytes="{len(text)}" xml:space="preserve">{escape(text)}</text>\n'
                "    </revision>\n  </page>\n")
    parts.append("</mediawiki>\n")
    path.write_bytes(bz2.compress("".join(parts).encode("utf-8")))
    return path


def test_extraction_cleans_markup_and_skips_non_articles(tmp_path):
    dump = write_dump(tmp_path / "enwiki-pages-articles.xml.bz2")
    report = extract_wikipedia.extract(dump, tmp_path / "source", num_workers=0)
    lines = (tmp_path / "source" / "0.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["wiki-10", "wiki-14", "wiki-15"]
    assert report.stats["skipped_redirect"] == 1 and report.stats["skipped_namespace"] == 1
    assert report.stats["skipped_empty_or_disambiguation"] == 1
    lobster = lines[0]
    assert lobster.startswith("wiki-10 Lobsters are a family of large marine crustaceans. They live on rocky,")
    assert "exoskeleton. They are about 25 cm long. Lobsters moult several times a year" in lobster
    for junk in ("Infobox", "cite", "http", "hidden", "Lobster.jpg", "Maine", "Catch", "list item", "Category",
                 "Hummer", "Biology", "{", "[", "<", "'''"):
        assert junk not in lobster
    assert "Crabs live in all the world's oceans, in fresh water, and on land. Many crabs are eaten" in lines[1]


def test_extraction_in_parallel_matches_serial_and_rolls_files(tmp_path):
    dump = write_dump(tmp_path / "dump.xml.bz2", copies=40)
    serial = extract_wikipedia.extract(dump, tmp_path / "serial", num_workers=0)
    parallel = extract_wikipedia.extract(dump, tmp_path / "parallel", num_workers=2, shard_bytes=4096,
                                         batch_bytes=2048)
    assert len(parallel.files) > 3 and serial.stats["written"] == parallel.stats["written"] == 120

    def text(directory: Path) -> str:
        files = sorted(directory.glob("*.txt"), key=lambda path: int(path.stem))
        return "".join(path.read_text(encoding="utf-8") for path in files)

    assert text(tmp_path / "serial") == text(tmp_path / "parallel")
    assert not list((tmp_path / "parallel").glob(".*"))  # no temporary files left
    with pytest.raises(FileExistsError):
        extract_wikipedia.extract(dump, tmp_path / "serial", num_workers=0)


def test_extraction_cli_reports_bad_dumps(tmp_path, capsys):
    (tmp_path / "broken.xml.bz2").write_bytes(bz2.compress(b"<mediawiki><page><title>x</title>"))
    assert extract_wikipedia.main(["--input", str(tmp_path / "broken.xml.bz2"), "--output-dir",
                                   str(tmp_path / "out"), "--num-workers", "0"]) == 2
    assert "not a well-formed" in capsys.readouterr().err
    assert extract_wikipedia.main(["--input", str(tmp_path / "none.bz2"), "--output-dir", str(tmp_path / "o")]) == 2


@pytest.fixture
def http_server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1 (an ephemeral port) for the download step."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wikipedia_dump_downloaded_extracted_and_sharded(client, tmp_path, http_server):
    from file_utils import cached_path

    root, url = http_server
    write_dump(root / "enwiki-latest-pages-articles.xml.bz2", copies=15)
    dump = cached_path(f"{url}/enwiki-latest-pages-articles.xml.bz2", cache_dir=tmp_path / "cache", progress=False)
    source = tmp_path / "wikipedia" / "source"
    extract_wikipedia.extract(dump, source, num_workers=0)
    sink = tmp_path / "shards"
    report = run_pipeline(client, sink, sources=[source], num_blocks=2, masking=True, target_seq_length=64,
                          sample_ratio=1.0, duplicate_factor=3)
    assert report["documents"] == 45
    counts = json.loads((sink / ".num_samples.json").read_text())
    assert sorted(counts) == ["shard-0.parquet", "shard-1.parquet"] and abs(counts["shard-0.parquet"]
                                                                                - counts["shard-1.parquet"]) <= 1
    rows = read_rows(sink)
    words = " ".join(r["A"] + " " + r["B"] for r in rows)
    assert "lobster" in words and "crab" in words and "talk" not in words.split()
    assert all(r["num_tokens"] == len(sequence(r)) <= 64 for r in rows)
