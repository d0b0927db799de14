"""SQuAD windows for the exported model and the Triton client, built by the same code as run_squad.py.

``data/squad.py`` reads the file, cuts each context into windows (``convert_examples_to_features``) and packs them
(``features_to_tensors``); this module only turns packed windows into the reference's int32 ``input__*`` arrays.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from data import squad  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402


@dataclass
class Windows:
    """The examples of a SQuAD file (or one question), their windows and the windows packed as tensors."""

    examples: list[squad.SquadExample]
    features: list[squad.QAFeature]
    tensors: dict[str, torch.Tensor]
    max_seq_length: int


def read_examples(predict_file: str | Path | None = None, question: str | None = None, context: str | None = None,
                  version_2_with_negative: bool = False) -> list[squad.SquadExample]:
    """The questions of a SQuAD JSON file, or the one ``question`` about ``context`` (id "0")."""
    if predict_file is not None:
        examples, _ = squad.read_squad_examples(predict_file, is_training=False,
                                                version_2_with_negative=version_2_with_negative)
        return examples
    if not question or not context:
        raise ValueError("give --predict-file, or both --question and --context")
    return [squad.SquadExample(qas_id="0", question_text=question, doc_tokens=squad.split_context(context)[0])]


def build_windows(examples: list[squad.SquadExample], tokenizer: BertTokenizer, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64) -> Windows:
    """Cut every example into run_squad.py's prediction windows and pack them."""
    features = squad.convert_examples_to_features(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                                  is_training=False)
    return Windows(examples, features, squad.features_to_tensors(features, max_seq_length), max_seq_length)


def triton_inputs(input_ids: torch.Tensor, segment_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Model inputs as the reference's named int32 arrays ``input__0`` / ``input__1`` / ``input__2``."""
    return {"input__0": input_ids.to(torch.int32).numpy(), "input__1": segment_ids.to(torch.int32).numpy(),
            "input__2": attention_mask.to(torch.int32).numpy()}


def fixed_batches(windows: Windows, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` windows padded to ``max_seq_length`` (the shape a performance test sends);
    the last batch is filled up by repeating windows from the start."""
    count = len(windows.features)
    if count == 0:
        raise ValueError("no windows to batch: the input has no questions")
    for first in range(0, count, batch_size):
        rows = torch.arange(first, first + batch_size) % count
        inputs = squad.model_inputs(windows.tensors["input_ids"][rows], windows.tensors["seq_lengths"][rows],
                                    windows.tensors["doc_offsets"][rows], trim=False)
        yield triton_inputs(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"])
