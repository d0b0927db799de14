"""Per-token hidden states of chosen BERT layers for lines of text, as JSON lines (google-research/bert's format).

The reference's flags, plus --init_checkpoint, --vocab_file and --config_file. Input: one example per line;
``text_a ||| text_b`` is a sentence pair. Output: one JSON object per input line,
``{"linex_index": i, "features": [{"token": "[CLS]", "layers": [{"index": -1, "values": [...]}, ...]}, ...]}``,
one entry per WordPiece token of ``[CLS] A [SEP] (B [SEP])`` and, in it, one vector per ``--layers`` index (encoder
layers counted from 0, or from the top with -1), each value rounded to 6 decimals.
Unlike the reference, which calls the model with ``token_type_ids=None``, a pair's segment ids reach the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

import utils
from data.glue import truncate_seq_pair
from file_utils import CheckpointError, atomic_write
from modeling import BertConfig, BertModel
from tokenization import BertTokenizer

logger = logging.getLogger("extract_features")
PAIR = re.compile(r"^(.*) \|\|\| (.*)$")  # google-research/bert's separator of text_a and text_b


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block: the reference's, plus --init_checkpoint, --vocab_file and --config_file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    required = parser.add_argument_group("required")
    required.add_argument("--input_file", required=True,
                          help="UTF-8 text, one example per line; 'text_a ||| text_b' for a sentence pair.")
    required.add_argument("--output_file", required=True, help="JSON-lines file to write (atomically).")
    required.add_argument("--bert_model", required=True,
                          help="Model folder (config.json, weights, vocab.txt); only a name when --init_checkpoint, "
                               "--config_file and --vocab_file are all given (nothing is downloaded).")
    other = parser.add_argument_group("other")
    other.add_argument("--init_checkpoint", default=None,
                       help="Weights: a reference .pt (pre-training or fine-tuned), our or a Hugging Face folder or "
                            "file; heads are ignored. Default: --bert_model.")
    other.add_argument("--vocab_file", default=None,
                       help="WordPiece vocabulary; default: vocab.txt in --bert_model or beside the weights.")
    other.add_argument("--config_file", default=None,
                       help="BERT config JSON; default: config.json (or bert_config.json) beside the weights.")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case the text (uncased models).")
    other.add_argument("--layers", default="-1,-2,-3,-4",
                       help="Comma-separated encoder layers to output: 0 is the first, -1 the last.")
    other.add_argument("--max_seq_length", type=int, default=128,
                       help="Tokens per example, [CLS]/[SEP] included; longer texts are trimmed (pairs: the longer).")
    other.add_argument("--batch_size", type=int, default=32, help="Examples per forward pass.")
    other.add_argument("--local_rank", type=int, default=-1, help="GPU index to run on (-1: the first GPU).")
    other.add_argument("--no_cuda", action="store_true", help="Run on the CPU even when a GPU is present.")
    return parser.parse_args(_join_layers_value(sys.argv[1:] if argv is None else list(argv)))


def _join_layers_value(argv: list[str]) -> list[str]:
    """``--layers -1,-2`` as ``--layers=-1,-2``: argparse takes a value that starts with "-" and is not one number
    for an option, so the reference's own default, written out, would be refused."""
    out: list[str] = []
    for word in argv:
        if out and out[-1] == "--layers" and re.fullmatch(r"-\d+(,-?\d+)+", word):
            out[-1] = f"--layers={word}"
        else:
            out.append(word)
    return out


@dataclass
class Example:
    """One input line: its 0-based index and text (``text_b`` None for a single sentence)."""

    line_index: int
    text_a: str
    text_b: str | None = None


@dataclass
class Features:
    """The WordPiece tokens of one example and its model inputs (unpadded)."""

    line_index: int
    tokens: list[str]
    input_ids: list[int]
    segment_ids: list[int]


def read_examples(path: str) -> list[Example]:
    """Every line of ``path`` (stripped) is an example, as in google-research/bert; an empty line gives
    ``[CLS] [SEP]`` so that line indices stay those of the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--input_file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--input_file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # Lines end at "\n" only (as readline splits them), not at the other separators str.splitlines knows.
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    if not lines:
        raise ValueError(f"--input_file {path} holds no lines")
    examples = []
    for index, line in enumerate(lines):
        line = line.strip()
        match = PAIR.match(line)
        examples.append(Example(index, line) if match is None else Example(index, match.group(1), match.group(2)))
    return examples


def convert_examples_to_features(examples: list[Example], tokenizer: BertTokenizer,
                                 max_seq_length: int) -> list[Features]:
    """``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]`` per example, trimmed to ``max_seq_length`` as the reference."""
    texts = [text for ex in examples for text in (ex.text_a, ex.text_b) if text is not None]
    tokenized = iter(tokenizer.batch_tokenize(texts))
    features = []
    for ex in examples:
        tokens_a = next(tokenized)
        tokens_b = next(tokenized) if ex.text_b is not None else []
        if tokens_b:
            truncate_seq_pair(tokens_a, tokens_b, max_seq_length - 3)
        else:
            del tokens_a[max_seq_length - 2:]
        tokens = ["[CLS]", *tokens_a, "[SEP]"]
        segment_ids = [0] * len(tokens)
        if tokens_b:
            tokens += [*tokens_b, "[SEP]"]
            segment_ids += [1] * (len(tokens_b) + 1)
        features.append(Features(ex.line_index, tokens, tokenizer.convert_tokens_to_ids(tokens), segment_ids))
    return features


def parse_layers(text: str, num_layers: int) -> list[int]:
    """The --layers indices, each checked against the model's depth (-num_layers .. num_layers - 1)."""
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r} is not a comma-separated list of whole numbers") from None
    bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
    if bad:
        raise ValueError(f"--layers {text!r}: {bad} out of range for a model of {num_layers} layers "
                         f"(valid: {-num_layers}..{num_layers - 1})")
    return layers


