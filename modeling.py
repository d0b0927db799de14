"""BERT in plain PyTorch: building blocks, `BertConfig`, the model classes, and checked weight import/export."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from file_utils import CheckpointError, PathLike, atomic_write, load_state_dict_file, save_checkpoint

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LEGACY_CONFIG_NAME = "bert_config.json"  # era-A name of the config file
WEIGHTS_NAME = "pytorch_model.bin"
SAFETENSORS_NAME = "model.safetensors"

# The reference adds -10000 to the scores of padded keys (its `(1 - mask) * -10000` adder). exp(-10000) is 0 in
# every float type, so padded keys get no weight, and the constant fits in fp16, unlike finfo.min.
MASK_ADDER = -10000.0
IGNORE_INDEX = -1  # the reference's "no label" value; Hugging Face's -100 is accepted too


# ----------------------------------------------------------------------------------------------------------------
# Activations


def gelu_erf(x: Tensor) -> Tensor:
    """Exact GELU, x * Phi(x) with the erf form: the BERT paper's, Google's BERT and Hugging Face's "gelu"."""
    return F.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation: what the reference's "gelu" (its bias_gelu kernel) computes."""
    return F.gelu(x, approximate="tanh")


# Activation names as this project's and the reference's config files mean them: "gelu" is the tanh form, as the
# reference computes it; the exact form, which the reference cannot express, is "gelu_erf". A Hugging Face
# config.json means its own names ("gelu" = erf) and is translated on reading (HF_TO_OURS) and on export.
ACT2FN: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": gelu_tanh,
    "bias_gelu": gelu_tanh,  # the reference's name of the same kernel
    "gelu_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,  # Hugging Face's names for the tanh form, unambiguous anywhere
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_erf": gelu_erf,
    "relu": F.relu,
    "tanh": torch.tanh,
    "swish": F.silu,
    "silu": F.silu,
}
HF_TO_OURS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "tanh": "tanh",
              "silu": "swish", "swish": "swish"}
OURS_TO_HF = {"gelu": "gelu_pytorch_tanh", "bias_gelu": "gelu_pytorch_tanh", "gelu_tanh": "gelu_pytorch_tanh",
              "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_erf": "gelu", "relu": "relu",
              "tanh": "tanh", "swish": "silu", "silu": "silu"}
OURS_TO_REFERENCE = {"gelu": "gelu", "bias_gelu": "gelu", "gelu_tanh": "gelu", "gelu_new": "gelu",
                     "gelu_pytorch_tanh": "gelu", "relu": "relu", "tanh": "tanh", "swish": "swish", "silu": "swish"}


class LinearActivation(nn.Linear):
    """A Linear layer followed by an activation; the reference's module, kept so its `dense_act` names load.

    Being an `nn.Linear`, it gets BERT's N(0, initializer_range) init (the reference's kept kaiming-uniform).
    """

    def __init__(self, in_features: int, out_features: int, act: str) -> None:
        super().__init__(in_features, out_features)
        self.act_name = act
        self.act = ACT2FN[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act_name}"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (post-LN transformer layer: LayerNorm(dropout(sublayer(x)) + x))


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm and dropout."""

    recorder: EncoderStates | None = None  # set by `record_states` only

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """input_ids, token_type_ids: [B, S] -> [B, S, H]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(seq_len, device=input_ids.device)  # [S], broadcast over B
        embeddings = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        embeddings = self.dropout(self.LayerNorm(embeddings))
        if self.recorder is not None:
            self.recorder.embeddings = embeddings
        return embeddings


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the whole sequence (no causal mask)."""

    recorder: EncoderStates | None = None  # set by `record_states` only

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
        """hidden_states: [B, S, H]; attention_mask: additive [B, 1, 1, S] or None -> context [B, S, H].

        B = batch, S = sequence, N = heads, D = head size (H = N * D). Scores are scaled by 1/sqrt(D) and the
        dropout acts on the attention probabilities, both inside `scaled_dot_product_attention`.
        """
        batch, seq_len, hidden = hidden_states.shape

        def split_heads(x: Tensor) -> Tensor:
            return x.view(batch, seq_len, self.num_heads, self.head_size).transpose(1, 2)  # [B, N, S, D]

        query = split_heads(self.query(hidden_states))
        key = split_heads(self.key(hidden_states))
        value = split_heads(self.value(hidden_states))
        if attention_mask is not None:
            attention_mask = attention_mask.to(query.dtype)  # autocast may have lowered q/k/v's dtype
        if self.recorder is None:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=self.dropout_prob if self.training else 0.0
            )  # [B, N, S, D]
        else:  # the same maths spelled out, to keep the scores that the fused kernel never materialises
            scores = query @ key.transpose(-1, -2) / self.head_size**0.5  # [B, N, S, S]
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = F.dropout(scores.softmax(dim=-1), self.dropout_prob, self.training)
            context = probs @ value  # [B, N, S, D]
            self.recorder.attention_scores.append(scores)
            self.recorder.value_states.append(value)
        return context.transpose(1, 2).reshape(batch, seq_len, hidden)  # [B, S, H]


class _ResidualOutput(nn.Module):
    """Projection to H, dropout, residual add and LayerNorm: the post-LN tail of both sub-blocks of a layer."""

    def __init__(self, in_features: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertSelfOutput(_ResidualOutput):
    """Attention output projection H -> H, dropout, residual add and LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config.hidden_size, config)


