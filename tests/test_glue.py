"""Tests for data/glue.py (GLUE readers, features, metrics) and run_glue.py (end to end on CPU)."""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared_path

from data import glue

# ---------------------------------------------------------------------------------------------------------------
# Processors: small files in the exact layout of the official GLUE download
# ---------------------------------------------------------------------------------------------------------------


def write(folder: Path, name: str, lines: list[str], bom: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def tsv(*fields: str) -> str:
    return "\t".join(fields)


def test_cola(tmp_path):
    # train/dev: no header; source, label, original label ("*" for unacceptable), sentence.
    write(tmp_path, "train.tsv", [tsv("gj04", "1", "", "Our friends won't buy this analysis."),
                                  tsv("gj04", "0", "*", 'They drank the pub "dry".')])
    write(tmp_path, "dev.tsv", [tsv("gj04", "1", "", "One more pseudo generalization.")])
    write(tmp_path, "test.tsv", [tsv("index", "sentence"), tsv("0", "Bill whistled past the house."),
                                 tsv("1", "The car honked its way down the road.")])
    p = glue.get_processor("cola")
    train = p.get_train_examples(tmp_path)
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in train] == [
        ("train-0", "Our friends won't buy this analysis.", None, "1"),
        ("train-1", 'They drank the pub "dry".', None, "0")]
    assert p.get_dev_examples(tmp_path)[0].label == "1"
    test = p.get_test_examples(tmp_path)
    assert [(e.guid, e.text_a, e.label) for e in test] == [
        ("test-0", "Bill whistled past the house.", None), ("test-1", "The car honked its way down the road.", None)]
    assert p.get_labels() == ["0", "1"] and p.num_labels == 2


def test_sst2(tmp_path):
    # As GLUE ships it: a space before the tab; bare quotes are text, not CSV quoting.
    write(tmp_path, "train.tsv", [tsv("sentence", "label"), tsv("hide new secretions from the parental units ", "0"),
                                  tsv('a " quoted " film ', "1")])
    write(tmp_path, "dev.tsv", [tsv("sentence", "label"), tsv("it 's a charming journey . ", "1")])
    write(tmp_path, "test.tsv", [tsv("index", "sentence"), tsv("0", "uneasy mishmash of styles and genres .")])
    p = glue.get_processor("SST-2")
    train = p.get_train_examples(tmp_path)
    assert [(e.guid, e.text_a, e.label) for e in train] == [
        ("train-1", "hide new secretions from the parental units ", "0"), ("train-2", 'a " quoted " film ', "1")]
    assert p.get_dev_examples(tmp_path)[0].guid == "dev-1"
    assert [(e.guid, e.label) for e in p.get_test_examples(tmp_path)] == [("test-0", None)]


