"""Task distillation (TinyBERT): a student learns a fine-tuned teacher on a GLUE task or SQuAD v1.1, in two stages.

Stage 1 (backbone, default): attention/value/hidden-state losses at a constant learning rate; the task head is not
trained. Stage 2 (``--pred_distill``): the prediction layer learns the teacher's logits (soft cross-entropy at
``--temperature``; MSE against the labels for regression tasks) with linear warm-up and decay. Each stage writes a
student folder that run_glue.py, run_squad.py and inference.py load like any fine-tuned model.

    python distillation/task_distill.py --data_dir glue/SST-2 --task_name sst-2 --teacher_model <fine-tuned> \\
        --student_model <general-distilled> --output_dir <stage1> --do_lower_case
    python distillation/task_distill.py ... --student_model <stage1> --output_dir <stage2> --pred_distill --do_eval
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_glue  # noqa: E402  (path insert)
import run_squad  # noqa: E402
import utils  # noqa: E402
from data import squad  # noqa: E402
from data.glue import PROCESSORS, get_processor  # noqa: E402
from distillation.common import (  # noqa: E402
    StudentWithLoss,
    check_student_weights,
    compatible,
    has_weights,
    load_projection,
    load_teacher,
    model_config,
    save_student,
    teacher_states,
)
from distillation.losses import BackboneLoss, DistillConfig, soft_cross_entropy  # noqa: E402
from file_utils import CheckpointError, atomic_write  # noqa: E402
from modeling import BertForQuestionAnswering, BertForSequenceClassification, BertPreTrainedModel  # noqa: E402
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups  # noqa: E402
from schedulers import ConstantLR, LinearWarmUpScheduler  # noqa: E402
from tokenization import BertTokenizer, load_vocab  # noqa: E402

log = logging.getLogger("task_distill")
HERE = Path(__file__).resolve().parent
SQUAD_TASK = "squadv1.1"
SQUAD_FILES = {"train": "train-v1.1.json", "aug": "train-v1.1_aug.json", "dev": "dev-v1.1.json"}
GLUE_AUG_FILE = "train_aug.tsv"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    required.add_argument("--data_dir", required=True,
                          help="GLUE task (train.tsv, dev.tsv), or SQuAD folder (train-v1.1.json, dev-v1.1.json).")
    required.add_argument("--teacher_model", required=True,
                          help="Teacher folder fine-tuned on this task by run_glue.py or run_squad.py.")
    required.add_argument("--student_model", required=True,
                          help="Student folder: general_distill.py's output, or stage 1's output for --pred_distill.")
    required.add_argument("--task_name", required=True, type=str.lower, choices=[*PROCESSORS, SQUAD_TASK],
                          help="GLUE task (as run_glue.py) or squadv1.1.")
    required.add_argument("--output_dir", required=True,
                          help="Where the student, eval_results.txt, ckpt_<step>.pt and dllogger.json are written.")
    other = parser.add_argument_group("other")
    other.add_argument("--vocab_file", default=None,
                       help="WordPiece vocabulary of teacher and student (default: <student_model>/vocab.txt).")
    other.add_argument("--distill_config", default=None,
                       help="Distillation config JSON (default: distillation_config_backbone.json, or "
                            "distillation_config_heads.json with --pred_distill).")
    other.add_argument("--pred_distill", action="store_true",
                       help="Stage 2: distil the prediction layer (logits) instead of the backbone.")
    other.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature of the logit loss.")
    other.add_argument("--aug_train", action="store_true",
                       help="Train on data_augmentation.py's output (train_aug.tsv / train-v1.1_aug.json).")
    other.add_argument("--max_seq_length", type=int, default=128, help="Tokens per example, [CLS]/[SEP] included.")
    other.add_argument("--doc_stride", type=int, default=128, help="SQuAD: stride between document windows.")
    other.add_argument("--max_query_length", type=int, default=64, help="SQuAD: longest question (tokens).")
    other.add_argument("--do_eval", action="store_true", help="Evaluate on the dev file at the end (eval_results.txt).")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case and strip accents (uncased models).")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Sequences per rank per optimizer step, before division by --gradient_accumulation_steps.")
    other.add_argument("--eval_batch_size", type=int, default=32, help="Sequences per evaluation batch.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="AdamW learning rate (peak in stage 2).")
    other.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay (LayerNorm, bias: 0).")
    other.add_argument("--num_train_epochs", type=float, default=3.0,
                       help="Passes over the training set; ignored when --max_steps > 0.")
    other.add_argument("--max_steps", type=utils.step_count, default=-1,
                       help="Optimizer steps to train when > 0 (overrides --num_train_epochs).")
    other.add_argument("--warmup_proportion", type=float, default=0.1,
                       help="Stage 2: fraction of the steps over which the learning rate rises linearly.")
    other.add_argument("--seed", type=int, default=42, help="Seed of the data order and the fresh head.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    other.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the total gradient norm to this.")
    other.add_argument("--eval_step", type=int, default=50,
                       help="With --pred_distill and --do_eval: evaluate on the dev file every N steps.")
    other.add_argument("--n_best_size", type=int, default=20, help="SQuAD: n-best start/end logits considered.")
    other.add_argument("--max_answer_length", type=int, default=30, help="SQuAD: longest answer (tokens).")
    utils.add_precision_flags(other)
    other.add_argument("--resume_from_checkpoint", action="store_true",
                       help="Continue from the newest loadable ckpt_<step>.pt in --output_dir.")
    other.add_argument("--num_steps_per_checkpoint", type=int, default=1000, help="Save ckpt_<step>.pt every N steps.")
    other.add_argument("--features_cache_dir", default=None,
                       help="Folder of the tokenized-features cache (default: --data_dir).")
    other.add_argument("--skip_features_cache", action="store_true", help="Neither read nor write the cache.")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    other.add_argument("--log_freq", type=int, default=1, help="Log the loss every N optimizer steps.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bars.")
    utils.add_run_flags(other)
    args = parser.parse_args(argv)
    if args.vocab_file is None:
        args.vocab_file = str(Path(args.student_model) / "vocab.txt")
    if args.distill_config is None:
        name = "distillation_config_heads.json" if args.pred_distill else "distillation_config_backbone.json"
        args.distill_config = str(HERE / name)
    args.bert_model = Path(args.student_model.rstrip("/")).name + ("_aug" if args.aug_train else "")  # cache name
    return args


def train_file(args: argparse.Namespace) -> Path:
    """The training file this run reads (the augmented one with --aug_train)."""
    if args.task_name == SQUAD_TASK:
        return Path(args.data_dir) / SQUAD_FILES["aug" if args.aug_train else "train"]
    return Path(args.data_dir) / (GLUE_AUG_FILE if args.aug_train else get_processor(args.task_name).train_file)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flags, files, configs and model pairs that cannot work, before anything is written."""
    utils.check_schedule_flags(args, world_size)
    utils.check_positive_finite(temperature=args.temperature, max_grad_norm=args.max_grad_norm)
    for flag in ("eval_step", "log_freq", "num_steps_per_checkpoint", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data_dir {args.data_dir} is not a folder")
    if not train_file(args).is_file():
        hint = " (make it with distillation/data_augmentation.py)" if args.aug_train else ""
        raise FileNotFoundError(f"training file {train_file(args)} does not exist{hint}")
    if not Path(args.vocab_file).is_file():
        raise FileNotFoundError(f"--vocab_file {args.vocab_file} does not exist")
    if not has_weights(args.student_model):
        raise FileNotFoundError(f"--student_model {args.student_model}: no weights (pytorch_model.bin or "
                                "model.safetensors); run general_distill.py first")
    distill = DistillConfig.from_json_file(args.distill_config)
    if args.pred_distill and not distill.use_pred_states:
        raise ValueError(f"--pred_distill needs use_pred_states true in --distill_config {args.distill_config}")
    if not args.pred_distill and not distill.uses_backbone:
        raise ValueError(f"--distill_config {args.distill_config} selects no backbone loss: pass --pred_distill "
                         "for the prediction-layer stage")
    compatible(model_config(args.student_model, "--student_model"), model_config(args.teacher_model, "--teacher_model"),
               distill, len(load_vocab(args.vocab_file)), args.max_seq_length, args)
    check_student_weights(args.student_model, model_config(args.student_model, "--student_model"))
    existing = utils.CheckpointManager(args.output_dir).checkpoints() if Path(args.output_dir).is_dir() else []
    if existing and not args.resume_from_checkpoint:
        raise ValueError(f"--output_dir {args.output_dir} holds {existing[-1][1].name}: pass --resume_from_checkpoint "
                         "to continue, or choose an empty folder")


# ----------------------------------------------------------------------------------------------------------------
# Task data and evaluation: run_glue.py's and run_squad.py's own code
# ----------------------------------------------------------------------------------------------------------------


def squad_args(args: argparse.Namespace, output_dir: str) -> argparse.Namespace:
    """run_squad.py's flags for this run, so that its feature, cache and prediction code reads them as its own."""
    argv = ["--bert_model", args.bert_model, "--output_dir", output_dir, "--init_checkpoint", args.student_model,
            "--vocab_file", args.vocab_file, "--config_file", str(Path(args.student_model) / "config.json"),
            "--train_file", str(train_file(args)), "--predict_file", str(Path(args.data_dir) / SQUAD_FILES["dev"]),
            "--max_seq_length", str(args.max_seq_length), "--doc_stride", str(args.doc_stride),
            "--max_query_length", str(args.max_query_length), "--predict_batch_size", str(args.eval_batch_size),
            "--n_best_size", str(args.n_best_size), "--max_answer_length", str(args.max_answer_length), "--do_eval"]
    argv += ["--do_lower_case"] * args.do_lower_case + ["--disable-progress-bar"] * args.disable_progress_bar
    argv += ["--skip_cache"] * args.skip_features_cache
    argv += ["--cache_dir", args.features_cache_dir] if args.features_cache_dir else []
    return run_squad.parse_arguments(argv)


class Task:
    """One task's model class, training batches, evaluation and prediction-layer loss."""

    def __init__(self, args: argparse.Namespace, run: utils.Run, micro_batch: int) -> None:
        self.args, self.run = args, run
        self.squad = args.task_name == SQUAD_TASK
        tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
        self.tokenizer = tokenizer
        if self.squad:
            self.model_class: type[BertPreTrainedModel] = BertForQuestionAnswering
            self.model_kwargs: dict[str, Any] = {}
            self.regression = False
            sargs = squad_args(args, args.output_dir)
            cached = utils.cached_features(run_squad.cache_path(sargs), run_squad.cache_key(sargs),
                                           lambda: run_squad.build_train_features(sargs, tokenizer), run.env)
            self.num_examples = len(cached["tensors"]["seq_lengths"])
            self.batches = run_squad.train_batches(cached["tensors"], micro_batch, args.seed, run.env.rank,
                                                   run.world_size)
            return
        processor = get_processor(args.task_name)
        if args.aug_train:
            processor.train_file = GLUE_AUG_FILE
        self.model_class, self.model_kwargs = BertForSequenceClassification, {"num_labels": processor.num_labels}
        self.regression = processor.is_regression
        tensors, _ = run_glue.load_features(args, processor, tokenizer, "train", run.env)
        self.dev = run_glue.load_features(args, processor, tokenizer, "dev", run.env)[0] if args.do_eval else None
        self.num_examples = tensors["input_ids"].shape[0]
        self.batches = run_glue.train_batches(tensors, micro_batch, args.seed, run.env.rank, run.world_size)

    def logits(self, model: torch.nn.Module, batch: utils.Batch) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

    def pred_loss(self, student: Any, teacher: Any, batch: utils.Batch) -> torch.Tensor:
        """Soft cross-entropy against the teacher (start + end for SQuAD); MSE against the labels for regression."""
        temperature = self.args.temperature
        if self.squad:
            return soft_cross_entropy(student[0], teacher[0], temperature) \
                + soft_cross_entropy(student[1], teacher[1], temperature)
        if self.regression:
            return F.mse_loss(student.float().view(-1), batch["labels"].float().view(-1))
        return soft_cross_entropy(student, teacher, temperature)

    def evaluate(self, model: BertPreTrainedModel) -> dict[str, Any]:
        """The task's dev metrics by run_glue.py's or run_squad.py's own code (main process only)."""
        if self.squad:
            sargs = squad_args(self.args, self.args.output_dir)
            return run_squad.predict(sargs, model, self.tokenizer, self.run)
        return run_glue.evaluate(model, self.dev, self.args, self.run, self.regression)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def restore(path: Path, checkpoint: dict[str, Any], model: torch.nn.Module, parts: utils.TrainParts,
            state: utils.TrainState, run: utils.Run, config: Any) -> None:
    """Continue this run's own checkpoint, strictly; another student architecture is refused by name."""
    differences = config.architecture_differences(checkpoint.get("config", {}))
    if differences:
        raise CheckpointError(f"{path} holds another student architecture than --student_model: "
                              f"{'; '.join(differences)}")
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this student: {str(exc).splitlines()[0]}") from None
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["grad_scaler"])
    state.load_state_dict(checkpoint["train_state"])
    utils.restore_rng_states(checkpoint, run.env.rank, run.world_size)
    log.info("resumed from %s at step %d", path, state.step)


