"""SWAG multiple-choice fine-tuning and evaluation: the reference's flags, on CPU, one GPU or many (torchrun)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data.swag import (
    NUM_CHOICES,
    SwagDataError,
    accuracy,
    convert_examples_to_features,
    features_to_tensors,
    read_swag_examples,
)
from file_utils import CheckpointError, atomic_write
from modeling import BertConfig, BertForMultipleChoice
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups
from schedulers import LinearWarmUpScheduler
from tokenization import BertTokenizer

Batch = dict[str, torch.Tensor]
SPLIT_FILES = {"train": "train.csv", "val": "val.csv"}  # the SWAG authors' names, read from --data_dir


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference run_swag.py's names and defaults."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--data_dir", required=True,
                          help="Folder holding SWAG's train.csv (read by --do_train) and val.csv (read by --do_eval).")
    required.add_argument("--bert_model", required=True,
                          help="Model name; only recorded in the log (nothing is downloaded).")
    required.add_argument("--output_dir", required=True,
                          help="Where pytorch_model.bin, config.json, results.txt and dllogger.json are written.")
    required.add_argument("--init_checkpoint", required=True,
                          help="Weights to start from: a reference .pt ({'model': ...} or bare), our or a Hugging "
                               "Face folder or file; a classifier absent from it is freshly initialised.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocabulary the model was trained with.")
    required.add_argument("--config_file", required=True, help="BERT config JSON (ours, the reference's or HF's).")
    other = parser.add_argument_group("other")
    other.add_argument("--max_seq_length", type=int, default=128,
                       help="Tokens per choice after WordPiece, [CLS]/[SEP] included; longer pairs are trimmed.")
    other.add_argument("--do_train", action="store_true", help="Fine-tune on train.csv.")
    other.add_argument("--do_eval", action="store_true", help="Evaluate on val.csv and write results.txt.")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case and strip accents (uncased models).")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Examples (of 4 choices each) per rank per optimizer step, before division by "
                            "--gradient_accumulation_steps.")
    other.add_argument("--eval_batch_size", type=int, default=8, help="Examples (of 4 choices) per evaluation batch.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="Peak AdamW learning rate.")
    other.add_argument("--num_train_epochs", type=float, default=3.0,
                       help="Passes over the training set (may be fractional); ignored when --max_steps > 0.")
    other.add_argument("--max_steps", type=utils.step_count, default=-1,
                       help="Optimizer steps to train when > 0 (overrides --num_train_epochs and sets the schedule).")
    other.add_argument("--warmup_proportion", type=float, default=0.1,
                       help="Fraction of the training steps over which the learning rate rises linearly.")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    other.add_argument("--seed", type=int, default=42, help="Seed of the data order and the classifier init.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    utils.add_precision_flags(other)
    other.add_argument("--skip_checkpoint", action="store_true", help="Do not write the fine-tuned model.")
    utils.add_run_flags(other, tensorboard=False)
    other.add_argument("--log_freq", type=int, default=1, help="Log the training loss every N optimizer steps.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bars.")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flag combinations and inputs that cannot work, before any data is read or model built."""
    if not (args.do_train or args.do_eval):
        raise ValueError("at least one of --do_train or --do_eval must be set")
    if args.do_train:
        utils.check_schedule_flags(args, world_size)
    if args.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    if args.max_seq_length < 3:
        raise ValueError(f"--max_seq_length must be >= 3 ([CLS] A [SEP] B [SEP] needs room), got {args.max_seq_length}")
    if args.log_freq < 1:
        raise ValueError(f"--log_freq must be >= 1, got {args.log_freq}")
    if not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {args.data_dir} is not a folder")
    for split, needed in (("train", args.do_train), ("val", args.do_eval)):
        if needed and not (Path(args.data_dir) / SPLIT_FILES[split]).is_file():
            raise FileNotFoundError(f"--data_dir {args.data_dir} has no {SPLIT_FILES[split]} "
                                    f"(needed by --do_{'train' if split == 'train' else 'eval'})")
    for flag in ("vocab_file", "config_file"):
        if not Path(getattr(args, flag)).is_file():
            raise FileNotFoundError(f"--{flag} {getattr(args, flag)} does not exist")
    if "://" not in args.init_checkpoint and not Path(args.init_checkpoint).exists():
        raise FileNotFoundError(f"--init_checkpoint {args.init_checkpoint} does not exist")