def test_mrpc_bom_and_quotes(tmp_path):
    head = tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    write(tmp_path, "train.tsv", [head, tsv("1", "702876", "702977", 'He called "the witness" a liar.',
                                            'Referring to him as "the witness", he lied.')], bom=True)
    write(tmp_path, "dev.tsv", [head, tsv("0", "1", "2", "A b.", "C d.")], bom=True)
    write(tmp_path, "test.tsv", [tsv("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                                 tsv("0", "1089874", "1089925", "PCCW's chief.", "Current Chief.")])
    p = glue.get_processor("mrpc")
    (ex,) = p.get_train_examples(tmp_path)
    assert (ex.guid, ex.text_a, ex.text_b, ex.label) == (
        "train-1", 'He called "the witness" a liar.', 'Referring to him as "the witness", he lied.', "1")
    (ex,) = p.get_test_examples(tmp_path)
    assert (ex.guid, ex.text_a, ex.text_b, ex.label) == ("test-0", "PCCW's chief.", "Current Chief.", None)


def test_stsb_regression(tmp_path):
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    write(tmp_path, "train.tsv", [tsv(*head, "score"),
                                  tsv("0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                                      "A plane is taking off.", "An air plane is taking off.", "5.000"),
                                  tsv("1", "main-captions", "MSRvid", "2012test", "0004", "none", "none",
                                      "A man is playing a large flute.", "A man is playing a flute.", "3.800")])
    write(tmp_path, "test.tsv", [tsv(*head), tsv("0", "main-captions", "MSRvid", "2012test", "0024", "none", "none",
                                                  "A girl is styling her hair.", "A girl is brushing her hair.")])
    p = glue.get_processor("sts-b")
    assert p.is_regression and p.num_labels == 1 and p.get_labels() == []
    train = p.get_train_examples(tmp_path)
    assert [(e.guid, e.text_b, e.label) for e in train] == [
        ("train-0", "An air plane is taking off.", "5.000"), ("train-1", "A man is playing a flute.", "3.800")]
    assert p.get_test_examples(tmp_path)[0].text_a == "A girl is styling her hair."
    write(tmp_path / "bad", "train.tsv", [tsv(*head, "score"), tsv(*["x"] * 9, "high")])
    with pytest.raises(glue.GlueDataError, match=r"train\.tsv, line 2: label 'high' is not a finite number"):
        p.get_train_examples(tmp_path / "bad")


def test_qqp(tmp_path):
    write(tmp_path, "train.tsv", [tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                                  tsv("133273", "213221", "213222", "How is the life of a math student?",
                                      "Which level of prepration is enough?", "0")])
    write(tmp_path, "test.tsv", [tsv("id", "question1", "question2"), tsv("0", "Why do rockets look white?",
                                                                          "Why are rockets white?")])
    p = glue.get_processor("qqp")
    (ex,) = p.get_train_examples(tmp_path)
    assert (ex.guid, ex.text_a, ex.label) == ("train-133273", "How is the life of a math student?", "0")
    (ex,) = p.get_test_examples(tmp_path)
    assert (ex.guid, ex.text_b, ex.label) == ("test-0", "Why are rockets white?", None)


MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(index: str, *labels: str) -> str:
    return tsv(index, "31193", "31193n", "government", "( ( x ) )", "( y )", "(ROOT x)", "(ROOT y)",
               f"premise {index}", f"hypothesis {index}", *labels)


def test_mnli_matched_and_mismatched(tmp_path):
    # train: one annotator label + gold; dev: five annotator labels + gold; test: no label columns.
    write(tmp_path, "train.tsv", [tsv(*MNLI_HEAD, "label1", "gold_label"), mnli_row("0", "neutral", "neutral")])
    dev_head = tsv(*MNLI_HEAD, "label1", "label2", "label3", "label4", "label5", "gold_label")
    write(tmp_path, "dev_matched.tsv", [dev_head, mnli_row("0", *["entailment"] * 5, "entailment")])
    write(tmp_path, "dev_mismatched.tsv", [dev_head, mnli_row("7", *["contradiction"] * 5, "contradiction")])
    write(tmp_path, "test_matched.tsv", [tsv(*MNLI_HEAD), mnli_row("3")])
    write(tmp_path, "test_mismatched.tsv", [tsv(*MNLI_HEAD), mnli_row("4")])
    m, mm = glue.get_processor("mnli"), glue.get_processor("mnli-mm")
    assert m.get_labels() == ["contradiction", "entailment", "neutral"] == mm.get_labels()
    (ex,) = m.get_train_examples(tmp_path)
    assert (ex.guid, ex.text_a, ex.text_b, ex.label) == ("train-0", "premise 0", "hypothesis 0", "neutral")
    assert [(e.guid, e.label) for e in m.get_dev_examples(tmp_path)] == [("dev-0", "entailment")]
    assert [(e.guid, e.label) for e in mm.get_dev_examples(tmp_path)] == [("dev-7", "contradiction")]
    assert [(e.guid, e.label) for e in m.get_test_examples(tmp_path)] == [("test-3", None)]
    assert [e.guid for e in mm.get_test_examples(tmp_path)] == ["test-4"]
    assert mm.get_train_examples(tmp_path)[0].label == "neutral"


@pytest.mark.parametrize("task,labels,a,b", [
    ("qnli", ("entailment", "not_entailment"), "question", "sentence"),
    ("rte", ("entailment", "not_entailment"), "sentence1", "sentence2"),
    ("wnli", ("0", "1"), "sentence1", "sentence2"),
])
def test_nli_pairs(tmp_path, task, labels, a, b):
    write(tmp_path, "train.tsv", [tsv("index", a, b, "label"), tsv("0", "first", "second", labels[1]),
                                  tsv("1", "third", "fourth", labels[0])])
    write(tmp_path, "dev.tsv", [tsv("index", a, b, "label"), tsv("5", "x", "y", labels[0])])
    write(tmp_path, "test.tsv", [tsv("index", a, b), tsv("9", "p", "q")])
    p = glue.get_processor(task)
    assert p.get_labels() == list(labels)
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in p.get_train_examples(tmp_path)] == [
        ("train-0", "first", "second", labels[1]), ("train-1", "third", "fourth", labels[0])]
    assert [(e.guid, e.label) for e in p.get_dev_examples(tmp_path)] == [("dev-5", labels[0])]
    assert [(e.guid, e.text_b, e.label) for e in p.get_test_examples(tmp_path)] == [("test-9", "q", None)]


def test_every_reference_task_name_has_a_processor():
    assert set(glue.PROCESSORS) == {"cola", "sst-2", "mrpc", "sts-b", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli"}


def test_wrong_column_count_names_file_and_line(tmp_path):
    head = tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    path = write(tmp_path, "train.tsv", [head, tsv("1", "1", "2", "a", "b"), tsv("0", "3", "4", "c\td", "e")])
    with pytest.raises(glue.GlueDataError, match=rf"{path}, line 3: expected 5 tab-separated columns, found 6"):
        glue.get_processor("mrpc").get_train_examples(tmp_path)
    path = write(tmp_path, "dev.tsv", [tsv("gj04", "1", "", "fine"), tsv("gj04", "1", "too short")])
    with pytest.raises(glue.GlueDataError, match=rf"{path}, line 2: expected 4 .* found 3"):
        glue.get_processor("cola").get_dev_examples(tmp_path)


def test_bytes_that_are_not_utf8_or_tsv_name_the_file(tmp_path):
    # Found by tests/test_properties.py: a UnicodeDecodeError / csv.Error escaped the reader naming no file.
    head = tsv("sentence", "label").encode()
    path = tmp_path / "train.tsv"
    path.write_bytes(head + b"\nfine\t1\nbroken \xed\xa0\x80 surrogate\t0\n")  # a lone surrogate as UTF-8
    with pytest.raises(glue.GlueDataError, match=rf"^{re.escape(str(path))}, line 3: not UTF-8 text") as info:
        glue.get_processor("sst-2").get_train_examples(tmp_path)
    assert "\n" not in str(info.value)
    path.write_bytes(head + b"\n" + b"x" * (csv.field_size_limit() + 1) + b"\t1\n")
    with pytest.raises(glue.GlueDataError, match=rf"^{re.escape(str(path))}: unreadable TSV: field larger than"):
        glue.get_processor("sst-2").get_train_examples(tmp_path)


def test_bad_label_missing_file_and_wrong_header(tmp_path):
    write(tmp_path, "train.tsv", [tsv("sentence", "label"), tsv("good", "1"), tsv("bad", "positive")])
    with pytest.raises(glue.GlueDataError, match=r"train\.tsv, line 3: label 'positive' is not one of \['0', '1'\]"):
        glue.get_processor("sst-2").get_train_examples(tmp_path)
    with pytest.raises(glue.GlueDataError, match=r"dev file not found: .*dev\.tsv"):
        glue.get_processor("sst-2").get_dev_examples(tmp_path)
    # An SST-2 file given as MRPC: the header names the problem.
    with pytest.raises(glue.GlueDataError, match=r"header has no column '#1 String'.*mrpc train file"):
        glue.get_processor("mrpc").get_train_examples(tmp_path)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst3'; valid tasks: cola, sst-2, mrpc, sts-b"):
        glue.get_processor("sst3")
    with pytest.raises(ValueError, match="valid tasks"):
        glue.compute_metrics("squad", [1], [1])


def test_real_mrpc_and_sst2_row_counts():
    p = glue.get_processor("mrpc")
    train = p.get_train_examples(shared_path("mrpc"))
    dev = p.get_dev_examples(shared_path("mrpc"))
    test = p.get_test_examples(shared_path("mrpc"))
    assert (len(train), len(dev), len(test)) == (3668, 408, 1725)
    assert sum(e.label == "1" for e in train) == 2474 and sum(e.label == "1" for e in dev) == 279
    assert '"' in "".join(e.text_a for e in train)  # bare quotes survived as text
    dev2 = glue.get_processor("sst-2").get_dev_examples(shared_path("sst2"))
    assert len(dev2) == 872 and sum(e.label == "1" for e in dev2) == 444


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]


@pytest.fixture
def tokenizer(tmp_path):
    from tokenization import BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(vocab, do_lower_case=True)


def ids(*tokens: str) -> list[int]:
    return [VOCAB.index(t) for t in tokens]


def test_single_sentence_features_truncate_and_pad(tokenizer):
    examples = [glue.InputExample("a", "The cat sat.", None, "1"), glue.InputExample("b", "the cat sat on the mat .",
                                                                                     None, "0")]
    features, label_map = glue.convert_examples_to_features(examples, ["0", "1"], 6, tokenizer)
    assert label_map == {"0": 0, "1": 1}
    f0, f1 = features
    assert f0.input_ids == ids("[CLS]", "the", "cat", "sat", ".", "[SEP]")
    assert f0.input_mask == [1] * 6 and f0.segment_ids == [0] * 6 and f0.label_id == 1
    assert f1.input_ids == ids("[CLS]", "the", "cat", "sat", "on", "[SEP]")  # cut to max_seq_length - 2 tokens
    features, _ = glue.convert_examples_to_features(examples[:1], ["0", "1"], 8, tokenizer)
    assert features[0].input_ids == ids("[CLS]", "the", "cat", "sat", ".", "[SEP]") + [0, 0]
    assert features[0].input_mask == [1] * 6 + [0, 0]


def test_pair_features_pop_from_longer_and_segment_ids(tokenizer):
    ex = glue.InputExample("a", "the cat sat on the mat", "a dog ran", "1")
    (f,), _ = glue.convert_examples_to_features([ex], ["0", "1"], 10, tokenizer)
    # 6 + 3 tokens must fit 10 - 3 = 7: the longer first sentence loses its last two tokens.
    assert f.input_ids == ids("[CLS]", "the", "cat", "sat", "on", "[SEP]", "a", "dog", "ran", "[SEP]")
    assert f.segment_ids == [0] * 6 + [1] * 4
    (f,), _ = glue.convert_examples_to_features([ex], ["0", "1"], 7, tokenizer)
    # Budget 4 (lengths a/b): 6/3 -> 5/3 -> 4/3 -> 3/3, a tie pops from the second -> 3/2 -> 2/2.
    assert f.input_ids == ids("[CLS]", "the", "cat", "[SEP]", "a", "dog", "[SEP]")
    assert f.segment_ids == [0, 0, 0, 0, 1, 1, 1] and f.input_mask == [1] * 7
    a, b = list(range(5)), list(range(2))
    glue.truncate_seq_pair(a, b, 4)
    assert (a, b) == ([0, 1], [0, 1])


def test_regression_and_unlabelled_features_to_tensors(tokenizer):
    examples = [glue.InputExample("a", "the cat", "a dog", "3.8"), glue.InputExample("b", "the mat", "a cat", "5.0")]
    features, label_map = glue.convert_examples_to_features(examples, [], 8, tokenizer)
    assert label_map == {} and [f.label_id for f in features] == [3.8, 5.0]
    tensors = glue.features_to_tensors(features)
    assert tensors["labels"].dtype == torch.float32 and tensors["input_ids"].shape == (2, 8)
    assert tensors["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    test = [glue.InputExample("t", "the dog", None, None)]
    features, _ = glue.convert_examples_to_features(test, ["0", "1"], 5, tokenizer)
    tensors = glue.features_to_tensors(features)
    assert "labels" not in tensors and tensors["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="label 'x' is not one of"):
        glue.convert_examples_to_features([glue.InputExample("a", "cat", None, "x")], ["0", "1"], 5, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Metrics: hand-computed values, and scipy/sklearn where installed
# ---------------------------------------------------------------------------------------------------------------


def test_metrics_hand_computed():
    preds, labels = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0])
    # TP=2 FP=1 FN=1 TN=2: acc 4/6, F1 = 4/6, MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    assert glue.simple_accuracy(preds, labels) == pytest.approx(4 / 6)
    assert glue.f1_score(preds, labels) == pytest.approx(4 / 6)
    assert glue.matthews_corrcoef(preds, labels) == pytest.approx(1 / 3)
    assert glue.compute_metrics("mrpc", preds, labels) == pytest.approx(
        {"acc": 4 / 6, "f1": 4 / 6, "acc_and_f1": 4 / 6})
    assert glue.compute_metrics("cola", preds, labels) == pytest.approx({"acc": 4 / 6, "mcc": 1 / 3})
    assert glue.compute_metrics("sst-2", preds, labels) == {"acc": pytest.approx(4 / 6)}
    assert glue.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictions: 0 by convention
    assert glue.f1_score([0, 0], [0, 0]) == 0.0
    # Spearman with ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
    assert glue.rankdata(np.array([3, 2, 1, 2])).tolist() == [4, 2.5, 1, 2.5]
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 9.0])
    # Pearson by hand: dx = [-1.5, -.5, .5, 1.5], dy = [-3.25, -1.25, .75, 3.75], sum dx*dy = 11.5,
    # |dx|^2 = 5, |dy|^2 = 26.75 -> 11.5 / sqrt(133.75).
    m = glue.compute_metrics("sts-b", x, y)
    assert m["pearson"] == pytest.approx(11.5 / math.sqrt(133.75))
    assert m["spearmanr"] == pytest.approx(1.0) and m["corr"] == pytest.approx((m["pearson"] + 1) / 2)
    assert math.isnan(glue.pearson_corr([1.0, 1.0], [1.0, 2.0]))


def test_metrics_match_scipy_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        assert glue.matthews_corrcoef(preds, labels) == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, preds))
        assert glue.f1_score(preds, labels) == pytest.approx(sklearn_metrics.f1_score(labels, preds))
        labels3, preds3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
        assert glue.matthews_corrcoef(preds3, labels3) == pytest.approx(
            sklearn_metrics.matthews_corrcoef(labels3, preds3))
        x, y = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)  # x has many ties
        assert glue.spearman_corr(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
        assert glue.pearson_corr(x, y) == pytest.approx(stats.pearsonr(x, y)[0])


# ---------------------------------------------------------------------------------------------------------------
# run_glue.py end to end (CPU, a tiny random model, a subset of real MRPC)
# ---------------------------------------------------------------------------------------------------------------

TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}


