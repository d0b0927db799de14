"""GLUE fine-tuning, evaluation and prediction: the reference's flags, on CPU, one GPU or many (torchrun / SLURM)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import utils
from data.glue import (
    PROCESSORS,
    DataProcessor,
    GlueDataError,
    compute_metrics,
    convert_examples_to_features,
    features_to_tensors,
    get_processor,
)
from file_utils import CheckpointError, atomic_write, sha256sum
from modeling import IGNORE_INDEX, BertConfig, BertForSequenceClassification
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups
from schedulers import LinearWarmUpScheduler
from tokenization import BertTokenizer

Batch = dict[str, torch.Tensor]
CACHE_FORMAT = 2  # bump when the cached tensors change meaning


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults (README "Parameters")."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--data_dir", required=True,
                          help="Task folder of the official GLUE download (e.g. glue_data/MRPC) holding its TSVs.")
    required.add_argument("--bert_model", required=True,
                          help="Model name; only names the features cache file (nothing is downloaded).")
    required.add_argument("--task_name", required=True, type=str.lower, choices=list(PROCESSORS),
                          help="GLUE task; mnli-mm is MNLI evaluated on the mismatched dev/test files.")
    required.add_argument("--output_dir", required=True,
                          help="Where pytorch_model.bin, config.json, results.txt and predictions.json are written.")
    required.add_argument("--init_checkpoint", required=True,
                          help="Weights to start from: a reference .pt ({'model': ...} or bare), our or a Hugging "
                               "Face folder or file; a classifier absent from it is freshly initialised.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocabulary the model was trained with.")
    required.add_argument("--config_file", required=True, help="BERT config JSON (ours, the reference's or HF's).")
    other = parser.add_argument_group("other")
    other.add_argument("--max_seq_length", type=int, default=128,
                       help="Tokens per example after WordPiece, [CLS]/[SEP] included; longer pairs are trimmed.")
    other.add_argument("--do_train", action="store_true", help="Fine-tune on train.tsv.")
    other.add_argument("--do_eval", action="store_true", help="Evaluate on the dev file and write results.txt.")
    other.add_argument("--do_predict", action="store_true",
                       help="Write predictions.json (guid -> label) for the --predict_split file.")
    other.add_argument("--predict_split", choices=("dev", "test"), default="dev",
                       help="File --do_predict labels: dev (the reference's choice) or test (GLUE's unlabelled set).")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case and strip accents (uncased models).")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Sequences per rank per optimizer step, before division by --gradient_accumulation_steps.")
    other.add_argument("--eval_batch_size", type=int, default=8, help="Sequences per evaluation/prediction batch.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="Peak AdamW learning rate.")
    other.add_argument("--num_train_epochs", type=float, default=3.0,
                       help="Passes over the training set (may be fractional); ignored when --max_steps > 0.")
    other.add_argument("--max_steps", type=utils.step_count, default=-1,
                       help="Optimizer steps to train when > 0 (overrides --num_train_epochs and sets the schedule).")
    other.add_argument("--warmup_proportion", type=float, default=0.1,
                       help="Fraction of the training steps over which the learning rate rises linearly.")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    other.add_argument("--seed", type=int, default=1, help="Seed of the data order and the classifier init.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    utils.add_precision_flags(other)
    other.add_argument("--skip_checkpoint", action="store_true", help="Do not write the fine-tuned model.")
    utils.add_run_flags(other)
    other.add_argument("--features_cache_dir", default=None,
                       help="Folder of the tokenized-features cache (default: --data_dir, as the reference).")
    other.add_argument("--skip_features_cache", action="store_true",
                       help="Neither read nor write the features cache.")
    other.add_argument("--log_freq", type=int, default=1, help="Log the training loss every N optimizer steps.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bars.")
    other.add_argument("--server_ip", default="", help="With --server_port: wait for a debugpy client at this address.")
    other.add_argument("--server_port", default="", help="With --server_ip: the debugpy port (remote debugging).")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flag combinations and inputs that cannot work, before any data is read or model built."""
    if not (args.do_train or args.do_eval or args.do_predict):
        raise ValueError("at least one of --do_train, --do_eval or --do_predict must be set")
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
    for flag in ("vocab_file", "config_file"):
        if not Path(getattr(args, flag)).is_file():
            raise FileNotFoundError(f"--{flag} {getattr(args, flag)} does not exist")
    if "://" not in args.init_checkpoint and not Path(args.init_checkpoint).exists():
        raise FileNotFoundError(f"--init_checkpoint {args.init_checkpoint} does not exist")


