"""Distillation: each loss against a direct formula, the model's optional recording path, bad input, and the
general -> task (backbone, prediction) chain on tiny models through the real entry scripts."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import run_glue
from distillation import general_distill, task_distill
from distillation.losses import (
    BackboneLoss,
    DistillConfig,
    Projection,
    layer_mapping,
    relation_kl,
    soft_cross_entropy,
    token_loss,
    value_relation,
)
from modeling import (
    MASK_ADDER,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    record_states,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO / "vocab" / "vocab"
SST2 = REPO / "data" / "sample" / "glue" / "SST-2"
BACKBONE = REPO / "distillation" / "distillation_config_backbone.json"


def padding_mask(batch: int, seq: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Losses against direct formulas
# ---------------------------------------------------------------------------------------------------------------


def direct_relation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum over real query rows of KL(p || q) over real keys, divided by heads x real rows, written out in loops."""
    total, rows = 0.0, 0
    batch, heads, seq, _ = student.shape
    for b in range(batch):
        real = [j for j in range(seq) if mask[b, j]]
        for n in range(heads):
            for i in real:
                p = torch.softmax(teacher[b, n, i, real].double(), dim=0)
                q = torch.softmax(student[b, n, i, real].double(), dim=0)
                total += float((p * (p.log() - q.log())).sum())
                rows += 1
    return total / rows


def test_attention_kl_matches_formula_and_ignores_padding():
    torch.manual_seed(0)
    mask = padding_mask(3, 7, [7, 4, 2])
    student, teacher = torch.randn(3, 5, 7, 7), torch.randn(3, 5, 7, 7)
    adder = (1 - mask[:, None, None, :].float()) * MASK_ADDER  # as the model records them
    got = relation_kl(student + adder, teacher + adder, mask)
    assert got.item() == pytest.approx(direct_relation_kl(student, teacher, mask), rel=1e-5)
    # What sits at padded keys or in padded query rows changes nothing.
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[1, :, :, 4:] = 50.0
    noisy_t[2, :, 2:, :] = -30.0
    assert relation_kl(noisy_s, noisy_t, mask).item() == pytest.approx(got.item(), rel=1e-5)
    assert relation_kl(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_value_relation_kl_matches_formula():
    torch.manual_seed(1)
    mask = padding_mask(2, 6, [6, 3])
    values_s, values_t = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 8)  # head sizes may differ
    relation_s = torch.einsum("bnid,bnjd->bnij", values_s, values_s) / math.sqrt(5)
    relation_t = torch.einsum("bnid,bnjd->bnij", values_t, values_t) / math.sqrt(8)
    torch.testing.assert_close(value_relation(values_s), relation_s)
    got = relation_kl(value_relation(values_s), value_relation(values_t), mask)
    assert got.item() == pytest.approx(direct_relation_kl(relation_s, relation_t, mask), rel=1e-5)


def test_hidden_state_losses_through_the_projection_match_formulas():
    torch.manual_seed(2)
    mask = padding_mask(2, 5, [5, 2])
    student, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 10)
    projection = Projection(6, 10)
    with torch.no_grad():
        projected = student @ projection.fit_dense.weight.T + projection.fit_dense.bias
    cosines, squares = [], []
    for b in range(2):
        for i in range(int(mask[b].sum())):
            s, t = projected[b, i], teacher[b, i]
            cosines.append(1 - float(s @ t / (s.norm() * t.norm())))
            squares.append(float(((s - t) ** 2).mean()))
    assert token_loss(projection(student), teacher, mask, "cosine").item() == pytest.approx(
        sum(cosines) / len(cosines), rel=1e-5)
    assert token_loss(projection(student), teacher, mask, "mse").item() == pytest.approx(
        sum(squares) / len(squares), rel=1e-5)


def test_soft_cross_entropy_with_temperature_matches_formula():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    for temperature in (1.0, 2.5):
        p = torch.softmax(teacher / temperature, dim=-1)
        log_q = torch.log_softmax(student / temperature, dim=-1)
        expected = -(p * log_q).sum() / p.numel()  # the reference's mean over every element
        assert soft_cross_entropy(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-6)
    hot = soft_cross_entropy(student, teacher, 1.0)
    assert hot.item() > soft_cross_entropy(teacher, teacher, 1.0).item()  # the teacher itself scores best


