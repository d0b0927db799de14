"""Fine-tune BERT on SQuAD v1.1/v2.0 and predict answers: the reference's flags, on CPU, one GPU or many (torchrun)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import utils
from data import squad
from file_utils import CheckpointError, sha256sum
from modeling import BertConfig, BertForQuestionAnswering
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups
from schedulers import LinearWarmUpScheduler
from tokenization import BertTokenizer

CACHE_FORMAT = "run_squad train features v2"


class EvalScriptError(RuntimeError):
    """--eval_script failed or printed something other than a JSON object of metrics."""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--bert_model", required=True,
                          help="Model name, e.g. bert-large-uncased; part of the train-features cache file name.")
    required.add_argument("--output_dir", required=True,
                          help="Where pytorch_model.bin, config.json and the prediction files are written.")
    required.add_argument("--init_checkpoint", required=True,
                          help="Weights to start from: a reference .pt ({'model': ...} or bare), a Hugging Face "
                               "folder/file, or a run_squad.py output folder.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocabulary file of the model.")
    required.add_argument("--config_file", required=True, help="BERT config JSON of the model.")
    other = parser.add_argument_group("other")
    other.add_argument("--train_file", default=None, help="SQuAD JSON to train on (needed by --do_train).")
    other.add_argument("--predict_file", default=None,
                       help="SQuAD JSON to predict on (needed by --do_predict; --do_eval scores against it).")
    other.add_argument("--max_seq_length", type=int, default=384,
                       help="Tokens per window: [CLS] query [SEP] doc [SEP], zero padded.")
    other.add_argument("--doc_stride", type=int, default=128,
                       help="Tokens between the starts of consecutive windows over a long document.")
    other.add_argument("--max_query_length", type=int, default=64, help="Questions are cut to this many tokens.")
    other.add_argument("--do_train", action="store_true", help="Fine-tune on --train_file.")
    other.add_argument("--do_predict", action="store_true", help="Write predictions for --predict_file.")
    other.add_argument("--do_eval", action="store_true",
                       help="With --do_predict: score the predictions (built-in official metrics, plus "
                            "--eval_script when given).")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Sequences per rank per optimizer step, before division by --gradient_accumulation_steps.")
    other.add_argument("--predict_batch_size", type=int, default=8, help="Sequences per prediction batch.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="Peak AdamW learning rate.")
    other.add_argument("--num_train_epochs", type=float, default=3.0,
                       help="Passes over the training features; sets the length of the lr schedule.")
    other.add_argument("--max_steps", type=utils.step_count, default=-1,
                       help="If > 0, stop after this many optimizer steps (benchmarking); the schedule still spans "
                            "--num_train_epochs.")
    other.add_argument("--warmup_proportion", type=float, default=0.1,
                       help="Fraction of the schedule spent warming the learning rate up linearly.")
    other.add_argument("--n_best_size", type=int, default=20,
                       help="Start/end candidates per window, and entries per question in nbest_predictions.json.")
    other.add_argument("--max_answer_length", type=int, default=30, help="Longest answer, in tokens.")
    other.add_argument("--verbose_logging", action="store_true",
                       help="Log predictions that can't be aligned with the original text.")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    other.add_argument("--seed", type=int, default=42, help="Seed; rank r uses seed + r for dropout.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case the text (uncased models).")
    utils.add_precision_flags(other)
    other.add_argument("--version_2_with_negative", action="store_true",
                       help="SQuAD v2.0: questions may have no answer; writes null_odds.json.")
    other.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                       help="v2.0: answer \"\" when null score - best span score exceeds this.")
    other.add_argument("--log_freq", type=int, default=50, help="Log every N optimizer steps.")
    utils.add_run_flags(other, json_summary="results/dllogger.json")
    other.add_argument("--eval_script", default=None,
                       help="With --do_eval: also run this official evaluate script (data_file pred_file) as a "
                            "subprocess and log its JSON output.")
    other.add_argument("--use_env", action="store_true",
                       help="Accepted for launcher compatibility; ranks are always read from the environment.")
    other.add_argument("--skip_checkpoint", action="store_true", help="Don't save the fine-tuned model.")
    other.add_argument("--disable-progress-bar", dest="disable_progress_bar", action="store_true",
                       help="No tqdm bars.")
    other.add_argument("--skip_cache", action="store_true", help="Don't read or write the train-features cache.")
    other.add_argument("--profile", action="store_true",
                       help="Write a torch.profiler trace of the first 5 training steps (or of the prediction pass "
                            "without --do_train) to <output_dir>/profile/.")
    other.add_argument("--cache_dir", default=None,
                       help="Folder of the train-features cache (default: beside --train_file).")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flag combinations and inputs that cannot work, before any model is built."""
    if not (args.do_train or args.do_predict):
        raise ValueError("at least one of --do_train or --do_predict must be set")
    if args.do_train and not args.train_file:
        raise ValueError("--do_train needs --train_file")
    if args.do_predict and not args.predict_file:
        raise ValueError("--do_predict needs --predict_file")
    if args.do_eval and not args.do_predict:
        raise ValueError("--do_eval scores the predictions of --do_predict; set --do_predict too")
    if args.eval_script and not args.do_eval:
        raise ValueError("--eval_script runs with --do_eval; set --do_eval (and --do_predict)")
    utils.check_batch_arithmetic(args.train_batch_size, args.gradient_accumulation_steps, world_size)
    positive = {"--predict_batch_size": args.predict_batch_size, "--doc_stride": args.doc_stride,
                "--max_query_length": args.max_query_length, "--n_best_size": args.n_best_size,
                "--max_answer_length": args.max_answer_length, "--log_freq": args.log_freq}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.max_seq_length <= args.max_query_length + 3:
        raise ValueError(f"--max_seq_length {args.max_seq_length} must exceed --max_query_length "
                         f"{args.max_query_length} + 3 so that each window holds some document")
    if args.do_train:
        utils.check_positive_finite(learning_rate=args.learning_rate, num_train_epochs=args.num_train_epochs)
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    files = {"--vocab_file": args.vocab_file, "--config_file": args.config_file,
             "--train_file": args.train_file if args.do_train else None,
             "--predict_file": args.predict_file if args.do_predict else None,
             "--eval_script": args.eval_script}
    for flag, path in files.items():
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if not Path(args.init_checkpoint).exists():
        raise FileNotFoundError(f"--init_checkpoint {args.init_checkpoint} does not exist")


