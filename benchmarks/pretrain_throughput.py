"""Pre-training step throughput: this project's BertForPreTraining vs transformers', same config, batch, masked
positions and LAMB step, each measured in a fresh process so peak memory is its own.

Ours runs through ``utils.train_loop``, the path run_pretraining.py takes (gradient-norm measurement and the
finite check included); transformers' model runs a bare forward/backward/LAMB step, so any loop overhead counts
against ours. ``--impls ours ours-bare`` also times our model on the bare step, which isolates the loop's cost.

    python benchmarks/pretrain_throughput.py                      # CPU: tiny, small and base, fp32 and bf16
    python benchmarks/pretrain_throughput.py --configs large --precisions bf16 --batch_size 256   # one GPU

Prints one line per measurement and ends with one JSON line holding every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(impl: str, config_name: str, precision: str, batch_size: int, seq_len: int, masked: int,
            steps: int, warmup: int, compile: bool) -> dict:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones, in this process."""
    import torch

    import utils
    from modeling import BertConfig, BertForPreTraining, pretraining_loss
    from optimization import build_optimizer, param_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = BertConfig.from_json_file(REPO / "bert_configs" / f"{config_name}.json")
    torch.manual_seed(0)
    vocab = config.padded_vocab_size
    input_ids = torch.randint(1000, config.vocab_size, (batch_size, seq_len))
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2:] = 1
    attention_mask = torch.ones_like(input_ids)
    labels = torch.full_like(input_ids, -1)
    for row in range(batch_size):
        positions = torch.randperm(seq_len - 2)[:masked] + 1
        labels[row, positions] = input_ids[row, positions]
    nsp = torch.randint(0, 2, (batch_size,))
    batch = {k: v.to(device) for k, v in dict(input_ids=input_ids, token_type_ids=token_type_ids,
                                               attention_mask=attention_mask, labels=labels, nsp=nsp).items()}

    if impl in ("ours", "ours-bare"):
        model = BertForPreTraining(config)

        def loss_fn() -> torch.Tensor:
            scores, seq = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                masked_lm_labels=batch["labels"])
            return pretraining_loss(scores, seq, batch["labels"], batch["nsp"])[0]
    else:
        import transformers

        hf_config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            hidden_act=config.to_hf_dict()["hidden_act"], max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps)
        model = transformers.BertForPreTraining(hf_config)
        hf_labels = batch["labels"].masked_fill(batch["labels"] == -1, -100)

        def loss_fn() -> torch.Tensor:
            return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                         attention_mask=batch["attention_mask"], labels=hf_labels,
                         next_sentence_label=batch["nsp"]).loss

    model.to(device).train()
    if compile:
        model = torch.compile(model)
    optimizer = build_optimizer("lamb", param_groups(model, weight_decay=0.01), lr=1e-4, device=device)
    if impl == "ours":
        run = utils.Run(utils.RunEnv(device=device), precision, utils.Logger())
        parts = utils.TrainParts(model, lambda net, b: loss_fn(), optimizer,
                                 torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                                 utils.make_grad_scaler(precision, device))
        loop = utils.LoopConfig(max_steps=warmup + steps, max_grad_norm=None, progress=False,
                                timing_warmup_steps=warmup)
        result = utils.train_loop(run, parts, utils.IteratorBatches(iter(lambda: batch, None)), loop)
        return report(impl, config_name, precision, batch_size, seq_len, masked, config, device,
                      result.sequences_per_second)
    ctx = utils.autocast(precision, device)

    def step() -> torch.Tensor:
        with ctx:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return report(impl, config_name, precision, batch_size, seq_len, masked, config, device,
                  batch_size * steps / elapsed)


def report(impl: str, config_name: str, precision: str, batch_size: int, seq_len: int, masked: int, config: Any,
           device: Any, seqs: float) -> dict:
    """One measurement's record: throughput, MFU (GPU only) and peak memory."""
    import torch

    import utils

    flops = utils.bert_flops_per_sequence(config, seq_len, masked_tokens=masked) * seqs
    peak = utils.peak_flops(device, precision)
    return {"impl": impl, "config": config_name, "precision": precision, "batch_size": batch_size,
            "seq_len": seq_len, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "sequences_per_second": seqs, "mfu": flops / peak if peak else None,
            "peak_memory_gib": utils.peak_memory_gib(device), "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--masked", type=int, default=20, help="Masked positions per sequence (max_predictions).")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--impls", nargs="+", default=["ours", "transformers"],
                        choices=["ours", "ours-bare", "transformers"],
                        help="ours = our model through utils.train_loop; ours-bare = our model on the bare step.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement and print its JSON
    args = parser.parse_args()
    if args.one:
        impl, config_name, precision = args.one.split(",")
        print(json.dumps(measure(impl, config_name, precision, args.batch_size, args.seq_len, args.masked,
                                 args.steps, args.warmup, args.compile)))
        return
    results, ratios = [], {}
    for config_name in args.configs:
        for precision in args.precisions:
            pair = {}
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--one", f"{impl},{config_name},{precision}",
                       "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                       "--masked", str(args.masked), "--steps", str(args.steps), "--warmup", str(args.warmup)]
                if args.compile:
                    cmd.append("--compile")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
                pair[impl] = json.loads(out.strip().splitlines()[-1])
                results.append(pair[impl])
                r = pair[impl]
                mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
                print(f"{impl:>12} {config_name:>5} {precision:>4} bs{args.batch_size} seq{args.seq_len}: "
                      f"{r['sequences_per_second']:8.2f} seq/s  MFU {mfu}  peak {r['peak_memory_gib']:.2f} GiB",
                      flush=True)
            for other, label in (("transformers", ""), ("ours-bare", " (loop vs bare step)")):
                if "ours" in pair and other in pair:
                    ratio = pair["ours"]["sequences_per_second"] / pair[other]["sequences_per_second"]
                    ratios[f"{config_name}/{precision}" + ("" if other == "transformers" else "/loop")] = ratio
                    print(f"{'':>12} {config_name:>5} {precision:>4} ours/{other}{label}: {ratio:.2f}x", flush=True)
    print(json.dumps({"benchmark": "pretrain_throughput", "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
