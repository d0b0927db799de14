"""Tests for triton/: the folder never shadows the Triton compiler, export parity, protobuf-valid model configs for
every backend, and a real Triton server (from PyPI's nvidia-pytriton) answering as inference.py and run_squad.py do.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

import inference
import run_squad
from modeling import BertConfig, BertModel

sys.path.insert(0, str(REPO / "triton"))  # the deployment scripts import their siblings, as when run as scripts
import deploy  # noqa: E402
import export_model  # noqa: E402
import pytriton_server  # noqa: E402
import run_inference_on_triton  # noqa: E402
import run_performance_on_triton  # noqa: E402

VOCAB = REPO / "vocab" / "vocab"
SAMPLE = REPO / "data" / "sample" / "squad" / "v2.0"
SEQ = ["--max-seq-length", "128", "--doc-stride", "64"]


def run_from_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root (sys.path[0] = the root, as for any script run there)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after '' (the root) on sys.path
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------------------------------------------
# The folder name: `import triton` from the root behaves as if triton/ were not there
# ----------------------------------------------------------------------------------------------------------------


def test_without_the_compiler_import_triton_fails_and_torch_and_transformers_work():
    try:
        import triton  # noqa: F401  (through the folder's __init__.py: the real compiler, if installed)
        pytest.skip("the Triton compiler is installed here; the fake-package test covers this case")
    except ImportError:
        pass
    done = run_from_root("""
        import importlib.util, sys
        try:
            import triton
            print("IMPORTED", triton.__file__)
        except ImportError as exc:
            print("ImportError", type(exc).__name__)
        print("find_spec", importlib.util.find_spec("triton"))
        import torch
        from torch.utils._triton import has_triton_package
        print("has_triton", has_triton_package())
        compiled = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        x = torch.linspace(-1, 1, 5)
        print("compile", torch.allclose(compiled(x), torch.sin(x) * 2 + 1))
        from transformers import BertConfig, BertModel
        model = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                     intermediate_size=37, vocab_size=99))
        print("bert", tuple(model(torch.ones(2, 5, dtype=torch.long)).last_hidden_state.shape))
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["ImportError ModuleNotFoundError", "find_spec None", "has_triton False", "compile True",
                     "bert (2, 5, 24)"], done.stdout


