"""Answer SQuAD questions through a model served by Triton Inference Server (HTTP or gRPC) and score them.

Windows are built by run_squad.py's code (``data/squad.py``), sent in batches of --batch-size (longest first, each
batch cut to its longest window, as run_squad.py --do_predict does), and the logits go through the same n-best
post-processing; predictions.json and nbest_predictions.json (and null_odds.json for v2.0) land in --output-dir,
and the built-in SQuAD evaluation scores them when the file has answers.

    python triton/run_inference_on_triton.py --server-url grpc://localhost:8001 --model-name bert \\
        --vocab-file vocab/vocab --do-lower-case --predict-file dev-v1.1.json --output-dir out
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import dataloader
import model as triton_model
import numpy as np
import torch

import utils  # noqa: E402  (the siblings above put the repository root on sys.path)
from data import squad  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402


class TritonError(RuntimeError):
    """The server is unreachable, the model is not ready, or it does not take/return what the client sends."""


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The reference client's flags (--server-url, --model-name, --model-version) plus run_squad.py's window and
    post-processing options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default="grpc://localhost:8001",
                        help="Server address; http:// or grpc:// chooses the protocol (default grpc, port 8001; "
                             "HTTP is port 8000).")
    parser.add_argument("--protocol", choices=("http", "grpc"), default=None,
                        help="Protocol when --server-url has no scheme (default grpc).")
    parser.add_argument("--model-name", default="bert", help="Served model name.")
    parser.add_argument("--model-version", default="", help="Served model version (default: the server's choice).")
    parser.add_argument("--vocab-file", required=True, help="WordPiece vocabulary of the served model.")
    parser.add_argument("--predict-file", default=None, help="SQuAD JSON file to answer.")
    parser.add_argument("--question", default=None, help="One question (with --context) instead of --predict-file.")
    parser.add_argument("--context", default=None, help="The text --question is about.")
    parser.add_argument("--output-dir", default=None,
                        help="Where predictions.json etc. go (required with --predict-file).")
    parser.add_argument("--do-lower-case", action="store_true", help="Lower-case the text (uncased models).")
    parser.add_argument("--version-2-with-negative", action="store_true", help="SQuAD v2.0: allow no answer.")
    parser.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                        help="v2.0: answer \"\" when null score - best span score > this (run_squad.py's default).")
    parser.add_argument("--max-seq-length", type=int, default=384, help="Tokens per window.")
    parser.add_argument("--doc-stride", type=int, default=128, help="Tokens between window starts.")
    parser.add_argument("--max-query-length", type=int, default=64, help="Questions are cut to this many tokens.")
    parser.add_argument("--n-best-size", type=int, default=20, help="Candidates kept per question.")
    parser.add_argument("--max-answer-length", type=int, default=30, help="Longest answer, in tokens.")
    parser.add_argument("--batch-size", type=int, default=8, help="Windows per request.")
    parser.add_argument("--fixed-seq-length", action="store_true",
                        help="Pad every request to --max-seq-length (for a model exported with a fixed length).")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for the server per request.")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Fail on bad flags before contacting the server."""
    for flag in ("max_seq_length", "doc_stride", "max_query_length", "n_best_size", "max_answer_length",
                 "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not Path(args.vocab_file).is_file():
        raise FileNotFoundError(f"--vocab-file {args.vocab_file} does not exist")
    if args.predict_file is None and not (args.question and args.context):
        raise ValueError("give --predict-file, or both --question and --context")
    if args.predict_file is not None:
        if not Path(args.predict_file).is_file():
            raise FileNotFoundError(f"--predict-file {args.predict_file} does not exist")
        if args.output_dir is None:
            raise ValueError("--predict-file needs --output-dir for predictions.json")


def split_url(url: str, protocol: str | None) -> tuple[str, str]:
    """(protocol, host:port) from --server-url and --protocol."""
    for scheme in ("http", "grpc"):
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3:].rstrip("/")
    return protocol or "grpc", url


