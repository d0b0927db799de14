"""Answer questions about a text with a fine-tuned SQuAD model: one question from flags or many from a JSON file."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import utils
from data import squad
from modeling import BertForQuestionAnswering
from tokenization import BertTokenizer

logger = logging.getLogger("inference")

CANDIDATES = 20
# The reference's defaults (its README's probiotics/antibiotics example), without their trailing spaces.
DEFAULT_QUESTION = "Most antibiotics target bacteria and don't affect what class of organisms?"
DEFAULT_CONTEXT = (
    "Within the genitourinary and gastrointestinal tracts, commensal flora serve as biological barriers by competing "
    "with pathogenic bacteria for food and space and, in some cases, by changing the conditions in their "
    "environment, such as pH or available iron. This reduces the probability that pathogens will reach sufficient "
    "numbers to cause illness. However, since most antibiotics non-specifically target bacteria and do not affect "
    "fungi, oral antibiotics can lead to an overgrowth of fungi and cause conditions such as a vaginal candidiasis "
    "(a yeast infection). There is good evidence that re-introduction of probiotic flora, such as pure cultures of "
    "the lactobacilli normally found in unpasteurized yogurt, helps restore a healthy balance of microbial "
    "populations in intestinal infections in children and encouraging preliminary data in studies on bacterial "
    "gastroenteritis, inflammatory bowel diseases, urinary tract infection and post-surgical infections."
)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """All flags in one block: the reference's inference.py flags plus --json_file, --doc_stride, --bf16."""
    parser = argparse.ArgumentParser(description=__doc__)
    required = parser.add_argument_group("required")
    required.add_argument("--init_checkpoint", required=True,
                          help="Fine-tuned QA weights: a run_squad.py output folder or its pytorch_model.bin, a "
                               "reference .pt, or a Hugging Face BertForQuestionAnswering folder/file.")
    other = parser.add_argument_group("other")
    other.add_argument("--bert_model", default=None,
                       help="Model name, only echoed in the output (the reference requires it; nothing is looked up).")
    other.add_argument("--vocab_file", default=None,
                       help="WordPiece vocabulary; default: vocab.txt beside --init_checkpoint.")
    other.add_argument("--config_file", default=None,
                       help="BERT config JSON; default: config.json (or bert_config.json) beside --init_checkpoint.")
    other.add_argument("--question", default=DEFAULT_QUESTION, help="The question (ignored with --json_file).")
    other.add_argument("--context", default=DEFAULT_CONTEXT, help="The text to answer from (ignored with --json_file).")
    other.add_argument("--json_file", default=None,
                       help="Answer many questions: a JSON list of {\"question\", \"context\"[, \"id\"]} objects, or a "
                            "SQuAD-format file.")
    other.add_argument("--seed", type=int, default=1, help="Random seed (prediction itself is deterministic).")
    other.add_argument("--max_seq_length", type=int, default=384,
                       help="Tokens per window: [CLS] query [SEP] doc [SEP].")
    other.add_argument("--doc_stride", type=int, default=128,
                       help="Tokens between window starts when a context is longer than one window (the reference "
                            "truncates instead).")
    other.add_argument("--max_query_length", type=int, default=64, help="Questions are cut to this many tokens.")
    other.add_argument("--n_best_size", type=int, default=1,
                       help="Answers listed per question, best first (chosen from at least 20 candidates).")
    other.add_argument("--max_answer_length", type=int, default=30, help="Longest answer, in tokens.")
    other.add_argument("--predict_batch_size", type=int, default=8, help="Windows per forward pass.")
    other.add_argument("--no_cuda", "--no_gpu", dest="no_cuda", action="store_true",
                       help="Run on the CPU even when a GPU is present (--no_gpu: the reference's name).")
    other.add_argument("--do_lower_case", action="store_true", help="Lower-case the text (uncased models).")
    other.add_argument("--version_2_with_negative", "--can_give_negative_answer", dest="version_2_with_negative",
                       action="store_true",
                       help="SQuAD v2.0 model: answer \"\" (unknown) when the null score wins by the threshold; "
                            "--can_give_negative_answer (the reference inference.py's name) is the same option.")
    other.add_argument("--null_score_diff_threshold", type=float, default=-11.0,
                       help="With --version_2_with_negative: answer \"\" when null score - best span score > this.")
    other.add_argument("--fp16", action="store_true", help="fp16 autocast (CUDA only).")
    other.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU or CPU).")
    other.add_argument("--local_rank", type=int, default=-1, help="GPU index to run on (-1: the first GPU).")
    return parser.parse_args(argv)