def execute(args: argparse.Namespace, run: utils.Run) -> dict[str, Any]:
    """Build teacher and student, distil one stage through utils.train_loop, save the student and evaluate."""
    distill = DistillConfig.from_json_file(args.distill_config)
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    task = Task(args, run, micro_batch)
    teacher = load_teacher(task.model_class, args.teacher_model, run.device, **task.model_kwargs)
    student_config = model_config(args.student_model, "--student_model")
    student = task.model_class.from_pretrained(args.student_model, config=student_config, **task.model_kwargs)
    total_steps = args.max_steps if args.max_steps > 0 else utils.steps_per_epochs(
        task.num_examples, micro_batch, run.world_size, args.gradient_accumulation_steps, args.num_train_epochs)

    if args.pred_distill:
        trained: torch.nn.Module = student

        def loss_fn(net: torch.nn.Module, batch: utils.Batch) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = task.logits(teacher, batch)
            return task.pred_loss(task.logits(net, batch), teacher_logits, batch)
    else:
        for name, parameter in student.named_parameters():  # only embeddings and encoder get a backbone loss
            if not name.startswith(("bert.embeddings.", "bert.encoder.")):
                parameter.requires_grad_(False)
        loss = BackboneLoss(distill, student_config.num_hidden_layers, teacher.config.num_hidden_layers,
                            student_config.hidden_size, teacher.config.hidden_size)
        if load_projection(loss.projection, args.student_model):
            log.info("continued the projection from %s", Path(args.student_model) / "project.bin")
        trained = StudentWithLoss(student, loss)

        def loss_fn(net: torch.nn.Module, batch: utils.Batch) -> torch.Tensor:
            states, _ = teacher_states(teacher, batch)
            return net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], states)[0]

    trained.to(run.device)
    optimizer = build_optimizer("adamw", param_groups(trained, weight_decay=args.weight_decay,
                                                      no_decay=FINETUNING_NO_DECAY),
                                lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-6, device=run.device)
    scheduler = LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps) \
        if args.pred_distill else ConstantLR(optimizer, total_steps=total_steps)
    parts = utils.TrainParts(utils.wrap_model(trained, run.env), loss_fn, optimizer, scheduler, run.grad_scaler(args))
    state = utils.TrainState()
    manager = utils.CheckpointManager(args.output_dir, keep=2, dllog=run.dllog)
    if run.is_main:
        manager.remove_stale_temporaries()
    found = manager.newest_loadable() if args.resume_from_checkpoint else None
    if found is not None:
        restore(*found, trained, parts, state, run, student_config)
    checkpointer = utils.Checkpointer(
        run, manager, interval=args.num_steps_per_checkpoint, state_fn=lambda s: {
            "model": trained.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "grad_scaler": parts.scaler.state_dict(), "train_state": s.state_dict(),
            "config": student_config.to_dict(), "distill_config": distill.to_dict(), "args": vars(args)})
    evaluations: list[dict[str, Any]] = []

    def on_step(s: utils.TrainState) -> bool:
        if args.pred_distill and args.do_eval and run.is_main and s.step % args.eval_step == 0 \
                and s.step < total_steps:
            results = task.evaluate(student)
            student.train()
            evaluations.append({"step": s.step, **results})
            run.dllog.log(step=(0, s.step), data={f"eval:{k}" if ":" not in k else k: v for k, v in results.items()
                                                  if isinstance(v, (int, float))})
        return checkpointer.on_step(s)

    run.dllog.log(step="PARAMETER", data={"stage": "prediction" if args.pred_distill else "backbone",
                                          "train:num_examples": task.num_examples, "train:total_steps": total_steps})
    wall_start = time.perf_counter()
    try:
        result = utils.train_loop(run, parts, task.batches, utils.LoopConfig.from_args(
            args, max_steps=total_steps, max_grad_norm=args.max_grad_norm), state, on_step=on_step)
        checkpointer.finish(state)
    finally:
        checkpointer.close()
    summary: dict[str, Any] = {"global_step": state.step, "train:loss": result.mean_loss,
                               "train:latency": time.perf_counter() - wall_start,
                               "train:throughput": result.sequences_per_second}
    if result.stopped_early:
        run.dllog.log(step=tuple(), data=summary)
        return summary
    if run.is_main:
        utils.check_finite_weights(student.state_dict(), f"the student in {args.output_dir}")
        projection = None if args.pred_distill else trained.loss.projection
        save_student(student, projection, args.output_dir, args.vocab_file, args.distill_config)
        if args.do_eval:
            summary.update(task.evaluate(student))
            evaluations.append({"step": state.step, **summary})
            with atomic_write(Path(args.output_dir) / "eval_results.txt", mode="w") as handle:
                json.dump(evaluations, handle, indent=2, default=str)
                handle.write("\n")
        run.dllog.log(step=tuple(), data={k: v for k, v in summary.items() if isinstance(v, (int, float))})
    utils.barrier()
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files, configs or checkpoints end the run with one line and exit status 1."""
    args = parse_arguments(argv)
    return utils.run_job("task_distill.py", args, check_arguments, lambda run: execute(args, run),
                         json_summary=args.json_summary or str(Path(args.output_dir) / "dllogger.json"),
                         tensorboard=args.tensorboard, errors=(squad.SquadFormatError,))


if __name__ == "__main__":
    sys.exit(main())
