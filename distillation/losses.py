"""Distillation losses (TinyBERT / MiniLM) and the distillation config JSON that selects them.

The reference's `distillation_config_*.json` layout is kept: ``{"distillation": true, "distillation_config":
{"use_attention_scores": ..., "attention_loss": "kld", ...}}``. B = batch, S = sequence, N = heads, D = head size,
H = hidden size throughout.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from file_utils import PathLike
from modeling import EncoderStates

LossName = Literal["kld", "mse", "cosine"]
LOSS_NAMES = ("kld", "mse", "cosine")
LAYER_MAPPINGS = ("last_layer", "uniform")
MASKED = -1e9  # fp32 logit of an excluded key: exp() is exactly 0


@dataclass
class DistillConfig:
    """Which teacher signals the student learns from, and by which loss (the reference's keys and defaults)."""

    use_attention_scores: bool = False  # KL between per-head attention distributions
    use_hidden_states: bool = False  # layer outputs, through `Projection` when the widths differ
    use_value_states: bool = False  # MiniLM's value-relation KL
    use_embedding_states: bool = False  # the embedding block's output
    use_pred_states: bool = False  # prediction-layer (logits) soft cross-entropy, task distillation only
    attention_loss: LossName = "kld"
    hidden_state_loss: LossName = "cosine"
    embedding_state_loss: LossName = "cosine"
    value_state_loss: LossName = "kld"
    student_teacher_layer_mapping: Literal["last_layer", "uniform"] = "last_layer"

    @property
    def uses_backbone(self) -> bool:
        return self.use_attention_scores or self.use_hidden_states or self.use_value_states \
            or self.use_embedding_states

    @classmethod
    def from_json_file(cls, path: PathLike) -> DistillConfig:
        """Read and check a distillation config; an unknown key, a wrong type or value is a ValueError naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--distill_config {path} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--distill_config {path}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"--distill_config {path}: expected a JSON object")
        unknown = sorted(set(raw) - {"distillation", "distillation_config"})
        if unknown:
            raise ValueError(f"--distill_config {path}: unknown key(s) {', '.join(unknown)} "
                             "(expected distillation, distillation_config)")
        if raw.get("distillation", True) is not True:
            raise ValueError(f"--distill_config {path}: \"distillation\" must be true")
        values = raw.get("distillation_config", {})
        if not isinstance(values, dict):
            raise ValueError(f"--distill_config {path}: distillation_config must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"--distill_config {path}: unknown key(s) {', '.join(unknown)} in distillation_config "
                             f"(known: {', '.join(fields)})")
        for key, value in values.items():
            if key.startswith("use_") and not isinstance(value, bool):
                raise ValueError(f"--distill_config {path}: {key} must be true or false, got {value!r}")
            if key.endswith("_loss") and value not in LOSS_NAMES:
                raise ValueError(f"--distill_config {path}: {key} must be one of {', '.join(LOSS_NAMES)}, "
                                 f"got {value!r}")
            if key == "student_teacher_layer_mapping" and value not in LAYER_MAPPINGS:
                raise ValueError(f"--distill_config {path}: {key} must be one of {', '.join(LAYER_MAPPINGS)}, "
                                 f"got {value!r}")
        config = cls(**values)
        if not (config.uses_backbone or config.use_pred_states):
            raise ValueError(f"--distill_config {path}: no use_* key is true, so there is nothing to distill")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"distillation": True, "distillation_config": dataclasses.asdict(self)}


# ----------------------------------------------------------------------------------------------------------------
# The loss formulas
# ----------------------------------------------------------------------------------------------------------------


def relation_kl(student: Tensor, teacher: Tensor, attention_mask: Tensor | None) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over keys, averaged over heads and real query rows.

    student, teacher: [B, N, S, S] logits (attention scores, or value relations); attention_mask [B, S], 1 = real.
    Padded keys are excluded from both distributions and padded query rows from the mean (the reference zeroes
    scores <= -100 instead, which lets padding take probability mass); its normalisation, the KL summed over keys
    and divided by B * N * S, is this mean when nothing is padded.
    """
    student, teacher = student.float(), teacher.float()
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        student = student.masked_fill(~keys, MASKED)  # finite, so that 0 * (log p - log q) stays 0, also in backward
        teacher = teacher.masked_fill(~keys, MASKED)
    log_q, log_p = student.log_softmax(dim=-1), teacher.log_softmax(dim=-1)
    per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, N, S]
    if attention_mask is None:
        return per_row.mean()
    rows = attention_mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * rows).sum() / rows.sum().clamp(min=1.0)


def value_relation(values: Tensor) -> Tensor:
    """MiniLM's value relation V Vᵀ / sqrt(D): [B, N, S, D] -> [B, N, S, S] logits."""
    return values @ values.transpose(-1, -2) / math.sqrt(values.shape[-1])