def build_config(args: argparse.Namespace, tokenizer: BertTokenizer) -> BertConfig:
    """Read the model config and check it can embed every token id and position the features will hold."""
    config = BertConfig.from_json_file(args.config_file)
    config.check_fits(len(tokenizer), args.max_seq_length, config_file=args.config_file, vocab_file=args.vocab_file)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Features (with a cache of plain tensors, keyed by the content of every input that shapes them)
# ---------------------------------------------------------------------------------------------------------------


def load_features(args: argparse.Namespace, processor: DataProcessor, tokenizer: BertTokenizer, split: str,
                  run_env: utils.RunEnv) -> tuple[Batch, list[str]]:
    """Tokenized tensors of one split (see ``features_to_tensors``) and the guid of each row.

    The cache file (``<bert_model>_<max_seq_length>_<do_lower_case>_<task>_<split>.pt``, the reference's name
    plus task and split, in --features_cache_dir or --data_dir) is used only when its key, a hash of the source
    file, the vocabulary and the conversion settings, matches (``utils.cached_features``): a changed vocab or data
    file is never served stale features.
    """
    source = Path(args.data_dir) / {"train": processor.train_file, "dev": processor.dev_file,
                                    "test": processor.test_file}[split]
    path, key = None, ""
    if not args.skip_features_cache and source.is_file():
        name = f"{Path(args.bert_model.rstrip('/')).name}_{args.max_seq_length}_{args.do_lower_case}_" \
               f"{processor.task_name}_{split}.pt"
        path = Path(args.features_cache_dir or args.data_dir) / name
        key = hashlib.sha256(json.dumps([CACHE_FORMAT, sha256sum(source), sha256sum(args.vocab_file),
                                         args.max_seq_length, args.do_lower_case, processor.task_name,
                                         split]).encode()).hexdigest()

    def build() -> dict[str, Any]:
        examples = processor.get_examples(args.data_dir, split)
        if not examples:
            raise GlueDataError(f"{source}: holds no examples")
        features, _ = convert_examples_to_features(examples, processor.get_labels(), args.max_seq_length, tokenizer)
        return {"tensors": features_to_tensors(features), "guids": [ex.guid for ex in examples]}

    cached = utils.cached_features(path, key, build, run_env)
    return cached["tensors"], list(cached["guids"])


def trim_padding(batch: Batch) -> Batch:
    """Cut the columns that are padding in every row of the batch.

    Results do not change: padded keys get exp(-10000) = 0 attention weight, positions and segments of real
    tokens are unaffected, and the classifier reads [CLS]. Short-sentence tasks (SST-2) run several times faster.
    """
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


def train_batches(tensors: Batch, micro_batch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> utils.ShuffledBatches:
    """Endless shuffled micro-batches of this rank's share, each trimmed to its longest row."""
    return utils.ShuffledBatches(tensors["input_ids"].shape[0], micro_batch, seed,
                                 lambda index: trim_padding({k: v[index] for k, v in tensors.items()}), rank,
                                 world_size)


def make_loss_fn(regression: bool) -> utils.LossFn:
    """Cross-entropy (labels of -1 ignored) or, for regression, mean squared error, of one micro-batch."""
    def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        if regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX)

    return loss_fn