def build_config(args: argparse.Namespace, tokenizer: BertTokenizer) -> BertConfig:
    """Read the model config and check the vocabulary and the window length fit the model."""
    config = BertConfig.from_json_file(args.config_file)
    config.check_fits(len(tokenizer.vocab), args.max_seq_length, config_file=args.config_file,
                      vocab_file=args.vocab_file)
    return config


def load_model(args: argparse.Namespace, config: BertConfig, dllog: Any) -> BertForQuestionAnswering:
    """Build the QA model from --init_checkpoint (any format ``from_pretrained`` reads) and the given config.

    Loading maps names explicitly and fails on shape mismatches. Predicting without training needs a fine-tuned
    QA checkpoint: a missing ``qa_outputs`` head would answer at random, so that is an error.
    """
    dllog.log(step="PARAMETER", data={"loading_checkpoint": True})
    try:
        model = BertForQuestionAnswering.from_pretrained(args.init_checkpoint, config=config)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"--init_checkpoint {args.init_checkpoint} does not fit --config_file "
                              f"{args.config_file}: {exc}") from exc
    missing_head = [key for key in model.load_report.missing if key.startswith("qa_outputs.")]
    if missing_head and not args.do_train:
        raise CheckpointError(f"--init_checkpoint {args.init_checkpoint} has no question-answering head "
                              f"({', '.join(missing_head)} missing): fine-tune it with --do_train first")
    dllog.log(step="PARAMETER", data={"loaded_checkpoint": True,
                                      "model_weights_num": sum(p.numel() for p in model.parameters())})
    return model


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
            end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies over positions [B, S] -> scalar.

    As in the reference, targets are clamped to [0, S] and S is ignored, so a position outside the (trimmed)
    sequence contributes nothing instead of failing.
    """
    seq_len = start_logits.shape[1]
    start_loss = F.cross_entropy(start_logits.float(), start_positions.clamp(0, seq_len), ignore_index=seq_len)
    end_loss = F.cross_entropy(end_logits.float(), end_positions.clamp(0, seq_len), ignore_index=seq_len)
    return (start_loss + end_loss) / 2


# ----------------------------------------------------------------------------------------------------------------
# Training features (cached) and batches
# ----------------------------------------------------------------------------------------------------------------


def cache_path(args: argparse.Namespace) -> Path | None:
    """The reference's cache name ``<train_file>_<bert_model>_<max_seq>_<stride>_<max_query>``, plus ``.pt``
    (tensors, not a pickle), in --cache_dir or beside --train_file; None with --skip_cache."""
    if args.skip_cache:
        return None
    train_file = Path(args.train_file)
    folder = Path(args.cache_dir) if args.cache_dir else train_file.parent
    model = args.bert_model.replace("/", "_").replace(os.sep, "_")
    return folder / f"{train_file.name}_{model}_{args.max_seq_length}_{args.doc_stride}_{args.max_query_length}.pt"


def cache_key(args: argparse.Namespace) -> str:
    """Everything the cached features depend on; a cache with another key is rebuilt, not reused."""
    return json.dumps({"format": CACHE_FORMAT, "train_file_sha256": sha256sum(args.train_file),
                       "vocab_sha256": sha256sum(args.vocab_file), "do_lower_case": args.do_lower_case,
                       "version_2_with_negative": args.version_2_with_negative,
                       "max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
                       "max_query_length": args.max_query_length}, sort_keys=True)


def build_train_features(args: argparse.Namespace, tokenizer: BertTokenizer) -> dict[str, Any]:
    """Read --train_file and make packed training features: ``{"tensors": ..., "num_examples": ...}``."""
    examples, _ = squad.read_squad_examples(args.train_file, is_training=True,
                                            version_2_with_negative=args.version_2_with_negative)
    features = squad.convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                  args.max_query_length, is_training=True)
    if not features:
        raise ValueError(f"--train_file {args.train_file} gave no training features")
    return {"tensors": squad.features_to_tensors(features, args.max_seq_length), "num_examples": len(examples)}


def train_batches(tensors: dict[str, torch.Tensor], micro_batch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> utils.ShuffledBatches:
    """Endless shuffled micro-batches of this rank's share of the features, each cut to its longest row."""
    def make_batch(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = squad.model_inputs(tensors["input_ids"][rows], tensors["seq_lengths"][rows],
                                   tensors["doc_offsets"][rows])
        batch["start_positions"] = tensors["start_positions"][rows]
        batch["end_positions"] = tensors["end_positions"][rows]
        return batch

    return utils.ShuffledBatches(len(tensors["seq_lengths"]), micro_batch, seed, make_batch, rank, world_size)


def train(args: argparse.Namespace, model: BertForQuestionAnswering, tokenizer: BertTokenizer, config: BertConfig,
          run: utils.Run, profiler: utils.StepProfiler | None = None) -> dict[str, float]:
    """Fine-tune with AdamW, linear warm-up/decay and global-norm clipping through ``utils.train_loop``.

    Returns the summary figures (e2e_train_time, training_sequences_per_second, final_loss)."""
    path = cache_path(args)
    run.dllog.log(step="PARAMETER", data={"Cached_train features_file": str(path)})
    cached = utils.cached_features(path, cache_key(args), lambda: build_train_features(args, tokenizer), run.env)
    tensors, num_examples = cached["tensors"], int(cached["num_examples"])
    num_features = len(tensors["seq_lengths"])
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    # The schedule length counts features (windows), which is what the model trains on. The reference counts
    # examples (questions), so its lr reached zero before the last ~3% of each epoch's features on SQuAD v1.1.
    total_steps = utils.steps_per_epochs(num_features, micro_batch, run.world_size,
                                         args.gradient_accumulation_steps, args.num_train_epochs)
    max_steps = total_steps if args.max_steps <= 0 else min(args.max_steps, total_steps)
    run.dllog.log(step="PARAMETER", data={"train_start": True, "training_samples": num_examples,
                                          "training_features": num_features,
                                          "train_batch_size": args.train_batch_size, "steps": total_steps,
                                          "max_steps": max_steps})

    # The pooler gets no gradient from the QA loss; BertForQuestionAnswering freezes it (so DDP doesn't wait for
    # it) and it stays out of the optimizer, as in the reference.
    model.to(run.device)
    optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY,
                                                      drop_pooler=True),
                                lr=args.learning_rate, device=run.device)

    def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start_logits, end_logits = net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        return qa_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])

    parts = utils.TrainParts(
        utils.wrap_model(model, run.env), loss_fn, optimizer,
        LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps),
        run.grad_scaler(args), flops_per_batch=lambda b: b["input_ids"].shape[0] * utils.bert_flops_per_sequence(
            config, b["input_ids"].shape[1], masked_tokens=0))
    wall_start = time.perf_counter()
    result = utils.train_loop(run, parts, train_batches(tensors, micro_batch, args.seed, run.env.rank,
                                                        run.world_size),
                              utils.LoopConfig.from_args(args, max_steps=max_steps, max_grad_norm=1.0),
                              on_step=profiler.on_step if profiler is not None else None)
    return {"e2e_train_time": time.perf_counter() - wall_start,
            "training_sequences_per_second": result.sequences_per_second, "final_loss": result.final_loss}


