"""General distillation (TinyBERT / MiniLM): a small student learns a BERT teacher's attention, values and hidden
states on the pre-training shards, through the project's one training loop, checkpoints and dllogger.

    python distillation/general_distill.py --input_dir <shards> --teacher_model <folder> \\
        --student_model bert_configs/distill_4l_312d.json --output_dir <dir> --vocab_file vocab/vocab \\
        --distill_config distillation/distillation_config_backbone.json
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402  (path insert)
from data.pretraining_dataset import get_pretraining_data_loader  # noqa: E402
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
from distillation.losses import BackboneLoss, DistillConfig  # noqa: E402
from file_utils import CheckpointError  # noqa: E402
from modeling import BertModel, record_states  # noqa: E402
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups  # noqa: E402
from schedulers import LinearWarmUpScheduler  # noqa: E402
from tokenization import load_vocab  # noqa: E402

log = logging.getLogger("general_distill")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "distillation_config_backbone.json"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    required.add_argument("--input_dir", required=True,
                          help="Folder of pre-training shards, Parquet or HDF5, read by the pre-training loader.")
    required.add_argument("--teacher_model", required=True,
                          help="Teacher folder (config.json + weights: ours, the reference's or Hugging Face's).")
    required.add_argument("--student_model", required=True,
                          help="Student config JSON, or a folder with config.json (and weights for --continue_train).")
    required.add_argument("--output_dir", required=True,
                          help="Where ckpt_<step>.pt, the student (config.json, pytorch_model.bin) and project.bin go.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocabulary of shards, teacher and student.")
    other = parser.add_argument_group("other")
    other.add_argument("--distill_config", default=str(DEFAULT_CONFIG),
                       help="Distillation config JSON selecting the losses (default: the backbone config).")
    other.add_argument("--max_seq_length", type=int, default=128, help="Longest sequence (tokens) a shard may hold.")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Sequences per rank per optimizer step, before division by --gradient_accumulation_steps.")
    other.add_argument("--eval_batch_size", type=int, default=8, help="Sequences per batch of the --eval_step check.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="Peak AdamW learning rate.")
    other.add_argument("--weight_decay", "--wd", type=float, default=1e-4,
                       help="AdamW weight decay (LayerNorm and bias excluded).")
    other.add_argument("--num_train_epochs", type=float, default=3.0,
                       help="Passes over the shards (with --steps_per_epoch); ignored when --max_steps > 0.")
    other.add_argument("--steps_per_epoch", type=utils.step_count, default=-1,
                       help="Optimizer steps one epoch counts for the schedule; -1 = the loader's batches per pass.")
    other.add_argument("--max_steps", type=utils.step_count, default=-1,
                       help="Optimizer steps to train when > 0 (overrides the epochs and sets the schedule).")
    other.add_argument("--warmup_proportion", type=float, default=0.1,
                       help="Fraction of the steps over which the learning rate rises linearly.")
    other.add_argument("--seed", type=int, default=42, help="Seed; rank r uses seed + r.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    utils.add_precision_flags(other)
    other.add_argument("--continue_train", action="store_true",
                       help="Start the student from the weights (and project.bin) in the --student_model folder.")
    other.add_argument("--resume_from_checkpoint", action="store_true",
                       help="Continue this run from the newest loadable ckpt_<step>.pt in --output_dir.")
    other.add_argument("--num_steps_per_checkpoint", type=int, default=1000, help="Save ckpt_<step>.pt every N steps.")
    other.add_argument("--keep_checkpoints", type=int, default=3, help="Keep the newest N ckpt_<step>.pt files.")
    other.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the total gradient norm to this.")
    other.add_argument("--eval_step", type=int, default=1000,
                       help="Every N steps log the student/teacher cosine of the last hidden state on fixed batches.")
    other.add_argument("--num_workers", type=int, default=4, help="Data-loader worker processes (0 = in-process).")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    other.add_argument("--log_freq", type=int, default=1, help="Log the losses every N optimizer steps.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bars.")
    utils.add_run_flags(other)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flags and inputs that cannot work, before any model is built or file written."""
    utils.check_schedule_flags(args, world_size)
    utils.check_positive_finite(max_grad_norm=args.max_grad_norm)
    for flag in ("eval_step", "log_freq", "num_steps_per_checkpoint", "keep_checkpoints", "eval_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"--input_dir {args.input_dir} is not a folder")
    if not Path(args.vocab_file).is_file():
        raise FileNotFoundError(f"--vocab_file {args.vocab_file} does not exist")
    if args.continue_train and not has_weights(args.student_model):
        raise FileNotFoundError(f"--continue_train needs weights in the --student_model folder {args.student_model}")
    distill = DistillConfig.from_json_file(args.distill_config)
    if not distill.uses_backbone:
        raise ValueError(f"--distill_config {args.distill_config}: general distillation needs a backbone loss "
                         "(use_attention_scores, use_hidden_states, use_value_states or use_embedding_states)")
    compatible(model_config(args.student_model, "--student_model"), model_config(args.teacher_model, "--teacher_model"),
               distill, len(load_vocab(args.vocab_file)), args.max_seq_length, args)
    if args.continue_train:
        check_student_weights(args.student_model, model_config(args.student_model, "--student_model"))
    existing = utils.CheckpointManager(args.output_dir).checkpoints() if Path(args.output_dir).is_dir() else []
    if existing and not args.resume_from_checkpoint:
        raise ValueError(f"--output_dir {args.output_dir} holds {existing[-1][1].name}: pass --resume_from_checkpoint "
                         "to continue, or choose an empty folder")


def build(args: argparse.Namespace, run: utils.Run) -> tuple[torch.nn.Module, StudentWithLoss, DistillConfig]:
    """Teacher (frozen) and the trained student+projection, after every compatibility check."""
    distill = DistillConfig.from_json_file(args.distill_config)  # checked by check_arguments
    student_config = model_config(args.student_model, "--student_model")
    teacher_config = model_config(args.teacher_model, "--teacher_model")
    teacher = load_teacher(BertModel, args.teacher_model, run.device)
    if args.continue_train:
        student = BertModel.from_pretrained(args.student_model, config=student_config)
    else:
        student = BertModel(student_config)
    student.pooler.requires_grad_(False)  # no loss reaches it; DDP would wait for its gradients
    loss = BackboneLoss(distill, student_config.num_hidden_layers, teacher_config.num_hidden_layers,
                        student_config.hidden_size, teacher_config.hidden_size)
    if args.continue_train and load_projection(loss.projection, args.student_model):
        log.info("continued the projection from %s", Path(args.student_model) / "project.bin")
    return teacher, StudentWithLoss(student, loss).to(run.device), distill


def last_hidden_cosine(teacher: torch.nn.Module, trained: StudentWithLoss, batches: list[utils.Batch],
                       run: utils.Run) -> float:
    """Mean cosine, over real tokens, between the projected last student layer and the last teacher layer."""
    was_training = trained.training
    trained.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            batch = utils.move_to_device(batch, run.device)
            mask = batch["attention_mask"].float()
            with run.autocast():
                teacher_out, _ = teacher(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
                with record_states(trained.student) as states:
                    trained.student(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
                student_out = trained.loss.projection(states.hidden_states[-1])
            cosine = torch.nn.functional.cosine_similarity(student_out.float(), teacher_out.float(), dim=-1)
            total += float((cosine * mask).sum())
            count += float(mask.sum())
    trained.train(was_training)
    return total / max(count, 1.0)


def execute(args: argparse.Namespace, run: utils.Run) -> dict[str, Any]:
    """Build, restore, distil until the last step (or a SIGTERM), checkpoint and write the student."""
    teacher, trained, distill = build(args, run)
    vocab_size = len(load_vocab(args.vocab_file))
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    manager = utils.CheckpointManager(args.output_dir, keep=args.keep_checkpoints, dllog=run.dllog)
    if run.is_main:
        manager.remove_stale_temporaries()
    found = manager.newest_loadable() if args.resume_from_checkpoint else None
    loader = get_pretraining_data_loader(
        args.input_dir, vocab_file=args.vocab_file, batch_size=micro_batch, rank=run.env.rank,
        world_size=run.world_size, num_workers=args.num_workers, seed=args.seed, masked_lm_prob=0.0,
        max_seq_length=args.max_seq_length, vocab_size=trained.student.config.padded_vocab_size,
        start_state=found[1].get("data_loader") if found else None)
    eval_loader = get_pretraining_data_loader(
        args.input_dir, vocab_file=args.vocab_file, batch_size=args.eval_batch_size, seed=args.seed + 1,
        masked_lm_prob=0.0, max_seq_length=args.max_seq_length, vocab_size=vocab_size)
    eval_batches = [batch for _, batch in zip(range(4), eval_loader.batches())]
    steps_per_epoch = args.steps_per_epoch if args.steps_per_epoch > 0 else \
        max(1, len(loader) // args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(steps_per_epoch * args.num_train_epochs))

    optimizer = build_optimizer("adamw", param_groups(trained, weight_decay=args.weight_decay,
                                                      no_decay=FINETUNING_NO_DECAY),
                                lr=args.learning_rate, weight_decay=args.weight_decay, eps=1e-6, device=run.device)
    terms: dict[str, torch.Tensor] = {}

    def loss_fn(net: torch.nn.Module, batch: utils.Batch) -> torch.Tensor:
        states, _ = teacher_states(teacher, batch)
        total, parts = net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], states)
        terms.update(parts)
        return total

    student_config = trained.student.config
    teacher_config = teacher.config
    parts = utils.TrainParts(
        utils.wrap_model(trained, run.env), loss_fn, optimizer,
        LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps),
        run.grad_scaler(args), flops_per_batch=lambda b: b["input_ids"].shape[0] * (
            utils.bert_flops_per_sequence(student_config, b["input_ids"].shape[1], masked_tokens=0)
            + utils.bert_flops_per_sequence(teacher_config, b["input_ids"].shape[1], masked_tokens=0) / 3))
    state = utils.TrainState()
    if found is not None:
        restore(found, trained, parts, state, run)
    checkpointer = utils.Checkpointer(
        run, manager, interval=args.num_steps_per_checkpoint, state_fn=lambda s: {
            "model": trained.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "grad_scaler": parts.scaler.state_dict(),
            "train_state": s.state_dict(), "epoch": loader.epoch, "data_loader": loader.state_dict(),
            "config": student_config.to_dict(), "distill_config": distill.to_dict(), "args": vars(args)})

    def evaluate(step: int) -> None:
        if run.is_main:
            run.dllog.log(step=(loader.epoch, step), data={
                "eval:last_hidden_cosine": last_hidden_cosine(teacher, trained, eval_batches, run)})

    def on_step(s: utils.TrainState) -> bool:
        if s.step % args.log_freq == 0 or s.step == total_steps:
            run.dllog.log(step=(loader.epoch, s.step), data={k: float(v) for k, v in terms.items()})
        if s.step % args.eval_step == 0:
            evaluate(s.step)
        return checkpointer.on_step(s)

    run.dllog.log(step="PARAMETER", data={"total_steps": total_steps, "start_step": state.step,
                                          "student_parameters": sum(p.numel() for p in trained.student.parameters()),
                                          "teacher_parameters": sum(p.numel() for p in teacher.parameters())})
    if state.step == 0:
        evaluate(0)
    wall_start = time.perf_counter()
    try:
        result = utils.train_loop(run, parts, loader, utils.LoopConfig.from_args(
            args, max_steps=total_steps, max_grad_norm=args.max_grad_norm), state, on_step=on_step)
        checkpointer.finish(state)
    finally:
        checkpointer.close()
    if state.step % args.eval_step:
        evaluate(state.step)
    if run.is_main and not result.stopped_early:
        utils.check_finite_weights(trained.student.state_dict(), f"the student in {args.output_dir}")
        save_student(trained.student, trained.loss.projection, args.output_dir, args.vocab_file, args.distill_config)
    utils.barrier()
    summary = {"e2e_train_time": time.perf_counter() - wall_start, "final_loss": result.final_loss,
               "training_sequences_per_second": result.sequences_per_second}
    run.dllog.log(step=tuple(), data=summary)
    return summary


def restore(found: tuple[Path, dict[str, Any]], trained: StudentWithLoss, parts: utils.TrainParts,
            state: utils.TrainState, run: utils.Run) -> None:
    """Continue from this run's own checkpoint, strictly: a checkpoint of another student architecture is refused."""
    path, checkpoint = found
    differences = trained.student.config.architecture_differences(checkpoint.get("config", {}))
    if differences:
        raise CheckpointError(f"{path} holds another student architecture than --student_model: "
                              f"{'; '.join(differences)}")
    try:
        trained.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this student and projection: {str(exc).splitlines()[0]}") from None
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["grad_scaler"])
    state.load_state_dict(checkpoint["train_state"])
    utils.restore_rng_states(checkpoint, run.env.rank, run.world_size)
    log.info("resumed from %s at step %d", path, state.step)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files, configs or checkpoints end the run with one line and exit status 1."""
    args = parse_arguments(argv)
    return utils.run_job("general_distill.py", args, check_arguments, lambda run: execute(args, run),
                         json_summary=args.json_summary or str(Path(args.output_dir) / "dllogger.json"),
                         tensorboard=args.tensorboard)


if __name__ == "__main__":
    sys.exit(main())