class BertAttention(nn.Module):
    """Self-attention plus its output block; the attribute names give the reference's `attention.self.*` keys."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    """First feed-forward layer, H -> intermediate_size, with the configured activation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = LinearActivation(config.hidden_size, config.intermediate_size, act=config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dense_act(hidden_states)


class BertOutput(_ResidualOutput):
    """Second feed-forward layer, intermediate_size -> H, dropout, residual add and LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config.intermediate_size, config)


class BertLayer(nn.Module):
    """One transformer layer: attention block then feed-forward block, each post-LN."""

    recorder: EncoderStates | None = None  # set by `record_states` only

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
        attention_output = self.attention(hidden_states, attention_mask)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        if self.recorder is not None:
            self.recorder.hidden_states.append(layer_output)
        return layer_output


class BertEncoder(nn.Module):
    """The stack of layers, with optional activation checkpointing.

    Checkpointing recomputes each layer in the backward pass, keeping only the layer inputs. The reference
    checkpointed chunks of ceil(sqrt(L)) layers; one layer per chunk keeps less live at once (a layer's internals,
    attention probabilities included, are many times its [B, S, H] input), for the same single recomputation.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.checkpoint_activations = False

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None, output_all_encoded_layers: bool = False
    ) -> list[Tensor]:
        """Returns the output of every layer when `output_all_encoded_layers`, else a list with the last one."""
        checkpointing = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        all_layers = []
        for layer in self.layer:
            if checkpointing:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, attention_mask, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, attention_mask)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        return all_layers if output_all_encoded_layers else [hidden_states]


class BertPooler(nn.Module):
    """Dense + tanh on the first ([CLS]) token: the sentence representation for NSP and classification."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = LinearActivation(config.hidden_size, config.hidden_size, act="tanh")

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dense_act(hidden_states[:, 0])  # [B, S, H] -> [B, H]


class BertPredictionHeadTransform(nn.Module):
    """Dense + activation + LayerNorm applied before the MLM vocabulary projection."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_act = LinearActivation(config.hidden_size, config.hidden_size, act=config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.LayerNorm(self.dense_act(hidden_states))


