"""Triton Python-backend model (deploy.py copies it to ``<repository>/<name>/1/model.py``): runs the exported
ONNX file through onnxruntime, or the TorchScript file through torch, inside the Triton server.

The served file and thread count come from the config's parameters ``model_file`` and ``intra_op_threads``.
Requests batched together by the dynamic batcher may differ in sequence length: they are padded to the longest
(mask 0, so the real positions' logits do not change) and each response is cut back to its request's length.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT_NAMES = ("input__0", "input__1", "input__2")
OUTPUT_NAMES = ("output__0", "output__1")


class TritonPythonModel:
    """The Python backend's model class: ``initialize`` once per instance, ``execute`` per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / parameters.get("model_file", "model.onnx")
        threads = int(parameters.get("intra_op_threads", "1"))
        self.output_dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(config, OUTPUT_NAMES[0])["data_type"])
        if path.suffix == ".onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda feeds: session.run(list(OUTPUT_NAMES), feeds)
        else:
            import torch

            torch.set_num_threads(threads)
            module = torch.jit.load(str(path), map_location="cpu").eval()

            def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
                with torch.inference_mode():
                    outputs = module(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
                return [output.float().numpy() for output in outputs]

            self.run = run

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [[pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUT_NAMES]
                  for request in requests]
        width = max(inputs[0].shape[1] for inputs in arrays)
        feeds = {name: np.concatenate([np.pad(inputs[k], ((0, 0), (0, width - inputs[k].shape[1])))
                                       for inputs in arrays]).astype(np.int32)
                 for k, name in enumerate(INPUT_NAMES)}
        outputs = self.run(feeds)
        responses, row = [], 0
        for inputs in arrays:
            rows, length = inputs[0].shape
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(output[row:row + rows, :length],
                                                                  dtype=self.output_dtype))
                       for name, output in zip(OUTPUT_NAMES, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            row += rows
        return responses
