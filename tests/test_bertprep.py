"""Tests for data/bertPrep.py: the reference's --action/--dataset pairs mapped onto the project's data modules."""
from __future__ import annotations

import bz2
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
from conftest import REPO

from data import download, extract_wikipedia
from data.formats import inspect_hdf5, read_hdf5_rows
from data.shards import find_shards

bertprep = importlib.import_module("data.bertPrep")
VOCAB = REPO / "vocab" / "vocab"
WIKITEXT = REPO / "data" / "sample" / "source" / "en" / "wikitext2_valid.txt"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BERT_PREP_WORKING_DIR", str(tmp_path / "wd"))
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    return tmp_path / "wd"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace the downloaders by recorders: no network, and the calls are the mapping under test."""
    calls: list[tuple] = []

    def recorder(name: str):
        def record(*args, **kwargs):
            calls.append((name, *map(str, args), *(f"{k}={v}" for k, v in kwargs.items())))
            return extract_wikipedia.ExtractionReport() if name == "extract" else Path("/recorded")
        return record

    for name in ("download_wikipedia", "download_glue_task", "download_squad", "download_vocab"):
        monkeypatch.setattr(download, name, recorder(name))
    monkeypatch.setattr(extract_wikipedia, "extract", recorder("extract"))
    return calls


@pytest.mark.parametrize("dataset,expected", [
    ("wikicorpus_en", [("download_wikipedia", "{wd}", "en", "None")]),
    ("wikicorpus_zh", [("download_wikipedia", "{wd}", "zh", "None")]),
    ("squad", [("download_squad", "{wd}", "None")]),
    ("mrpc", [("download_glue_task", "MRPC", "{wd}", "None")]),
    ("sst-2", [("download_glue_task", "SST-2", "{wd}", "None")]),
    ("google_pretrained_weights", [("download_vocab", "{wd}", "None")]),
    ("all", [("download_wikipedia", "{wd}", "en", "None"), ("download_wikipedia", "{wd}", "zh", "None"),
             ("download_vocab", "{wd}", "None"), ("download_glue_task", "MRPC", "{wd}", "None"),
             ("download_glue_task", "SST-2", "{wd}", "None"), ("download_squad", "{wd}", "None")]),
])
def test_download_runs_the_project_downloaders(workdir, recorded, dataset, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="bertPrep"):
        assert bertprep.main(["--action", "download", "--dataset", dataset]) == 0
    assert recorded == [tuple(word.format(wd=workdir) for word in call) for call in expected]
    if dataset == "all":
        assert "skipping bookscorpus and nvidia_pretrained_weights" in caplog.text
    if dataset == "google_pretrained_weights":
        assert "only the uncased vocab.txt" in caplog.text


def test_download_passes_the_mirror_and_lands_where_the_reference_configs_look(workdir, recorded, monkeypatch):
    monkeypatch.setenv(download.MIRROR_ENV, "/srv/mirror")
    assert bertprep.main(["--action", "download", "--dataset", "mrpc"]) == 0
    assert recorded == [("download_glue_task", "MRPC", str(workdir), "/srv/mirror")]
    # google_pretrained_weights -> the vocab the reference's create_hdf5_files step reads.
    assert download.VOCAB_PATH == Path("download/google_pretrained_weights/uncased_L-24_H-1024_A-16/vocab.txt")


@pytest.mark.parametrize("action,dataset,reason", [
    ("download", "bookscorpus", "no BookCorpus downloader"),
    ("download", "nvidia_pretrained_weights", "published on NGC"),
    ("download", "books_wiki_en_corpus", "no BookCorpus downloader"),
    ("text_formatting", "wikicorpus_zh", "segmentation"),
    ("text_formatting", "squad", ""),
    ("sharding", "all", ""),
    ("sharding", "mrpc", ""),
    ("create_tfrecord_files", "wikicorpus_en", "use create_hdf5_files"),
    ("create_hdf5_files", "google_pretrained_weights", ""),
])
def test_pairs_without_counterpart_are_errors_listing_what_is_supported(workdir, recorded, capsys, action,
                                                                        dataset, reason):
    assert bertprep.main(["--action", action, "--dataset", dataset]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bertPrep.py: error: --action {action} --dataset {dataset} has no counterpart"), err
    supported = ", ".join(bertprep.SUPPORTED[action]) or "none"
    assert f"Supported with --action {action}: {supported}" in err and reason in err
    assert recorded == [] and not workdir.exists()  # nothing ran, nothing was written


def test_text_formatting_maps_to_the_extractor_and_skips_a_finished_extraction(workdir, recorded, caplog):
    dump = workdir / "wikipedia" / "wikicorpus-en.xml.bz2"
    assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en"]) == 1  # no dump yet
    dump.parent.mkdir(parents=True)
    dump.write_bytes(b"")
    assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en", "--n_processes", "3"]) == 0
    assert recorded == [("extract", str(dump), str(workdir / "wikipedia" / "source" / "en"), "num_workers=3")]
    assert (workdir / "wikipedia" / ".extracted").is_file()  # what create_datasets_from_start.sh checks
    with caplog.at_level(logging.INFO, logger="bertPrep"):
        assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en"]) == 0
    assert len(recorded) == 1 and "skipping" in caplog.text
    # --skip_wikiextractor 1 only checks that the articles are there.
    assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en",
                          "--skip_wikiextractor", "1"]) == 1
    (workdir / "wikipedia" / "source" / "en").mkdir(parents=True)
    (workdir / "wikipedia" / "source" / "en" / "0.txt").write_text("wiki-1 Text.\n")
    assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en",
                          "--skip_wikiextractor", "1"]) == 0
    assert len(recorded) == 1


def test_text_formatting_extracts_a_real_dump(workdir):
    pages = [(10, "Otter", "'''Otters''' are [[mammal]]s that swim. They eat fish.{{cite web|url=x}}"),
             (11, "Heron", "A '''heron''' is a wading bird. It has long legs.")]
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">']
    for page_id, title, text in pages:
        xml.append(f"<page><title>{title}</title><ns>0</ns><id>{page_id}</id><revision><id>1</id>"
                   f'<text xml:space="preserve">{escape(text)}</text></revision></page>')
    xml.append("</mediawiki>")
    dump = workdir / "wikipedia" / "wikicorpus-en.xml.bz2"
    dump.parent.mkdir(parents=True)
    dump.write_bytes(bz2.compress("\n".join(xml).encode()))
    assert bertprep.main(["--action", "text_formatting", "--dataset", "wikicorpus_en", "--n_processes", "1"]) == 0
    assert (workdir / "wikipedia" / "source" / "en" / "0.txt").read_text().splitlines() == [
        "wiki-10 Otters are mammals that swim. They eat fish.", "wiki-11 A heron is a wading bird. It has long legs."]


def test_assign_articles_is_balanced_complete_and_keeps_the_test_fraction():
    sizes = [(7 * i) % 23 + 1 for i in range(200)]
    training, test = bertprep.assign_articles(sizes, 8, 2, 0.1, seed=3)
    placed = [a for shard in training + test for a in shard]
    assert sorted(placed) == list(range(200)) and all(training) and all(test)
    test_share = sum(sizes[a] for shard in test for a in shard) / sum(sizes)
    assert 0.1 <= test_share < 0.1 + max(sizes) / sum(sizes)
    totals = [sum(sizes[a] for a in shard) for shard in training]
    assert max(totals) - min(totals) <= max(sizes)
    assert bertprep.assign_articles(sizes, 8, 2, 0.1, seed=3) == (training, test)  # deterministic
    with pytest.raises(ValueError, match="3 articles cannot fill 2 training \\+ 2 test shards"):
        bertprep.assign_articles([1, 2, 3], 2, 2, 0.1, seed=0)


def test_sharding_then_create_hdf5_files_end_to_end(workdir, capsys):
    # Six articles of the bundled corpus in the text_formatting output layout (wiki-<id> text).
    source = workdir / "wikipedia" / "source" / "en"
    source.mkdir(parents=True)
    articles = WIKITEXT.read_text(encoding="utf-8").splitlines()[:6]
    (source / "0.txt").write_text("\n".join(f"wiki-{i} {a.split(' ', 1)[1][:3000]}" for i, a in enumerate(articles))
                                  + "\n", encoding="utf-8")
    shards = ["--n_training_shards", "3", "--n_test_shards", "1", "--fraction_test_set", "0.2"]
    assert bertprep.main(["--action", "sharding", "--dataset", "wikicorpus_en", *shards,
                          "--segmentation_method", "regex"]) == 0
    sharded = workdir / "sharded_training_shards_3_test_shards_1_fraction_0.2" / "wikicorpus_en"
    names = ["wikicorpus_en_training_0", "wikicorpus_en_training_1", "wikicorpus_en_training_2",
             "wikicorpus_en_test_0"]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(f"{n}.txt" for n in names)
    documents = [doc for n in names for doc in (sharded / f"{n}.txt").read_text().split("\n\n") if doc.strip()]
    assert len(documents) == 6 and all(len(doc.splitlines()) > 3 for doc in documents)  # one sentence a line
    assert not any(line.startswith("wiki-") for doc in documents for line in doc.splitlines())

    hdf5 = ["--action", "create_hdf5_files", "--dataset", "wikicorpus_en", *shards, "--max_seq_length", "64",
            "--max_predictions_per_seq", "10", "--dupe_factor", "1", "--n_processes", "1"]
    assert bertprep.main(hdf5) == 1 and "needs --vocab_file" in capsys.readouterr().err
    assert bertprep.main([*hdf5, "--vocab_file", str(VOCAB)]) == 0
    out = workdir / ("hdf5_lower_case_1_seq_len_64_max_pred_10_masked_lm_prob_0.15_random_seed_12345_"
                     "dupe_factor_1") / "wikicorpus_en"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.hdf5" for n in names)
    assert all(inspect_hdf5(str(out / f"{n}.hdf5")) > 0 for n in names)
    # run_pretraining's loader takes the training files of this folder, as the reference's did.
    assert sorted(Path(s.path).name for s in find_shards(out).shards) == sorted(f"{n}.hdf5" for n in names[:3])
    # A rerun skips the complete files; other shard counts find no text shards and say how to make them.
    before = {n: (out / f"{n}.hdf5").stat().st_mtime_ns for n in names}
    assert bertprep.main([*hdf5, "--vocab_file", str(VOCAB)]) == 0
    assert {n: (out / f"{n}.hdf5").stat().st_mtime_ns for n in names} == before
    # Two missing files are made again by two worker processes, with the same content (same seed and text).
    def rows(name: str) -> dict:
        path = str(out / f"{name}.hdf5")
        return read_hdf5_rows(path, 0, inspect_hdf5(path))

    made = {n: rows(n) for n in names[1:3]}
    for n in names[1:3]:
        (out / f"{n}.hdf5").unlink()
    assert bertprep.main([*hdf5, "--vocab_file", str(VOCAB), "--n_processes", "2"]) == 0
    for n in names[1:3]:
        again = rows(n)
        assert all(np.array_equal(again[key], made[n][key]) for key in made[n])
    assert (out / f"{names[0]}.hdf5").stat().st_mtime_ns == before[names[0]]
    capsys.readouterr()
    assert bertprep.main([*hdf5, "--vocab_file", str(VOCAB), "--n_training_shards", "4"]) == 1
    assert "run --action sharding with the same --n_training_shards" in capsys.readouterr().err


def test_sharding_inputs_and_settings_errors(workdir, tmp_path, capsys):
    assert bertprep.main(["--action", "sharding", "--dataset", "wikicorpus_en"]) == 1
    assert "run --action text_formatting --dataset wikicorpus_en first" in capsys.readouterr().err
    assert bertprep.main(["--action", "sharding", "--dataset", "bookscorpus"]) == 1
    assert "needs --input_files" in capsys.readouterr().err
    assert bertprep.main(["--action", "sharding", "--dataset", "wikicorpus_en", "--segmentation_method", "nltk"]) == 1
    assert "--segmentation_method nltk is not available" in capsys.readouterr().err
    # --input_files: the reference's formatted files, one article per line, no id word.
    books = tmp_path / "books.txt"
    books.write_text("One book here. It ends.\n\nAnother book. It is short.\nA third one. Yes.\n")
    assert bertprep.main(["--action", "sharding", "--dataset", "bookscorpus", "--input_files", str(books),
                          "--n_training_shards", "2", "--n_test_shards", "1", "--segmentation_method", "regex"]) == 0
    folder = workdir / "sharded_training_shards_2_test_shards_1_fraction_0.1" / "bookscorpus"
    text = "".join((folder / f"bookscorpus_{s}.txt").read_text() for s in ("training_0", "training_1", "test_0"))
    assert sorted(text.split("\n\n")[:-1]) == ["A third one.\nYes.", "Another book.\nIt is short.",
                                               "One book here.\nIt ends."]
    assert bertprep.main(["--action", "sharding", "--dataset", "bookscorpus", "--input_files", str(books)]) == 1
    assert "3 articles cannot fill 256 training + 256 test shards" in capsys.readouterr().err


def test_runs_as_the_reference_calls_it(tmp_path):
    env = {**os.environ, "BERT_PREP_WORKING_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "data/bertPrep.py", "--action", "download", "--dataset", "bookscorpus"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no BookCorpus downloader" in done.stderr