class BertLMPredictionHead(nn.Module):
    """MLM head: transform, then a vocabulary projection whose weight IS the word-embedding matrix, plus a bias."""

    def __init__(self, config: BertConfig, word_embeddings_weight: nn.Parameter) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.decoder.weight = word_embeddings_weight  # tied (Press & Wolf 2017), as in BERT
        self.bias = nn.Parameter(torch.zeros(config.padded_vocab_size))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[..., H] -> [..., V] logits over the padded vocabulary."""
        return self.decoder(self.transform(hidden_states)) + self.bias


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT model, BERT-base defaults; JSON keys it does not know are kept in `extra`.

    Extra keys (a Hugging Face config's `architectures`, the distillation settings, ...) read as attributes and are
    written back by `to_dict`/`to_json_file`, so a config survives a round trip unchanged.
    """

    vocab_size: int = 30522  # as written in the JSON; the model builds `padded_vocab_size` rows
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # the reference's meaning: the tanh form; "gelu_erf" is the exact form
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12  # the reference's (and Google's) value, not PyTorch's 1e-5
    pad_vocab_size_multiple: int = 8  # vocab rows rounded up to a multiple of 8 for tensor cores (30522 -> 30528)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_act not in ACT2FN:
            problems.append(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACT2FN)}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.pad_vocab_size_multiple < 1:
            problems.append(f"pad_vocab_size_multiple={self.pad_vocab_size_multiple} must be >= 1")
        if problems:
            raise ValueError("invalid BertConfig: " + "; ".join(problems))

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"BertConfig has no field or extra key {name!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and MLM output matrices: vocab_size rounded up to pad_vocab_size_multiple."""
        multiple = self.pad_vocab_size_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        """Build from a dict; known keys are type-checked, unknown ones go to `extra`.

        A Hugging Face config (it names a `model_type`) has its activation translated to this project's name
        with the same maths (HF's "gelu" is the exact form, "gelu_erf" here; its "gelu_new" the tanh form), and
        its `model_type` dropped, so the config written back means this project's names.
        """
        if "model_type" in values and isinstance(values.get("hidden_act"), str):
            if values["hidden_act"] not in HF_TO_OURS:
                raise ValueError(f"Hugging Face hidden_act={values['hidden_act']!r} has no counterpart here; "
                                 f"supported: {sorted(HF_TO_OURS)}")
            # Without model_type the values now read with this project's meaning, and write back that way.
            values = {**{k: v for k, v in values.items() if k != "model_type"},
                      "hidden_act": HF_TO_OURS[values["hidden_act"]]}
        kinds = {"int": (int,), "float": (int, float), "str": (str,)}
        known, extra, problems = {}, {}, []
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for key, value in values.items():
            if key not in fields:
                extra[key] = value
                continue
            allowed = kinds[fields[key].type]
            if isinstance(value, bool) or not isinstance(value, allowed):
                problems.append(f"{key}={value!r} should be {fields[key].type}")
            known[key] = value
        if problems:
            raise ValueError("invalid BertConfig values: " + "; ".join(problems))
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: PathLike) -> BertConfig:
        """Read a config JSON file (ours, the reference's or Hugging Face's)."""
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read BERT config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"BERT config {path} does not hold a JSON object")
        try:
            return cls.from_dict(values)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def check_fits(self, vocab_size: int, max_seq_length: int, *, config_file: PathLike, vocab_file: PathLike) -> None:
        """Raise ValueError, naming both files, when the vocabulary or the sequence length does not fit this model."""
        if vocab_size > self.padded_vocab_size:
            raise ValueError(f"--vocab_file {vocab_file} holds {vocab_size} tokens but --config_file {config_file} "
                             f"embeds only {self.padded_vocab_size} (vocab_size {self.vocab_size})")
        if max_seq_length > self.max_position_embeddings:
            raise ValueError(f"--max_seq_length {max_seq_length} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings} of --config_file {config_file}")

    # The fields that shape the weights: two configs that differ in one cannot share a state dict.
    ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings", "type_vocab_size", "pad_vocab_size_multiple")

    def architecture_differences(self, other: dict[str, Any]) -> list[str]:
        """``"name: <other's> vs <ours>"`` for each architecture field in which the config dict ``other`` differs."""
        return [f"{name} {other[name]} vs {getattr(self, name)}" for name in self.ARCHITECTURE_FIELDS
                if name in other and other[name] != getattr(self, name)]

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values}

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as Hugging Face's `BertConfig` reads it, the activation named by HF's meaning."""
        return {**self.to_dict(), "hidden_act": OURS_TO_HF[self.hidden_act], "model_type": "bert"}

    def to_reference_dict(self) -> dict[str, Any]:
        """The config as the reference's `BertConfig` reads it; refuses an activation the reference cannot run."""
        if self.hidden_act not in OURS_TO_REFERENCE:
            raise ValueError(f"hidden_act={self.hidden_act!r} cannot be expressed for the reference (its \"gelu\" is "
                             "the tanh form and it has no exact-erf GELU)")
        return {**self.to_dict(), "hidden_act": OURS_TO_REFERENCE[self.hidden_act]}

    def to_json_string(self) -> str:
        """Indented, key-sorted JSON (the reference's layout)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: PathLike) -> None:
        with atomic_write(path, mode="w") as handle:
            handle.write(self.to_json_string())


# ----------------------------------------------------------------------------------------------------------------
# Weight names: the reference's are ours; these are the only differences allowed in files we read or write.

# (Hugging Face name, our name) as regexes over dotted components. HF calls the activated Linear layers `dense`.
_HF_RENAMES = (
    (r"(^|\.)intermediate\.dense\.", r"\1intermediate.dense_act."),
    (r"(^|\.)pooler\.dense\.", r"\1pooler.dense_act."),
    (r"(^|\.)predictions\.transform\.dense\.", r"\1predictions.transform.dense_act."),
)
# TF-converted checkpoints name LayerNorm parameters gamma/beta (the cause of reference issue #1151).
_LEGACY_RENAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias"))
# Buffers Hugging Face stores (in older files) that we recompute at run time.
_DROPPED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_BASE_ROOTS = ("embeddings.", "encoder.", "pooler.")
_DECODER_WEIGHT = "cls.predictions.decoder.weight"  # tied to the word embeddings
_DECODER_BIAS = "cls.predictions.decoder.bias"  # Hugging Face's alias of cls.predictions.bias
_MLM_BIAS = "cls.predictions.bias"


def find_weights_file(folder: PathLike) -> Path:
    """The weights of a model folder: ``model.safetensors`` (Hugging Face) or else ``pytorch_model.bin``."""
    candidates = [Path(folder) / SAFETENSORS_NAME, Path(folder) / WEIGHTS_NAME]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(c.name for c in candidates)}")
    return weights


@dataclass
class LoadReport:
    """What `load_weights` did: which tensors loaded, which the model initialised, which the file had in excess."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors not in the file: left at their initial values
    unexpected: list[str] = field(default_factory=list)  # file tensors the model has no place for: not loaded
    renamed: int = 0
    dropped_buffers: list[str] = field(default_factory=list)
    vocab_rows: tuple[int, int] | None = None  # (rows in file, rows in model) when they differed

    def __str__(self) -> str:
        text = f"{self.source}: loaded {len(self.loaded)} tensors ({self.renamed} renamed)"
        if self.vocab_rows:
            text += f", vocabulary rows {self.vocab_rows[0]} -> {self.vocab_rows[1]}"
        if self.missing:
            text += f"; initialised {len(self.missing)} missing: {', '.join(self.missing)}"
        if self.unexpected:
            text += f"; ignored {len(self.unexpected)} unexpected: {', '.join(self.unexpected)}"
        return text


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


