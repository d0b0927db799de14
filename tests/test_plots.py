"""scripts/plot_logs.py on logs written by real tiny runs (two phases, two runs, a fine-tuning run), its errors on
bad logs, benchmarks/plot_results.py, and --tensorboard events read back with TensorBoard's own reader."""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
from conftest import REPO

import run_glue
import run_pretraining
import run_squad

matplotlib = pytest.importorskip("matplotlib")
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))
import plot_logs  # noqa: E402
import plot_results  # noqa: E402

VOCAB = REPO / "vocab" / "vocab"
TINY = REPO / "bert_configs" / "tiny.json"
SST2 = REPO / "data" / "sample" / "glue" / "SST-2"
SQUAD_V2 = REPO / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"


def pretrain_argv(shards: Path, out: Path, log: Path, *extra: str, steps: int) -> list[str]:
    return ["--input_dir", str(shards), "--config_file", str(TINY), "--vocab_file", str(VOCAB),
            "--output_dir", str(out), "--do_train", "--train_batch_size", "4", "--max_steps", str(steps),
            "--learning_rate", "5e-3", "--warmup_proportion", "0.3", "--max_seq_length", "64",
            "--max_predictions_per_seq", "10", "--num_workers", "0", "--log_freq", "1", "--skip_checkpoint",
            "--json-summary", str(log), "--disable_progress_bar", *extra]


@pytest.fixture(scope="module")
def logs(pretraining_shards, tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    """Logs of tiny real runs: fp32 phase 1 (4 steps) + phase 2 (3 steps) appended to one file with TensorBoard
    events, a bf16 phase 1 (4 steps), and a 2-epoch SST-2 fine-tuning run with TensorBoard events."""
    root = tmp_path_factory.mktemp("plots")
    shards = pretraining_shards["train"]
    fp32, bf16 = root / "fp32" / "dllogger.json", root / "bf16" / "dllogger.json"
    tb = root / "tb_pretrain"
    # phase 2 reads phase 1's checkpoint: write it (not --skip_checkpoint) for phase 1 of the fp32 run
    argv = pretrain_argv(shards, root / "ckpt", fp32, "--tensorboard", str(tb), steps=4)
    assert run_pretraining.main([a for a in argv if a != "--skip_checkpoint"]) == 0
    assert run_pretraining.main(pretrain_argv(shards, root / "ckpt", fp32, "--tensorboard", str(tb), "--phase2",
                                              "--resume_from_checkpoint", "--phase1_end_step", "4",
                                              "--learning_rate", "1e-3", steps=3)) == 0
    assert run_pretraining.main(pretrain_argv(shards, root / "ckpt_bf16", bf16, "--bf16", steps=4)) == 0
    init, config = tiny_encoder
    glue_out = root / "SST-2"
    assert run_glue.main(["--data_dir", str(SST2), "--bert_model", "tiny", "--task_name", "sst-2",
                          "--output_dir", str(glue_out), "--init_checkpoint", str(init), "--vocab_file", str(VOCAB),
                          "--config_file", str(config), "--do_lower_case", "--max_seq_length", "64",
                          "--skip_features_cache", "--disable_progress_bar", "--train_batch_size", "64",
                          "--num_train_epochs", "2", "--learning_rate", "1e-3", "--do_train", "--do_eval",
                          "--skip_checkpoint", "--tensorboard", str(root / "tb_glue")]) == 0
    return {"root": root, "fp32": fp32, "bf16": bf16, "glue": glue_out / "dllogger.json", "tb": tb,
            "tb_glue": root / "tb_glue"}


def records(path: Path) -> list[dict]:
    return [json.loads(line[5:]) for line in path.read_text().splitlines()]


def training(path: Path) -> list[list[dict]]:
    """The [epoch, step] records of each process that appended to ``path``, in order."""
    runs: list[list[dict]] = []
    for r in records(path):
        if r["type"] == "METADATA" and r["metric"] == "run_start":
            runs.append([])
        elif r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 2:
            runs[-1].append(r)
    return runs


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def line(fig, gid: str):
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, (gid, [ln.get_gid() for ax in fig.axes for ln in ax.get_lines()])
    return found[0]


def test_two_phases_draw_one_curve_with_the_boundary_and_two_runs_overlay(logs, tmp_path):
    phase1, phase2 = training(logs["fp32"])
    assert [r["step"][1] for r in phase1] == [1, 2, 3, 4] and [r["step"][1] for r in phase2] == [1, 2, 3]
    runs = plot_logs.read_logs([str(logs["fp32"]), str(logs["bf16"])], ["fp32", "bf16"])
    fig = plot_logs.make_figure(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Training loss", "Learning rate", "Throughput", "Model FLOPs utilisation"]
    for key in ("average_loss", "learning_rate", "sequences_per_second"):
        fp32 = line(fig, f"fp32|{key}")
        # phase 2's steps 1..3 continue after phase 1's last step, 4: one curve over global steps 1..7
        assert list(fp32.get_xdata()) == [1, 2, 3, 4, 5, 6, 7]
        assert list(fp32.get_ydata()) == pytest.approx([r["data"][key] for r in phase1 + phase2])
        bf16 = line(fig, f"bf16|{key}")
        assert list(bf16.get_xdata()) == [1, 2, 3, 4]
        assert list(bf16.get_ydata()) == pytest.approx([r["data"][key] for r in training(logs["bf16"])[0]])
    assert line(fig, "fp32|average_loss").get_label() == "fp32"  # the legend entry
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["fp32", "bf16", "phase 1 | phase 2"]
    for ax in fig.axes:  # the phase boundary, on every panel, after phase 1's last step
        assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_gid() == "phase boundary|4"] == [4]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes[:3])
    assert "sequences/s" in fig.axes[2].get_ylabel()
    # MFU is "n/a" on a CPU: no line, and the panel says why
    assert "n/a" in fig.axes[3].texts[0].get_text()
    assert not [ln for ln in fig.axes[3].get_lines() if ln.get_gid().endswith("|mfu")]

    out = tmp_path / "pretrain.png"
    assert plot_logs.main([str(logs["fp32"]), str(logs["bf16"]), "--label", "fp32", "--label", "bf16",
                           "-o", str(out)]) == 0
    assert png_size(out) == plot_logs.figure_size(runs) == (1200, 790)