def test_an_installed_compiler_is_the_one_imported(tmp_path):
    fake = tmp_path / "site" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '3.9.0'\nFAKE = 'compiler'\n")
    (fake / "language.py").write_text("DTYPE = 'fp32'\n")
    done = run_from_root("""
        import sys
        assert sys.path[0] == ''
        import triton
        import triton.language
        print(triton.FAKE, triton.__version__, triton.language.DTYPE, triton.__file__)
    """, extra_path=tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["compiler", "3.9.0", "fp32", str(fake / "__init__.py")]


def test_scripts_run_from_the_root():
    done = subprocess.run([sys.executable, "triton/export_model.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--output-type" in done.stdout, done.stderr


# ----------------------------------------------------------------------------------------------------------------
# A tiny fine-tuned QA model and its exports
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> dict[str, Path]:
    """bert_configs/tiny.json fine-tuned for a few steps by run_squad.py on the bundled SQuAD v2.0 sample, with its
    predictions for the bundled dev sample."""
    folder = tmp_path_factory.mktemp("triton_qa")
    config = BertConfig.from_json_file(REPO / "bert_configs" / "tiny.json")
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "init")
    out = folder / "out"
    argv = ["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(folder / "init"),
            "--vocab_file", str(VOCAB), "--config_file", str(REPO / "bert_configs" / "tiny.json"), "--do_lower_case",
            "--train_file", str(SAMPLE / "train-v2.0.json"), "--predict_file", str(SAMPLE / "dev-v2.0.json"),
            "--do_train", "--do_predict", "--version_2_with_negative", "--max_steps", "4", "--train_batch_size", "8",
            "--learning_rate", "1e-3", "--max_seq_length", "128", "--doc_stride", "64", "--skip_cache",
            "--disable-progress-bar"]
    assert run_squad.main(argv) == 0
    return {"folder": folder, "out": out}


def export(qa_run: dict[str, Path], output_type: str, capsys, **extra: str) -> tuple[int, dict, str, Path]:
    path = qa_run["folder"] / ("model.onnx" if output_type == "onnx" else "model.pt")
    argv = ["--checkpoint", str(qa_run["out"]), "--vocab-file", str(VOCAB), "--do-lower-case",
            "--version-2-with-negative", "--output-type", output_type, "--output-path", str(path), "--cpu", *SEQ,
            "--max-windows", "24"]
    for flag, value in extra.items():
        argv += [f"--{flag.replace('_', '-')}", value]
    code = export_model.main(argv)
    captured = capsys.readouterr()
    report = json.loads(captured.out.splitlines()[-1]) if captured.out.strip() else {}
    return code, report, captured.err, path


@pytest.mark.parametrize("output_type", ["ts-trace", "onnx"])
def test_export_matches_pytorch(qa_run, output_type, capsys):
    code, report, err, path = export(qa_run, output_type, capsys)
    assert code == 0, err
    assert path.is_file() and report["output_type"] == output_type and report["precision"] == "fp32"
    assert report["windows"] >= 20 and report["questions"] >= 10
    assert report["max_abs_logit_diff"] <= 1e-3 and report["answers_identical"], report
    if output_type == "onnx":
        import onnx

        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == ["input__0", "input__1", "input__2"]
        assert [o.name for o in graph.output] == ["output__0", "output__1"]
        dims = graph.input[0].type.tensor_type.shape.dim
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert [d.dim_param for d in dims] == ["batch", "sequence"]  # dynamic batch and sequence axes


def test_export_fails_and_writes_nothing_when_the_export_differs(qa_run, monkeypatch, capsys, tmp_path):
    real_load = export_model.load_exported

    class Shifted(__import__("torch").nn.Module):
        """The exported model with the start logit of each window's last token raised: answers change."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            start, end = self.inner(*inputs)
            start = start.clone()
            start[:, 20] += 50.0
            return start, end

    monkeypatch.setattr(export_model, "load_exported", lambda *a: Shifted(real_load(*a)))
    qa = dict(qa_run, folder=tmp_path)
    code, report, err, path = export(qa, "onnx", capsys)
    assert code == 1 and "differs from PyTorch" in err and "not written" in err
    assert report["max_abs_logit_diff"] > 40 and not report["answers_identical"]
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_export_flag_errors(qa_run, capsys, tmp_path):
    code, _, err, _ = export(dict(qa_run, out=tmp_path / "missing"), "onnx", capsys)
    assert code == 1 and "--checkpoint" in err and "does not exist" in err
    code, _, err, _ = export(qa_run, "onnx", capsys, max_windows="0")
    assert code == 1 and "--max-windows must be >= 1" in err


@pytest.mark.parametrize("output_type", ["ts-trace", "onnx"])
def test_fp16_export_on_the_cpu_matches_pytorch_in_fp16(qa_run, output_type, capsys, tmp_path):
    """The GPU's default export precision, made and checked with the CPU's half kernels."""
    code, report, err, path = export(dict(qa_run, folder=tmp_path), output_type, capsys, precision="fp16")
    assert code == 0, err
    assert report["precision"] == "fp16" and report["device"] == "cpu" and report["tolerance"] == 5e-2
    assert report["max_abs_logit_diff"] <= 5e-2 and report["answers_identical"], report
    if output_type == "onnx":
        import onnx

        graph = onnx.load(str(path)).graph
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT16}
    else:
        import torch

        traced = torch.jit.load(str(path))
        assert {p.dtype for p in traced.parameters()} == {torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Model repository: every backend's config parses with Triton's ModelConfig protobuf
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, kind, suffix, extra", [
    ("onnxruntime", "KIND_GPU", ".onnx", ["--tensorrt-accelerator", "FP16", "--precision", "fp16"]),
    ("onnxruntime", "KIND_CPU", ".onnx", ["--intra-op-threads", "2"]),
    ("pytorch", "KIND_GPU", ".pt", []),
    ("tensorrt", "KIND_GPU", ".plan", ["--precision", "fp16"]),
    ("python", "KIND_CPU", ".onnx", []),
])
def test_model_repository_configs_parse_with_tritons_protobuf(tmp_path, backend, kind, suffix, extra):
    from tritonclient.grpc import model_config_pb2

    exported = tmp_path / f"exported{suffix}"
    exported.write_bytes(b"weights")
    repository = tmp_path / "repository"
    assert deploy.main(["--model-repository", str(repository), "--model-name", "bert_qa", "--model-path",
                        str(exported), "--backend", backend, "--instance-kind", kind, "--instance-count", "2",
                        "--max-batch-size", "16", "--preferred-batch-sizes", "8", "16", "--max-queue-delay-us",
                        "500", *extra]) == 0
    config = deploy.parse_config((repository / "bert_qa" / "config.pbtxt").read_text())
    assert config.name == "bert_qa" and config.max_batch_size == 16
    expected = {"onnxruntime": ("onnxruntime_onnx", ""), "pytorch": ("pytorch_libtorch", ""),
                "tensorrt": ("tensorrt_plan", ""), "python": ("", "python")}[backend]
    assert (config.platform, config.backend) == expected
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        (f"input__{i}", model_config_pb2.DataType.TYPE_INT32, [-1]) for i in range(3)]
    fp16 = "fp16" in extra
    assert [(t.name, t.data_type) for t in config.output] == [
        (f"output__{i}", model_config_pb2.DataType.TYPE_FP16 if fp16 else model_config_pb2.DataType.TYPE_FP32)
        for i in range(2)]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    group = config.instance_group[0]
    assert group.count == 2 and model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == kind
    files = sorted(p.name for p in (repository / "bert_qa" / "1").iterdir())
    if backend == "python":
        assert files == ["model.onnx", "model.py"]
        assert config.parameters["model_file"].string_value == "model.onnx"
    else:
        assert files == [deploy.BACKENDS[backend][1]]
    if "--tensorrt-accelerator" in extra:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def test_deploy_errors_write_nothing(tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"x")
    repository = tmp_path / "repository"
    cases = [(["--backend", "tensorrt", "--model-path", str(onnx_file)], "serves .plan or .engine"),
             (["--backend", "onnxruntime", "--model-path", str(onnx_file), "--preferred-batch-sizes", "32"],
              "--preferred-batch-sizes [32]"),
             (["--backend", "pytorch", "--model-path", str(tmp_path / "none.pt")], "does not exist")]
    for argv, message in cases:
        assert deploy.main(["--model-repository", str(repository), *argv]) == 1
        assert message in capsys.readouterr().err
    assert not list(repository.rglob("config.pbtxt"))


# ----------------------------------------------------------------------------------------------------------------
# A real Triton server on 127.0.0.1 serving the ONNX export through its Python backend
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(qa_run, tmp_path_factory):
    """tritonserver from nvidia-pytriton (its venv created once and cached) serving the tiny model's ONNX export."""
    folder = tmp_path_factory.mktemp("triton_server")
    onnx_path = folder / "model.onnx"
    assert export_model.main(["--checkpoint", str(qa_run["out"]), "--vocab-file", str(VOCAB), "--do-lower-case",
                              "--output-type", "onnx", "--output-path", str(onnx_path), "--cpu", *SEQ,
                              "--max-windows", "8"]) == 0
    repository = folder / "repository"
    assert deploy.main(["--model-repository", str(repository), "--model-name", "bert", "--model-path",
                        str(onnx_path), "--backend", "python", "--instance-kind", "KIND_CPU", "--max-batch-size",
                        "16", "--preferred-batch-sizes", "8", "16", "--max-queue-delay-us", "1000"]) == 0
    # The same checkpoint exported in fp16 (the GPU default), served with FP16 outputs.
    half = folder / "model_fp16.onnx"
    assert export_model.main(["--checkpoint", str(qa_run["out"]), "--vocab-file", str(VOCAB), "--do-lower-case",
                              "--output-type", "onnx", "--output-path", str(half), "--cpu", *SEQ, "--max-windows",
                              "8", "--precision", "fp16"]) == 0
    assert deploy.main(["--model-repository", str(repository), "--model-name", "bert_fp16", "--model-path",
                        str(half), "--backend", "python", "--instance-kind", "KIND_CPU", "--max-batch-size", "16",
                        "--precision", "fp16"]) == 0
    # A model whose config declares int64 token ids: the client must refuse it by name and dtype.
    shutil.copytree(repository / "bert", repository / "bert_int64")
    config = (repository / "bert" / "config.pbtxt").read_text().replace('name: "bert"', 'name: "bert_int64"')
    (repository / "bert_int64" / "config.pbtxt").write_text(config.replace(
        'name: "input__0"\n  data_type: TYPE_INT32', 'name: "input__0"\n  data_type: TYPE_INT64'))
    try:
        venv = pytriton_server.ensure_venv(log=folder / "venv.log")
        running = pytriton_server.start_server(repository, venv, folder / "work", ready_timeout=180)
    except pytriton_server.ServerError as exc:
        pytest.skip(f"the Triton server cannot start here: {exc}")
    try:
        yield running
    finally:
        running.stop()
        assert running.process.poll() is not None


def client(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_inference_on_triton.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_answers_equal_run_squad_and_inference(server, qa_run, protocol, tmp_path, capsys):
    url = f"{protocol}://{server.http_url if protocol == 'http' else server.grpc_url}"
    base = ["--server-url", url, "--model-name", "bert", "--vocab-file", str(VOCAB), "--do-lower-case",
            "--predict-file", str(SAMPLE / "dev-v2.0.json"), *SEQ]
    # SQuAD v2.0 as run_squad.py --do_predict: same predictions.json and the same n-best texts.
    code, out, err = client(base + ["--version-2-with-negative", "--output-dir", str(tmp_path / "v2")], capsys)
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["protocol"] == protocol and summary["questions"] == 86 and "exact_match" in summary
    served = json.loads((tmp_path / "v2" / "predictions.json").read_text())
    assert served == json.loads((qa_run["out"] / "predictions.json").read_text())
    served_nbest = json.loads((tmp_path / "v2" / "nbest_predictions.json").read_text())
    local_nbest = json.loads((qa_run["out"] / "nbest_predictions.json").read_text())
    assert {q: [e["text"] for e in n[:5]] for q, n in served_nbest.items()} == \
        {q: [e["text"] for e in n[:5]] for q, n in local_nbest.items()}
    assert sum(any(e["text"] for e in n) for n in served_nbest.values()) > 50  # real spans, not only ""
    # Span answers (no null answer) as inference.py gives them for the same file.
    code, out, err = client(base + ["--output-dir", str(tmp_path / "v1"), "--batch-size", "5"], capsys)
    assert code == 0, err
    served = json.loads((tmp_path / "v1" / "predictions.json").read_text())
    assert inference.main(["--init_checkpoint", str(qa_run["out"]), "--vocab_file", str(VOCAB), "--do_lower_case",
                           "--max_seq_length", "128", "--doc_stride", "64", "--json_file",
                           str(SAMPLE / "dev-v2.0.json")]) == 0
    local = {r["id"]: r["answer"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert served == local and sum(bool(a) for a in served.values()) > 80


def test_server_serves_the_fp16_export(server, tmp_path, capsys):
    import tritonclient.http

    metadata = tritonclient.http.InferenceServerClient(server.http_url).get_model_metadata("bert_fp16")
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {"output__0": "FP16", "output__1": "FP16"}
    answers = {}
    for name in ("bert", "bert_fp16"):
        code, _, err = client(["--server-url", f"grpc://{server.grpc_url}", "--model-name", name, "--vocab-file",
                               str(VOCAB), "--do-lower-case", "--predict-file", str(SAMPLE / "dev-v2.0.json"), *SEQ,
                               "--output-dir", str(tmp_path / name)], capsys)
        assert code == 0, err
        answers[name] = json.loads((tmp_path / name / "predictions.json").read_text())
    assert answers["bert_fp16"].keys() == answers["bert"].keys()
    same = sum(answers["bert_fp16"][q] == answer for q, answer in answers["bert"].items())
    assert same >= 0.95 * len(answers["bert"]), f"{same} of {len(answers['bert'])} answers as in fp32"


def test_client_one_question_and_errors(server, tmp_path, capsys):
    base = ["--model-name", "bert", "--vocab-file", str(VOCAB), "--do-lower-case", *SEQ]
    context = "The Normans were led by Rollo, a Viking chieftain, who swore fealty to King Charles III in 911."
    code, out, err = client(["--server-url", f"http://{server.http_url}", *base, "--question", "Who led them?",
                             "--context", context], capsys)
    assert code == 0, err
    assert json.loads(out)["answer"] in context
    dead = f"grpc://127.0.0.1:{pytriton_server.free_port()}"
    code, _, err = client(["--server-url", dead, *base, "--question", "q", "--context", "c", "--timeout", "5"],
                          capsys)
    assert code == 1 and "cannot reach Triton" in err
    code, _, err = client(["--server-url", f"http://{server.http_url}", *base, "--question", "q", "--context", "c",
                           "--model-name", "absent"], capsys)
    assert code == 1 and "model 'absent' is not ready" in err and "bert (READY)" in err
    code, _, err = client(["--server-url", f"grpc://{server.grpc_url}", *base, "--question", "q", "--context", "c",
                           "--batch-size", "32"], capsys)
    assert code == 1 and "max_batch_size 16" in err
    code, _, err = client(["--server-url", f"http://{server.http_url}", *base, "--question", "q", "--context", "c",
                           "--model-name", "bert_int64"], capsys)
    assert code == 1 and "input__0: INT64 (the client sends INT32)" in err
    code, _, err = client(["--server-url", f"grpc://{server.grpc_url}", *base, "--predict-file",
                           str(SAMPLE / "dev-v2.0.json")], capsys)
    assert code == 1 and "--output-dir" in err


def test_performance_csv(server, tmp_path, capsys):
    result = tmp_path / "perf.csv"
    code = run_performance_on_triton.main(["--server-url", f"grpc://{server.grpc_url}", "--model-name", "bert",
                                           "--batch-sizes", "1", "4", "--concurrency", "1", "2",
                                           "--max-seq-length", "128", "--measurement-interval", "600", "--warmup",
                                           "0.2", "--performance-tool", "builtin", "--result-path", str(result)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(result.open()))
    assert list(rows[0]) == run_performance_on_triton.COLUMNS
    assert [(r["Batch"], r["Concurrency"]) for r in rows] == [("1", "1"), ("1", "2"), ("4", "1"), ("4", "2")]
    for row in rows:
        latencies = [float(row[f"p{q} latency"]) for q in (50, 90, 95, 99)]
        assert float(row["Inferences/Second"]) > 0 and latencies == sorted(latencies) and latencies[0] > 0
        assert float(row["Server Compute Infer"]) > 0 and row["Tool"] == "builtin"
    assert json.loads(captured.out.splitlines()[-1])["points"] == 4
