"""Export a pre-training checkpoint of this recipe in the reference's layout, for NVIDIA's own run_pretraining.py.

    python -m scripts.convert_checkpoint results/checkpoints/ckpt_7038.pt reference/ckpt_7038.pt

The output is ``{'model', 'optimizer', 'grad_scaler', 'epoch'}`` with the optimizer state in apex FusedLAMBAMP's
layout (tensor ``lr`` and int32 ``step`` per group, ``exp_avg``/``exp_avg_sq`` per parameter), which the
reference's ``--phase2`` and ``--init_checkpoint`` paths load, and ``bert_config.json`` beside it in the
reference's activation names (an exact-erf GELU model is refused: the reference cannot run it). Weights and
moments are copied bit for bit; the schedule, data position and RNG state have no place there and are left out.
The other direction needs no tool: run_pretraining.py continues a reference checkpoint directly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from file_utils import CheckpointError, atomic_write, load_checkpoint, save_checkpoint  # noqa: E402  (path insert)
from modeling import BertConfig  # noqa: E402
from optimization import is_reference_lamb_state, lamb_state_to_reference  # noqa: E402


def to_reference(checkpoint: dict) -> dict:
    """The reference's checkpoint dict made from one of ours."""
    missing = [key for key in ("model", "optimizer") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"not a pre-training checkpoint: no {', '.join(missing)}")
    optimizer = checkpoint["optimizer"]
    if not is_reference_lamb_state(optimizer):
        optimizer = lamb_state_to_reference(optimizer)
    return {"model": checkpoint["model"], "optimizer": optimizer,
            "grad_scaler": checkpoint.get("grad_scaler", {}), "epoch": int(checkpoint.get("epoch", 0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A ckpt_<step>.pt written by run_pretraining.py.")
    parser.add_argument("output", help="Where to write the reference-layout checkpoint (written atomically).")
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        exported = to_reference(checkpoint)
        config = BertConfig.from_dict(checkpoint["config"]).to_reference_dict() if "config" in checkpoint else None
        save_checkpoint(exported, args.output)
        if config is not None:
            with atomic_write(Path(args.output).parent / "bert_config.json", mode="w") as handle:
                handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"convert_checkpoint.py: error: {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} (reference layout: model, optimizer, grad_scaler, epoch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