def load_split(args: argparse.Namespace, tokenizer: BertTokenizer, split: str) -> Batch:
    """Tokenized tensors of ``train`` or ``val`` (see ``data.swag.features_to_tensors``)."""
    path = Path(args.data_dir) / SPLIT_FILES[split]
    examples = read_swag_examples(path, labelled=True)
    if not examples:
        raise SwagDataError(f"{path}: holds no examples")
    return features_to_tensors(convert_examples_to_features(examples, tokenizer, args.max_seq_length))


def trim_padding(batch: Batch) -> Batch:
    """Cut the sequence columns that are padding in every choice of every example of the batch.

    Results do not change: padded keys get exp(-10000) = 0 attention weight and the classifier reads [CLS].
    """
    length = int(batch["attention_mask"].sum(dim=-1).max())
    return {k: v[..., :length] if v.dim() == 3 else v for k, v in batch.items()}


def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the examples of one micro-batch, the choices' logits ``[B, C]`` as the classes."""
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
    return F.cross_entropy(logits, batch["labels"])


def train(args: argparse.Namespace, model: BertForMultipleChoice, config: BertConfig, tensors: Batch,
          run: utils.Run) -> dict[str, Any]:
    """Fine-tune with AdamW and linear warm-up/decay through ``utils.train_loop``; returns the train:* results.

    Unlike the reference, which leaves the pooler out of the optimizer (a workaround for apex), every parameter
    trains: the pooled [CLS] vector is what the classifier scores.
    """
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    num_examples = tensors["input_ids"].shape[0]
    total_steps = args.max_steps if args.max_steps > 0 else utils.steps_per_epochs(
        num_examples, micro_batch, run.world_size, args.gradient_accumulation_steps, args.num_train_epochs)
    optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY),
                                lr=args.learning_rate, eps=1e-6, device=run.device)
    parts = utils.TrainParts(
        utils.wrap_model(model, run.env), loss_fn, optimizer,
        LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps),
        run.grad_scaler(args),
        flops_per_batch=lambda b: b["input_ids"].shape[0] * NUM_CHOICES * utils.bert_flops_per_sequence(
            config, b["input_ids"].shape[-1], masked_tokens=0))
    run.dllog.log(step="PARAMETER", data={"train:num_examples": num_examples, "train:total_steps": total_steps,
                                          "batch_size_per_gpu": args.train_batch_size})
    batches = utils.ShuffledBatches(num_examples, micro_batch, args.seed,
                                    lambda index: trim_padding({k: v[index] for k, v in tensors.items()}),
                                    run.env.rank, run.world_size)
    state = utils.TrainState()
    start = time.perf_counter()
    # The reference clips at a total norm of 1.0 (BertAdam's and FusedAdam's max_grad_norm); so does this run.
    result = utils.train_loop(run, parts, batches, utils.LoopConfig.from_args(args, max_steps=total_steps,
                                                                              max_grad_norm=1.0), state)
    run.synchronize()
    latency = time.perf_counter() - start
    return {"global_step": state.step, "train:loss": result.mean_loss, "train:latency": latency,
            "train:num_steps": state.step, "train:throughput": state.sequences / latency}