# A checkpoint's vocabulary padding is a few rows (the reference pads 30522 to 30528; some pad to a multiple of
# 128): more extra rows than this mean the config's vocab is smaller than the checkpoint's real one.
MAX_PADDING_ROWS = 128


def _fit_vocab_rows(source: str, key: str, tensor: Tensor, config: BertConfig, rows: int, pad_value: float) -> Tensor:
    """Pad or trim the vocabulary dimension (dim 0). Only rows at or past config.vocab_size, i.e. padding, change;
    trimming real vocabulary rows (a config whose vocab is smaller than the checkpoint's) is an error."""
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] < config.vocab_size:
        raise ValueError(
            f"{source}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)} has fewer rows than the config's "
            f"vocab_size={config.vocab_size} (model {rows} rows)"
        )
    if tensor.shape[0] > rows:
        if tensor.shape[0] - config.vocab_size >= MAX_PADDING_ROWS:
            raise ValueError(
                f"{source}: {key} has {tensor.shape[0]} vocabulary rows but the config's vocab_size is "
                f"{config.vocab_size}: {tensor.shape[0] - rows} rows would be cut, more than padding "
                "(use the config the checkpoint was trained with)"
            )
        return tensor[:rows]
    padding = tensor.new_full((rows - tensor.shape[0], *tensor.shape[1:]), pad_value)
    return torch.cat([tensor, padding])


# ----------------------------------------------------------------------------------------------------------------
# Models