class TritonModel(torch.nn.Module):
    """A served model behind the torch call signature ``(ids, segment ids, mask) -> (start, end)``, so that
    ``squad.predict_logits`` (run_squad.py's prediction loop) drives it."""

    def __init__(self, url: str, protocol: str, model_name: str, model_version: str = "",
                 timeout: float = 120.0) -> None:
        super().__init__()
        self.url, self.protocol, self.model_name, self.model_version = url, protocol, model_name, model_version
        self.timeout = timeout
        if protocol == "http":
            import tritonclient.http as client_module

            self.client = client_module.InferenceServerClient(url, connection_timeout=timeout,
                                                              network_timeout=timeout)
        else:
            import tritonclient.grpc as client_module

            self.client = client_module.InferenceServerClient(url)
        self.module = client_module
        self.metadata: dict[str, Any] = {}
        self.max_batch_size = 0

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return function(*args, **kwargs)
        except InferenceServerException as exc:
            raise TritonError(f"{what} on {self.protocol}://{self.url} failed: {exc.message()}") from None
        except (ConnectionError, OSError) as exc:
            raise TritonError(f"cannot reach Triton at {self.protocol}://{self.url} ({what}): {exc}") from None

    def check(self, batch_size: int, seq_length: int) -> None:
        """Fail clearly when the server is unreachable, the model not ready, or its inputs/outputs do not match."""
        extra = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        from tritonclient.utils import InferenceServerException

        try:
            live = self.client.is_server_live(**extra)
        except (InferenceServerException, ConnectionError, OSError) as exc:
            detail = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            raise TritonError(f"cannot reach Triton at {self.protocol}://{self.url}: {detail}") from None
        if not live:
            raise TritonError(f"Triton at {self.protocol}://{self.url} is not live")
        if not self._call("the readiness check", self.client.is_model_ready, self.model_name, self.model_version):
            index = self._call("the repository index", self.client.get_model_repository_index)
            rows = index if isinstance(index, list) else self._as_dict(index).get("models", [])
            states = ", ".join(f"{row.get('name')} ({row.get('state', 'UNKNOWN')})" for row in rows) or "none"
            raise TritonError(f"model {self.model_name!r} is not ready on {self.protocol}://{self.url}; models "
                              f"there: {states}")
        self.metadata = self._as_dict(self._call("the model metadata", self.client.get_model_metadata,
                                                 self.model_name, self.model_version))
        config = self._as_dict(self._call("the model config", self.client.get_model_config, self.model_name,
                                          self.model_version))
        config = config.get("config", config)
        self.max_batch_size = int(config.get("max_batch_size", 0))
        inputs = {tensor["name"]: tensor for tensor in self.metadata.get("inputs", [])}
        outputs = {tensor["name"] for tensor in self.metadata.get("outputs", [])}
        wrong = [f"{name}: {inputs[name]['datatype']} (the client sends INT32)" for name in triton_model.INPUT_NAMES
                 if name in inputs and inputs[name]["datatype"] != "INT32"]
        missing = [name for name in (*triton_model.INPUT_NAMES, *triton_model.OUTPUT_NAMES)
                   if name not in inputs and name not in outputs]
        if missing or wrong:
            raise TritonError(f"model {self.model_name!r} does not match the client: "
                              + "; ".join([*(f"no tensor {name}" for name in missing), *wrong]))
        for name, tensor in inputs.items():
            shape = [int(dim) for dim in tensor["shape"]]
            length = shape[-1]
            if length not in (-1, seq_length):
                raise TritonError(f"model {self.model_name!r} input {name} has shape {shape}, but the client sends "
                                  f"windows of {seq_length} tokens (--max-seq-length, --fixed-seq-length)")
        if self.max_batch_size and batch_size > self.max_batch_size:
            raise TritonError(f"--batch-size {batch_size} is larger than model {self.model_name!r}'s max_batch_size "
                              f"{self.max_batch_size}")

    @staticmethod
    def _as_dict(message: Any) -> Any:
        """HTTP answers are dicts already; gRPC answers are protobuf messages."""
        if isinstance(message, (dict, list)):
            return message
        from google.protobuf import json_format

        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    def infer(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One request: int32 ``input__*`` arrays in, start and end logits out."""
        inputs = []
        for name in triton_model.INPUT_NAMES:
            tensor = self.module.InferInput(name, list(feeds[name].shape), "INT32")
            tensor.set_data_from_numpy(feeds[name])
            inputs.append(tensor)
        outputs = [self.module.InferRequestedOutput(name) for name in triton_model.OUTPUT_NAMES]
        extra = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        result = self._call(f"inference with model {self.model_name!r}", self.client.infer, self.model_name, inputs,
                            model_version=self.model_version, outputs=outputs, **extra)
        start, end = (result.as_numpy(name) for name in triton_model.OUTPUT_NAMES)
        if start is None or end is None or start.shape != feeds["input__0"].shape or end.shape != start.shape:
            raise TritonError(f"model {self.model_name!r} returned outputs of shape "
                              f"{None if start is None else start.shape} / {None if end is None else end.shape} for "
                              f"inputs of shape {feeds['input__0'].shape}")
        return start, end

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.infer(dataloader.triton_inputs(input_ids, segment_ids, attention_mask))
        return torch.from_numpy(start.astype(np.float32)), torch.from_numpy(end.astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        check_arguments(args)
        protocol, url = split_url(args.server_url, args.protocol)
        served = TritonModel(url, protocol, args.model_name, args.model_version, args.timeout)
        served.check(args.batch_size, args.max_seq_length)
        tokenizer = BertTokenizer(args.vocab_file, do_lower_case=args.do_lower_case)
        examples = dataloader.read_examples(args.predict_file, args.question, args.context,
                                            args.version_2_with_negative)
        windows = dataloader.build_windows(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                           args.max_query_length)
        start_time = time.perf_counter()
        starts, ends = predict(served, windows, args.batch_size, args.fixed_seq_length)
        elapsed = time.perf_counter() - start_time
        predictions = squad.compute_predictions(
            windows.examples, windows.features, starts, ends, tokenizer, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, do_lower_case=args.do_lower_case,
            version_2_with_negative=args.version_2_with_negative,
            null_score_diff_threshold=args.null_score_diff_threshold)
        summary: dict[str, Any] = {"protocol": protocol, "questions": len(windows.examples),
                                   "windows": len(windows.features), "seconds": round(elapsed, 3),
                                   "windows_per_second": round(len(windows.features) / max(elapsed, 1e-9), 2)}
        if args.predict_file is None:
            print(squad.json_text({"answer": predictions.answers["0"], "nbest": predictions.nbest["0"][:5]},
                                  indent=2))
            return 0
        squad.write_predictions(predictions, args.output_dir, args.version_2_with_negative)
        dataset = squad.load_squad_json(args.predict_file)
        try:
            summary.update(squad.evaluate(dataset, predictions.answers, args.version_2_with_negative,
                                          predictions.null_odds if args.version_2_with_negative else None))
        except squad.SquadFormatError as exc:
            summary["evaluation"] = f"skipped: {exc}"
    except utils.USER_ERRORS + (TritonError,) as exc:
        return utils.report_error("run_inference_on_triton.py", exc)
    print(json.dumps(summary))
    return 0


def predict(served: TritonModel, windows: dataloader.Windows, batch_size: int,
            fixed_seq_length: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of every window through the server, by run_squad.py's prediction loop (``squad.predict_logits``).

    With ``fixed_seq_length`` every request is padded to the full window length instead of its longest row."""
    if not fixed_seq_length:
        return squad.predict_logits(served, windows.tensors, batch_size, torch.device("cpu"))
    starts, ends = [], []
    lengths = windows.tensors["seq_lengths"]
    for first in range(0, len(windows.features), batch_size):
        rows = torch.arange(first, min(first + batch_size, len(windows.features)))
        inputs = squad.model_inputs(windows.tensors["input_ids"][rows], lengths[rows],
                                    windows.tensors["doc_offsets"][rows], trim=False)
        start, end = served.infer(dataloader.triton_inputs(inputs["input_ids"], inputs["token_type_ids"],
                                                           inputs["attention_mask"]))
        for k, row in enumerate(rows.tolist()):
            starts.append(start[k, :lengths[row]].astype(np.float32))
            ends.append(end[k, :lengths[row]].astype(np.float32))
    return starts, ends


if __name__ == "__main__":
    sys.exit(main())