@torch.no_grad()
def evaluate(model: BertForMultipleChoice, tensors: Batch, args: argparse.Namespace, run: utils.Run) -> dict[str, Any]:
    """Accuracy and mean cross-entropy over val.csv, and the inference time (main process only, as the reference)."""
    model.eval()
    num_examples = tensors["input_ids"].shape[0]
    logits = torch.empty(num_examples, NUM_CHOICES)
    inputs = {k: tensors[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    start = time.perf_counter()
    starts = range(0, num_examples, args.eval_batch_size)
    for first in utils.progress_bar(starts, disable=args.disable_progress_bar, desc="eval"):
        rows = slice(first, first + args.eval_batch_size)
        batch = utils.move_to_device(trim_padding({k: v[rows] for k, v in inputs.items()}), run.device)
        with run.autocast():
            logits[rows] = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float().cpu()
    run.synchronize()
    latency = time.perf_counter() - start
    labels = tensors["labels"]
    return {"eval:accuracy": accuracy(logits, labels), "eval:loss": float(F.cross_entropy(logits, labels)),
            "eval:num_examples": num_examples, "eval:latency": latency, "eval:throughput": num_examples / latency}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The final dllogger record: the reference run_swag's result names, and the timings per example (of 4
    sequences; the training log's sequences_per_second counts examples too)."""
    names = {"eval_accuracy": "eval:accuracy", "eval_loss": "eval:loss", "global_step": "global_step",
             "loss": "train:loss", "e2e_train_time": "train:latency",
             "training_examples_per_second": "train:throughput", "e2e_inference_time": "eval:latency",
             "inference_examples_per_second": "eval:throughput"}
    return {key: results[source] for key, source in names.items() if source in results}


def execute(args: argparse.Namespace, run: utils.Run) -> dict[str, Any]:
    """Do what --do_train / --do_eval ask and return the results dict (also written to results.txt)."""
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    config = BertConfig.from_json_file(args.config_file)
    config.check_fits(len(tokenizer), args.max_seq_length, config_file=args.config_file, vocab_file=args.vocab_file)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for metric, unit in (("e2e_train_time", "s"), ("training_examples_per_second", "examples/s"),
                         ("e2e_inference_time", "s"), ("inference_examples_per_second", "examples/s")):
        run.dllog.metadata(metric, {"unit": unit})

    # Read both files first: a malformed val.csv fails the run before any training time is spent.
    data = {split: load_split(args, tokenizer, split)
            for split, wanted in (("train", args.do_train), ("val", args.do_eval)) if wanted}

    model = BertForMultipleChoice.from_pretrained(args.init_checkpoint, config=config, num_choices=NUM_CHOICES)
    missing_head = [key for key in model.load_report.missing if key.startswith("classifier.")]
    if missing_head and not args.do_train:  # a random classifier would score chance and exit 0
        raise CheckpointError(f"--init_checkpoint {args.init_checkpoint} has no multiple-choice classifier "
                              f"({', '.join(missing_head)} missing): fine-tune it with --do_train before --do_eval")
    model.to(run.device)
    run.dllog.log(step="PARAMETER", data={"num_parameters": sum(p.numel() for p in model.parameters()),
                                          "init_checkpoint_load": str(model.load_report)})
    results: dict[str, Any] = {}
    if args.do_train:
        results.update(train(args, model, config, data["train"], run))
        utils.save_finetuned(run, model, output_dir, skip=args.skip_checkpoint)
    if run.is_main:
        if args.do_eval:
            results.update(evaluate(model, data["val"], args, run))
        with atomic_write(output_dir / "results.txt", mode="w", encoding="utf-8") as handle:
            json.dump(dict(sorted(results.items())), handle, indent=2)
            handle.write("\n")
        run.dllog.log(step=tuple(), data=summarize(results))
    utils.barrier()
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files, data or checkpoints end the run with a message and exit status 1."""
    args = parse_arguments(argv)
    return utils.run_job("run_swag.py", args, check_arguments, lambda run: execute(args, run),
                         json_summary=args.json_summary or str(Path(args.output_dir) / "dllogger.json"))


if __name__ == "__main__":
    sys.exit(main())