def test_mfu_is_plotted_in_percent_when_logged(tmp_path):
    log = tmp_path / "gpu" / "dllogger.json"
    log.parent.mkdir()
    lines = [{"type": "METADATA", "metric": "run_start", "metadata": {}},
             # the reference logs its flags as str(argparse.Namespace)
             {"type": "LOG", "step": "PARAMETER", "data": {"Config": ["Namespace(phase2=False, seed=1)"]}}]
    lines += [{"type": "LOG", "step": [0, s], "data": {"average_loss": 9.0 - s, "learning_rate": 1e-3 * s,
                                                        "sequences_per_second": 100.0 + s, "mfu": 0.4 + s / 100}}
              for s in (1, 2, 3)]
    log.write_text("".join("DLLL " + json.dumps(r) + "\n" for r in lines))
    (run,) = plot_logs.read_logs([str(log)])
    assert [s.name for s in run.stages] == ["phase 1"] and run.stages[0].config == {"phase2": False, "seed": 1}
    fig = plot_logs.make_figure([run])
    assert list(line(fig, "gpu|mfu").get_ydata()) == pytest.approx([41.0, 42.0, 43.0])


def test_fine_tuning_log_gives_loss_and_the_eval_metric_per_epoch(logs, tmp_path):
    (train,) = training(logs["glue"])
    # 400 training sentences, batch 64: 7 steps an epoch, 2 epochs
    assert [r["step"] for r in train][6:8] == [[0, 7], [1, 8]] and train[-1]["step"] == [1, 14]
    accuracy = next(r["data"]["exact_match"] for r in records(logs["glue"]) if r.get("step") == [])
    runs = plot_logs.read_logs([str(logs["glue"])])
    fig = plot_logs.make_figure(runs)
    loss = line(fig, "SST-2|GLUE SST-2|average_loss")
    assert list(loss.get_xdata()) == list(range(1, 15))
    assert list(loss.get_ydata()) == pytest.approx([r["data"]["average_loss"] for r in train])
    metric = line(fig, "SST-2|GLUE SST-2|exact_match")
    assert list(metric.get_xdata()) == [2.0]  # evaluated after 2 epochs
    assert list(metric.get_ydata()) == pytest.approx([100.0 * accuracy])
    loss_ax, metric_ax = fig.axes
    assert metric_ax.get_xlabel() == "epochs trained" and metric_ax.get_ylabel() == "score (%)"
    assert f"{100 * accuracy:.1f}" in [t.get_text() for t in metric_ax.texts]
    epoch_end = [ln.get_xdata()[0] for ln in loss_ax.get_lines() if ln.get_linestyle() == ":"]
    assert epoch_end == [7.5]

    # a results folder: every dllogger file under it, pre-training on top and fine-tuning below, one PNG
    out = tmp_path / "all.png"
    assert plot_logs.main([str(logs["root"]), "-o", str(out)]) == 0
    width, height = png_size(out)
    assert (width, height) == (1200, round((3 * plot_logs.ROW_HEIGHT_IN + plot_logs.TITLE_HEIGHT_IN) * 100))