def resolve_files(args: argparse.Namespace) -> tuple[str, Path, BertConfig | None]:
    """The weights (path), the vocabulary file and the config (None: ``from_pretrained`` finds it beside the
    weights), from --init_checkpoint / --vocab_file / --config_file, falling back on the --bert_model folder."""
    weights = args.init_checkpoint or args.bert_model
    if "://" not in weights and not Path(weights).exists():
        raise FileNotFoundError(f"--init_checkpoint {weights} does not exist" if args.init_checkpoint else
                                f"--bert_model {weights} is not a model folder or file (names are not downloaded: "
                                "pass --init_checkpoint, --config_file and --vocab_file)")
    if args.vocab_file:
        vocab = Path(args.vocab_file)
        if not vocab.is_file():
            raise FileNotFoundError(f"--vocab_file {vocab} does not exist")
    else:
        folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in (args.bert_model, weights)
                   if "://" not in p and Path(p).exists()]
        found = [folder / "vocab.txt" for folder in folders if (folder / "vocab.txt").is_file()]
        if not found:
            raise FileNotFoundError(f"no --vocab_file given and no vocab.txt in {', '.join(map(str, folders))}")
        vocab = found[0]
    config = None
    if args.config_file:
        if not Path(args.config_file).is_file():
            raise FileNotFoundError(f"--config_file {args.config_file} does not exist")
        config = BertConfig.from_json_file(args.config_file)
    return weights, vocab, config


def load_model(weights: str, config: BertConfig | None) -> BertModel:
    """The encoder of a checkpoint, in eval mode; a shape or naming mismatch is a ``CheckpointError``."""
    try:
        model = BertModel.from_pretrained(weights, config=config)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"--init_checkpoint {weights}: {exc}") from exc
    return model.eval()


@torch.no_grad()
def write_features(features: list[Features], model: BertModel, layers: list[int], batch_size: int,
                   device: torch.device, handle: IO[str]) -> None:
    """Run the model over ``features`` in input order, ``batch_size`` at a time, and write one JSON line each."""
    for first in range(0, len(features), batch_size):
        batch = features[first:first + batch_size]
        width = max(len(f.input_ids) for f in batch)  # pad to the longest of this batch only
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        segment_ids = torch.zeros_like(input_ids)
        mask = torch.zeros_like(input_ids)
        for row, feature in enumerate(batch):
            n = len(feature.input_ids)
            input_ids[row, :n] = torch.tensor(feature.input_ids)
            segment_ids[row, :n] = torch.tensor(feature.segment_ids)
            mask[row, :n] = 1
        all_layers, _ = model(input_ids.to(device), segment_ids.to(device), mask.to(device),
                              output_all_encoded_layers=True)
        chosen = torch.stack([all_layers[layer] for layer in layers], dim=2).float().cpu()  # [B, S, len(layers), H]
        for row, feature in enumerate(batch):
            values = chosen[row, :len(feature.tokens)].tolist()  # [T][len(layers)][H]
            handle.write(json.dumps(line_record(feature, layers, values)) + "\n")


def line_record(feature: Features, layers: list[int], values: list[list[list[float]]]) -> dict[str, Any]:
    """One output line; values are rounded with Python's ``round(x, 6)`` as google-research/bert rounds them."""
    return {"linex_index": feature.line_index,
            "features": [{"token": token,
                          "layers": [{"index": layer, "values": [round(x, 6) for x in vector]}
                                     for layer, vector in zip(layers, per_layer)]}
                         for token, per_layer in zip(feature.tokens, values)]}


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad flags, files or checkpoints end the run with a message and exit status 1."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("extract_features.py runs as one process (all ranks would write the same file); start "
                             "it with python, not torchrun, and choose the GPU with --local_rank")
        if args.max_seq_length < 3:
            raise ValueError(f"--max_seq_length must be >= 3 ([CLS] A [SEP] B [SEP] needs room), got "
                             f"{args.max_seq_length}")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        use_cuda = torch.cuda.is_available() and not args.no_cuda
        device = torch.device("cuda", max(args.local_rank, 0)) if use_cuda else torch.device("cpu")
        examples = read_examples(args.input_file)
        weights, vocab_file, config = resolve_files(args)
        tokenizer = BertTokenizer(vocab_file, do_lower_case=args.do_lower_case)
        model = load_model(weights, config)
        model.config.check_fits(len(tokenizer), args.max_seq_length,
                                config_file=args.config_file or f"the config beside {weights}", vocab_file=vocab_file)
        layers = parse_layers(args.layers, model.config.num_hidden_layers)
        features = convert_examples_to_features(examples, tokenizer, args.max_seq_length)
        model.to(device)
        with atomic_write(args.output_file, "w", encoding="utf-8", newline="\n") as handle:
            write_features(features, model, layers, args.batch_size, device, handle)
    except utils.USER_ERRORS as exc:
        return utils.report_error("extract_features.py", exc)
    logger.info("%d lines -> %s (layers %s)", len(features), args.output_file, layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
