"""Tests for extract_features.py: the JSON-lines format of google-research/bert and the values of each layer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO

import extract_features
from modeling import BertModel
from tokenization import BertTokenizer

VOCAB = REPO / "vocab" / "vocab"
LINES = ["The cat sat on the mat.", "Is this Jacksonville ? ||| No it is not ."]


@pytest.fixture(scope="module")
def extracted(tiny_encoder, tmp_path_factory) -> dict:
    init, config = tiny_encoder
    root = tmp_path_factory.mktemp("features")
    (root / "input.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    status = extract_features.main(["--input_file", str(root / "input.txt"), "--output_file", str(root / "out.jsonl"),
                                    "--bert_model", "bert-tiny-uncased", "--init_checkpoint", str(init),
                                    "--config_file", str(config), "--vocab_file", str(VOCAB), "--do_lower_case",
                                    "--layers", "-1,0,-2", "--batch_size", "1", "--no_cuda"])
    records = [json.loads(line) for line in (root / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"status": status, "records": records, "root": root}


def model_layers(init: Path, text_a: str, text_b: str | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Tokens and every encoder layer's output [S, H] of one unpadded example, straight from BertModel."""
    tokenizer = BertTokenizer(VOCAB, do_lower_case=True)
    tokens = ["[CLS]", *tokenizer.tokenize(text_a), "[SEP]"]
    segments = [0] * len(tokens)
    if text_b is not None:
        tokens += [*tokenizer.tokenize(text_b), "[SEP]"]
        segments += [1] * (len(tokens) - len(segments))
    model = BertModel.from_pretrained(init).eval()
    with torch.no_grad():
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens)])
        sequence_output, _ = model(ids, torch.tensor([segments]), torch.ones_like(ids))
        layers, _ = model(ids, torch.tensor([segments]), torch.ones_like(ids), output_all_encoded_layers=True)
    assert torch.equal(layers[-1], sequence_output)
    return tokens, [layer[0] for layer in layers]


def test_json_lines_in_google_bert_format(extracted):
    assert extracted["status"] == 0
    records = extracted["records"]
    assert [r["linex_index"] for r in records] == [0, 1] and all(list(r) == ["linex_index", "features"]
                                                                 for r in records)
    for record in records:
        for feature in record["features"]:
            assert list(feature) == ["token", "layers"]
            assert [layer["index"] for layer in feature["layers"]] == [-1, 0, -2]
            assert all(len(layer["values"]) == 24 for layer in feature["layers"])  # hidden size of the tiny model
            assert all(v == round(v, 6) for layer in feature["layers"] for v in layer["values"])
    tokens = [[f["token"] for f in r["features"]] for r in records]
    assert tokens[0] == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert tokens[1][0] == "[CLS]" and tokens[1].count("[SEP]") == 2 and tokens[1][-1] == "[SEP]"
    assert not [p.name for p in extracted["root"].iterdir() if p.name.startswith(".")]  # written atomically


def test_layer_values_equal_the_model_outputs(extracted, tiny_encoder):
    init, _ = tiny_encoder
    for record, line in zip(extracted["records"], LINES):
        text_a, _, text_b = line.partition(" ||| ")
        tokens, layers = model_layers(init, text_a, text_b or None)  # a pair: segment ids 1 for B
        assert [f["token"] for f in record["features"]] == tokens
        for index, expected in ((-1, layers[-1]), (0, layers[0]), (-2, layers[-2])):
            got = torch.tensor([[next(layer["values"] for layer in f["layers"] if layer["index"] == index)
                                 for f in record["features"]]])[0]
            assert torch.allclose(got, expected, atol=1e-6, rtol=0), index


def test_batching_and_padding_do_not_change_the_values(extracted, tiny_encoder, tmp_path):
    init, config = tiny_encoder
    args = ["--input_file", str(extracted["root"] / "input.txt"), "--bert_model", str(init), "--config_file",
            str(config), "--vocab_file", str(VOCAB), "--do_lower_case", "--layers", "-1,0,-2"]
    assert extract_features.main([*args, "--output_file", str(tmp_path / "b.jsonl"), "--batch_size", "8"]) == 0
    batched = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for one, two in zip(batched, extracted["records"]):
        a = torch.tensor([[layer["values"] for layer in f["layers"]] for f in one["features"]])
        b = torch.tensor([[layer["values"] for layer in f["layers"]] for f in two["features"]])
        assert torch.allclose(a, b, atol=2e-6, rtol=0)


