"""BERT pre-training (MLM + NSP) with LAMB: the reference's flags, on CPU, one GPU or many (torchrun / SLURM)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

import utils
from data.pretraining_dataset import get_pretraining_data_loader
from file_utils import CheckpointError, load_state_dict_file
from modeling import BertConfig, BertForPreTraining, pretraining_loss
from optimization import build_optimizer, param_groups
from schedulers import PolyWarmUpScheduler
from tokenization import load_vocab


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults (see README "Parameters")."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--input_dir", required=True,
                          help="Folder of pre-training shards: Parquet (shard-*.parquet[_<bin>]) or HDF5 (*.hdf5).")
    required.add_argument("--config_file", required=True, help="BERT config JSON; its vocab is padded to a multiple of 8.")
    required.add_argument("--output_dir", required=True, help="Where ckpt_<step>.pt files are written and resumed from.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocab the Parquet shards' tokens map through.")
    other = parser.add_argument_group("other")
    other.add_argument("--init_checkpoint", default=None,
                       help="Start from this checkpoint (ours, the reference's, or a Hugging Face folder/file); "
                            "a training checkpoint also brings its LAMB moments, as the reference does.")
    other.add_argument("--max_seq_length", type=int, default=512,
                       help="Longest sequence (tokens) a shard may hold; longer ones are an error.")
    other.add_argument("--max_predictions_per_seq", type=int, default=80,
                       help="Cap on masked tokens per sequence when masking dynamically.")
    other.add_argument("--train_batch_size", type=int, default=32,
                       help="Sequences per rank per optimizer step, before division by --gradient_accumulation_steps.")
    other.add_argument("--learning_rate", type=float, default=5e-5, help="Peak LAMB learning rate.")
    other.add_argument("--max_steps", type=float, default=1000, help="Optimizer steps of this phase (sets the schedule).")
    other.add_argument("--warmup_proportion", type=float, default=0.01,
                       help="Fraction of --max_steps spent warming the learning rate up linearly.")
    other.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                       help="Set by torch.distributed.launch; torchrun's LOCAL_RANK variable takes precedence.")
    other.add_argument("--seed", type=int, default=42, help="Seed; rank r uses seed + r for dropout.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    other.add_argument("--fp16", "--amp", dest="fp16", action="store_true",
                       help="fp16 autocast with dynamic loss scaling (CUDA only).")
    other.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU or CPU); no loss scaling needed.")
    other.add_argument("--loss_scale", type=float, default=0.0,
                       help="With --fp16: 0 = dynamic loss scaling from --init_loss_scale; S > 0 = start at S and "
                            "never grow (it still halves on overflow so a bad step is skipped, not applied).")
    other.add_argument("--init_loss_scale", type=float, default=2.0**20, help="Initial dynamic loss scale for --fp16.")
    other.add_argument("--log_freq", type=int, default=1, help="Log every N optimizer steps.")
    other.add_argument("--checkpoint_activations", action="store_true",
                       help="Recompute layer activations in the backward pass to save memory.")
    other.add_argument("--resume_from_checkpoint", action="store_true",
                       help="Continue from the newest ckpt_<step>.pt in --output_dir (or --resume_step).")
    other.add_argument("--resume_step", type=int, default=-1,
                       help="With --resume_from_checkpoint: resume from ckpt_<resume_step>.pt; -1 = the newest.")
    other.add_argument("--num_steps_per_checkpoint", type=int, default=100, help="Checkpoint every N optimizer steps.")
    other.add_argument("--keep_checkpoints", type=int, default=3, help="How many newest checkpoints to keep.")
    other.add_argument("--skip_checkpoint", action="store_true", help="Write no checkpoints.")
    other.add_argument("--phase2", action="store_true",
                       help="Phase 2: start from phase 1's last checkpoint (model and LAMB moments, fresh step and "
                            "schedule) and number checkpoints after --phase1_end_step.")
    other.add_argument("--phase1_end_step", type=int, default=7038,
                       help="Length of phase 1 in steps; phase-2 checkpoints are ckpt_<phase1_end_step + step>.pt.")
    other.add_argument("--allreduce_post_accumulation", action="store_true",
                       help="All-reduce gradients once per optimizer step, not on every micro-batch (DDP no_sync).")
    other.add_argument("--allreduce_post_accumulation_fp16", action="store_true",
                       help="All-reduce gradients in fp16 (DDP fp16 compression hook) to halve the traffic.")
    other.add_argument("--do_train", action="store_true", help="Must be set: train the model.")
    other.add_argument("--json-summary", dest="json_summary", default="results/dllogger.json",
                       help="dllogger JSON-lines file written by rank 0.")
    other.add_argument("--use_env", action="store_true",
                       help="Accepted for launcher compatibility; ranks are always read from the environment.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bar.")
    other.add_argument("--steps_this_run", type=int, default=-1,
                       help="Stop (with a checkpoint) after this many optimizer steps in this run; -1 = to --max_steps.")
    other.add_argument("--num_workers", type=int, default=4, help="Data-loader worker processes per rank.")
    other.add_argument("--no_dense_sequence_output", action="store_true",
                       help="Run the MLM head on every position instead of the masked ones only.")
    other.add_argument("--compile", action="store_true", help="torch.compile the model (replaces TorchScript/NVFuser).")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    args = parser.parse_args(argv)
    args.max_steps = int(args.max_steps)
    return args


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flag combinations and inputs that cannot work, before any model is built."""
    if not args.do_train:
        raise ValueError("--do_train must be set (pre-training only trains)")
    utils.check_batch_arithmetic(args.train_batch_size, args.gradient_accumulation_steps, world_size)
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.log_freq < 1 or args.num_steps_per_checkpoint < 1:
        raise ValueError("--log_freq and --num_steps_per_checkpoint must be >= 1")
    if args.loss_scale < 0:
        raise ValueError(f"--loss_scale must be >= 0, got {args.loss_scale}")
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"--input_dir {args.input_dir} is not a folder")
    existing = utils.CheckpointManager(args.output_dir).checkpoints()
    if existing and not args.resume_from_checkpoint:
        raise ValueError(f"--output_dir {args.output_dir} already holds checkpoints ({existing[-1][1].name}, ...); "
                         "pass --resume_from_checkpoint to continue, or choose an empty folder")