def test_layer_mappings():
    assert layer_mapping(2, 6, "last_layer") == [(1, 5)]
    assert layer_mapping(3, 6, "uniform") == [(0, 1), (1, 3), (2, 5)]
    with pytest.raises(ValueError, match="multiple"):
        layer_mapping(4, 6, "uniform")


def test_backbone_loss_sums_the_selected_terms(tmp_path):
    torch.manual_seed(4)
    teacher_cfg = BertConfig(vocab_size=99, hidden_size=12, num_hidden_layers=4, num_attention_heads=2,
                             intermediate_size=20)
    student_cfg = BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=11)
    teacher, student = BertModel(teacher_cfg).eval(), BertModel(student_cfg).eval()
    ids, mask = torch.randint(0, 99, (2, 6)), padding_mask(2, 6, [6, 3])
    with record_states(teacher) as t_states:
        teacher(ids, None, mask)
    with record_states(student) as s_states:
        student(ids, None, mask)
    config = DistillConfig(use_attention_scores=True, use_hidden_states=True, use_value_states=True,
                           use_embedding_states=True, student_teacher_layer_mapping="uniform")
    loss = BackboneLoss(config, 2, 4, 8, 12)
    total, terms = loss(s_states, t_states, mask)
    expected_attention = sum(relation_kl(s_states.attention_scores[s], t_states.attention_scores[t], mask)
                             for s, t in ((0, 1), (1, 3)))
    expected_hidden = sum(token_loss(loss.projection(s_states.hidden_states[s]), t_states.hidden_states[t], mask,
                                     "cosine") for s, t in ((0, 1), (1, 3)))
    assert terms["attention_loss"].item() == pytest.approx(expected_attention.item(), rel=1e-6)
    assert terms["hidden_state_loss"].item() == pytest.approx(expected_hidden.item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    assert set(terms) == {"attention_loss", "value_state_loss", "hidden_state_loss", "embedding_state_loss"}
    total.backward()
    assert student.embeddings.word_embeddings.weight.grad is not None
    assert loss.projection.fit_dense.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# The model's optional recording path
# ---------------------------------------------------------------------------------------------------------------


def test_record_states_changes_nothing_outside_and_records_scores_inside():
    torch.manual_seed(5)
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37)
    model = BertForSequenceClassification(config, num_labels=3).eval()
    keys = list(model.state_dict())
    ids, mask = torch.randint(0, 99, (13, 7)), padding_mask(13, 7, [7] * 6 + [3] * 7)
    plain = model(ids, None, mask)
    with record_states(model) as states:
        recorded = model(ids, None, mask)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys
    assert len(states.hidden_states) == len(states.attention_scores) == len(states.value_states) == 2
    assert states.embeddings.shape == (13, 7, 32) and states.value_states[0].shape == (13, 4, 7, 8)
    # Layer 0's scores are q k^T / sqrt(D) plus the mask adder, from the embedding output.
    attention = model.bert.encoder.layer[0].attention.self
    q = attention.query(states.embeddings).view(13, 7, 4, 8).transpose(1, 2)
    k = attention.key(states.embeddings).view(13, 7, 4, 8).transpose(1, 2)
    expected = q @ k.transpose(-1, -2) / math.sqrt(8) + (1 - mask[:, None, None, :].float()) * MASK_ADDER
    torch.testing.assert_close(states.attention_scores[0], expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(states.hidden_states[-1], model.bert(ids, None, mask)[0], atol=1e-5, rtol=1e-5)
    model(ids, None, mask)
    assert len(states.hidden_states) == 2  # nothing recorded after the context ends
    assert all(getattr(m, "recorder", None) is None for m in model.modules())


def test_record_states_refuses_activation_checkpointing():
    model = BertModel(BertConfig(vocab_size=99, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=9))
    model.checkpoint_activations(True)
    with pytest.raises(ValueError, match="checkpointing"), record_states(model):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 1, before training
# ---------------------------------------------------------------------------------------------------------------


def run_script(capsys: pytest.CaptureFixture, script: str, *argv: str) -> tuple[int, str]:
    """Run distillation/<script>'s main() in this process (quiet, in-process data loading): (exit status, stderr)."""
    module = {"general_distill.py": general_distill, "task_distill.py": task_distill}[script]
    quiet = ["--disable_progress_bar"] + (["--num_workers", "0"] if script == "general_distill.py" else [])
    capsys.readouterr()
    status = module.main([*argv, *quiet])
    return status, capsys.readouterr().err


def save_model(model_class: type, config: BertConfig, folder: Path, seed: int, **kwargs) -> Path:
    torch.manual_seed(seed)
    model_class(config, **kwargs).save_pretrained(folder)
    (folder / "vocab.txt").write_bytes(VOCAB.read_bytes())
    return folder


TEACHER = dict(hidden_size=24, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
               max_position_embeddings=128)
STUDENT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=29,
               max_position_embeddings=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher encoder and SST-2 classifier (random weights: only the plumbing is tested) and a student
    config."""
    root = tmp_path_factory.mktemp("distill_models")
    student_config = root / "student.json"
    BertConfig(**STUDENT).to_json_file(student_config)
    return {"teacher": save_model(BertModel, BertConfig(**TEACHER), root / "teacher", 0),
            "teacher_sst2": save_model(BertForSequenceClassification, BertConfig(**TEACHER), root / "teacher_sst2", 1),
            "student_config": student_config, "root": root}


def general_argv(shards: Path, models: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--input_dir", str(shards), "--teacher_model", str(models["teacher"]), "--student_model",
            str(models["student_config"]), "--output_dir", str(out), "--vocab_file", str(VOCAB),
            "--max_seq_length", "64", "--train_batch_size", "8", "--learning_rate", "1e-3", "--eval_step", "3",
            "--seed", "3", *extra]


def test_bad_input_is_one_clear_error_before_training(tmp_path, capsys, models, pretraining_shards):
    shards = pretraining_shards["train"]
    out = tmp_path / "out"
    # 1. Vocabulary mismatch between teacher and student.
    other_vocab = tmp_path / "student_vocab.json"
    BertConfig(**{**STUDENT, "vocab_size": 21128}).to_json_file(other_vocab)
    argv = general_argv(shards, models, out, "--max_steps", "2")
    argv[argv.index(str(models["student_config"]))] = str(other_vocab)
    status, err = run_script(capsys, "general_distill.py", *argv)
    assert status == 1 and "vocab_size 21128" in err and "teacher" in err, err
    # 2. A distillation config with an unknown key.
    bad = json.loads(BACKBONE.read_text())
    bad["distillation_config"]["use_attention_probs"] = True
    bad_config = tmp_path / "bad.json"
    bad_config.write_text(json.dumps(bad))
    status, err = run_script(capsys, "general_distill.py",
                             *general_argv(shards, models, out, "--distill_config", str(bad_config)))
    assert status == 1 and "unknown key(s) use_attention_probs" in err and str(bad_config) in err, err
    # 3. A student checkpoint whose weights are another architecture than its config.
    student = save_model(BertModel, BertConfig(**STUDENT), tmp_path / "student", 2)
    BertConfig(**{**STUDENT, "num_hidden_layers": 3}).to_json_file(student / "config.json")
    sst2 = ["--data_dir", str(SST2), "--task_name", "sst-2", "--output_dir", str(out), "--skip_features_cache"]
    status, err = run_script(capsys, "task_distill.py", *sst2, "--teacher_model", str(models["teacher_sst2"]),
                             "--student_model", str(student))
    assert status == 1 and "num_hidden_layers 2 in the weights, 3 in the config" in err, err
    assert not out.exists()  # every check ran before anything was written
    # 4. A teacher without the task head it is to teach (found when it loads, before any step).
    fine = save_model(BertModel, BertConfig(**STUDENT), tmp_path / "fine", 2)
    status, err = run_script(capsys, "task_distill.py", *sst2, "--teacher_model", str(models["teacher"]),
                             "--student_model", str(fine), "--max_steps", "1")
    assert status == 1 and "classifier.weight" in err and "fine-tune it first" in err, err
    assert not (out / "pytorch_model.bin").exists()


def test_distill_config_checks(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"distillation": True, "distillation_config": {"attention_loss": "l1"}}))
    with pytest.raises(ValueError, match="attention_loss must be one of kld, mse, cosine"):
        DistillConfig.from_json_file(config)
    config.write_text(json.dumps({"distilation": True}))
    with pytest.raises(ValueError, match="unknown key.*distilation"):
        DistillConfig.from_json_file(config)
    loaded = DistillConfig.from_json_file(BACKBONE)
    assert loaded.use_attention_scores and loaded.use_value_states and not loaded.use_pred_states


# ---------------------------------------------------------------------------------------------------------------
# The chain on tiny models: general -> resume -> task backbone -> prediction layer -> run_glue.py
# ---------------------------------------------------------------------------------------------------------------


def dll_records(path: Path) -> list[dict]:
    """The data of every dllogger log record (metadata records left out)."""
    lines = [json.loads(line[len("DLLL "):]) for line in path.read_text().splitlines() if line.startswith("DLLL ")]
    return [{"data": {}, **record} for record in lines]


def test_general_then_task_distillation_chain(tmp_path, capsys, models, pretraining_shards):
    shards = pretraining_shards["train"]
    general = tmp_path / "general"
    status, err = run_script(capsys, "general_distill.py", *general_argv(
        shards, models, general, "--max_steps", "6", "--num_steps_per_checkpoint", "3"))
    assert status == 0, err
    assert {"config.json", "pytorch_model.bin", "project.bin", "vocab.txt", "ckpt_6.pt"} <= {
        p.name for p in general.iterdir()}
    records = dll_records(general / "dllogger.json")
    losses = [r["data"] for r in records if "attention_loss" in r["data"]]
    assert len(losses) == 6 and {"attention_loss", "value_state_loss", "hidden_state_loss"} <= set(losses[0])
    cosines = [r["data"]["eval:last_hidden_cosine"] for r in records if "eval:last_hidden_cosine" in r["data"]]
    assert len(cosines) == 3  # steps 0, 3 and 6

    # Resume: from the straight run's ckpt_3 to step 6 gives the straight run's student (data position, schedule,
    # optimizer and RNG all restored).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt_3.pt").write_bytes((general / "ckpt_3.pt").read_bytes())
    status, err = run_script(capsys, "general_distill.py", *general_argv(
        shards, models, resumed, "--max_steps", "6", "--resume_from_checkpoint"))
    assert status == 0, err
    straight = torch.load(general / "pytorch_model.bin", weights_only=True)["model"]
    again = torch.load(resumed / "pytorch_model.bin", weights_only=True)["model"]
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, msg=key)

    # Task distillation, stage 1 (backbone; the projection continues from project.bin) and stage 2 (logits).
    common = ["--data_dir", str(SST2), "--task_name", "sst-2", "--teacher_model", str(models["teacher_sst2"]),
              "--do_lower_case", "--max_seq_length", "64", "--train_batch_size", "8", "--learning_rate", "1e-3",
              "--features_cache_dir", str(tmp_path / "cache")]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    status, err = run_script(capsys, "task_distill.py", *common, "--student_model", str(general),
                             "--output_dir", str(stage1), "--max_steps", "3")
    assert status == 0, err
    before = torch.load(general / "pytorch_model.bin", weights_only=True)["model"]
    after = torch.load(stage1 / "pytorch_model.bin", weights_only=True)["model"]
    key = "encoder.layer.1.output.dense.weight"
    assert not torch.equal(after["bert." + key], before[key])
    assert (stage1 / "project.bin").is_file()
    status, err = run_script(capsys, "task_distill.py", *common, "--student_model", str(stage1),
                             "--output_dir", str(stage2), "--max_steps", "4", "--pred_distill", "--temperature", "2",
                             "--do_eval", "--eval_step", "2")
    assert status == 0, err
    evaluations = json.loads((stage2 / "eval_results.txt").read_text())
    assert [e["step"] for e in evaluations] == [2, 4] and 0.0 <= evaluations[-1]["acc"] <= 1.0
    stage1_head = torch.load(stage1 / "pytorch_model.bin", weights_only=True)["model"]["classifier.weight"]
    stage2_head = torch.load(stage2 / "pytorch_model.bin", weights_only=True)["model"]["classifier.weight"]
    assert not torch.equal(stage1_head, stage2_head)

    # The student is an ordinary fine-tuned model: run_glue.py evaluates it alike and it exports to HF format.
    assert run_glue.main(["--data_dir", str(SST2), "--bert_model", "s", "--task_name", "sst-2", "--output_dir",
                          str(tmp_path / "glue"), "--init_checkpoint", str(stage2), "--vocab_file", str(VOCAB),
                          "--config_file", str(stage2 / "config.json"), "--do_eval", "--do_lower_case",
                          "--max_seq_length", "64", "--skip_features_cache", "--disable_progress_bar"]) == 0
    glue = json.loads((tmp_path / "glue" / "results.txt").read_text())
    assert glue["acc"] == pytest.approx(evaluations[-1]["acc"])
    student = BertForSequenceClassification.from_pretrained(stage2, num_labels=2)
    student.save_pretrained(tmp_path / "hf", hf_format=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2


def test_squad_task_distillation(tmp_path, capsys, models):
    """SQuAD v1.1 (answerable questions of the bundled v2.0 sample): both stages run and the student predicts."""
    data = tmp_path / "squad"
    data.mkdir()
    for split, name in (("train", "train-v1.1.json"), ("dev", "dev-v1.1.json")):
        dataset = json.loads((REPO / "data" / "sample" / "squad" / "v2.0" / f"{split}-v2.0.json").read_text())
        for article in dataset["data"]:
            for paragraph in article["paragraphs"]:
                paragraph["qas"] = [qa for qa in paragraph["qas"] if not qa.get("is_impossible")]
        (data / name).write_text(json.dumps(dataset))
    teacher = save_model(BertForQuestionAnswering, BertConfig(**TEACHER), tmp_path / "teacher_qa", 4)
    student = save_model(BertModel, BertConfig(**STUDENT), tmp_path / "student", 5)
    common = ["--data_dir", str(data), "--task_name", "squadv1.1", "--teacher_model", str(teacher),
              "--do_lower_case", "--max_seq_length", "96", "--doc_stride", "48", "--train_batch_size", "4",
              "--features_cache_dir", str(tmp_path / "cache")]
    status, err = run_script(capsys, "task_distill.py", *common, "--student_model", str(student),
                             "--output_dir", str(tmp_path / "s1"), "--max_steps", "2")
    assert status == 0, err
    status, err = run_script(capsys, "task_distill.py", *common, "--student_model", str(tmp_path / "s1"),
                             "--output_dir", str(tmp_path / "s2"), "--max_steps", "2", "--pred_distill", "--do_eval")
    assert status == 0, err
    results = json.loads((tmp_path / "s2" / "eval_results.txt").read_text())[-1]
    assert 0.0 <= results["F1"] <= 100.0 and (tmp_path / "s2" / "predictions.json").is_file()
    BertForQuestionAnswering.from_pretrained(tmp_path / "s2")  # loads as run_squad.py / inference.py load it


def test_soft_cross_entropy_trains_student_toward_teacher():
    """A few steps of the prediction-layer loss move a student's class distribution to the teacher's."""
    torch.manual_seed(6)
    teacher_logits = torch.randn(16, 3) * 3
    student = torch.zeros(16, 3, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=50.0)
    gap = F.kl_div(student.log_softmax(-1), teacher_logits.softmax(-1), reduction="batchmean").item()
    for _ in range(50):
        optimizer.zero_grad()
        soft_cross_entropy(student, teacher_logits).backward()
        optimizer.step()
    assert F.kl_div(student.log_softmax(-1), teacher_logits.softmax(-1), reduction="batchmean").item() < gap / 10


def test_e2e_script_modes():
    """The end-to-end script documents itself and refuses an unknown mode before doing anything."""
    script = REPO / "distillation" / "run_e2e_distillation.sh"
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "cpu_demo" in shown.stdout
    bad = subprocess.run(["bash", str(script), "tpu_demo"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown mode 'tpu_demo'" in bad.stderr