# ----------------------------------------------------------------------------------------------------------------
# Prediction and evaluation
# ----------------------------------------------------------------------------------------------------------------


def predict(args: argparse.Namespace, model: BertForQuestionAnswering, tokenizer: BertTokenizer,
            run: utils.Run) -> dict[str, float]:
    """Predict answers for --predict_file, write the prediction files and (with --do_eval) score them.

    Returns the summary figures (e2e_inference_time, inference_sequences_per_second, and with --do_eval
    exact_match, F1 and, for v2.0, the HasAns/NoAns/best-threshold figures)."""
    dataset = squad.load_squad_json(args.predict_file)
    unanswerable = [qa["id"] for article in dataset["data"] for paragraph in article["paragraphs"]
                    for qa in paragraph["qas"] if qa.get("is_impossible")]
    if unanswerable and not args.version_2_with_negative:  # v1 predictions on a v2.0 file score wrongly
        raise squad.SquadFormatError(
            f"--predict_file {args.predict_file} is SQuAD v2.0: {len(unanswerable)} questions are marked "
            f"is_impossible (e.g. {unanswerable[0]}); pass --version_2_with_negative")
    examples, _ = squad.read_squad_examples(args.predict_file, is_training=False,
                                            version_2_with_negative=args.version_2_with_negative)
    features = squad.convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                  args.max_query_length, is_training=False)
    tensors = squad.features_to_tensors(features, args.max_seq_length)
    run.dllog.log(step="PARAMETER", data={"infer_start": True, "eval_samples": len(examples),
                                          "eval_features": len(features),
                                          "predict_batch_size": args.predict_batch_size})
    model.to(run.device)
    run.synchronize()
    start = time.perf_counter()
    start_logits, end_logits = squad.predict_logits(
        model, tensors, args.predict_batch_size, run.device, run.autocast,
        progress=lambda batches: utils.progress_bar(batches, disable=args.disable_progress_bar, desc="predict"))
    run.synchronize()
    inference_time = time.perf_counter() - start
    predictions = squad.compute_predictions(
        examples, features, start_logits, end_logits, tokenizer, n_best_size=args.n_best_size,
        max_answer_length=args.max_answer_length, do_lower_case=args.do_lower_case,
        version_2_with_negative=args.version_2_with_negative,
        null_score_diff_threshold=args.null_score_diff_threshold, verbose_logging=args.verbose_logging)
    files = squad.write_predictions(predictions, args.output_dir, args.version_2_with_negative)
    summary: dict[str, float] = {"e2e_inference_time": inference_time,
                                 "inference_sequences_per_second": len(features) / max(inference_time, 1e-9)}
    if args.do_eval:
        run.dllog.log(step="PARAMETER", data={"eval_start": True})
        try:
            metrics = squad.evaluate(dataset, predictions.answers, args.version_2_with_negative,
                                     predictions.null_odds if args.version_2_with_negative else None)
        except squad.SquadFormatError as exc:
            raise squad.SquadFormatError(f"--do_eval on --predict_file {args.predict_file}: {exc}") from None
        summary.update({"exact_match": metrics["exact_match"], "F1": metrics["f1"]})
        summary.update({k: v for k, v in metrics.items() if k not in ("exact_match", "exact", "f1")})
        if args.eval_script:
            summary.update(run_eval_script(args, files))
    return summary