def train(args: argparse.Namespace, model: BertForSequenceClassification, config: BertConfig, tensors: Batch,
          run: utils.Run, regression: bool) -> dict[str, Any]:
    """Fine-tune with AdamW and linear warm-up/decay through ``utils.train_loop``; returns the train:* results."""
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    num_examples = tensors["input_ids"].shape[0]
    total_steps = args.max_steps if args.max_steps > 0 else utils.steps_per_epochs(
        num_examples, micro_batch, run.world_size, args.gradient_accumulation_steps, args.num_train_epochs)
    optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY),
                                lr=args.learning_rate, eps=1e-6, device=run.device)
    parts = utils.TrainParts(
        utils.wrap_model(model, run.env), make_loss_fn(regression), optimizer,
        LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps),
        run.grad_scaler(args), flops_per_batch=lambda b: b["input_ids"].shape[0] * utils.bert_flops_per_sequence(
            config, b["input_ids"].shape[1], masked_tokens=0))
    run.dllog.log(step="PARAMETER", data={"train:num_examples": num_examples, "train:total_steps": total_steps,
                                          "batch_size_per_gpu": args.train_batch_size})
    state = utils.TrainState()
    start = time.perf_counter()
    # No clipping in the reference is a defect (its GLUE GradientClipper is never called); clip at 1.0 as BERT does.
    result = utils.train_loop(run, parts, train_batches(tensors, micro_batch, args.seed, run.env.rank, run.world_size),
                              utils.LoopConfig.from_args(args, max_steps=total_steps, max_grad_norm=1.0), state)
    run.synchronize()
    latency = time.perf_counter() - start
    samples_per_gpu = state.sequences // run.world_size
    return {
        "global_step": state.step,
        "train:loss": result.mean_loss,
        "train:latency": latency,
        "train:num_samples_per_gpu": samples_per_gpu,
        "train:num_steps": state.step,
        "train:throughput": run.world_size * samples_per_gpu / latency,
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and prediction (main process only, as the reference)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def infer(model: BertForSequenceClassification, tensors: Batch, args: argparse.Namespace,
          run: utils.Run) -> tuple[np.ndarray, list[float]]:
    """Logits ``[N, num_labels]`` (fp32, in input order) and the latency of each batch in ms.

    Examples are batched in order of length so that little padding is computed; the logits are put back in
    input order. Each batch is timed from host tensors to logits on the host (synchronised on GPU).
    """
    model.eval()
    lengths = tensors["attention_mask"].sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    logits = torch.empty(len(order), model.num_labels)
    latencies = []
    inputs = {k: tensors[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    starts = range(0, len(order), args.eval_batch_size)
    for start in utils.progress_bar(starts, disable=args.disable_progress_bar, desc="infer"):
        index = order[start:start + args.eval_batch_size]
        tic = time.perf_counter()
        batch = utils.move_to_device(trim_padding({k: v[index] for k, v in inputs.items()}), run.device)
        with run.autocast():
            out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        logits[index] = out.float().cpu()
        latencies.append((time.perf_counter() - tic) * 1000.0)
    return logits.numpy(), latencies


def latency_results(latencies: list[float], num_samples: int) -> dict[str, float]:
    """The reference's infer:* keys: per-batch latency percentiles, mean, std and sum (ms) and throughput."""
    values = np.asarray(latencies)
    results = {f"infer:latency(ms):{p}%": float(np.percentile(values, p)) for p in (50, 90, 95, 99, 100)}
    results.update({"infer:latency(ms):avg": float(values.mean()), "infer:latency(ms):std": float(values.std()),
                    "infer:latency(ms):sum": float(values.sum()),
                    "infer:throughput(samples/s):avg": num_samples / (values.sum() / 1000.0)})
    return results


def evaluate(model: BertForSequenceClassification, tensors: Batch, args: argparse.Namespace, run: utils.Run,
             regression: bool) -> dict[str, Any]:
    """Dev-set loss, the task's metrics (data/glue.py) and the inference timing."""
    logits, latencies = infer(model, tensors, args, run)
    labels = tensors["labels"]
    logits_t = torch.from_numpy(logits)
    if regression:
        loss = F.mse_loss(logits_t.squeeze(-1), labels.float())
        preds = logits[:, 0]
    else:
        loss = F.cross_entropy(logits_t, labels, ignore_index=IGNORE_INDEX)
        preds = logits.argmax(axis=1)
    results = {"eval:num_samples_per_gpu": len(preds), "eval:num_steps": len(latencies), "eval:loss": float(loss)}
    results.update(latency_results(latencies, len(preds)))
    results.update(compute_metrics(args.task_name, preds, labels.numpy()))
    return results


def predict(model: BertForSequenceClassification, tensors: Batch, guids: list[str], label_list: list[str],
            args: argparse.Namespace, run: utils.Run) -> tuple[dict[str, str], list[float]]:
    """guid -> predicted label string (a score, as text, for regression), and the batch latencies."""
    logits, latencies = infer(model, tensors, args, run)
    if label_list:
        labels = [label_list[i] for i in logits.argmax(axis=1)]
    else:
        labels = [f"{score:.6g}" for score in logits[:, 0]]
    return dict(zip(guids, labels)), latencies


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a crash never leaves a half-written file), keys in the order given."""
    with atomic_write(path, mode="w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


# Summary keys of the reference's dllogger record, and the results they are taken from.
SUMMARY_KEYS = {"exact_match": "acc", "F1": "f1", "e2e_train_time": "train:latency",
                "training_sequences_per_second": "train:throughput",
                "inference_sequences_per_second": "infer:throughput(samples/s):avg"}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The final dllogger record: the reference's mapped keys, plus the other task metrics under their own names."""
    summary = {key: results[source] for key, source in SUMMARY_KEYS.items() if source in results}
    if "infer:latency(ms):sum" in results:
        summary["e2e_inference_time"] = results["infer:latency(ms):sum"] / 1000.0
    for key in ("mcc", "acc_and_f1", "pearson", "spearmanr", "corr", "eval:loss"):
        if key in results:
            summary[key] = results[key]
    return summary


def execute(args: argparse.Namespace, run: utils.Run) -> dict[str, Any]:
    """Do what the --do_* flags ask and return the results dict (also written to results.txt)."""
    processor = get_processor(args.task_name)
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    config = build_config(args, tokenizer)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for metric, unit in (("e2e_train_time", "s"), ("training_sequences_per_second", "sequences/s"),
                         ("e2e_inference_time", "s"), ("inference_sequences_per_second", "sequences/s")):
        run.dllog.metadata(metric, {"unit": unit})

    # Read every split first: a malformed file fails the run before any training time is spent.
    splits = (["train"] if args.do_train else []) + (["dev"] if args.do_eval else []) \
        + ([args.predict_split] if args.do_predict else [])
    data = {split: load_features(args, processor, tokenizer, split, run.env) for split in dict.fromkeys(splits)}
    regression = processor.is_regression

    model = BertForSequenceClassification.from_pretrained(args.init_checkpoint, config=config,
                                                          num_labels=processor.num_labels)
    missing_head = [key for key in model.load_report.missing if key.startswith("classifier.")]
    if missing_head and not args.do_train:  # a random classifier would score chance and exit 0
        raise CheckpointError(f"--init_checkpoint {args.init_checkpoint} has no classifier ({', '.join(missing_head)} "
                              "missing): fine-tune it with --do_train before --do_eval or --do_predict")
    model.to(run.device)
    run.dllog.log(step="PARAMETER", data={"num_parameters": sum(p.numel() for p in model.parameters()),
                                          "init_checkpoint_load": str(model.load_report)})
    results: dict[str, Any] = {}
    if args.do_train:
        results.update(train(args, model, config, data["train"][0], run, regression))
        utils.save_finetuned(run, model, output_dir, skip=args.skip_checkpoint)
    if run.is_main:
        if args.do_eval:
            results.update(evaluate(model, data["dev"][0], args, run, regression))
        if args.do_predict:
            tensors, guids = data[args.predict_split]
            predictions, latencies = predict(model, tensors, guids, processor.get_labels(), args, run)
            write_json(output_dir / "predictions.json", predictions)
            results["predict:num_samples"] = len(predictions)
            if not args.do_eval:
                results.update(latency_results(latencies, len(predictions)))
        write_json(output_dir / "results.txt", dict(sorted(results.items())))
        run.dllog.log(step=tuple(), data=summarize(results))
    utils.barrier()
    return results


def wait_for_debugger(server_ip: str, server_port: str) -> None:
    """The reference's remote-debugging flags: listen with debugpy (ptvsd's successor) and wait for a client."""
    if not (server_ip and server_port):
        raise ValueError("--server_ip and --server_port go together (remote debugging); give both or neither")
    try:
        import debugpy  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError("--server_ip/--server_port need the debugpy package: pip install debugpy") from None
    debugpy.listen((server_ip, int(server_port)))
    print(f"run_glue.py: waiting for a debugger to attach at {server_ip}:{server_port}", flush=True)
    debugpy.wait_for_client()


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files or checkpoints end the run with a message and exit status 1."""
    args = parse_arguments(argv)
    if args.server_ip or args.server_port:
        try:
            wait_for_debugger(args.server_ip, args.server_port)
        except ValueError as exc:
            return utils.report_error("run_glue.py", exc)
    return utils.run_job("run_glue.py", args, check_arguments, lambda run: execute(args, run),
                         json_summary=args.json_summary or str(Path(args.output_dir) / "dllogger.json"),
                         tensorboard=args.tensorboard)


if __name__ == "__main__":
    sys.exit(main())