def test_truncation_empty_lines_and_errors(tiny_encoder, tmp_path, capsys):
    init, config = tiny_encoder
    source = tmp_path / "in.txt"
    source.write_text("one two three four five six seven eight\n\na b c ||| d e f g h i\n", encoding="utf-8")
    base = ["--input_file", str(source), "--bert_model", "tiny", "--init_checkpoint", str(init), "--config_file",
            str(config), "--vocab_file", str(VOCAB), "--do_lower_case"]
    out = tmp_path / "out.jsonl"
    assert extract_features.main([*base, "--output_file", str(out), "--max_seq_length", "8", "--layers", "1"]) == 0
    tokens = [[f["token"] for f in json.loads(line)["features"]] for line in out.read_text().splitlines()]
    assert tokens == [["[CLS]", "one", "two", "three", "four", "five", "six", "[SEP]"],
                      ["[CLS]", "[SEP]"],  # an empty line keeps its index
                      ["[CLS]", "a", "b", "c", "[SEP]", "d", "e", "[SEP]"]]  # the longer side gave way
    cases = [
        (["--layers", "-1,-3"], r"--layers '-1,-3': \[-3\] out of range for a model of 2 layers \(valid: -2\.\.1\)"),
        (["--layers", "last"], "not a comma-separated list of whole numbers"),
        (["--init_checkpoint", str(tmp_path / "none.pt")], "--init_checkpoint .*none.pt does not exist"),
        (["--vocab_file", str(tmp_path / "none.txt")], "--vocab_file .*none.txt does not exist"),
        (["--input_file", str(tmp_path / "missing.txt")], "--input_file .*missing.txt does not exist"),
        (["--max_seq_length", "2"], "--max_seq_length must be >= 3"),
    ]
    for extra, message in cases:
        assert extract_features.main([*base, "--output_file", str(tmp_path / "never.jsonl"), *extra]) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("extract_features.py: error:") and re.search(message, err), err
    assert not (tmp_path / "never.jsonl").exists()
    # A bare model name cannot be downloaded: say which flags replace it.
    assert extract_features.main(["--input_file", str(source), "--output_file", str(out), "--bert_model",
                                  "bert-base-uncased"]) == 1
    assert "names are not downloaded" in capsys.readouterr().err


def test_model_folder_alone_and_a_pretraining_checkpoint(tiny_encoder, tmp_path):
    import shutil

    from modeling import BertConfig, BertForPreTraining

    _, config_file = tiny_encoder
    torch.manual_seed(1)
    pretrained = BertForPreTraining(BertConfig.from_json_file(config_file))
    folder = tmp_path / "model"
    pretrained.save_pretrained(folder)  # config.json + pytorch_model.bin, MLM/NSP heads included
    shutil.copy(VOCAB, folder / "vocab.txt")
    source = tmp_path / "in.txt"
    source.write_text(LINES[0] + "\n", encoding="utf-8")
    # --bert_model is the folder: weights, config and vocabulary come from it; the heads are left out.
    assert extract_features.main(["--input_file", str(source), "--output_file", str(tmp_path / "out.jsonl"),
                                  "--bert_model", str(folder), "--do_lower_case", "--layers", "-1"]) == 0
    record = json.loads((tmp_path / "out.jsonl").read_text())
    got = torch.tensor([f["layers"][0]["values"] for f in record["features"]])
    tokens, layers = model_layers(folder, LINES[0])
    assert [f["token"] for f in record["features"]] == tokens
    with torch.no_grad():
        ids = torch.tensor([BertTokenizer(VOCAB).convert_tokens_to_ids(tokens)])
        expected = pretrained.eval().bert(ids, torch.zeros_like(ids), torch.ones_like(ids))[0][0]
    assert torch.allclose(got, expected, atol=1e-6, rtol=0) and torch.allclose(layers[-1], expected, atol=1e-6)
