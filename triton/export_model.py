"""Export a fine-tuned SQuAD model for Triton (TorchScript trace or ONNX) and check the export on real windows.

After writing the file, the exported model runs (TorchScript in torch, ONNX through onnxruntime) on SQuAD windows
built as run_squad.py builds them; the script prints the largest start/end logit difference against PyTorch and
whether every predicted answer is the same, and fails (exit 1, file removed) above --tolerance or on any differing
answer. Run it as ``python triton/export_model.py``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import dataloader
import model as triton_model
import numpy as np
import torch

import utils  # noqa: E402  (the siblings above put the repository root on sys.path)
from data import squad  # noqa: E402
from file_utils import atomic_path  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

DEFAULT_PREDICT_FILE = triton_model.ROOT / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"
OUTPUT_TYPES = ("ts-trace", "onnx")


class ExportMismatchError(RuntimeError):
    """The exported model's logits or answers differ from PyTorch's beyond the tolerance."""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The reference's export flags (--output-path, --output-type, --onnx-opset) plus the window and check flags."""
    parser = argparse.ArgumentParser(description=__doc__)
    triton_model.update_argparser(parser)
    group = parser.add_argument_group("export")
    group.add_argument("--output-path", required=True, help="Exported file: model.pt (ts-trace) or model.onnx.")
    group.add_argument("--output-type", choices=OUTPUT_TYPES, required=True,
                       help="ts-trace: TorchScript (LibTorch backend); onnx: ONNX with dynamic batch and sequence "
                            "axes (ONNX Runtime and TensorRT backends).")
    group.add_argument("--onnx-opset", type=int, default=17, help="ONNX opset (the reference used 13).")
    group.add_argument("--vocab-file", default=None, help="WordPiece vocabulary; default: vocab.txt beside "
                                                          "--checkpoint.")
    group.add_argument("--predict-file", default=str(DEFAULT_PREDICT_FILE),
                       help="SQuAD JSON whose windows check the export; default: the bundled v2.0 sample.")
    group.add_argument("--do-lower-case", action="store_true", help="Lower-case the text (uncased models).")
    group.add_argument("--version-2-with-negative", action="store_true",
                       help="SQuAD v2.0 model: compare answers with the null answer allowed.")
    group.add_argument("--max-seq-length", type=int, default=384, help="Tokens per window.")
    group.add_argument("--doc-stride", type=int, default=128, help="Tokens between window starts.")
    group.add_argument("--max-query-length", type=int, default=64, help="Questions are cut to this many tokens.")
    group.add_argument("--batch-size", type=int, default=8, help="Windows per batch, in tracing and in the check.")
    group.add_argument("--max-windows", type=int, default=64,
                       help="Windows checked (the first questions of --predict-file up to this many windows).")
    group.add_argument("--tolerance", type=float, default=None,
                       help="Largest allowed logit difference; default 1e-3 for fp32, 5e-2 for fp16.")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Fail on bad flags before any work, naming the flag."""
    for flag in ("max_seq_length", "doc_stride", "max_query_length", "batch_size", "max_windows"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
    if not Path(args.predict_file).is_file():
        raise FileNotFoundError(f"--predict-file {args.predict_file} does not exist")
    folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    args.vocab_file = args.vocab_file or str(folder / "vocab.txt")
    if not Path(args.vocab_file).is_file():
        raise FileNotFoundError(f"--vocab-file {args.vocab_file} does not exist")
    if args.output_type == "onnx" and not str(args.output_path).endswith(".onnx"):
        raise ValueError(f"--output-path {args.output_path}: an ONNX export must end in .onnx")


class OnnxRuntimeModel(torch.nn.Module):
    """An ONNX file run by onnxruntime behind the torch call signature, so ``squad.predict_logits`` can drive it."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        super().__init__()
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = dataloader.triton_inputs(input_ids.cpu(), segment_ids.cpu(), attention_mask.cpu())
        start, end = self.session.run(list(triton_model.OUTPUT_NAMES), feeds)
        return torch.from_numpy(start), torch.from_numpy(end)