def subset(src: Path, dst: Path, rows: int) -> None:
    lines = src.read_bytes().splitlines(keepends=True)
    dst.write_bytes(b"".join(lines[: rows + 1]))  # header + rows (the BOM stays on the header)


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory):
    """A reference-style pre-training checkpoint of a tiny model, and MRPC subsets in the official layout."""
    from modeling import BertConfig, BertForPreTraining

    root = tmp_path_factory.mktemp("glue")
    data = root / "MRPC"
    data.mkdir()
    for name, rows in (("train.tsv", 64), ("dev.tsv", 40), ("test.tsv", 24)):
        subset(shared_path("mrpc", name), data / name, rows)
    config = root / "bert_config.json"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig.from_json_file(config))
    torch.save({"model": model.state_dict()}, root / "ckpt_8601.pt")
    common = ["--data_dir", str(data), "--bert_model", "bert-tiny-uncased", "--task_name", "mrpc",
              "--vocab_file", str(REPO / "vocab" / "vocab"), "--config_file", str(config), "--do_lower_case",
              "--max_seq_length", "64", "--disable_progress_bar"]
    return {"root": root, "data": data, "config": config, "ckpt": root / "ckpt_8601.pt", "common": common}


def run_glue_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_glue.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_run_glue_train_eval_predict_then_eval_only(glue_run):
    out = glue_run["root"] / "out"
    proc = run_glue_cli(*glue_run["common"], "--init_checkpoint", str(glue_run["ckpt"]), "--output_dir", str(out),
                        "--do_train", "--do_eval", "--do_predict", "--predict_split", "test",
                        "--train_batch_size", "16",
                        "--gradient_accumulation_steps", "2", "--eval_batch_size", "8", "--num_train_epochs", "2",
                        "--learning_rate", "1e-3", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    for name in ("pytorch_model.bin", "config.json", "results.txt", "predictions.json", "dllogger.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.txt").read_text())
    # 64 examples, micro-batch 8, 2 accumulation steps: 4 optimizer steps per epoch, 2 epochs.
    assert results["global_step"] == results["train:num_steps"] == 8
    assert results["train:num_samples_per_gpu"] == 128 and results["eval:num_samples_per_gpu"] == 40
    assert results["eval:num_steps"] == 5 and results["predict:num_samples"] == 24
    for key in ("acc", "f1", "acc_and_f1", "eval:loss", "train:loss", "train:latency", "train:throughput",
                "infer:latency(ms):50%", "infer:latency(ms):99%", "infer:latency(ms):sum",
                "infer:throughput(samples/s):avg"):
        assert math.isfinite(results[key]), key
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == [f"test-{i}" for i in range(24)]  # GLUE's index column, file order
    assert set(predictions.values()) <= {"0", "1"}
    checkpoint = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(checkpoint) == {"model"} and checkpoint["model"]["classifier.weight"].shape == (2, 32)
    records = [json.loads(line[5:]) for line in (out / "dllogger.json").read_text().splitlines()]
    summary = [r["data"] for r in records if r.get("type") == "LOG" and r["step"] == []][-1]
    assert summary["exact_match"] == results["acc"] and summary["F1"] == results["f1"]
    assert {"e2e_train_time", "training_sequences_per_second", "e2e_inference_time",
            "inference_sequences_per_second"} <= set(summary)
    params = {k for r in records if r.get("step") == "PARAMETER" for k in r["data"]}
    assert {"Config", "SEED", "num_parameters"} <= params
    assert {p.name for p in glue_run["data"].glob("bert-tiny-uncased_*.pt")} == {
        "bert-tiny-uncased_64_True_mrpc_dev.pt", "bert-tiny-uncased_64_True_mrpc_test.pt",
        "bert-tiny-uncased_64_True_mrpc_train.pt"}

    # Evaluate the saved model alone (features from the cache): the same accuracy and loss as after training.
    out2 = glue_run["root"] / "out_eval"
    proc = run_glue_cli(*glue_run["common"], "--init_checkpoint", str(out / "pytorch_model.bin"),
                        "--output_dir", str(out2), "--do_eval", "--eval_batch_size", "16")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out2 / "results.txt").read_text())
    assert again["acc"] == results["acc"] and again["eval:loss"] == pytest.approx(results["eval:loss"], rel=1e-5)
    assert "train:loss" not in again and not (out2 / "pytorch_model.bin").exists()