class BertPreTrainedModel(nn.Module):
    """Base of every model: BERT's weight init, activation checkpointing, and name-checked load/save."""

    # False for heads that ignore the pooled output (MLM, QA, token classification). They keep the pooler so the
    # reference's state-dict keys stay, but freeze it: DDP would otherwise wait forever for its gradients.
    # transformers builds these classes without a pooler, so their HF export leaves it out.
    uses_pooler = True

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        unsupported = {
            "position_embedding_type": lambda v: v not in (None, "absolute"),
            "is_decoder": bool,
            "add_cross_attention": bool,
        }
        for key, is_unsupported in unsupported.items():
            if key in config.extra and is_unsupported(config.extra[key]):
                raise ValueError(f"config key {key}={config.extra[key]!r} is not supported by this BERT")
        self.config = config

    def init_weights(self, root: nn.Module | None = None) -> None:
        """BERT's init (Devlin et al. 2019, Google's code) of `root` (default: the whole model): every Linear and
        Embedding ~ N(0, initializer_range), biases 0, LayerNorm 1/0. Unlike the reference, this covers the
        LinearActivation layers too. Task models initialise only their heads; `BertModel` has done the rest."""
        std = self.config.initializer_range
        for module in (self if root is None else root).modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, BertLMPredictionHead):
                nn.init.zeros_(module.bias)

    def checkpoint_activations(self, flag: bool) -> None:
        """Recompute encoder activations in the backward pass (less memory, about one more forward of compute)."""
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.checkpoint_activations = bool(flag)

    # -- import ---------------------------------------------------------------------------------------------------

    @property
    def _base_prefix(self) -> str:
        return "" if isinstance(self, BertModel) else "bert."

    def load_weights(
        self, state_dict: dict[str, Tensor], source: str = "state_dict", strict: bool = False
    ) -> LoadReport:
        """Load a state dict in the reference's, Hugging Face's or our naming, through an explicit mapping.

        Renames only the named exceptions (HF `dense` -> `dense_act`, `gamma`/`beta`, the `bert.` prefix, a DDP
        `module.` prefix, HF's decoder-bias alias), drops the known buffers `position_ids`/`token_type_ids`, and
        pads or trims padding rows of the vocabulary (padded word-embedding rows are zero; padded MLM-bias rows are
        -10000, so the padded vocabulary takes no probability mass and logits stay equal to the source model's).

        Raises ValueError on a shape mismatch (naming the key and both shapes), on any missing or unexpected
        embedding or encoder tensor (nothing of the encoder is dropped silently), on real vocabulary rows that would
        be trimmed, and, when `strict`, on any missing or unexpected tensor. Otherwise missing pooler/head tensors
        keep their fresh initialisation and unexpected head tensors (another task's) are skipped; both are logged,
        and the returned report (also `self.load_report`) lists them.
        """
        report = LoadReport(source=source)
        expected = self.state_dict()
        mapped = self._map_names(state_dict, report)
        self._resolve_vocab_and_ties(mapped, expected, report)

        for key, tensor in mapped.items():
            if key in expected and tensor.shape != expected[key].shape:
                raise ValueError(
                    f"{source}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)} vs model "
                    f"{tuple(expected[key].shape)} (check the config)"
                )
        report.loaded = sorted(k for k in mapped if k in expected)
        report.missing = sorted(k for k in expected if k not in mapped)
        report.unexpected = sorted(k for k in mapped if k not in expected)
        base = (self._base_prefix + "embeddings.", self._base_prefix + "encoder.")
        base_missing = [k for k in report.missing if k.startswith(base)]
        if base_missing:
            raise ValueError(
                f"{source}: {len(base_missing)} embedding/encoder tensors are missing, e.g. "
                f"{', '.join(base_missing[:5])} (is this a BERT checkpoint of this config?)"
            )
        base_unexpected = [k for k in report.unexpected if k.startswith(base)]
        if base_unexpected:  # e.g. a config with fewer layers than the checkpoint: never drop encoder weights
            raise ValueError(
                f"{source}: {len(base_unexpected)} embedding/encoder tensors have no place in this model, e.g. "
                f"{', '.join(base_unexpected[:5])} (the config has fewer layers or other sizes than the checkpoint)"
            )
        if strict and (report.missing or report.unexpected):
            raise ValueError(f"{source}: strict load failed; missing {report.missing}, unexpected {report.unexpected}")

        self.load_state_dict({**expected, **{k: mapped[k] for k in report.loaded}}, strict=True)
        if report.missing:
            logger.warning("%s: initialised %d tensors not in the checkpoint: %s", source, len(report.missing),
                           ", ".join(report.missing))
        if report.unexpected:
            logger.warning("%s: ignored %d checkpoint tensors this %s has no place for: %s", source,
                           len(report.unexpected), type(self).__name__, ", ".join(report.unexpected))
        logger.info("%s", report)
        self.load_report = report
        return report

    def _map_names(self, state_dict: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
        """Source names -> our names: drop known buffers, apply the named renames, add or strip `bert.`."""
        prefix = self._base_prefix
        items = state_dict.items()
        if state_dict and all(k.startswith("module.") for k in state_dict):
            items = ((k[len("module."):], v) for k, v in items)  # saved from a DDP wrapper
        mapped: dict[str, Tensor] = {}
        for key, tensor in items:
            if key.endswith(_DROPPED_BUFFERS):
                report.dropped_buffers.append(key)
                continue
            new_key = _rename(_rename(key, _HF_RENAMES), _LEGACY_RENAMES)
            if prefix and new_key.startswith(_BASE_ROOTS):
                new_key = prefix + new_key  # a bare encoder's weights going into a task model
            elif not prefix and new_key.startswith("bert."):
                new_key = new_key[len("bert."):]  # a task model's encoder going into a bare BertModel
            if new_key in mapped:
                raise ValueError(f"{report.source}: two tensors map to {new_key} (one of them is {key})")
            report.renamed += new_key != key
            mapped[new_key] = tensor
        return mapped

    def _resolve_vocab_and_ties(
        self, mapped: dict[str, Tensor], expected: dict[str, Tensor], report: LoadReport
    ) -> None:
        """Fold the tied/aliased MLM tensors into ours (refusing ones that differ) and fit the vocabulary rows."""
        word_key = self._base_prefix + "embeddings.word_embeddings.weight"
        if _DECODER_BIAS in mapped and _MLM_BIAS in expected:
            alias = mapped.pop(_DECODER_BIAS)
            if _MLM_BIAS not in mapped:
                mapped[_MLM_BIAS] = alias
            elif alias.shape != mapped[_MLM_BIAS].shape or not torch.equal(alias, mapped[_MLM_BIAS]):
                raise ValueError(f"{report.source}: {_DECODER_BIAS} differs from {_MLM_BIAS}; this model has one")
        if _DECODER_WEIGHT in expected and word_key in mapped:
            decoder = mapped.pop(_DECODER_WEIGHT, None)
            word = mapped[word_key]
            if decoder is not None and (decoder.shape != word.shape or not torch.equal(decoder, word)):
                raise ValueError(f"{report.source}: {_DECODER_WEIGHT} is not tied to {word_key}; this model ties them")

        rows = self.config.padded_vocab_size
        for key, pad_value in ((word_key, 0.0), (_MLM_BIAS, MASK_ADDER)):
            if key in mapped and key in expected and mapped[key].shape[0] != rows:
                report.vocab_rows = (mapped[key].shape[0], rows)
                mapped[key] = _fit_vocab_rows(report.source, key, mapped[key], self.config, rows, pad_value)
        if _DECODER_WEIGHT in expected and word_key in mapped:
            mapped[_DECODER_WEIGHT] = mapped[word_key]

    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        config: BertConfig | PathLike | None = None,
        *,
        strict: bool = False,
        **model_kwargs: Any,
    ) -> BertPreTrainedModel:
        """Build a model and load weights from a folder or file: the reference's `.pt` (`{"model": sd}` or bare),
        a Hugging Face BERT (`model.safetensors` or `pytorch_model.bin`), or our `save_pretrained` output.

        The config is `config` (object or JSON path) or else `config.json`/`bert_config.json` in the folder or beside
        the file. A path containing "://" is fetched with `file_utils.cached_path`. See `load_weights` for the
        mapping rules; the result is also in `model.load_report`.
        """
        if "://" in str(path):
            from file_utils import cached_path  # only remote paths need the download machinery

            path = cached_path(str(path))
        path = Path(path)
        if path.is_dir():
            weights, folder = find_weights_file(path), path
        elif path.is_file():
            weights, folder = path, path.parent
        else:
            raise FileNotFoundError(f"pretrained model path does not exist: {path}")
        if config is None:
            found = [folder / name for name in (CONFIG_NAME, LEGACY_CONFIG_NAME) if (folder / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"no config for {weights}: pass config= or put {CONFIG_NAME} or {LEGACY_CONFIG_NAME} in {folder}"
                )
            config = found[0]
        if not isinstance(config, BertConfig):
            config = BertConfig.from_json_file(config)
        model = cls(config, **model_kwargs)
        model.load_weights(load_state_dict_file(weights), source=str(weights), strict=strict)
        return model

    # -- export ---------------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: PathLike, hf_format: bool = False) -> None:
        """Write `config.json` and the weights, each file atomically.

        Default: the reference's fine-tuned layout, `pytorch_model.bin` = {"model": state_dict} in our names.
        `hf_format`: a Hugging Face folder (`model.safetensors` with HF names, vocabulary trimmed to
        config.vocab_size, tied decoder left out; `config.json` with `architectures` and `model_type`) that
        `transformers.<same class name>.from_pretrained` loads.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not hf_format:
            self.config.to_json_file(directory / CONFIG_NAME)
            save_checkpoint({"model": self.state_dict()}, directory / WEIGHTS_NAME)
            return
        from safetensors.torch import save as safetensors_bytes

        tensors = self._hf_state_dict()
        hf_config = {
            **self.config.to_hf_dict(),
            "architectures": [type(self).__name__],
            "tie_word_embeddings": True,
        }
        hf_config.update(self._hf_config_extras())
        with atomic_write(directory / SAFETENSORS_NAME) as handle:
            handle.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
        with atomic_write(directory / CONFIG_NAME, mode="w") as handle:
            handle.write(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")

    def _hf_state_dict(self) -> dict[str, Tensor]:
        """Our state dict in Hugging Face names: `dense_act` -> `dense`, vocabulary rows cut to vocab_size."""
        vocab_keys = (self._base_prefix + "embeddings.word_embeddings.weight", _MLM_BIAS)
        tensors, skipped = {}, []
        for key, tensor in self.state_dict().items():
            if key == _DECODER_WEIGHT:
                continue  # tied to the word embeddings; HF re-ties it on load
            if not self.uses_pooler and key.startswith("bert.pooler."):
                skipped.append(key)
                continue
            if key in vocab_keys:
                tensor = tensor[: self.config.vocab_size]
            tensors[key.replace(".dense_act.", ".dense.")] = tensor.detach().to("cpu", copy=True).contiguous()
        if skipped:
            logger.info("HF export: transformers' %s has no pooler; left out %s", type(self).__name__, skipped)
        return tensors

    def _hf_config_extras(self) -> dict[str, Any]:
        """Task-specific HF config keys (label counts); none by default."""
        return {}


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, transformer layers and pooler."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_all_encoded_layers: bool = False,
    ) -> tuple[Tensor | list[Tensor], Tensor]:
        """input_ids, token_type_ids, attention_mask (1 = real token, 0 = padding): [B, S].

        Returns (sequence_output [B, S, H] -- or the list of every layer's output when
        `output_all_encoded_layers` -- and pooled_output [B, H]).
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.embeddings(input_ids, token_type_ids)
        extended_mask = None
        if attention_mask is not None:
            # [B, S] -> [B, 1, 1, S]: 0 for keys to attend to, MASK_ADDER for padding; broadcast over heads, queries.
            extended_mask = (1.0 - attention_mask[:, None, None, :].to(embeddings.dtype)) * MASK_ADDER
        encoded_layers = self.encoder(embeddings, extended_mask, output_all_encoded_layers)
        pooled_output = self.pooler(encoded_layers[-1])
        return (encoded_layers if output_all_encoded_layers else encoded_layers[-1]), pooled_output


@dataclass
class EncoderStates:
    """The intermediate tensors of one forward pass, for distillation (filled inside `record_states`).

    B = batch, S = sequence, N = heads, D = head size, H = hidden size; one list entry per layer, in order.
    """

    embeddings: Tensor | None = None  # [B, S, H], the embedding block's output
    hidden_states: list[Tensor] = field(default_factory=list)  # [B, S, H], each layer's output
    attention_scores: list[Tensor] = field(default_factory=list)  # [B, N, S, S], before softmax, mask adder added
    value_states: list[Tensor] = field(default_factory=list)  # [B, N, S, D], the attention values (MiniLM)


@contextmanager
def record_states(model: nn.Module) -> Iterator[EncoderStates]:
    """Record every forward pass of `model` (any BERT class, wrapped or not) into the yielded `EncoderStates`.

    Outside this context the model computes exactly as before (fused attention, nothing kept); inside it attention
    is computed unfused so that its scores exist. State-dict names never change. Activation checkpointing would
    record each layer twice (forward and recomputation), so it is refused.
    """
    modules = [m for m in model.modules() if isinstance(m, (BertEmbeddings, BertSelfAttention, BertLayer))]
    if any(isinstance(m, BertEncoder) and m.checkpoint_activations and m.training for m in model.modules()):
        raise ValueError("recording hidden states needs activation checkpointing off (layers would run twice)")
    states = EncoderStates()
    for module in modules:
        module.recorder = states
    try:
        yield states
    finally:
        for module in modules:
            del module.recorder  # back to the class default, None


def _ignored(labels: Tensor) -> Tensor:
    """Boolean mask of "no label" entries: the reference's -1 or Hugging Face's -100."""
    return (labels == IGNORE_INDEX) | (labels == -100)


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the masked-LM and next-sentence heads (`cls.predictions`, `cls.seq_relationship`)."""

    def __init__(self, config: BertConfig, dense_sequence_output: bool = True) -> None:
        super().__init__(config)
        self.dense_sequence_output = dense_sequence_output
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict({
            "predictions": BertLMPredictionHead(config, self.bert.embeddings.word_embeddings.weight),
            "seq_relationship": nn.Linear(config.hidden_size, 2),
        })
        self.init_weights(self.cls)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        masked_lm_labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (prediction_scores, seq_relationship_score [B, 2]).

        prediction_scores is [B, S, V], or, with `dense_sequence_output` and labels given, [M, V] for only the M
        labelled positions (labels not -1/-100, row-major order): the vocabulary projection, the largest matmul in
        BERT, then runs on ~15% of the tokens.
        """
        sequence_output, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        if self.dense_sequence_output and masked_lm_labels is not None:
            hidden = sequence_output.shape[-1]
            labelled = ~_ignored(masked_lm_labels.reshape(-1))
            sequence_output = sequence_output.reshape(-1, hidden)[labelled]  # [B*S, H] -> [M, H]
        return self.cls["predictions"](sequence_output), self.cls["seq_relationship"](pooled_output)


def _mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over labelled entries; 0 (not NaN) when none is labelled. No host sync."""
    labels = labels.masked_fill(_ignored(labels), IGNORE_INDEX)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def pretraining_loss(
    prediction_scores: Tensor,
    seq_relationship_score: Tensor,
    masked_lm_labels: Tensor,
    next_sentence_labels: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """BERT's pre-training loss: mean MLM cross-entropy + mean NSP cross-entropy (labels -1 or -100 are ignored).

    prediction_scores: [B, S, V], or the dense [M, V] rows of `BertForPreTraining` (then the labels are filtered the
    same way); masked_lm_labels: [B, S]; seq_relationship_score: [B, 2]; next_sentence_labels: [B].
    Returns (total, mlm, nsp).
    """
    vocab = prediction_scores.shape[-1]
    mlm_labels = masked_lm_labels.reshape(-1)
    scores = prediction_scores.reshape(-1, vocab)
    if scores.shape[0] != mlm_labels.shape[0]:
        mlm_labels = mlm_labels[~_ignored(mlm_labels)]
        if scores.shape[0] != mlm_labels.shape[0]:
            raise ValueError(
                f"prediction_scores has {scores.shape[0]} rows but masked_lm_labels has {mlm_labels.shape[0]} "
                f"labelled positions out of {masked_lm_labels.numel()}"
            )
    mlm = _mean_cross_entropy(scores, mlm_labels)
    nsp = _mean_cross_entropy(seq_relationship_score.reshape(-1, 2), next_sentence_labels.reshape(-1))
    return mlm + nsp, mlm, nsp


class BertForMaskedLM(BertPreTrainedModel):
    """BERT with only the masked-LM head."""

    uses_pooler = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.bert.pooler.requires_grad_(False)  # see `uses_pooler`
        self.cls = nn.ModuleDict(
            {"predictions": BertLMPredictionHead(config, self.bert.embeddings.word_embeddings.weight)}
        )
        self.init_weights(self.cls)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Returns prediction_scores [B, S, V] over the padded vocabulary."""
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        return self.cls["predictions"](sequence_output)


class BertForNextSentencePrediction(BertPreTrainedModel):
    """BERT with only the next-sentence head."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict({"seq_relationship": nn.Linear(config.hidden_size, 2)})
        self.init_weights(self.cls)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Returns seq_relationship_score [B, 2] (index 0: B follows A)."""
        _, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        return self.cls["seq_relationship"](pooled_output)


def _label_maps(num_labels: int) -> dict[str, Any]:
    """HF config keys that make transformers build a classifier with `num_labels` outputs."""
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT + dropout + linear classifier on the pooled output (GLUE)."""

    def __init__(self, config: BertConfig, num_labels: int = 2) -> None:
        super().__init__(config)
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights(self.classifier)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Returns logits [B, num_labels]."""
        _, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(pooled_output))

    def _hf_config_extras(self) -> dict[str, Any]:
        return _label_maps(self.num_labels)


