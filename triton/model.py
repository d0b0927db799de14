"""The model Triton serves: BertForQuestionAnswering behind the reference's tensor names and int32 inputs.

Inputs ``input__0`` (token ids), ``input__1`` (segment ids), ``input__2`` (attention mask), all int32 [B, S];
outputs ``output__0`` (start logits) and ``output__1`` (end logits), [B, S] float (fp16 when exported in fp16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python triton/<script>.py`: sys.path[0] is this folder, not the root
    sys.path.insert(1, str(ROOT))

from modeling import BertForQuestionAnswering  # noqa: E402

INPUT_NAMES = ("input__0", "input__1", "input__2")
OUTPUT_NAMES = ("output__0", "output__1")


class TritonQA(torch.nn.Module):
    """Casts the int32 Triton inputs to int64 and returns the QA head's (start, end) logits."""

    def __init__(self, model: BertForQuestionAnswering) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start_logits, end_logits = self.model(input_ids.long(), segment_ids.long(), attention_mask.long())
        return start_logits, end_logits


def get_model(checkpoint: str | Path, config_file: str | Path | None = None, precision: str = "fp32",
              device: str | torch.device = "cpu") -> TritonQA:
    """The wrapped model in eval mode on ``device``, in fp16 or fp32.

    fp16 runs on the CPU too (PyTorch's and ONNX Runtime's CPU half kernels: fast with AVX512-FP16, slow without),
    so an fp16 export can be made and checked on a machine without a GPU.
    """
    device = torch.device(device)
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"--precision must be fp16 or fp32, got {precision!r}")
    model = TritonQA(BertForQuestionAnswering.from_finetuned(checkpoint, config_file, "--checkpoint")).to(device).eval()
    return model.half() if precision == "fp16" else model


def update_argparser(parser: argparse.ArgumentParser) -> None:
    """The model flags of the reference's triton/model.py: --checkpoint, --config-file, --precision, --cpu."""
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", required=True,
                       help="Fine-tuned QA weights: a run_squad.py output folder or its pytorch_model.bin, a "
                            "reference .pt, or a Hugging Face BertForQuestionAnswering folder.")
    group.add_argument("--config-file", default=None,
                       help="BERT config JSON; default: config.json (or bert_config.json) beside --checkpoint.")
    group.add_argument("--precision", choices=("fp16", "fp32"), default=None,
                       help="Exported precision; default fp16 on a GPU, fp32 on the CPU (fp16 runs there too, to "
                            "make and check an fp16 export without a GPU).")
    group.add_argument("--cpu", action="store_true", help="Export on the CPU even when a GPU is present.")