def test_run_glue_rejects_checkpoint_of_another_shape(glue_run, tmp_path):
    from modeling import BertConfig, BertForPreTraining

    wider = BertForPreTraining(BertConfig.from_dict({**TINY, "hidden_size": 48, "intermediate_size": 96}))
    torch.save({"model": wider.state_dict()}, tmp_path / "wide.pt")
    proc = run_glue_cli(*glue_run["common"], "--init_checkpoint", str(tmp_path / "wide.pt"),
                        "--output_dir", str(tmp_path / "out"), "--do_eval", "--skip_features_cache")
    assert proc.returncode == 1
    assert "run_glue.py: error:" in proc.stderr and "shape mismatch" in proc.stderr and "Traceback" not in proc.stderr


def test_run_glue_checks_flags_before_any_work(glue_run, tmp_path, capsys):
    import run_glue

    out = tmp_path / "never"
    base = [*glue_run["common"], "--init_checkpoint", str(glue_run["ckpt"]), "--output_dir", str(out)]
    cases = [
        ([], "at least one of --do_train, --do_eval or --do_predict"),
        (["--do_train", "--train_batch_size", "16", "--gradient_accumulation_steps", "3"], "not divisible"),
        (["--do_eval", "--loss_scale", "128"], "--loss_scale only applies with --fp16"),
        (["--do_eval", "--init_checkpoint", str(tmp_path / "missing.pt")], "--init_checkpoint .* does not exist"),
    ]
    for extra, message in cases:
        assert run_glue.main(base + extra) == 1
        assert re.search(message, capsys.readouterr().err), message
    assert not out.exists()  # nothing was written
    with pytest.raises(SystemExit):
        run_glue.parse_arguments(["--task_name", "sst3"])
    assert "invalid choice: 'sst3'" in capsys.readouterr().err


