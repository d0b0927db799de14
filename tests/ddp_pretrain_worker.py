"""Run N LAMB steps of a tiny BERT through utils.train_loop, for the data-parallel equivalence tests.

Launched either as one process or under torchrun. Every global step uses the same global batch of ``2 * micro``
sequences: rank r of w takes its slice ``[r * 2m / w, (r + 1) * 2m / w)``, split further into
``--accumulation`` micro-batches. Rank 0 saves the final weights to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from modeling import BertConfig, BertForPreTraining, pretraining_loss  # noqa: E402
from optimization import build_optimizer, param_groups  # noqa: E402
from schedulers import PolyWarmUpScheduler  # noqa: E402


def global_batches(steps: int, global_batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Deterministic synthetic pre-training batches (same on every rank)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        ids = torch.randint(5, vocab, (global_batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[: global_batch // 2, seq - 3:] = 0  # some padding
        # Exactly 3 masked tokens per sequence: every slice then holds the same number, so the mean loss of the
        # whole batch is the mean of the slices' mean losses (what DDP and accumulation average).
        labels = torch.full_like(ids, -1)
        for row in range(global_batch):
            positions = torch.randperm(seq - 3, generator=gen)[:3]
            labels[row, positions] = ids[row, positions]
        out.append({"input_ids": ids, "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand_as(ids).clone(),
                    "attention_mask": mask, "labels": labels,
                    "next_sentence_labels": torch.randint(0, 2, (global_batch,), generator=gen)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()
    env = utils.setup_distributed(no_cuda=True)
    try:
        config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)  # identical initial weights on every rank
        model = BertForPreTraining(config)
        optimizer = build_optimizer("lamb", param_groups(model, 0.01), lr=2e-2)
        scheduler = PolyWarmUpScheduler(optimizer, warmup=0.3, total_steps=args.steps)
        per_rank = args.global_batch // env.world_size
        micro = per_rank // args.accumulation

        def batches():
            for batch in global_batches(args.steps, args.global_batch, 12, config.vocab_size):
                mine = {k: v[env.rank * per_rank:(env.rank + 1) * per_rank] for k, v in batch.items()}
                for i in range(args.accumulation):
                    yield {k: v[i * micro:(i + 1) * micro] for k, v in mine.items()}

        def loss_fn(net, b):
            scores, nsp = net(b["input_ids"], b["token_type_ids"], b["attention_mask"], masked_lm_labels=b["labels"])
            return pretraining_loss(scores, nsp, b["labels"], b["next_sentence_labels"])[0]

        run = utils.Run(env, "fp32", utils.Logger())
        parts = utils.TrainParts(utils.wrap_model(model, env), loss_fn, optimizer, scheduler,
                                 utils.make_grad_scaler("fp32", env.device))
        loop = utils.LoopConfig(max_steps=args.steps, gradient_accumulation_steps=args.accumulation,
                                max_grad_norm=None, progress=False, allreduce_post_accumulation=True)
        utils.train_loop(run, parts, utils.IteratorBatches(batches()), loop)
        if env.is_main:
            torch.save(model.state_dict(), args.out)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    main()
