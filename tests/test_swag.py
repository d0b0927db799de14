"""Tests for data/swag.py (SWAG reader and features), run_swag.py (end to end on CPU) and scripts/run_swag.sh."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO

from data import swag
from tokenization import BertTokenizer

SAMPLE = REPO / "data" / "sample" / "swag"
VOCAB = REPO / "vocab" / "vocab"
HEADER = ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label"


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(VOCAB, do_lower_case=True)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(index: int, label: str = "0", ending0: str = "opens the door.") -> str:
    return (f"{index},vid-{index},{100 + index},The man knocks. He,The man knocks.,He,gold,{ending0},"
            f"sings.,swims.,flies.,{label}")


# ---------------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------------


def test_reader_on_the_bundled_sample():
    train = swag.read_swag_examples(SAMPLE / "train.csv")
    val = swag.read_swag_examples(SAMPLE / "val.csv")
    assert (len(train), len(val)) == (40, 20)
    first = train[0]
    assert first.swag_id == "1000"  # fold-ind, as the reference's swag_id
    assert first.context_sentence == "A woman fills a kettle at the kitchen sink." and first.start_ending == "She"
    assert first.endings[first.label] == "sets it on the stove and turns on the burner."
    assert len(first.endings) == 4 and {ex.label for ex in train + val} == {0, 1, 2, 3}
    # The sample is in the authors' exact layout: the row-index column without a name, then the named columns.
    with open(SAMPLE / "train.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert ",".join(rows[0]) == HEADER and all(len(r) == 12 for r in rows)
    assert all(r[3] == f"{r[4]} {r[5]}" and r[6] in ("gold", "gen") for r in rows[1:])


def test_reader_finds_columns_by_name_and_reads_quoted_fields(tmp_path):
    path = write_csv(tmp_path / "val.csv", [
        "video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label",  # no index
        'v1,7,"A cook, smiling, stirs. She","A cook, smiling, stirs.",She,gen,"tastes it, then nods.",'
        '"says ""done"".",flies.,"line one\nline two",3',
        "",
        "v2,8,A dog barks. It,A dog barks.,It,gold,runs.,sits.,sleeps.,eats.,0"])
    examples = swag.read_swag_examples(path)
    assert [(e.swag_id, e.label) for e in examples] == [("7", 3), ("8", 0)]
    assert examples[0].context_sentence == "A cook, smiling, stirs."
    assert examples[0].endings == ["tastes it, then nods.", 'says "done".', "flies.", "line one\nline two"]
    # SWAG's test.csv has no label column: read unlabelled.
    write_csv(tmp_path / "test.csv", [HEADER.rsplit(",", 1)[0], row(0).rsplit(",", 1)[0]])
    assert swag.read_swag_examples(tmp_path / "test.csv", labelled=False)[0].label is None


@pytest.mark.parametrize("lines,message", [
    ([HEADER, row(0), row(1, label="4")], r"train\.csv, line 3: label '4' is not one of 0\.\.3"),
    ([HEADER, row(0), row(1, label="")], r"train\.csv, line 3: label '' is not one of"),
    ([HEADER, row(0), row(1, ending0="opens the door, slowly.")],
     r"train\.csv, line 3: expected 12 comma-separated fields as in the header, found 13"),
    # A field spanning two lines: the error names the line the bad row starts on.
    ([HEADER, row(0, ending0='"opens\nthe door."'), row(1, label="x")], r"train\.csv, line 4: label 'x'"),
    ([HEADER.replace("ending2,", ""), row(0)], r"train\.csv: header has no column ending2"),
    ([HEADER.replace(",label", ""), row(0).rsplit(",", 1)[0]], r"header has no column label"),
    ([], r"train\.csv: empty file"),
])
def test_reader_names_file_and_line_of_malformed_rows(tmp_path, lines, message):
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(swag.SwagDataError, match=message):
        swag.read_swag_examples(path)


def test_reader_missing_file_and_bad_csv(tmp_path):
    with pytest.raises(swag.SwagDataError, match=r"SWAG file not found: .*nothing\.csv"):
        swag.read_swag_examples(tmp_path / "nothing.csv")
    bad = write_csv(tmp_path / "val.csv", [HEADER, row(0), row(1, ending0='"opens" the door.'), row(2)])
    with pytest.raises(swag.SwagDataError, match=r"val\.csv, line 3: not valid CSV \(',' expected after '\"'\)"):
        swag.read_swag_examples(bad)
    write_csv(bad, [HEADER, row(0), row(1), row(2, ending0='"opens the door.')])
    with pytest.raises(swag.SwagDataError, match=r"val\.csv, line 4: not valid CSV \(unexpected end of data\)"):
        swag.read_swag_examples(bad)
    bad.write_bytes(f"{HEADER}\n{row(0)}\n".encode() + row(1, ending0="caf\xe9.").encode("latin-1") + b"\n")
    with pytest.raises(swag.SwagDataError, match=r"val\.csv, line 3: not UTF-8 text \(invalid continuation byte"):
        swag.read_swag_examples(bad)
    assert issubclass(swag.SwagDataError, ValueError)  # run_job reports it as a user error


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def test_features_shapes_and_layout(tokenizer):
    examples = swag.read_swag_examples(SAMPLE / "train.csv")
    tensors = swag.features_to_tensors(swag.convert_examples_to_features(examples, tokenizer, 40))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "input_ids": (40, 4, 40), "token_type_ids": (40, 4, 40), "attention_mask": (40, 4, 40), "labels": (40,)}
    assert all(v.dtype == torch.long for v in tensors.values())
    assert tensors["labels"].tolist() == [ex.label for ex in examples]
    ex = examples[0]
    for choice in range(4):
        ids = tensors["input_ids"][0, choice]
        length = int(tensors["attention_mask"][0, choice].sum())
        tokens = tokenizer.convert_ids_to_tokens(ids[:length].tolist())
        expected = ["[CLS]", *tokenizer.tokenize(ex.context_sentence), "[SEP]",
                    *tokenizer.tokenize(ex.start_ending), *tokenizer.tokenize(ex.endings[choice]), "[SEP]"]
        assert tokens == expected
        assert ids[length:].eq(0).all()
        first_sep = tokens.index("[SEP]")
        assert tensors["token_type_ids"][0, choice].tolist() == \
            [0] * (first_sep + 1) + [1] * (length - first_sep - 1) + [0] * (40 - length)


def test_features_trim_the_longer_side_as_the_reference(tokenizer):
    example = swag.SwagExample("1", "one two three four five six seven eight nine ten", "he",
                               ["runs", "sits down", "walks to the shop", "a b c d e f g h i j k l"], 2)
    features = swag.convert_examples_to_features([example], tokenizer, 12)[0]
    decoded = [tokenizer.convert_ids_to_tokens([i for i in ids if i]) for ids in features.input_ids]
    # 9 tokens for the pair: the 10-word context gives way to the short endings ...
    assert decoded[0] == ["[CLS]", "one", "two", "three", "four", "five", "six", "seven", "[SEP]", "he", "runs",
                          "[SEP]"]
    assert decoded[2] == ["[CLS]", "one", "two", "three", "four", "five", "[SEP]", "he", "walks", "to", "the",
                          "[SEP]"]
    # ... and against a longer ending both sides shrink, one token at a time from the longer (on a tie, the ending).
    assert decoded[3] == ["[CLS]", "one", "two", "three", "four", "five", "[SEP]", "he", "a", "b", "c", "[SEP]"]
    assert all(len(ids) == 12 for ids in features.input_ids) and features.label == 2
    with pytest.raises(ValueError, match="max_seq_length=2"):
        swag.convert_examples_to_features([example], tokenizer, 2)


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert swag.accuracy(logits, torch.tensor([1, 2, 3])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# run_swag.py end to end (tiny random BERT, CPU)
# ---------------------------------------------------------------------------------------------------------------


def common_args(tiny_encoder) -> list[str]:
    _, config = tiny_encoder
    return ["--data_dir", str(SAMPLE), "--bert_model", "bert-tiny-uncased", "--vocab_file", str(VOCAB),
            "--config_file", str(config), "--do_lower_case", "--max_seq_length", "48", "--disable_progress_bar"]


@pytest.fixture(scope="module")
def trained(tiny_encoder, tmp_path_factory) -> dict:
    import run_swag

    init, _ = tiny_encoder
    out = tmp_path_factory.mktemp("swag") / "out"
    status = run_swag.main([*common_args(tiny_encoder), "--init_checkpoint", str(init), "--output_dir", str(out),
                            "--do_train", "--do_eval", "--train_batch_size", "8", "--gradient_accumulation_steps",
                            "2", "--num_train_epochs", "2", "--learning_rate", "1e-3", "--eval_batch_size", "6",
                            "--log_freq", "2"])
    return {"status": status, "out": out, "results": json.loads((out / "results.txt").read_text())}


def test_run_swag_trains_evaluates_and_saves(trained):
    assert trained["status"] == 0
    results, out = trained["results"], trained["out"]
    # 40 examples, micro-batch 4, 2 accumulation steps: 5 steps an epoch, 2 epochs.
    assert results["global_step"] == results["train:num_steps"] == 10
    assert results["eval:num_examples"] == 20 and 0.0 <= results["eval:accuracy"] <= 1.0
    assert results["eval:accuracy"] * 20 == pytest.approx(round(results["eval:accuracy"] * 20))
    assert 0.0 < results["eval:loss"] < 10.0 and results["train:loss"] > 0.0
    assert {p.name for p in out.iterdir()} >= {"config.json", "pytorch_model.bin", "results.txt", "dllogger.json"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    records = [json.loads(line.split(" ", 1)[1]) for line in (out / "dllogger.json").read_text().splitlines()
               if line.startswith("DLLL ")]
    summary = [r["data"] for r in records if r.get("type") == "LOG" and r.get("step") == []][-1]
    assert summary["eval_accuracy"] == results["eval:accuracy"] and summary["global_step"] == 10
    assert sum(1 for r in records if r.get("type") == "LOG" and r["data"].get("average_loss") is not None) == 5


def test_run_swag_evaluates_the_saved_model_alone(trained, tiny_encoder, tmp_path):
    import run_swag

    out = tmp_path / "eval"
    assert run_swag.main([*common_args(tiny_encoder), "--init_checkpoint", str(trained["out"]), "--output_dir",
                          str(out), "--do_eval", "--eval_batch_size", "20"]) == 0
    again = json.loads((out / "results.txt").read_text())
    assert again["eval:accuracy"] == trained["results"]["eval:accuracy"]
    assert again["eval:loss"] == pytest.approx(trained["results"]["eval:loss"], rel=1e-5)  # other batching
    assert "train:loss" not in again and not (out / "pytorch_model.bin").exists()


def test_run_swag_checks_flags_and_inputs_before_any_work(tiny_encoder, tmp_path, capsys):
    import run_swag

    init, _ = tiny_encoder
    out = tmp_path / "never"
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [*common_args(tiny_encoder), "--init_checkpoint", str(init), "--output_dir", str(out)]
    cases = [
        ([], "at least one of --do_train or --do_eval"),
        (["--do_train", "--train_batch_size", "8", "--gradient_accumulation_steps", "3"], "not divisible"),
        (["--do_eval", "--loss_scale", "128"], "--loss_scale only applies with --fp16"),
        (["--do_eval", "--fp16"], "--fp16/--amp needs a CUDA device"),
        (["--do_eval", "--data_dir", str(empty)], r"--data_dir .*empty has no val\.csv \(needed by --do_eval\)"),
        (["--do_train", "--warmup_proportion", "1"], r"--warmup_proportion must be in \[0, 1\)"),
        (["--do_eval", "--init_checkpoint", str(tmp_path / "missing.pt")], "--init_checkpoint .* does not exist"),
        # A model without a multiple-choice head would score chance: refused for evaluation alone.
        (["--do_eval"], "has no multiple-choice classifier"),
    ]
    for extra, message in cases:
        assert run_swag.main(base + extra) == 1, message
        err = capsys.readouterr().err
        assert re.search(message, err) and err.startswith("run_swag.py: error:"), (message, err)
    assert not (out / "results.txt").exists() and not (out / "pytorch_model.bin").exists()


def test_run_swag_reports_malformed_data_naming_file_and_line(tiny_encoder, tmp_path, capsys):
    import run_swag

    init, _ = tiny_encoder
    data = tmp_path / "swag"
    write_csv(data / "train.csv", (SAMPLE / "train.csv").read_text(encoding="utf-8").splitlines())
    write_csv(data / "val.csv", [HEADER, row(0), row(1, label="7")])
    args = [a if a != str(SAMPLE) else str(data) for a in common_args(tiny_encoder)]
    assert run_swag.main([*args, "--init_checkpoint", str(init), "--output_dir", str(tmp_path / "out"),
                          "--do_train", "--do_eval"]) == 1
    err = capsys.readouterr().err
    assert f"{data / 'val.csv'}, line 3: label '7' is not one of 0..3" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()  # val.csv is read before training starts


# ---------------------------------------------------------------------------------------------------------------
# scripts/run_swag.sh (PYTHON=echo prints the command instead of running it)
# ---------------------------------------------------------------------------------------------------------------


def run_swag_sh(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SWAG_DIR", "OUT_DIR", "VOCAB_FILE", "CONFIG_FILE")}
    environ.update(PYTHON="echo", BERT_PREP_WORKING_DIR=str(tmp_path / "prep"), RESULTS_DIR=str(tmp_path / "res"),
                   **env)
    return subprocess.run(["bash", "scripts/run_swag.sh", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=60)


def flags(words: list[str]) -> dict[str, str]:
    """--name value pairs (a flag with no value maps to "")."""
    out = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            out[word] = words[i + 1] if has_value else ""
    return out


def test_run_swag_sh_positional_arguments_land_on_the_reference_flags(tmp_path):
    done = run_swag_sh(["/x/ckpt_7.pt", "train eval", "100", "16", "1e-5", "bf16", "0", "3"], tmp_path)
    assert done.returncode == 0, done.stderr
    words = done.stdout.splitlines()[-1].split()
    assert words[0] == str(REPO / "run_swag.py")  # one process: no torchrun
    got = flags(words)
    assert {k: got.get(k) for k in ("--init_checkpoint", "--max_steps", "--train_batch_size", "--eval_batch_size",
                                    "--learning_rate", "--bf16", "--no_cuda", "--num_train_epochs", "--do_train",
                                    "--do_eval", "--data_dir", "--output_dir", "--vocab_file", "--config_file",
                                    "--do_lower_case", "--bert_model", "--max_seq_length")} == {
        "--init_checkpoint": "/x/ckpt_7.pt", "--max_steps": "100", "--train_batch_size": "16",
        "--eval_batch_size": "16", "--learning_rate": "1e-5", "--bf16": "", "--no_cuda": "",
        "--num_train_epochs": "3", "--do_train": "", "--do_eval": "", "--data_dir": f"{tmp_path}/prep/swag/data/",
        "--output_dir": f"{tmp_path}/res/SWAG", "--vocab_file": str(VOCAB),
        "--config_file": str(REPO / "bert_configs" / "large.json"), "--do_lower_case": "",
        "--bert_model": "bert-large-uncased", "--max_seq_length": "128"}
    assert (tmp_path / "res" / "SWAG" / "logfile").read_text().splitlines()[0].split()[1:] == words


def test_run_swag_sh_defaults_and_launcher(tmp_path):
    # The reference's defaults: mode train, max_steps -1.0, batch 12, lr 5e-6, fp32, 2 epochs; no GPU here: CPU.
    done = run_swag_sh([], tmp_path, SWAG_DIR=str(tmp_path / "swag"))
    assert done.returncode == 0, done.stderr
    got = flags(done.stdout.splitlines()[-1].split())
    assert {k: got.get(k) for k in ("--init_checkpoint", "--max_steps", "--train_batch_size", "--learning_rate",
                                    "--num_train_epochs", "--data_dir")} == {
        "--init_checkpoint": str(REPO / "checkpoints" / "bert_uncased.pt"), "--max_steps": "-1.0",
        "--train_batch_size": "12", "--learning_rate": "5e-6", "--num_train_epochs": "2",
        "--data_dir": f"{tmp_path}/swag/data/"}
    assert "--do_train" in got and "--do_eval" not in got and "--fp16" not in got and "--bf16" not in got
    # 8 GPUs asked for: torchrun with 8 processes to train, one process to evaluate.
    train = run_swag_sh(["/x/c.pt", "train", "-1", "12", "5e-6", "fp16", "8"], tmp_path).stdout.splitlines()[-1]
    assert train.split()[:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8", str(REPO / "run_swag.py")]
    assert "--fp16" in train.split() and "--no_cuda" not in train.split()
    evaluate = run_swag_sh(["/x/c.pt", "eval", "-1", "12", "5e-6", "fp32", "8"], tmp_path).stdout.splitlines()[-1]
    assert evaluate.split()[0] == str(REPO / "run_swag.py") and "--do_eval" in evaluate and "--do_train" not in evaluate
    for args, message in ((["/x/c.pt", "train", "-1", "12", "5e-6", "fp16", "0"], "fp16 needs a GPU"),
                          (["/x/c.pt", "predict"], "names neither train nor eval"),
                          (["/x/c.pt", "train", "-1", "12", "5e-6", "fp8"], "unknown precision 'fp8'")):
        bad = run_swag_sh(args, tmp_path)
        assert bad.returncode == 1 and message in bad.stderr, bad.stderr