def build_config(args: argparse.Namespace) -> BertConfig:
    """Read the model config and check it can embed every token of the vocab the data was made with."""
    config = BertConfig.from_json_file(args.config_file)
    vocab_size = len(load_vocab(args.vocab_file))
    if vocab_size > config.padded_vocab_size:
        raise ValueError(f"--config_file {args.config_file} has vocab_size {config.vocab_size} but --vocab_file "
                         f"{args.vocab_file} holds {vocab_size} tokens: the data's token ids would not fit")
    if args.max_seq_length > config.max_position_embeddings:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings} of {args.config_file}")
    return config


def find_resume_checkpoint(args: argparse.Namespace, manager: utils.CheckpointManager) -> tuple[Optional[Path], bool]:
    """The checkpoint this run starts from, and whether it continues a run in --output_dir.

    With --resume_from_checkpoint the run's own checkpoints win (ckpt_<resume_step>.pt, else the newest), so a
    preempted and requeued job resumes where it stopped; --init_checkpoint is the start only when there are none.
    """
    if args.resume_from_checkpoint:
        if args.resume_step >= 0:
            path = manager.path_for(args.resume_step)
            if not path.is_file():
                raise CheckpointError(f"--resume_step {args.resume_step}: {path} does not exist")
            return path, True
        if manager.latest() is not None:
            return manager.latest(), True
    if args.init_checkpoint:
        return Path(args.init_checkpoint), False
    if args.phase2:
        raise CheckpointError(f"--phase2: no ckpt_<step>.pt from phase 1 in --output_dir {args.output_dir} "
                              "and no --init_checkpoint")
    return None, False