class BertForMultipleChoice(BertPreTrainedModel):
    """BERT scoring each of `num_choices` candidate sequences with one logit (SWAG-style)."""

    def __init__(self, config: BertConfig, num_choices: int = 2) -> None:
        super().__init__(config)
        self.num_choices = num_choices
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights(self.classifier)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """input_ids etc.: [B, C, S] with C = num_choices. Returns logits [B, C]."""
        batch, choices, seq_len = input_ids.shape
        if choices != self.num_choices:
            raise ValueError(f"input has {choices} choices per example, the model was built for {self.num_choices}")

        def flat(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.reshape(batch * choices, seq_len)  # [B, C, S] -> [B*C, S]

        _, pooled_output = self.bert(flat(input_ids), flat(token_type_ids), flat(attention_mask))
        return self.classifier(self.dropout(pooled_output)).view(batch, choices)  # [B*C, 1] -> [B, C]


class BertForTokenClassification(BertPreTrainedModel):
    """BERT + dropout + linear classifier on every token (NER-style)."""

    uses_pooler = False

    def __init__(self, config: BertConfig, num_labels: int) -> None:
        super().__init__(config)
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.bert.pooler.requires_grad_(False)  # see `uses_pooler`
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights(self.classifier)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Returns logits [B, S, num_labels]."""
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        return self.classifier(self.dropout(sequence_output))

    def _hf_config_extras(self) -> dict[str, Any]:
        return _label_maps(self.num_labels)


class BertForQuestionAnswering(BertPreTrainedModel):
    """BERT + a linear layer giving answer-span start and end logits per token (SQuAD); no dropout, as the
    reference."""

    uses_pooler = False

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.bert.pooler.requires_grad_(False)  # see `uses_pooler`
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights(self.qa_outputs)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Returns (start_logits [B, S], end_logits [B, S])."""
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        start_logits, end_logits = self.qa_outputs(sequence_output).unbind(dim=-1)  # [B, S, 2] -> 2 x [B, S]
        return start_logits, end_logits

    @classmethod
    def from_finetuned(cls, checkpoint: PathLike, config_file: PathLike | None = None,
                       flag: str = "--init_checkpoint") -> BertForQuestionAnswering:
        """A fine-tuned QA model in eval mode, for prediction: fails, naming ``flag``, when the weights don't fit the
        config or carry no QA head (a bare encoder would answer at random)."""
        config = BertConfig.from_json_file(config_file) if config_file else None
        try:
            model = cls.from_pretrained(checkpoint, config=config)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{flag} {checkpoint}: {exc}") from exc
        missing_head = [key for key in model.load_report.missing if key.startswith("qa_outputs.")]
        if missing_head:
            raise CheckpointError(f"{flag} {checkpoint} is not a question-answering model: it has no "
                                  f"{', '.join(missing_head)} (fine-tune it with run_squad.py first)")
        return model.eval()
