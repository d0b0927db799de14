"""The reference's fine-tuning flags that do something here beyond training: run_squad.py --profile, run_glue.py
--server_ip/--server_port (remote debugging) and --do_predict's default split."""
from __future__ import annotations

import json
import sys
import types

from conftest import REPO

import run_glue
import run_squad

VOCAB = REPO / "vocab" / "vocab"
SQUAD_V2 = REPO / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"
SST2 = REPO / "data" / "sample" / "glue" / "SST-2"


def test_run_squad_profile_writes_a_trace_of_the_first_steps(tiny_encoder, tmp_path):
    init, config = tiny_encoder
    out = tmp_path / "out"
    assert run_squad.main(["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(init),
                           "--vocab_file", str(VOCAB), "--config_file", str(config), "--do_lower_case",
                           "--max_seq_length", "128", "--doc_stride", "64", "--max_query_length", "32",
                           "--train_batch_size", "8", "--train_file", str(SQUAD_V2), "--version_2_with_negative",
                           "--do_train", "--max_steps", "6", "--skip_cache", "--skip_checkpoint", "--profile",
                           "--json-summary", str(out / "log.json"), "--disable-progress-bar"]) == 0
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("aten::" in name for name in names)  # real operator events, not an empty file


def glue_argv(init, config, out, *extra: str) -> list[str]:
    return ["--data_dir", str(SST2), "--bert_model", "tiny", "--task_name", "sst-2", "--output_dir", str(out),
            "--init_checkpoint", str(init), "--vocab_file", str(VOCAB), "--config_file", str(config),
            "--do_lower_case", "--max_seq_length", "64", "--skip_features_cache", "--disable_progress_bar",
            "--train_batch_size", "16", "--max_steps", "2", *extra]


def test_run_glue_predicts_the_dev_set_by_default(tiny_encoder, tmp_path):
    init, config = tiny_encoder
    out = tmp_path / "out"
    assert run_glue.main(glue_argv(init, config, out, "--do_train", "--do_predict")) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    dev_rows = len((SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()) - 1
    assert len(predictions) == dev_rows and set(predictions.values()) <= {"0", "1"}


def test_run_glue_remote_debugging_flags(tiny_encoder, tmp_path, monkeypatch, capsys):
    init, config = tiny_encoder
    monkeypatch.setitem(sys.modules, "debugpy", None)  # not installed
    assert run_glue.main(glue_argv(init, config, tmp_path / "a", "--do_train", "--server_ip", "127.0.0.1",
                                   "--server_port", "5678")) == 1
    assert "pip install debugpy" in capsys.readouterr().err
    assert run_glue.main(glue_argv(init, config, tmp_path / "b", "--do_train", "--server_port", "5678")) == 1
    assert "--server_ip and --server_port go together" in capsys.readouterr().err
    calls = []
    fake = types.SimpleNamespace(listen=lambda address: calls.append(("listen", address)),
                                 wait_for_client=lambda: calls.append(("wait",)))
    monkeypatch.setitem(sys.modules, "debugpy", fake)
    assert run_glue.main(glue_argv(init, config, tmp_path / "c", "--do_train", "--server_ip", "127.0.0.1",
                                   "--server_port", "5678")) == 0
    assert calls == [("listen", ("127.0.0.1", 5678)), ("wait",)]