def restore(path: Path, continuing: bool, args: argparse.Namespace, model: BertForPreTraining,
            optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, state: utils.TrainState,
            manager: utils.CheckpointManager) -> Optional[dict]:
    """Load a checkpoint into the run. Returns the saved data-loader position when continuing the same phase.

    * this run's own checkpoint of the same phase: everything is restored, strictly;
    * phase 1 -> phase 2, or an --init_checkpoint that is a training checkpoint: the model and LAMB moments
      carry over, the step, schedule, scaler and data position start afresh (the reference's phase-2 rule);
    * a weights-only file (Hugging Face, a fine-tuned or reference export): the model only.
    """
    if path.is_dir():  # a Hugging Face or save_pretrained folder: weights only
        weights = next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()), None)
        if weights is None:
            raise CheckpointError(f"--init_checkpoint {path}: no model.safetensors or pytorch_model.bin in it")
        model.load_weights(load_state_dict_file(weights), source=str(weights))
        return None
    checkpoint = manager.load(path) if path.suffix != ".safetensors" else {"model": load_state_dict_file(path)}
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dictionary")
    if "optimizer" not in checkpoint:  # weights only: a reference, Hugging Face or exported state dict
        model.load_weights(checkpoint.get("model", checkpoint), source=str(path))
        return None
    model.load_state_dict(checkpoint["model"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    same_phase = continuing and checkpoint.get("phase", 1) == (2 if args.phase2 else 1)
    if not same_phase:
        for group in optimizer.param_groups:  # new phase: new peak lr; the moments (exp_avg/exp_avg_sq) stay
            group["lr"] = args.learning_rate
            group["initial_lr"] = args.learning_rate
        for param_state in optimizer.state.values():
            if "step" in param_state:
                step = param_state["step"]
                param_state["step"] = torch.zeros_like(step) if isinstance(step, torch.Tensor) else 0
        return None
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["grad_scaler"])
    state.load_state_dict(checkpoint["train_state"])
    utils.set_rng_state(checkpoint["rng"])
    return checkpoint.get("data_loader")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_arguments(argv)
    if args.local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    env = utils.setup_distributed(no_cuda=args.no_cuda)
    preemption = utils.PreemptionFlag()
    logger = utils.setup_logger(args.json_summary if env.is_main else None, enabled=env.is_main)
    try:
        check_arguments(args, env.world_size)
        precision = utils.resolve_precision(args.fp16, args.bf16, env.device)
        config = build_config(args)
        utils.set_seed(args.seed, env.rank)
        utils.log_config(logger, args)
        logger.log(step="PARAMETER", data={"SEED": args.seed, "precision": precision, "world_size": env.world_size,
                                           "device": str(env.device)})
        micro_batch = args.train_batch_size // args.gradient_accumulation_steps

        model = BertForPreTraining(config, dense_sequence_output=not args.no_dense_sequence_output)
        model.checkpoint_activations(args.checkpoint_activations)
        model.to(env.device)
        optimizer = build_optimizer("lamb", param_groups(model, weight_decay=0.01), lr=args.learning_rate,
                                    device=env.device)
        scheduler = PolyWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=args.max_steps)
        scaler = utils.make_grad_scaler(precision, env.device, init_scale=args.loss_scale or args.init_loss_scale,
                                        static=args.loss_scale > 0)
        state = utils.TrainState()
        manager = utils.CheckpointManager(args.output_dir, keep=args.keep_checkpoints, logger=logger)
        start, continuing = find_resume_checkpoint(args, manager)
        data_state = None
        if start is not None:
            data_state = restore(start, continuing, args, model, optimizer, scheduler, scaler, state, manager)
        offset = args.phase1_end_step if args.phase2 else 0

        loader = get_pretraining_data_loader(
            args.input_dir, vocab_file=args.vocab_file, batch_size=micro_batch, rank=env.rank,
            world_size=env.world_size, num_workers=args.num_workers, seed=args.seed,
            max_seq_length=args.max_seq_length, max_predictions_per_seq=args.max_predictions_per_seq,
            start_state=data_state)
        wrapped = utils.wrap_model(model, env, compile=args.compile,
                                   allreduce_fp16=args.allreduce_post_accumulation_fp16)

        def loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            scores, nsp = net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                              masked_lm_labels=batch["labels"])
            return pretraining_loss(scores, nsp, batch["labels"], batch["next_sentence_labels"])[0]

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for batch in loader.batches():  # endless; the loader owns the epoch count
                if int(batch["input_ids"].max()) >= config.padded_vocab_size:
                    raise ValueError(f"a token id in --input_dir {args.input_dir} is >= the vocab size "
                                     f"{config.padded_vocab_size} of --config_file {args.config_file}")
                state.epoch = loader.epoch
                yield batch

        def save(step_state: utils.TrainState) -> None:
            if args.skip_checkpoint:
                return
            if env.is_main:
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                manager.save(offset + step_state.step, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(),
                    "train_state": step_state.state_dict(), "epoch": step_state.epoch,
                    "data_loader": loader.state_dict(), "rng": utils.rng_state(), "phase": 2 if args.phase2 else 1,
                    "config": config.to_dict(), "args": vars(args)})
            utils.barrier()

        def on_step(step_state: utils.TrainState) -> bool:
            if preemption.any_rank(env):
                save(step_state)
                logger.log(step="PARAMETER", data={"preempted_at_step": offset + step_state.step})
                return True
            if step_state.step % args.num_steps_per_checkpoint == 0 and step_state.step < last_step:
                save(step_state)
            return False

        steps_this_run = args.steps_this_run if args.steps_this_run > 0 else args.max_steps
        last_step = min(args.max_steps, state.step + steps_this_run)
        logger.log(step="PARAMETER", data={"train_start": True, "batch_size_per_gpu": args.train_batch_size,
                                           "learning_rate": args.learning_rate, "start_step": offset + state.step})
        def batch_flops(batch: dict[str, torch.Tensor]) -> float:
            size, seq_len = batch["input_ids"].shape
            masked = float((batch["labels"] != -1).sum()) / size if model.dense_sequence_output else None
            return size * utils.bert_flops_per_sequence(config, seq_len, masked_tokens=masked)

        wall_start = time.perf_counter()
        result = utils.train_loop(
            wrapped, batches(), loss_fn, optimizer, scheduler, scaler, env=env, precision=precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=last_step, max_grad_norm=None,
            state=state, log_freq=args.log_freq, logger=logger, on_step=on_step,
            progress=not args.disable_progress_bar, allreduce_post_accumulation=args.allreduce_post_accumulation,
            flops_per_batch=batch_flops)
        if not result.stopped_early and state.step > 0:
            save(state)
        logger.log(step=tuple(), data={"e2e_train_time": time.perf_counter() - wall_start,
                                       "training_sequences_per_second": result.sequences_per_second,
                                       "final_loss": result.final_loss, "raw_train_time": result.train_time})
        return 0
    except (ValueError, FileNotFoundError, CheckpointError, utils.NonFiniteLossError) as exc:
        print(f"run_pretraining.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        logger.flush()
        preemption.restore()
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