def attention_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean squared error of two [B, N, S, S] score maps over real (query, key) pairs (TinyBERT's attention loss)."""
    diff = (student.float() - teacher.float()) ** 2
    if attention_mask is None:
        return diff.mean()
    mask = attention_mask.float()
    pairs = (mask[:, :, None] * mask[:, None, :])[:, None].expand_as(diff)  # [B, N, S, S]
    return (diff * pairs).sum() / pairs.sum().clamp(min=1.0)


def token_loss(student: Tensor, teacher: Tensor, attention_mask: Tensor | None, kind: LossName) -> Tensor:
    """Hidden-state loss per real token of [B, S, H] states of equal width: mean (1 - cosine) or mean squared error.

    "cosine" is the reference's ``CosineEmbeddingLoss`` with target 1 (padded tokens left out here); "mse" averages
    over tokens and H.
    """
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1)  # [B, S]
    elif kind == "mse":
        per_token = ((student - teacher) ** 2).mean(dim=-1)
    else:
        raise ValueError(f"hidden-state loss must be cosine or mse, got {kind!r}")
    if attention_mask is None:
        return per_token.mean()
    mask = attention_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """The reference's prediction-layer loss: mean over all elements of -softmax(t / T) * log_softmax(s / T)."""
    targets = (teacher_logits.float() / temperature).softmax(dim=-1)
    return (-targets * (student_logits.float() / temperature).log_softmax(dim=-1)).mean()


def layer_mapping(student_layers: int, teacher_layers: int, mapping: str) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 0-based: the last layers only, or uniform (teacher i*k + k - 1)."""
    if mapping == "last_layer":
        return [(student_layers - 1, teacher_layers - 1)]
    if teacher_layers % student_layers:
        raise ValueError(f"uniform layer mapping needs the teacher's {teacher_layers} layers to be a multiple of the "
                         f"student's {student_layers}")
    k = teacher_layers // student_layers
    return [(i, i * k + k - 1) for i in range(student_layers)]


class Projection(nn.Module):
    """Linear map of student states to the teacher's width (TinyBERT's ``fit_dense``; saved as ``project.bin``)."""

    def __init__(self, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.fit_dense = nn.Linear(student_hidden, teacher_hidden)
        nn.init.normal_(self.fit_dense.weight, std=0.02)
        nn.init.zeros_(self.fit_dense.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.fit_dense(hidden_states)


class BackboneLoss(nn.Module):
    """The backbone distillation loss: attention + hidden (+ embedding) + value terms, as the config selects.

    Holds the projection (a trained parameter when the widths differ, identity otherwise). ``forward`` returns the
    total and each term (detached) for the log.
    """

    def __init__(self, config: DistillConfig, student_layers: int, teacher_layers: int, student_hidden: int,
                 teacher_hidden: int) -> None:
        super().__init__()
        self.config = config
        self.pairs = layer_mapping(student_layers, teacher_layers, config.student_teacher_layer_mapping)
        compares_states = config.use_hidden_states or config.use_embedding_states  # else it would get no gradient
        self.projection: nn.Module = Projection(student_hidden, teacher_hidden) \
            if student_hidden != teacher_hidden and compares_states else nn.Identity()

    def _relation(self, student: Tensor, teacher: Tensor, mask: Tensor | None, kind: str) -> Tensor:
        if kind == "kld":
            return relation_kl(student, teacher, mask)
        if kind == "mse":
            return attention_mse(student, teacher, mask)
        raise ValueError(f"attention and value losses must be kld or mse, got {kind!r}")

    def forward(self, student: EncoderStates, teacher: EncoderStates,
                attention_mask: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, terms = self.config, {}
        if cfg.use_attention_scores:
            terms["attention_loss"] = sum(
                self._relation(student.attention_scores[s], teacher.attention_scores[t], attention_mask,
                               cfg.attention_loss) for s, t in self.pairs)
        if cfg.use_value_states:
            terms["value_state_loss"] = sum(
                self._relation(value_relation(student.value_states[s].float()),
                               value_relation(teacher.value_states[t].float()), attention_mask, cfg.value_state_loss)
                for s, t in self.pairs)
        if cfg.use_hidden_states:
            terms["hidden_state_loss"] = sum(
                token_loss(self.projection(student.hidden_states[s]), teacher.hidden_states[t], attention_mask,
                           cfg.hidden_state_loss) for s, t in self.pairs)
        if cfg.use_embedding_states:
            terms["embedding_state_loss"] = token_loss(self.projection(student.embeddings), teacher.embeddings,
                                                       attention_mask, cfg.embedding_state_loss)
        if not terms:
            raise ValueError("the distillation config selects no backbone loss (use_attention_scores, "
                             "use_hidden_states, use_value_states or use_embedding_states)")
        total = torch.stack(list(terms.values())).sum()
        return total, {k: v.detach() for k, v in terms.items()}


def check_compatible(student: Any, teacher: Any, config: DistillConfig) -> None:
    """Refuse a student/teacher pair the selected losses cannot compare (before any training), naming why."""
    if student.padded_vocab_size != teacher.padded_vocab_size:  # 30522 and 30528 are one vocabulary, padded
        raise ValueError(f"student vocab_size {student.vocab_size} does not match the teacher's {teacher.vocab_size}: "
                         "both must embed the same token ids (one --vocab_file)")
    if (config.use_attention_scores or config.use_value_states) \
            and student.num_attention_heads != teacher.num_attention_heads:
        raise ValueError(f"attention/value distillation compares heads one to one: the student has "
                         f"{student.num_attention_heads} heads, the teacher {teacher.num_attention_heads}")
    if config.uses_backbone:
        layer_mapping(student.num_hidden_layers, teacher.num_hidden_layers, config.student_teacher_layer_mapping)