def run_eval_script(args: argparse.Namespace, files: dict[str, Path]) -> dict[str, float]:
    """Run --eval_script on the predictions as the reference does and return its JSON metrics, prefixed."""
    command = [sys.executable, args.eval_script, args.predict_file, str(files["predictions"])]
    if args.version_2_with_negative:
        command += ["--na-prob-file", str(files["null_odds"])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EvalScriptError(f"--eval_script {args.eval_script} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    try:
        output = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise EvalScriptError(f"--eval_script {args.eval_script} did not print a JSON object: "
                           f"{done.stdout.strip()[-500:]!r}") from None
    return {f"eval_script_{k}": v for k, v in output.items() if isinstance(v, (int, float))}


def execute(args: argparse.Namespace, run: utils.Run) -> None:
    """Train and/or predict as the --do_* flags ask, then log the summary."""
    for metric, unit in (("e2e_train_time", "s"), ("training_sequences_per_second", "sequences/s"),
                         ("final_loss", None), ("e2e_inference_time", "s"),
                         ("inference_sequences_per_second", "sequences/s"), ("exact_match", None), ("F1", None)):
        run.dllog.metadata(metric, {"unit": unit})
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    config = build_config(args, tokenizer)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model = load_model(args, config, run.dllog)
    # --profile traces the first 5 training steps, or the prediction pass when there is no training.
    profiler = utils.StepProfiler(Path(args.output_dir) / "profile", 0, run.env) if args.profile else None
    summary: dict[str, float] = {}
    try:
        if args.do_train:
            summary.update(train(args, model, tokenizer, config, run, profiler))
            utils.save_finetuned(run, model, args.output_dir, skip=args.skip_checkpoint)
        if args.do_predict:
            if run.is_main:
                summary.update(predict(args, model, tokenizer, run))
            utils.barrier()
    finally:
        if profiler is not None:
            profiler.close()
    run.dllog.log(step=tuple(), data=summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return utils.run_job("run_squad.py", args, check_arguments, lambda run: execute(args, run),
                         json_summary=args.json_summary, errors=(EvalScriptError,), tensorboard=args.tensorboard)


if __name__ == "__main__":
    sys.exit(main())