def test_run_glue_reports_malformed_data(glue_run, tmp_path):
    data = tmp_path / "MRPC"
    data.mkdir()
    (data / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tonly four\n")
    args = [a if a != str(glue_run["data"]) else str(data) for a in glue_run["common"]]
    proc = run_glue_cli(*args, "--init_checkpoint", str(glue_run["ckpt"]), "--output_dir", str(tmp_path / "out"),
                        "--do_eval")
    assert proc.returncode == 1 and f"{data / 'dev.tsv'}, line 2: expected 5" in proc.stderr


def test_run_glue_sh_on_cpu_writes_logfile(glue_run):
    out = glue_run["root"] / "out_sh"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "run_glue.sh"), str(glue_run["ckpt"]), str(glue_run["data"]),
         str(REPO / "vocab" / "vocab"), str(glue_run["config"]), str(out), "mrpc", "0", "32", "2", "1e-3", "0.1",
         "1", "-1.0", "fp32", "2", "train eval prediction"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    results = json.loads((out / "results.txt").read_text())
    assert results["global_step"] == 2 and "acc" in results and (out / "predictions.json").is_file()
    log = (out / "logfile").read_text()
    assert "--do_train --do_eval --do_predict --no_cuda" in log and "exact_match" in log
    bad = subprocess.run(["bash", str(REPO / "scripts" / "run_glue.sh"), "x", "x", "x", "x", str(out), "mrpc", "0",
                          "8", "1", "1e-3", "0.1", "1", "-1.0", "fp16"], capture_output=True, text=True)
    assert bad.returncode == 1 and "fp16 needs a GPU" in bad.stderr