def example_inputs(windows: dataloader.Windows, batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One full-length batch of real windows, int32, for tracing."""
    batch = next(dataloader.fixed_batches(windows, batch_size))
    return tuple(torch.from_numpy(batch[name]).to(device) for name in triton_model.INPUT_NAMES)


def export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output_type: str, path: Path,
           opset: int) -> None:
    """Write ``model`` traced with ``inputs`` to ``path`` (TorchScript) or as ONNX with dynamic batch/seq axes."""
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # Tracing warns on modeling.py's position-table check, a constant for any window that fits the table.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based ONNX exporter, chosen below
        if output_type == "ts-trace":
            traced = torch.jit.trace(model, inputs, check_trace=False)
            torch.jit.save(traced, str(path))
            return
        axes = {name: {0: "batch", 1: "sequence"} for name in (*triton_model.INPUT_NAMES,
                                                               *triton_model.OUTPUT_NAMES)}
        torch.onnx.export(model, inputs, str(path), input_names=list(triton_model.INPUT_NAMES),
                          output_names=list(triton_model.OUTPUT_NAMES), dynamic_axes=axes, opset_version=opset,
                          dynamo=False)  # the torch.export one needs every dim to be symbolic-safe


def load_exported(path: Path, output_type: str, device: torch.device) -> torch.nn.Module:
    """The exported file as a callable module: TorchScript through torch.jit.load, ONNX through onnxruntime."""
    if output_type == "ts-trace":
        return torch.jit.load(str(path), map_location=device).eval()
    return OnnxRuntimeModel(path, device)


def compare(reference: torch.nn.Module, exported: torch.nn.Module, windows: dataloader.Windows,
            tokenizer: BertTokenizer, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Logits and answers of the exported model against PyTorch's on the same windows."""
    def logits(module: torch.nn.Module) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return squad.predict_logits(module, windows.tensors, args.batch_size, device)

    (ref_start, ref_end), (exp_start, exp_end) = logits(reference), logits(exported)
    difference = max(float(np.abs(a.astype(np.float64) - b).max())
                     for a, b in zip([*ref_start, *ref_end], [*exp_start, *exp_end]))

    def answers(starts: list[np.ndarray], ends: list[np.ndarray]) -> dict[str, str]:
        return squad.compute_predictions(windows.examples, windows.features, starts, ends, tokenizer,
                                         do_lower_case=args.do_lower_case,
                                         version_2_with_negative=args.version_2_with_negative).answers

    ref_answers, exp_answers = answers(ref_start, ref_end), answers(exp_start, exp_end)
    differing = [qid for qid in ref_answers if ref_answers[qid] != exp_answers[qid]]
    return {"windows": len(windows.features), "questions": len(ref_answers), "max_abs_logit_diff": difference,
            "answers_identical": not differing, "differing_answers": differing}


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        check_arguments(args)
        use_cuda = torch.cuda.is_available() and not args.cpu
        device = torch.device("cuda" if use_cuda else "cpu")
        precision = args.precision or ("fp16" if use_cuda else "fp32")
        tolerance = args.tolerance if args.tolerance is not None else (5e-2 if precision == "fp16" else 1e-3)
        model = triton_model.get_model(args.checkpoint, args.config_file, precision, device)
        tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
        model.model.config.check_fits(len(tokenizer.vocab), args.max_seq_length, config_file=args.config_file
                                      or f"the config beside {args.checkpoint}", vocab_file=args.vocab_file)
        examples = dataloader.read_examples(args.predict_file, version_2_with_negative=args.version_2_with_negative)
        windows = dataloader.build_windows(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                           args.max_query_length)
        windows = limit_windows(windows, args.max_windows)
        output = Path(args.output_path)
        with atomic_path(output) as tmp:
            export(model, example_inputs(windows, args.batch_size, device), args.output_type, tmp, args.onnx_opset)
            report = compare(model, load_exported(tmp, args.output_type, device), windows, tokenizer, args, device)
            report.update({"output_path": str(output), "output_type": args.output_type, "precision": precision,
                           "device": device.type, "tolerance": tolerance})
            print(json.dumps(report))
            if report["max_abs_logit_diff"] > tolerance or not report["answers_identical"]:
                raise ExportMismatchError(
                    f"the exported model differs from PyTorch: max logit difference "
                    f"{report['max_abs_logit_diff']:.3g} (--tolerance {tolerance:g}), differing answers: "
                    f"{squad.describe_ids(report['differing_answers']) or 'none'}; {output} not written")
    except utils.USER_ERRORS + (ExportMismatchError,) as exc:
        return utils.report_error("export_model.py", exc)
    return 0


def limit_windows(windows: dataloader.Windows, max_windows: int) -> dataloader.Windows:
    """The first questions whose windows fit in ``max_windows`` (at least one question), repacked."""
    counts = collections.Counter(feature.example_index for feature in windows.features)
    keep = total = 0
    while keep < len(windows.examples) and (keep == 0 or total + counts[keep] <= max_windows):
        total += counts[keep]
        keep += 1
    features = [feature for feature in windows.features if feature.example_index < keep]
    return dataloader.Windows(windows.examples[:keep], features,
                              squad.features_to_tensors(features, windows.max_seq_length), windows.max_seq_length)


if __name__ == "__main__":
    sys.exit(main())
