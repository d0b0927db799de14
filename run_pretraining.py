"""BERT pre-training (MLM + NSP) with LAMB: the reference's flags, on CPU, one GPU or many (torchrun / SLURM)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import utils
from data.pretraining_dataset import get_pretraining_data_loader
from file_utils import CheckpointError, load_state_dict_file
from modeling import BertConfig, BertForPreTraining, find_weights_file, pretraining_loss
from optimization import build_optimizer, is_reference_lamb_state, lamb_state_from_reference, param_groups
from schedulers import PolyWarmUpScheduler
from tokenization import load_vocab

log = logging.getLogger("run_pretraining")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block, with the reference's names and defaults (see README "Parameters")."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--input_dir", required=True,
                          help="Folder of pre-training shards: Parquet (shard-*.parquet[_<bin>]) or HDF5 (*.hdf5).")
    required.add_argument("--config_file", required=True,
                          help="BERT config JSON; its vocab is padded to a multiple of 8.")
    required.add_argument("--output_dir", required=True,
                          help="Where ckpt_<step>.pt files are written and resumed from.")
    required.add_argument("--vocab_file", required=True, help="WordPiece vocab the Parquet shards' tokens map through.")
    other = parser.add_argument_group("other")
    other.add_argument("--bert_model", default="bert-large-uncased",
                       help="Model name, only recorded (the reference README lists it; --config_file sets the model).")
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
    other.add_argument("--max_steps", type=utils.step_count, default=1000,
                       help="Optimizer steps of this phase (sets the schedule).")
    other.add_argument("--warmup_proportion", type=float, default=0.01,
                       help="Fraction of --max_steps spent warming the learning rate up linearly.")
    other.add_argument("--seed", type=int, default=42, help="Seed; rank r uses seed + r for dropout.")
    other.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches per optimizer step; must divide --train_batch_size.")
    utils.add_precision_flags(other, "With --fp16: 0 = dynamic loss scaling from --init_loss_scale; S > 0 = start "
                                     "at S and never grow (it still halves on overflow so a bad step is skipped, "
                                     "not applied).")
    other.add_argument("--init_loss_scale", type=float, default=2.0**20, help="Initial dynamic loss scale for --fp16.")
    other.add_argument("--log_freq", type=float, default=1.0,
                       help="Log on steps that are a multiple of this (a float, as the reference's: 0.5 = each step).")
    other.add_argument("--checkpoint_activations", action="store_true",
                       help="Recompute layer activations in the backward pass to save memory.")
    other.add_argument("--resume_from_checkpoint", action="store_true",
                       help="Continue from --init_checkpoint when given (the reference's precedence), else from the "
                            "newest loadable ckpt_<step>.pt in --output_dir (or --resume_step).")
    other.add_argument("--resume_phase2", action="store_true",
                       help="The checkpoint resumed is a phase-2 one: keep its step, schedule and loss scale (needed "
                            "for reference checkpoints, which do not record their phase).")
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
    utils.add_run_flags(other, json_summary="results/dllogger.json",
                        tensorboard="phase 2 continues after --phase1_end_step")
    other.add_argument("--use_env", action="store_true",
                       help="Accepted for launcher compatibility; ranks are always read from the environment.")
    other.add_argument("--disable_progress_bar", action="store_true", help="No tqdm bar.")
    other.add_argument("--steps_this_run", type=int, default=-1,
                       help="Stop (with a checkpoint) once the phase's step count reaches this, as the reference "
                            "counts it; -1 = at --max_steps.")
    other.add_argument("--num_train_epochs", type=float, default=None,
                       help="Also stop (with a checkpoint) after this many passes over the data; the reference "
                            "parses it without effect, so it only applies when given.")
    other.add_argument("--num_workers", type=int, default=4, help="Data-loader worker processes per rank.")
    other.add_argument("--no_dense_sequence_output", action="store_true",
                       help="Run the MLM head on every position instead of the masked ones only.")
    other.add_argument("--compile", action="store_true", help="torch.compile the model (replaces TorchScript/NVFuser).")
    other.add_argument("--cuda_graphs", action="store_true",
                       help="Capture the step in CUDA graphs: torch.compile(mode='reduce-overhead') (CUDA only).")
    other.add_argument("--disable_jit_fusions", action="store_true",
                       help="Run the model eagerly (the reference's TorchScript/NVFuser switch); excludes --compile "
                            "and --cuda_graphs.")
    other.add_argument("--profile", action="store_true",
                       help="Write a torch.profiler trace of 5 steps from --profile-start to <output_dir>/profile/.")
    other.add_argument("--profile-start", dest="profile_start", type=int, default=0,
                       help="With --profile: the optimizer step the trace starts after.")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace, world_size: int) -> None:
    """Reject flag combinations and inputs that cannot work, before any model is built."""
    if not args.do_train:
        raise ValueError("--do_train must be set (pre-training only trains)")
    utils.check_batch_arithmetic(args.train_batch_size, args.gradient_accumulation_steps, world_size)
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}")
    utils.check_positive_finite(learning_rate=args.learning_rate, init_loss_scale=args.init_loss_scale,
                                log_freq=args.log_freq)
    if args.keep_checkpoints < 1:
        raise ValueError(f"--keep_checkpoints must be >= 1, got {args.keep_checkpoints}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.num_steps_per_checkpoint < 1:
        raise ValueError(f"--num_steps_per_checkpoint must be >= 1, got {args.num_steps_per_checkpoint}")
    if args.num_train_epochs is not None:
        utils.check_positive_finite(num_train_epochs=args.num_train_epochs)
    if args.disable_jit_fusions and (args.compile or args.cuda_graphs):
        raise ValueError("--disable_jit_fusions (an eager model) contradicts --compile and --cuda_graphs; pass one")
    if args.init_checkpoint and not args.resume_from_checkpoint:
        log.warning("--init_checkpoint %s is read only with --resume_from_checkpoint (the reference's rule); "
                    "starting from a fresh model", args.init_checkpoint)
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"--input_dir {args.input_dir} is not a folder")
    existing = utils.CheckpointManager(args.output_dir).checkpoints()
    if existing and not args.resume_from_checkpoint:
        raise ValueError(f"--output_dir {args.output_dir} already holds checkpoints ({existing[-1][1].name}, ...); "
                         "pass --resume_from_checkpoint to continue, or choose an empty folder")


def find_resume_checkpoint(args: argparse.Namespace, manager: utils.CheckpointManager
                           ) -> tuple[Path | None, dict | None, bool]:
    """The checkpoint this run starts from, its content when already loaded, and whether it continues a run in
    --output_dir.

    As in the reference, nothing is read without --resume_from_checkpoint, and with it --init_checkpoint wins over
    the run's own checkpoints (ckpt_<resume_step>.pt, else the newest that loads: a truncated newest one is
    skipped with a warning). A requeued job therefore passes --init_checkpoint only on its first start (run.sub
    does so).
    """
    if not args.resume_from_checkpoint:
        return None, None, False
    if args.init_checkpoint:
        return Path(args.init_checkpoint), None, False
    if args.resume_step >= 0:
        path = manager.path_for(args.resume_step)
        if not path.is_file():
            raise CheckpointError(f"--resume_step {args.resume_step}: {path} does not exist")
        return path, manager.load(path), True
    found = manager.newest_loadable()
    if found is not None:
        return found[0], found[1], True
    if args.phase2:
        raise CheckpointError(f"--phase2: no ckpt_<step>.pt from phase 1 in --output_dir {args.output_dir} "
                              "and no --init_checkpoint")
    return None, None, False


def restore(path: Path, checkpoint: dict | None, continuing: bool, args: argparse.Namespace, config: BertConfig,
            run_env: utils.RunEnv, parts: utils.TrainParts, state: utils.TrainState,
            manager: utils.CheckpointManager) -> dict | None:
    """Load a checkpoint into the run. Returns the saved data-loader position when continuing the same phase.

    * this run's own checkpoint of the same phase: everything is restored, strictly;
    * phase 1 -> phase 2, or an --init_checkpoint that is a training checkpoint: the model and LAMB moments
      carry over, the step, schedule, scaler and data position start afresh (the reference's phase-2 rule), and
      that checkpoint is never pruned;
    * a weights-only file (Hugging Face, a fine-tuned or reference export): the model only.
    """
    model = utils.unwrap_model(parts.model)
    if path.is_dir():  # a Hugging Face or save_pretrained folder: weights only
        weights = find_weights_file(path)
        model.load_weights(load_state_dict_file(weights), source=str(weights))
        return None
    if checkpoint is None:
        checkpoint = manager.load(path) if path.suffix != ".safetensors" else {"model": load_state_dict_file(path)}
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dictionary")
    if "optimizer" not in checkpoint:  # weights only: a reference, Hugging Face or exported state dict
        model.load_weights(checkpoint.get("model", checkpoint), source=str(path))
        return None
    differences = config.architecture_differences(checkpoint.get("config", {}))
    if differences:
        trained_with = checkpoint.get("args", {}).get("config_file", "another config")
        raise CheckpointError(f"{path} was trained with {trained_with}, not --config_file {args.config_file}: "
                              f"{'; '.join(differences)}")
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit --config_file {args.config_file}: "
                              f"{str(exc).splitlines()[0]}") from None
    optimizer_state, reference = checkpoint["optimizer"], is_reference_lamb_state(checkpoint["optimizer"])
    saved_step = None
    if reference:  # apex FusedLAMBAMP's layout, as the reference's run_pretraining.py writes it
        optimizer_state, saved_step = lamb_state_from_reference(optimizer_state)
    parts.optimizer.load_state_dict(optimizer_state)
    phase = checkpoint.get("phase", 2 if args.resume_phase2 else 1)
    step = manager.step_of(path)
    if args.phase2 and phase == 1 and step is not None and step > args.phase1_end_step:
        raise CheckpointError(f"--phase1_end_step {args.phase1_end_step} is below the step of phase 1's checkpoint "
                              f"{path.name}: phase 2 would number its checkpoints among phase 1's and restart from "
                              f"phase 1 after a requeue; pass --phase1_end_step {step}")
    if not (continuing and phase == (2 if args.phase2 else 1)):
        manager.protect(path)
        for group in parts.optimizer.param_groups:  # new phase: new peak lr; the moments (exp_avg/exp_avg_sq) stay
            group["lr"] = args.learning_rate
            group["initial_lr"] = args.learning_rate
        for param_state in parts.optimizer.state.values():
            if "step" in param_state:
                step_value = param_state["step"]
                param_state["step"] = torch.zeros_like(step_value) if isinstance(step_value, torch.Tensor) else 0
        if reference:
            log.info("started from reference checkpoint %s: weights and LAMB moments converted; step, learning rate "
                     "schedule, data position and RNG start afresh (a new phase)", path)
        return None
    if "grad_scaler" in checkpoint:
        parts.scaler.load_state_dict(checkpoint["grad_scaler"])
    if not reference:
        parts.scheduler.load_state_dict(checkpoint["scheduler"])
        state.load_state_dict(checkpoint["train_state"])
        utils.restore_rng_states(checkpoint, run_env.rank, run_env.world_size)
        return checkpoint.get("data_loader")
    state.step = saved_step
    parts.scheduler.fast_forward(saved_step)
    log.info("continued reference checkpoint %s: weights, LAMB moments and step %d converted (schedule and loss "
             "scale follow); reset: the data position (epoch %s restarts from its first batch) and the RNG state",
             path, saved_step, checkpoint.get("epoch", "?"))
    return None


def build_parts(args: argparse.Namespace, run: utils.Run, config: BertConfig) -> utils.TrainParts:
    """The model (on the device, compiled and wrapped as asked), LAMB, the poly-warm-up schedule and the scaler."""
    model = BertForPreTraining(config, dense_sequence_output=not args.no_dense_sequence_output)
    model.checkpoint_activations(args.checkpoint_activations)
    model.to(run.device)
    optimizer = build_optimizer("lamb", param_groups(model, weight_decay=0.01), lr=args.learning_rate,
                                device=run.device)

    def loss_fn(net: torch.nn.Module, batch: utils.Batch) -> torch.Tensor:
        scores, nsp = net(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                          masked_lm_labels=batch["labels"])
        return pretraining_loss(scores, nsp, batch["labels"], batch["next_sentence_labels"])[0]

    def flops_per_batch(batch: utils.Batch) -> float:
        size, seq_len = batch["input_ids"].shape
        masked = float((batch["labels"] != -1).sum()) / size if model.dense_sequence_output else None
        return size * utils.bert_flops_per_sequence(config, seq_len, masked_tokens=masked)

    return utils.TrainParts(
        model=utils.wrap_model(model, run.env, compile=args.compile, cuda_graphs=args.cuda_graphs,
                               allreduce_fp16=args.allreduce_post_accumulation_fp16),
        loss_fn=loss_fn, optimizer=optimizer,
        scheduler=PolyWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=args.max_steps),
        scaler=run.grad_scaler(args), flops_per_batch=flops_per_batch)


def train(args: argparse.Namespace, run: utils.Run) -> None:
    """Build, restore, train until --max_steps (or --steps_this_run, or a SIGTERM) and checkpoint."""
    config = BertConfig.from_json_file(args.config_file)
    config.check_fits(len(load_vocab(args.vocab_file)), args.max_seq_length, config_file=args.config_file,
                      vocab_file=args.vocab_file)
    parts = build_parts(args, run, config)
    state = utils.TrainState()
    manager = utils.CheckpointManager(args.output_dir, keep=args.keep_checkpoints, dllog=run.dllog,
                                      first_step=args.phase1_end_step if args.phase2 else 0)
    if run.is_main:
        manager.remove_stale_temporaries()
    start, checkpoint, continuing = find_resume_checkpoint(args, manager)
    data_state = None
    if start is not None:
        data_state = restore(start, checkpoint, continuing, args, config, run.env, parts, state, manager)
    micro_batch = args.train_batch_size // args.gradient_accumulation_steps
    loader = get_pretraining_data_loader(
        args.input_dir, vocab_file=args.vocab_file, batch_size=micro_batch, rank=run.env.rank,
        world_size=run.world_size, num_workers=args.num_workers, seed=args.seed,
        max_seq_length=args.max_seq_length, max_predictions_per_seq=args.max_predictions_per_seq,
        vocab_size=config.padded_vocab_size, start_state=data_state)
    model = utils.unwrap_model(parts.model)
    checkpointer = utils.Checkpointer(
        run, manager, interval=args.num_steps_per_checkpoint, step_offset=args.phase1_end_step if args.phase2 else 0,
        enabled=not args.skip_checkpoint, state_fn=lambda s: {
            "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "grad_scaler": parts.scaler.state_dict(),
            "train_state": s.state_dict(), "epoch": loader.epoch, "data_loader": loader.state_dict(),
            "phase": 2 if args.phase2 else 1, "config": config.to_dict(), "args": vars(args)})
    last_step = min(args.max_steps, args.steps_this_run) if args.steps_this_run > 0 else args.max_steps
    loop = utils.LoopConfig.from_args(args, max_steps=last_step, max_grad_norm=None)  # LAMB clips by itself
    profiler = utils.StepProfiler(Path(args.output_dir) / "profile", args.profile_start, run.env) \
        if args.profile else None

    def on_step(s: utils.TrainState) -> bool:
        """Profile, checkpoint (or stop on SIGTERM), and stop after --num_train_epochs passes when given."""
        if profiler is not None:
            profiler.on_step(s)
        if checkpointer.on_step(s):
            return True
        passes = loader.epoch + loader.batches_consumed / len(loader)
        return args.num_train_epochs is not None and passes >= args.num_train_epochs

    run.dllog.log(step="PARAMETER", data={"train_start": True, "batch_size_per_gpu": args.train_batch_size,
                                          "learning_rate": args.learning_rate,
                                          "start_step": checkpointer.step_offset + state.step})
    wall_start = time.perf_counter()
    try:
        result = utils.train_loop(run, parts, loader, loop, state, on_step=on_step)
        checkpointer.finish(state)  # nothing new after a SIGTERM, which saved already
    finally:
        checkpointer.close()
        if profiler is not None:
            profiler.close()
    run.dllog.log(step=tuple(), data={"e2e_train_time": time.perf_counter() - wall_start,
                                      "training_sequences_per_second": result.sequences_per_second,
                                      "final_loss": result.final_loss, "raw_train_time": result.train_time})


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return utils.run_job("run_pretraining.py", args, check_arguments, lambda run: train(args, run),
                         json_summary=args.json_summary, tensorboard=args.tensorboard,
                         tensorboard_step_offset=args.phase1_end_step if args.phase2 else 0)


if __name__ == "__main__":
    sys.exit(main())