def test_summary_table_has_a_row_per_stage(logs, capsys):
    assert plot_logs.main([str(logs["fp32"]), str(logs["glue"]), "--summary"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| stage") and len(out) == 2 + 3
    phase1, phase2 = training(logs["fp32"])
    assert "phase 1" in out[2] and f"{phase1[0]['data']['average_loss']:.3f} -> " \
        f"{phase1[-1]['data']['average_loss']:.3f}" in out[2]
    assert "phase 2" in out[3] and "steps 5-7" in out[3]
    accuracy = next(r["data"]["exact_match"] for r in records(logs["glue"]) if r.get("step") == [])
    assert out[4].startswith("| GLUE SST-2 ") and f"accuracy {100 * accuracy:.1f}%" in out[4]
    assert "14 steps, 2 epochs" in out[4]


@pytest.mark.parametrize("content, message", [
    ("", "empty log"),
    ("\n\n", "empty log"),
    ('DLLL {"type": "LOG", "step": [0, 1], "data": {"average_loss": 1.0}}\nnot a record\nDLLL {}\n',
     "line 2: not a dllogger record"),
    ('DLLL {"type": "LOG", "step": [0, 1], "data": {"average_loss": 1.0}}\nDLLL {"type": "LOG", "step": [0, 2\n'
     'DLLL {"type": "LOG", "step": [0, 3], "data": {"average_loss": 1.0}}\n', "line 2: not a dllogger record"),
    ('DLLL {"type": "LOG", "step": "PARAMETER", "data": {"SEED": 1}}\n', "no training records"),
])
def test_malformed_or_empty_log_is_an_error_naming_the_file(tmp_path, capsys, content, message):
    log = tmp_path / "bad.json"
    log.write_text(content)
    assert plot_logs.main([str(log), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"plot_logs.py: error: {log}") and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_missing_file_folder_without_logs_and_label_count(tmp_path, capsys):
    assert plot_logs.main([str(tmp_path / "nope.json")]) == 1
    assert f"{tmp_path / 'nope.json'}: no such file" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    assert plot_logs.main([str(tmp_path)]) == 1
    assert f"{tmp_path}: no dllogger logs found" in capsys.readouterr().err
    log = tmp_path / "a.json"
    log.write_text('DLLL {"type": "LOG", "step": [0, 1], "data": {"average_loss": 1.0}}\n')
    assert plot_logs.main([str(log), "--label", "x", "--label", "y"]) == 1
    assert "2 --label given for 1 logs" in capsys.readouterr().err


def test_killed_run_last_partial_line_is_ignored(tmp_path, capsys):
    log = tmp_path / "run" / "dllogger.json"
    log.parent.mkdir()
    log.write_text('DLLL {"type": "LOG", "step": [0, 1], "data": {"average_loss": 2.0}}\n'
                   'DLLL {"type": "LOG", "step": [0, 2], "data": {"average_lo')
    fig = plot_logs.make_figure(plot_logs.read_logs([str(log)]))
    assert list(line(fig, "run|average_loss").get_ydata()) == [2.0]
    assert "line 2: incomplete last record ignored" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------------------------


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_scalars(logs):
    pytest.importorskip("tensorboard")
    tb = scalars(logs["tb"])
    phase1, phase2 = training(logs["fp32"])
    # phase 2 continues at --phase1_end_step + step, as its checkpoints are numbered
    for key, tag in (("average_loss", "loss/average_loss"), ("learning_rate", "optimizer/learning_rate"),
                     ("sequences_per_second", "throughput/sequences_per_second"),
                     ("peak_memory_gib", "memory/peak_memory_gib"), ("grad_norm", "optimizer/grad_norm")):
        expected = [(r["step"][1], r["data"][key]) for r in phase1] + [(4 + r["step"][1], r["data"][key])
                                                                        for r in phase2]
        assert [s for s, _ in tb[tag]] == [s for s, _ in expected], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert "throughput/mfu" not in tb  # "n/a" on a CPU is not a scalar
    final = [r["data"] for r in records(logs["fp32"]) if r.get("step") == []]
    assert tb["time/e2e_train_time"] == [(4, pytest.approx(final[0]["e2e_train_time"])),
                                         (7, pytest.approx(final[1]["e2e_train_time"]))]

    glue = scalars(logs["tb_glue"])
    (train,) = training(logs["glue"])
    assert [s for s, _ in glue["loss/average_loss"]] == list(range(1, 15))
    assert [v for _, v in glue["loss/average_loss"]] == pytest.approx([r["data"]["average_loss"] for r in train])
    summary = next(r["data"] for r in records(logs["glue"]) if r.get("step") == [])
    assert glue["eval/exact_match"] == [(14, pytest.approx(summary["exact_match"]))]
    assert glue["loss/eval_loss"] == [(14, pytest.approx(summary["eval:loss"]))]


def test_run_squad_tensorboard(tiny_encoder, tmp_path):
    pytest.importorskip("tensorboard")
    init, config = tiny_encoder
    out = tmp_path / "out"
    assert run_squad.main(["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(init),
                           "--vocab_file", str(VOCAB), "--config_file", str(config), "--do_lower_case",
                           "--max_seq_length", "128", "--doc_stride", "64", "--max_query_length", "32",
                           "--train_batch_size", "8", "--train_file", str(SQUAD_V2), "--version_2_with_negative",
                           "--do_train", "--max_steps", "3", "--log_freq", "1", "--skip_cache", "--skip_checkpoint",
                           "--json-summary", str(out / "log.json"), "--disable-progress-bar",
                           "--tensorboard", str(tmp_path / "tb")]) == 0
    tb = scalars(tmp_path / "tb")
    (train,) = training(out / "log.json")
    assert [v for _, v in tb["loss/average_loss"]] == pytest.approx([r["data"]["average_loss"] for r in train])
    assert [s for s, _ in tb["loss/average_loss"]] == [1, 2, 3]


def test_missing_tensorboard_is_one_clear_error(tiny_encoder, tmp_path, monkeypatch, capsys):
    init, config = tiny_encoder
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    argv = ["--data_dir", str(SST2), "--bert_model", "tiny", "--task_name", "sst-2", "--output_dir",
            str(tmp_path / "out"), "--init_checkpoint", str(init), "--vocab_file", str(VOCAB), "--config_file",
            str(config), "--do_lower_case", "--max_seq_length", "64", "--skip_features_cache", "--do_train",
            "--max_steps", "1", "--disable_progress_bar", "--tensorboard", str(tmp_path / "tb")]
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err
    assert "run_glue.py: error: --tensorboard" in err and "pip install tensorboard" in err
    assert "Traceback" not in err and not (tmp_path / "tb").exists()


def test_tensorboard_tags_are_namespaced():
    import utils

    assert utils.tensorboard_tag("average_loss") == "loss/average_loss"
    assert utils.tensorboard_tag("sequences_per_second") == "throughput/sequences_per_second"
    assert utils.tensorboard_tag("peak_memory_gib") == "memory/peak_memory_gib"
    assert utils.tensorboard_tag("learning_rate") == "optimizer/learning_rate"
    assert utils.tensorboard_tag("infer:latency(ms):99%") == "time/infer_latency_ms_99"
    assert utils.tensorboard_tag("F1") == "eval/F1"


def test_tensorboard_backend_takes_nvidia_dllogger_datetimes(tmp_path):
    """NVIDIA's dllogger.Logger passes a datetime as the timestamp; this module's Logger passes seconds."""
    import datetime

    import utils

    pytest.importorskip("tensorboard")
    backend = utils.TensorBoardBackend(utils.Verbosity.VERBOSE, tmp_path, step_offset=10)
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    backend.log(when, 0.0, (0, 1), {"average_loss": 2.5, "mfu": "n/a", "skipped_steps": 0})
    backend.log(when.timestamp() + 1, 1.0, (), {"F1": 50.0})
    backend.log(when.timestamp() + 2, 2.0, "PARAMETER", {"SEED": 1})
    backend.close()
    assert scalars(tmp_path) == {"loss/average_loss": [(11, 2.5)], "optimizer/skipped_steps": [(11, 0.0)],
                                 "eval/F1": [(11, 50.0)]}


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/plot_results.py
# ------------------------------------------------------------------------------------------------------------------


def test_benchmark_ratios_are_plotted_from_the_results(tmp_path):
    results = REPO / "benchmarks" / "results"
    workloads = plot_results.ratios(results)
    pretrain = json.loads((results / "pretrain_bs32.json").read_text())["ratios"]
    squad = json.loads((results / "squad.json").read_text())
    fig = plot_results.make_figure(workloads)
    bars = {ax.get_title(): {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
            for ax in fig.axes}
    pre = next(v for k, v in bars.items() if k.startswith("Pre-training"))
    assert pre["base bf16, batch 32"] == pytest.approx(pretrain["base/bf16"])
    sq = next(v for k, v in bars.items() if k.startswith("SQuAD"))
    assert sq["vs transformers, padded to 384"] == pytest.approx(squad["speedup_vs_hf_padded"])
    assert all(math.isfinite(v) and v > 0 for v in pre.values())
    loop = json.loads((results / "pretrain_bs32_train_loop.json").read_text())["results"]
    speed = {r["impl"]: r["sequences_per_second"] for r in loop}
    panel = next(v for k, v in bars.items() if k.startswith("Shared training loop"))
    assert panel["base fp32, batch 32, utils.train_loop"] == pytest.approx(speed["ours"] / speed["transformers"])
    assert panel["base fp32, batch 32, bare forward/backward/step"] == pytest.approx(
        speed["ours-bare"] / speed["transformers"])
    accuracy = json.loads((results / "squad_accuracy.json").read_text())
    panel = next(v for k, v in bars.items() if k.startswith("SQuAD v2.0 fine-tuning"))
    assert panel["F1"] == pytest.approx(accuracy["ours"]["f1"]["mean"] / accuracy["transformers"]["f1"]["mean"])
    assert panel["peak RSS (transformers / ours)"] == pytest.approx(
        accuracy["transformers"]["peak_rss_gib"]["mean"] / accuracy["ours"]["peak_rss_gib"]["mean"])
    out = tmp_path / "ratios.png"
    assert plot_results.main(["--results", str(results), "-o", str(out)]) == 0
    assert png_size(out) == plot_results.figure_size(workloads)


# ------------------------------------------------------------------------------------------------------------------
# scripts/cpu_demo.sh's arguments (the demo itself runs for minutes: not here)
# ------------------------------------------------------------------------------------------------------------------


def test_cpu_demo_help_and_unknown_argument(tmp_path):
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "RESULTS_DIR": str(tmp_path / "demo")}
    done = subprocess.run(["bash", "scripts/cpu_demo.sh", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0 and "--pretrained" in done.stdout and "plumbing check" in done.stdout
    done = subprocess.run(["bash", "scripts/cpu_demo.sh", "--pretrianed"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 1 and "unknown argument '--pretrianed'" in done.stderr
    assert not (tmp_path / "demo").exists()  # nothing was started or deleted