def resolve_files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The vocabulary file and the config file (None: let ``from_pretrained`` find it beside the weights)."""
    checkpoint = Path(args.init_checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"--init_checkpoint {checkpoint} does not exist")
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    vocab = Path(args.vocab_file) if args.vocab_file else folder / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"--vocab_file {vocab} does not exist" if args.vocab_file else
                                f"no --vocab_file given and no vocab.txt in {folder}")
    config = Path(args.config_file) if args.config_file else None
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"--config_file {config} does not exist")
    return vocab, config


def read_items(args: argparse.Namespace) -> list[dict[str, str]]:
    """The questions to answer: from --json_file (list or SQuAD format), else --question/--context."""
    if not args.json_file:
        return [{"id": "0", "question": args.question, "context": args.context}]
    path = Path(args.json_file)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--json_file {path} does not exist") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an integer of > 4300 digits, deep nesting
        raise ValueError(f"--json_file {path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(content, dict) and "data" in content:
        dataset = squad.load_squad_json(path, unique_ids=True)
        return [{"id": str(qa["id"]), "question": qa["question"], "context": paragraph["context"]}
                for article in dataset["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    if not isinstance(content, list):
        raise ValueError(f"--json_file {path}: expected a list of {{question, context}} objects or SQuAD JSON")
    items = []
    first_with: dict[str, int] = {}
    for index, item in enumerate(content):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("question", "context")):
            raise ValueError(f"--json_file {path}: item [{index}] needs string \"question\" and \"context\" fields")
        qid = str(item.get("id", index))
        if first_with.setdefault(qid, index) != index:
            raise ValueError(f"--json_file {path}: item [{index}] has the id {qid!r} of item [{first_with[qid]}]; "
                             "ids must be unique (answers are keyed by id)")
        items.append({"id": qid, "question": item["question"], "context": item["context"]})
    return items


def answer(items: list[dict[str, str]], model: BertForQuestionAnswering, tokenizer: BertTokenizer,
           args: argparse.Namespace, device: torch.device, precision: utils.Precision) -> list[dict[str, Any]]:
    """Run the model over every item's windows and return {id, question, answer, score, nbest} per item."""
    contexts: dict[str, list[str]] = {}
    examples = []
    for item in items:
        if item["context"] not in contexts:  # questions about one context share its words
            contexts[item["context"]] = squad.split_context(item["context"])[0]
        examples.append(squad.SquadExample(qas_id=item["id"], question_text=item["question"],
                                           doc_tokens=contexts[item["context"]]))
    features = squad.convert_examples_to_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                  args.max_query_length, is_training=False)
    tensors = squad.features_to_tensors(features, args.max_seq_length)
    starts, ends = squad.predict_logits(model, tensors, args.predict_batch_size, device,
                                        lambda: utils.autocast(precision, device))
    # Candidates come from at least the 20 best start/end positions per window (run_squad.py's default), then the
    # list is cut to --n_best_size: with the reference's n_best_size=1 only the single best start and end could pair.
    predictions = squad.compute_predictions(
        examples, features, starts, ends, tokenizer, n_best_size=max(args.n_best_size, CANDIDATES),
        max_answer_length=args.max_answer_length, do_lower_case=args.do_lower_case,
        version_2_with_negative=args.version_2_with_negative,
        null_score_diff_threshold=args.null_score_diff_threshold)
    results = []
    for item, example in zip(items, examples):
        nbest = predictions.nbest[example.qas_id]
        text = predictions.answers[example.qas_id]
        score = next((entry["probability"] for entry in nbest if entry["text"] == text), 0.0)
        nbest = nbest[:args.n_best_size]
        results.append({"id": item["id"], "question": item["question"], "answer": text, "score": score,
                        "nbest": nbest})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        for flag in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size", "max_answer_length",
                     "predict_batch_size"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        use_cuda = torch.cuda.is_available() and not args.no_cuda
        device = torch.device("cuda", max(args.local_rank, 0)) if use_cuda else torch.device("cpu")
        precision = utils.resolve_precision(args.fp16, args.bf16, device)
        utils.set_seed(args.seed)
        vocab_file, config_file = resolve_files(args)
        tokenizer = BertTokenizer(vocab_file, do_lower_case=args.do_lower_case)
        items = read_items(args)
        model = BertForQuestionAnswering.from_finetuned(args.init_checkpoint, config_file)
        model.config.check_fits(len(tokenizer.vocab), args.max_seq_length,
                                config_file=config_file or f"the config beside {args.init_checkpoint}",
                                vocab_file=vocab_file)
        model = model.to(device).eval()
        if device.type == "cpu" and precision == "fp32":
            utils.prepack_linears(model, args.predict_batch_size * args.max_seq_length)
        results = answer(items, model, tokenizer, args, device, precision)
    except utils.USER_ERRORS as exc:
        return utils.report_error("inference.py", exc)
    # Lone surrogates (\ud800-style escapes in the JSON file, or undecodable bytes in a flag) cannot be printed as
    # UTF-8: they are printed as \uXXXX escapes instead, and named once.
    affected = [result["id"] for result, item in zip(results, items)
                if squad.has_lone_surrogates(result if args.json_file else [result, item["context"]])]
    if affected:
        logger.warning("%d question(s) have lone surrogates (\\ud800-style escapes that are not Unicode text) in "
                       "their id, question, context or answer: %s; they are printed as \\uXXXX escapes",
                       len(affected), squad.describe_ids(affected))
    if args.json_file:
        print(squad.json_text({"model": args.bert_model, "results": results}, indent=2))
        return 0
    result = results[0]
    lines = [f"question: {result['question']}", f"context: {items[0]['context']}",
             f"answer: {result['answer'] or '(no answer)'}", f"score: {result['score']:.4f}",
             squad.json_text(result["nbest"], indent=2)]
    print(squad.escape_lone_surrogates("\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