@pytest.mark.parametrize("function,expected", [
    # global batch 128 over 8 GPUs -> 16 per GPU, fits the capacity of 128 in one micro-batch.
    ("mrpc_dgxa100_8gpu_fp16", ["mrpc", "8", "16", "1", "2.4e-5", "0.1", "3", "-1.0", "fp16"]),
    # 1024 on one GPU, capacity 128: accumulation doubles to 8 (micro-batch 128).
    ("sst-2_dgxa100_1gpu_fp16", ["sst-2", "1", "1024", "8", "3e-5", "0.1", "3", "-1.0", "fp16"]),
    ("sst-2_dgxa100_2gpu_tf32", ["sst-2", "2", "256", "4", "2e-5", "0.1", "3", "-1.0", "tf32"]),
    ("sst-2_dgx2_1gpu_fp32", ["sst-2", "1", "1024", "16", "3e-5", "0.1", "3", "-1.0", "fp32"]),
    ("mrpc_dgxa10080g_1gpu_tf32_p2binned", ["mrpc", "1", "128", "1", "1.8e-5", "0.3", "3", "-1.0", "tf32"]),
    ("sst-2_dgxa10080g_1gpu_fp16_p2binned", ["sst-2", "1", "1024", "4", "1e-5", "0.1", "3", "-1.0", "fp16"]),
])
def test_glue_config_functions(function, expected):
    proc = subprocess.run(["bash", "-c", f"source scripts/configs/glue_config.sh && {function}"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    values = proc.stdout.split()
    assert len(values) == 14 and values[5:] == expected
    assert values[1].endswith(("/MRPC/", "/SST-2/")) and values[2].endswith("vocab/vocab")


def test_run_glue_stsb_regression_in_process(glue_run, tmp_path):
    import run_glue

    data = tmp_path / "STS-B"
    head = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    rows = [tsv(str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none",
                f"a man is playing a flute {i}.", f"a man plays the flute {i % 3}.", f"{i % 6}.000")
            for i in range(24)]
    write(data, "train.tsv", [tsv(*head, "score"), *rows])
    write(data, "dev.tsv", [tsv(*head, "score"), *rows[:12]])
    write(data, "test.tsv", [tsv(*head), *(r.rsplit("\t", 1)[0] for r in rows[:5])])
    args = [a if a not in (str(glue_run["data"]), "mrpc") else {"mrpc": "sts-b"}.get(a, str(data))
            for a in glue_run["common"]]
    out = tmp_path / "out"
    assert run_glue.main([*args, "--init_checkpoint", str(glue_run["ckpt"]), "--output_dir", str(out), "--do_train",
                          "--do_eval", "--do_predict", "--predict_split", "test", "--train_batch_size", "8",
                          "--num_train_epochs", "1", "--skip_checkpoint"]) == 0
    results = json.loads((out / "results.txt").read_text())
    assert results["global_step"] == 3 and {"pearson", "spearmanr", "corr", "eval:loss"} <= set(results)
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == [f"test-{i}" for i in range(5)]
    assert all(math.isfinite(float(v)) for v in predictions.values())
    assert not (out / "pytorch_model.bin").exists()  # --skip_checkpoint
