"""Time one LAMB step (foreach vs for-loop, and AdamW for scale) on BERT-base-sized parameter shapes."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimization import build_optimizer  # noqa: E402


def bert_base_shapes(vocab: int = 30528, hidden: int = 768, layers: int = 12, intermediate: int = 3072,
                     positions: int = 512) -> list[tuple[int, ...]]:
    """Shapes of BertForPreTraining(base) trainable tensors (decoder weight tied to the word embeddings)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output dense
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    shapes += [(hidden, hidden), (hidden,), (hidden,), (hidden,), (vocab,)]  # MLM transform, LayerNorm, bias
    shapes += [(2, hidden), (2,)]  # NSP
    return shapes


def make_params(shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Two groups as BERT's rule gives for these shapes: matrices decayed, vectors (bias, LayerNorm) not."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(name: str, implementation: str, shapes: list[tuple[int, ...]], device: torch.device,
              dtype: torch.dtype, warmup: int, steps: int) -> float:
    """Mean ms per optimizer.step() after `warmup` untimed steps (state allocated, kernels warm)."""
    groups = make_params(shapes, device, dtype)
    optimizer = build_optimizer(name, groups, 1e-3, implementation=implementation)
    for _ in range(warmup):
        optimizer.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device holding the parameters; default cuda when available.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="Parameter and gradient dtype; LAMB moments stay fp32 either way.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per implementation.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps before timing.")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = bert_base_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"BERT-base shapes: {len(shapes)} tensors, {n_params / 1e6:.1f}M parameters, {dtype}, {device}, "
          f"torch {torch.__version__}")
    runs = [("lamb", "foreach"), ("lamb", "for-loop"), ("adamw", "auto")]
    results = {}
    for name, implementation in runs:
        ms = time_step(name, implementation, shapes, device, dtype, args.warmup, args.steps)
        results[f"{name}-{implementation}"] = round(ms, 3)
        print(f"{name:6s} {implementation:9s} {ms:10.2f} ms/step")
    speedup = results["lamb-for-loop"] / results["lamb-foreach"]
    print(f"LAMB foreach speed-up over for-loop: {speedup:.2f}x")
    print(json.dumps({"benchmark": "optimizer_step", "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "dtype": args.dtype, "tensors": len(shapes), "parameters": n_params,
                      "ms_per_step": results, "lamb_foreach_speedup": round(speedup, 3)}))


if __name__ == "__main__":
    main()
