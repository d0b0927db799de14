"""distillation/data_augmentation.py: TinyBERT augmentation of GLUE and SQuAD training sets with a tiny random
masked LM (bundled vocabulary) and a hand-made GloVe file whose nearest neighbours are known."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared_path

from data.glue import get_processor
from distillation import data_augmentation as aug
from modeling import BertConfig, BertForPreTraining

VOCAB = REPO / "vocab" / "vocab"
SST2 = REPO / "data" / "sample" / "glue" / "SST-2"
SQUAD = REPO / "data" / "sample" / "squad" / "v2.0" / "train-v2.0.json"
# Every word a single WordPiece of the bundled vocabulary and no stop word: each goes to the masked LM.
PLAIN = "cat dog house river tree mountain garden window bridge forest castle ocean flower paper horse stone kitchen"
# 3-d vectors: the neighbours of "secretions" by cosine are fluids > liquids > juices ("12" is no word and
# "Secretions" the word itself); those of "gags" quips > jokes. Both words are several WordPieces.
GLOVE = """secretions 1 0 0
Secretions 0.99 0.01 0
12 0.95 0.05 0
fluids 0.9 0.1 0
liquids 0.8 0.2 0
juices 0.6 0.4 0
gags 0 1 0
quips 0 0.95 0.1
jokes 0.1 0.8 0.2
rock 0 0 1
"""


def save_mlm(folder: Path, favourite: str | None = None) -> Path:
    """A random tiny BertForPreTraining saved with save_pretrained, the bundled vocabulary beside it; a
    ``favourite`` word gets so large an output bias that it is the masked LM's first prediction everywhere."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=37, max_position_embeddings=160)
    model = BertForPreTraining(config)
    vocab = VOCAB.read_text(encoding="utf-8").splitlines()
    if favourite:
        with torch.no_grad():
            model.cls["predictions"].bias[vocab.index(favourite)] = 100.0
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_bytes(VOCAB.read_bytes())
    return folder


@pytest.fixture(scope="module")
def mlm(tmp_path_factory) -> Path:
    return save_mlm(tmp_path_factory.mktemp("mlm"))


def write_task(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def run_glue(mlm: Path, task: str, input_dir: Path, *extra: str, output_dir: Path | None = None) -> list[list[str]]:
    """Augment and return the rows of train_aug.tsv (written beside train.tsv unless ``output_dir``)."""
    out = ["--output_dir", str(output_dir)] if output_dir else []
    assert aug.main(["--pretrained_bert_model", str(mlm), "--task_name", task, "--input_dir", str(input_dir),
                     "--batch_size", "16", *out, *extra]) == 0
    written = (output_dir or input_dir) / "train_aug.tsv"
    return [line.split("\t") for line in written.read_text(encoding="utf-8").splitlines()]


def test_sst2_keeps_the_header_labels_and_originals_and_adds_n_copies(mlm, tmp_path):
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:31]
    task = write_task(tmp_path / "SST-2", lines)
    rows = run_glue(mlm, "sst-2", task, "--N", "3", output_dir=tmp_path / "out")
    original = [line.split("\t") for line in lines]
    assert rows[0] == original[0] == ["sentence", "label"]
    assert len(rows) == 1 + 30 * 4
    changed = 0
    for i, row in enumerate(original[1:]):
        group = rows[1 + 4 * i: 5 + 4 * i]
        assert group[0] == row  # the original first, unchanged (trailing space included)
        assert all(copy[1] == row[1] for copy in group)  # label kept
        assert all(len(copy[0].split()) == len(row[0].split()) for copy in group)  # words replaced one for one
        changed += sum(copy[0] != row[0] for copy in group[1:])
    assert changed > 60  # most of the 90 copies differ from their original


def test_pair_task_changes_both_sentences_and_no_other_column(mlm, tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    lines = [header, "1\t702876\t702977\tAmrozi accused his brother of deliberately distorting his evidence .\t"
             "Referring to him as only the witness , Amrozi accused his brother .",
             "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain in 1998 .\t"
             "Yucaipa bought Dominick 's in 1995 for $ 693 million ."]
    rows = run_glue(mlm, "mrpc", write_task(tmp_path / "MRPC", lines), "--N", "2", "--p", "1")
    assert "\t".join(rows[0]) == header and len(rows) == 1 + 2 * 3
    for i, line in enumerate(lines[1:]):
        row = line.split("\t")
        group = rows[1 + 3 * i: 4 + 3 * i]
        assert group[0] == row
        for copy in group[1:]:
            assert copy[:3] == row[:3] and copy[3] != row[3] and copy[4] != row[4]
    # run_glue.py's reader takes the file as a training set: every copy an example with its original's label.
    reread = tmp_path / "reread"
    reread.mkdir()
    (reread / "train.tsv").write_bytes((tmp_path / "MRPC" / "train_aug.tsv").read_bytes())
    examples = get_processor("mrpc").get_train_examples(reread)
    assert [e.label for e in examples] == ["1"] * 3 + ["0"] * 3
    assert [(e.text_a, e.text_b) for e in examples] == [(r[3], r[4]) for r in rows[1:]]


def test_cola_without_header_is_read_by_position(mlm, tmp_path):
    lines = ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
             "gj04\t0\t*\tThey drank the pub."]
    rows = run_glue(mlm, "CoLA", write_task(tmp_path / "CoLA", lines), "--N", "4", "--p", "1")
    assert len(rows) == 2 * 5
    for i, line in enumerate(lines):
        row = line.split("\t")
        assert rows[5 * i] == row
        assert all(copy[:3] == row[:3] and copy[3] != row[3] for copy in rows[5 * i + 1: 5 * i + 5])


def test_reference_command_line_with_glue_dir_and_per_task_n(mlm, tmp_path):
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:4]
    write_task(tmp_path / "glue" / "SST-2", lines)
    assert aug.main(["--pretrained_bert_model", str(mlm), "--glue_dir", str(tmp_path / "glue"),
                     "--task_name", "SST-2"]) == 0
    rows = (tmp_path / "glue" / "SST-2" / "train_aug.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 3 * (1 + 20)  # the reference's N for SST-2 is 20
    squad_dir = tmp_path / "squad" / "v1.1"
    squad_dir.mkdir(parents=True)
    (squad_dir / "train-v1.1.json").write_bytes(SQUAD.read_bytes())
    assert aug.main(["--pretrained_bert_model", str(mlm), "--glue_dir", str(squad_dir), "--task_name", "SQuADv1.1",
                     "--seed=1", "--N", "1"]) == 0
    questions = [qa for pg in json.loads((squad_dir / "train-v1.1_aug.json").read_text())["data"][0]["paragraphs"]
                 for qa in pg["qas"]]
    assert len(questions) == 2 * 89


def test_same_seed_same_output_other_seed_other_output(mlm, tmp_path):
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:11]
    task = write_task(tmp_path / "SST-2", lines)
    outputs = []
    for seed in ("1", "1", "2"):
        run_glue(mlm, "sst-2", task, "--N", "3", "--seed", seed)
        outputs.append((task / "train_aug.tsv").read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_each_candidate_word_is_replaced_with_probability_p(mlm, tmp_path, p):
    n = 300 if p == 0.4 else 5
    rows = run_glue(mlm, "sst-2", write_task(tmp_path / "SST-2", ["sentence\tlabel", f"{PLAIN}\t1"]),
                    "--N", str(n), "--p", str(p))
    words = PLAIN.split()
    copies = [row[0].split() for row in rows[2:]]
    assert len(copies) == n and all(len(copy) == len(words) for copy in copies)
    rate = np.mean([[new != old for new, old in zip(copy, words)] for copy in copies])
    # p = 0.4: 300 copies x 17 words, binomial standard deviation 0.007.
    assert rate == pytest.approx(p, abs=0.03)


def test_the_word_itself_is_never_a_candidate(tmp_path):
    model = save_mlm(tmp_path / "mlm", favourite="river")
    rows = run_glue(model, "sst-2", write_task(tmp_path / "SST-2", ["sentence\tlabel", "River cat river dog\t1"]),
                    "--N", "5", "--p", "1", "--M", "1")
    copies = [row[0].split() for row in rows[2:]]
    assert {c[1] for c in copies} == {c[3] for c in copies} == {"river"}  # the first prediction, where it may be
    assert "river" not in {c[0].lower() for c in copies} | {c[2] for c in copies}


def test_words_of_several_pieces_take_their_glove_neighbours(mlm, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text(GLOVE, encoding="utf-8")
    neighbours = aug.GloveNeighbours.load(glove).neighbours(["secretions", "Gags", "labored"], 3)
    assert neighbours == {"secretions": ["fluids", "liquids", "juices"], "Gags": ["quips", "jokes", "juices"],
                          "labored": []}
    assert aug.GloveNeighbours.load(glove, max_words=5).neighbours(["secretions"], 3) == {
        "secretions": ["fluids", "liquids"]}  # --glove_vocab_size 5 reads secretions ... liquids
    text = "Secretions and gags , labored"
    task = write_task(tmp_path / "SST-2", ["sentence\tlabel", f"{text}\t0"])
    rows = run_glue(mlm, "sst-2", task, "--N", "40", "--p", "1", "--M", "2", "--glove_embs", str(glove))
    firsts, seconds = {r[0].split()[0] for r in rows[2:]}, {r[0].split()[2] for r in rows[2:]}
    assert firsts == {"Fluids", "Liquids"} and seconds == {"quips", "jokes"}  # case of the replaced word kept
    assert {r[0].split()[4] for r in rows[2:]} == {"labored"}  # several pieces, no GloVe vector: kept
    rows = run_glue(mlm, "sst-2", task, "--N", "10", "--p", "1")
    assert {r[0].split()[0] for r in rows[2:]} == {"Secretions"}  # without GloVe such words are kept


def test_word_spans_skip_stop_words_answers_and_parts_of_longer_words():
    text = "The 3rd cat_x sat on café mats, not dog's (A-list) E=mc2"
    spans = aug.word_spans(text, protected=[(text.index("mats"), text.index("mats") + 2)])
    # "The", "on", "not", "s", "A" are stop words; "rd", "cat", "x", "caf", "mc" touch digits, "_" or accents.
    assert [text[s:e] for s, e in spans] == ["sat", "dog", "list", "E"]
    assert aug.match_case("ocean", "River") == "Ocean" and aug.match_case("ocean", "NASA") == "OCEAN"
    assert aug.shift_offset(10, [(0, 3, "tree"), (5, 8, "a"), (12, 14, "xyz")]) == 10 + 1 - 2


def test_lower_case_follows_the_vocabulary(tmp_path):
    cased = tmp_path / "cased.txt"
    cased.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nThe\nthe\n", encoding="utf-8")
    assert aug.vocab_is_uncased(VOCAB) and not aug.vocab_is_uncased(cased)


def squad_answers_in_place(dataset: dict) -> int:
    """Assert every answer and plausible answer text sits at its answer_start; return the count checked."""
    checked = 0
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                for answer in qa["answers"] + qa.get("plausible_answers", []):
                    start = answer["answer_start"]
                    assert paragraph["context"][start:start + len(answer["text"])] == answer["text"], qa["id"]
                    checked += 1
    return checked


def test_squad_context_copies_keep_every_answer_at_its_offset(mlm, tmp_path):
    out = tmp_path / "aug.json"
    assert aug.main(["--pretrained_bert_model", str(mlm), "--task_name", "SQuADv1.1", "--input_file", str(SQUAD),
                     "--output_file", str(out), "--N", "3", "--p", "0.6"]) == 0
    source, result = (json.loads(path.read_text(encoding="utf-8")) for path in (SQUAD, out))
    assert result["version"] == source["version"]
    paragraphs = source["data"][0]["paragraphs"]
    copies = result["data"][0]["paragraphs"]
    assert len(copies) == 4 * len(paragraphs)
    ids = [qa["id"] for pg in copies for qa in pg["qas"]]
    assert len(ids) == len(set(ids)) == 4 * sum(len(pg["qas"]) for pg in paragraphs)
    moved = 0
    for i, paragraph in enumerate(paragraphs):
        assert copies[4 * i] == paragraph
        for k in range(1, 4):
            copy = copies[4 * i + k]
            assert copy["context"] != paragraph["context"]
            assert [qa["id"] for qa in copy["qas"]] == [f"{qa['id']}_aug{k}" for qa in paragraph["qas"]]
            assert [qa["question"] for qa in copy["qas"]] == [qa["question"] for qa in paragraph["qas"]]
            moved += sum(a["answer_start"] != b["answer_start"] for qa, qb in zip(paragraph["qas"], copy["qas"])
                         for a, b in zip(qa["answers"], qb["answers"]))
    assert squad_answers_in_place(result) == 4 * squad_answers_in_place(source) > 300
    assert moved > 50  # the offsets really moved: words of other lengths were put before the answers


def test_squad_answers_in_place_on_real_dev_paragraphs(mlm, tmp_path):
    """SQuAD v2.0 dev paragraphs: up to five answers per question, plausible answers, non-ASCII text."""
    dataset = json.loads(shared_path("squad2", "haystack_small", "small.json").read_text(encoding="utf-8"))
    dataset["data"] = [{**dataset["data"][0], "paragraphs": dataset["data"][0]["paragraphs"][:20]}]
    source, out = tmp_path / "dev.json", tmp_path / "aug.json"
    source.write_text(json.dumps(dataset), encoding="utf-8")
    assert aug.main(["--pretrained_bert_model", str(mlm), "--task_name", "squad", "--input_file", str(source),
                     "--output_file", str(out), "--N", "2", "--p", "0.6"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert squad_answers_in_place(result) == 3 * squad_answers_in_place(dataset) > 500


def test_squad_question_copies(mlm, tmp_path):
    out = tmp_path / "aug.json"
    assert aug.main(["--pretrained_bert_model", str(mlm), "--task_name", "squad", "--input_file", str(SQUAD),
                     "--output_file", str(out), "--N", "2", "--squad_augment", "question", "--p", "1"]) == 0
    source, result = (json.loads(path.read_text(encoding="utf-8")) for path in (SQUAD, out))
    for paragraph, copy in zip(source["data"][0]["paragraphs"], result["data"][0]["paragraphs"], strict=True):
        assert copy["context"] == paragraph["context"] and len(copy["qas"]) == 3 * len(paragraph["qas"])
        for i, qa in enumerate(paragraph["qas"]):
            assert copy["qas"][3 * i] == qa
            for k in (1, 2):
                other = copy["qas"][3 * i + k]
                assert other["id"] == f"{qa['id']}_aug{k}" and other["answers"] == qa["answers"]
                assert other["question"] != qa["question"]
    squad_answers_in_place(result)


def test_runs_as_a_script_from_the_repository_root(mlm, tmp_path):
    task = write_task(tmp_path / "RTE", ["index\tsentence1\tsentence2\tlabel",
                                         "0\tDana Reeve died of lung cancer.\tReeve was ill.\tentailment"])
    done = subprocess.run([sys.executable, "distillation/data_augmentation.py", "--pretrained_bert_model", str(mlm),
                           "--task_name", "rte", "--input_dir", str(task), "--N", "2", "--no_cuda"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len((task / "train_aug.tsv").read_text(encoding="utf-8").splitlines()) == 1 + 3
    assert '"rows_written": 3' in done.stderr


def test_errors_name_the_flag_or_file_and_write_nothing(mlm, tiny_encoder, tmp_path, capsys):
    task = write_task(tmp_path / "SST-2", ["sentence\tlabel", "a fine film\t1"])
    base = ["--pretrained_bert_model", str(mlm), "--task_name", "sst-2", "--input_dir", str(task)]

    def fails(argv: list[str], *needles: str) -> None:
        assert aug.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("data_augmentation.py: error: ")
        assert all(needle in err[0] for needle in needles), err[0]
        assert sorted(p.name for p in task.iterdir()) == ["train.tsv"]  # nothing written, no temporary file

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["--pretrained_bert_model", str(mlm), "--task_name", "sst-2", "--input_dir", str(empty)],
          "--input_dir", "train.tsv")
    fails([*base[:3], "swag", *base[4:]], "unknown --task_name 'swag'", "sst-2", "squad")
    glove = tmp_path / "glove.txt"
    glove.write_text("cat 1 0 0\ndog 0 1 0\nhorse 0 1\n", encoding="utf-8")
    fails([*base, "--glove_embs", str(glove)], f"{glove}:3", "expected a word and 3 numbers")
    glove.write_text("cat 1 0 0\ndog 0 one 0\n", encoding="utf-8")
    fails([*base, "--glove_embs", str(glove)], f"{glove}:2", "one")
    small = tmp_path / "small"
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                  intermediate_size=37, max_position_embeddings=160)).save_pretrained(small)
    fails(["--pretrained_bert_model", str(small), *base[2:], "--vocab_file", str(VOCAB)],
          "--vocab_file", "30522 tokens", "embeds only 104")
    encoder, config = tiny_encoder
    fails(["--pretrained_bert_model", str(encoder), *base[2:], "--vocab_file", str(VOCAB), "--config_file",
           str(config)], "no masked-LM head", "cls.predictions.bias")
    fails([*base, "--p", "1.5"], "--p")
    fails([*base, "--max_seq_length", "200"], "--max_seq_length 200", "max_position_embeddings 160")
    fails([*base, "--amp", "--no_cuda"], "--amp", "CUDA")
    fails(["--pretrained_bert_model", str(mlm), "--task_name", "squad", "--input_file", str(SQUAD)], "--output_file")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "1", "question": "q", '
                   '"answers": [{"text": "abcd", "answer_start": 0}]}]}]}]}', encoding="utf-8")
    fails(["--pretrained_bert_model", str(mlm), "--task_name", "squad", "--input_file", str(bad),
           "--output_file", str(task / "out.json")], str(bad), "answer_start")
