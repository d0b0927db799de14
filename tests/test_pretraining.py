"""End-to-end tests of run_pretraining.py on the bundled corpus: learning, resume, preemption, data parallelism,
bad input, and the two-phase shell wrapper."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import run_pretraining
from data.pretraining_dataset import get_pretraining_data_loader
from file_utils import load_checkpoint
from modeling import BertConfig, BertForPreTraining

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "sample" / "source" / "en"
VOCAB = REPO / "vocab" / "vocab"
TINY = REPO / "bert_configs" / "tiny.json"


@pytest.fixture(scope="module")
def shards(pretraining_shards):
    return pretraining_shards


def _args(input_dir: Path, out: Path, *extra: str, steps: int = 6, batch: int = 8) -> list[str]:
    return ["--input_dir", str(input_dir), "--config_file", str(TINY), "--vocab_file", str(VOCAB),
            "--output_dir", str(out), "--do_train", "--train_batch_size", str(batch), "--max_steps", str(steps),
            "--learning_rate", "5e-3", "--warmup_proportion", "0.1", "--max_seq_length", "64",
            "--max_predictions_per_seq", "10", "--num_workers", "0", "--log_freq", "1",
            "--json-summary", str(out / "dllogger.json"), "--disable_progress_bar", *extra]


def _losses(json_path: Path) -> dict[int, float]:
    records = [json.loads(line[5:]) for line in json_path.read_text().splitlines()]
    return {r["step"][1]: r["data"]["average_loss"] for r in records
            if r["type"] == "LOG" and isinstance(r["step"], list) and len(r["step"]) == 2}


def test_tiny_bert_learns_masked_tokens(shards, tmp_path):
    out = tmp_path / "run"
    steps = 300
    assert run_pretraining.main(_args(shards["train"], out, "--num_steps_per_checkpoint", "1000", "--log_freq",
                                      "25", "--learning_rate", "1e-2", steps=steps, batch=32)) == 0
    losses = _losses(out / "dllogger.json")
    assert losses[steps] < losses[25] - 2.0, losses  # MLM + NSP loss falls clearly (~10.4 at the start)

    model = BertForPreTraining(BertConfig.from_json_file(TINY))
    model.load_state_dict(load_checkpoint(out / f"ckpt_{steps}.pt")["model"])
    model.eval()
    train_labels = Counter()
    for batch in get_pretraining_data_loader(shards["train"], vocab_file=VOCAB, batch_size=64, seed=7):
        train_labels.update(batch["labels"][batch["labels"] != -1].tolist())
    most_frequent = train_labels.most_common(1)[0][0]
    correct = baseline = total = 0
    with torch.no_grad():
        for batch in get_pretraining_data_loader(shards["held"], vocab_file=VOCAB, batch_size=64, seed=7):
            scores, _ = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                              masked_lm_labels=batch["labels"])
            labels = batch["labels"][batch["labels"] != -1]
            correct += int((scores.argmax(-1) == labels).sum())
            baseline += int((labels == most_frequent).sum())
            total += labels.numel()
    accuracy, base_accuracy = correct / total, baseline / total
    assert total > 500
    print(f"held-out MLM accuracy {accuracy:.3f}, most-frequent-token baseline {base_accuracy:.3f}")
    assert accuracy > base_accuracy + 0.03, (accuracy, base_accuracy)


def test_interrupted_and_resumed_run_equals_uninterrupted(shards, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("--num_steps_per_checkpoint", "2")
    assert run_pretraining.main(_args(shards["train"], full, *common)) == 0
    assert run_pretraining.main(_args(shards["train"], split, *common, "--steps_this_run", "3")) == 0
    first = _losses(split / "dllogger.json")
    assert sorted(first) == [1, 2, 3]
    stale, other = split / ".ckpt_4.pt.0123abcd.tmp", split / ".notes.txt.0123abcd.tmp"  # as a kill -9 leaves
    stale.write_bytes(b"half a checkpoint")
    other.write_bytes(b"not ours")
    assert run_pretraining.main(_args(shards["train"], split, *common, "--resume_from_checkpoint")) == 0
    assert not stale.exists() and other.exists()
    resumed = {**first, **_losses(split / "dllogger.json")}
    assert resumed == _losses(full / "dllogger.json")  # identical losses, step by step
    a, b = load_checkpoint(full / "ckpt_6.pt"), load_checkpoint(split / "ckpt_6.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key  # bitwise on CPU
    assert a["data_loader"] == b["data_loader"] and a["train_state"] == b["train_state"]
    assert [p.name for p in sorted(full.glob("ckpt_*.pt"))] == ["ckpt_2.pt", "ckpt_4.pt", "ckpt_6.pt"]


def test_phase2_starts_from_phase1_and_numbers_after_it(shards, tmp_path):
    out = tmp_path / "run"
    assert run_pretraining.main(_args(shards["train"], out, steps=4)) == 0
    assert run_pretraining.main(_args(shards["train"], out, "--phase2", "--resume_from_checkpoint",
                                      "--phase1_end_step", "4", "--learning_rate", "1e-3", steps=2)) == 0
    phase1, phase2 = load_checkpoint(out / "ckpt_4.pt"), load_checkpoint(out / "ckpt_6.pt")
    assert phase2["phase"] == 2 and phase2["train_state"]["step"] == 2
    assert phase2["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3)
    changed = [k for k in phase1["model"] if not torch.equal(phase1["model"][k], phase2["model"][k])]
    assert changed  # phase 2 trained on from phase 1's weights
    # Restarting phase 2 in the same folder resumes phase 2 (its own checkpoint), not phase 1 again.
    assert run_pretraining.main(_args(shards["train"], out, "--phase2", "--resume_from_checkpoint",
                                      "--phase1_end_step", "4", "--learning_rate", "1e-3", steps=3)) == 0
    assert load_checkpoint(out / "ckpt_7.pt")["train_state"]["step"] == 3


def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "run_pretraining.py",
                             *_args(shards["train"], out, "--num_steps_per_checkpoint", "100000", steps=100000)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "Training Iteration: 2 " in line:
            break
        assert time.time() < deadline, "training did not start"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    saved = list(out.glob("ckpt_*.pt"))
    assert len(saved) == 1 and "preempted_at_step" in rest
    checkpoint = load_checkpoint(saved[0])
    assert checkpoint["train_state"]["step"] == int(saved[0].stem.split("_")[1]) >= 2


def _worker(tmp_path: Path, name: str, nproc: int, accumulation: int, global_batch: int = 8) -> dict:
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "tests/ddp_pretrain_worker.py"] if nproc > 1 else [sys.executable, "tests/ddp_pretrain_worker.py"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for _ in range(2):  # one retry: a torchrun rendezvous can fail to start on a loaded 2-core machine
        run = subprocess.run([*cmd, "--out", str(out), "--accumulation", str(accumulation), "--global_batch",
                              str(global_batch)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        if run.returncode == 0:
            break
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    single = _worker(tmp_path, "single", 1, 1)
    ddp = _worker(tmp_path, "ddp", 2, 1)
    accumulated = _worker(tmp_path, "accum", 1, 4)
    initial = BertForPreTraining(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64,
                                            max_position_embeddings=32))
    assert any(not torch.equal(single[k], v) for k, v in initial.state_dict().items() if k in single)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(accumulated[key], single[key], rtol=0, atol=1e-5, msg=key)


def _error(capsys, argv: list[str]) -> str:
    assert run_pretraining.main(argv) == 1
    return capsys.readouterr().err


def test_bad_input_fails_before_training(shards, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_5.pt").write_bytes(b"x")
    assert "--resume_from_checkpoint" in _error(capsys, _args(shards["train"], out))
    fresh = tmp_path / "fresh"
    assert "--train_batch_size 10 is not divisible by --gradient_accumulation_steps 4" in _error(
        capsys, _args(shards["train"], fresh, "--gradient_accumulation_steps", "4", batch=10))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _error(capsys, _args(empty, fresh))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**json.loads(TINY.read_text()), "vocab_size": 1000}))
    message = _error(capsys, [*_args(shards["train"], fresh), "--config_file", str(small)])
    assert "vocab_size 1000" in message and "30522" in message
    assert not fresh.exists() or not list(fresh.glob("ckpt_*"))


def test_two_phase_shell_demo(tmp_path):
    env = {**os.environ, "RESULTS_DIR": str(tmp_path / "results")}
    args = subprocess.run(["bash", "-c", "source scripts/configs/pretrain_config.sh && cpu_demo"], cwd=REPO,
                          env=env, capture_output=True, text=True, check=True).stdout.split()
    assert len(args) == 32
    args[5], args[18] = "20", "4"  # fewer steps than the interactive demo; the same path otherwise
    run = subprocess.run(["bash", "scripts/run_pretraining.sh", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "finished pretraining" in run.stdout and "finished phase2" in run.stdout
    final = load_checkpoint(tmp_path / "results" / "checkpoints" / "ckpt_24.pt")
    assert final["phase"] == 2 and final["train_state"]["step"] == 4
    assert list((tmp_path / "results").glob("bert_cpu_demo.pyt_bert_pretraining_phase2_*.log"))


def test_compile_smoke(shards, tmp_path):
    """The one torch.compile test (compiling is slow on 2 cores): --compile trains and saves plain weight names."""
    out = tmp_path / "run"
    assert run_pretraining.main(_args(shards["train"], out, "--compile", steps=2)) == 0
    saved = load_checkpoint(out / "ckpt_2.pt")["model"]
    assert set(saved) == set(BertForPreTraining(BertConfig.from_json_file(TINY)).state_dict())


def reference_checkpoint(path: Path, step: int, seed: int = 0) -> dict:
    """A checkpoint as the reference's run_pretraining.py writes it, built from the documented layout: model,
    optimizer of apex FusedLAMBAMP (tensor lr and int32 step per group; exp_avg/exp_avg_sq per parameter, groups
    split by the no-decay names), grad_scaler and epoch."""
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_json_file(TINY))
    names = [name for name, _ in model.named_parameters()]
    no_decay = ("bias", "gamma", "beta", "LayerNorm")
    groups = [[i for i, n in enumerate(names) if not any(k in n for k in no_decay)],
              [i for i, n in enumerate(names) if any(k in n for k in no_decay)]]
    params = dict(model.named_parameters())
    state = {i: {"exp_avg": torch.randn_like(params[names[i]]) * 1e-3,
                 "exp_avg_sq": torch.rand_like(params[names[i]]) * 1e-6} for i in range(len(names))}
    optimizer = {"state": state, "param_groups": [
        {"params": ids, "lr": torch.tensor(4e-3), "step": torch.tensor(step, dtype=torch.int32),
         "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": wd, "grad_averaging": True,
         "max_grad_norm": 1.0} for ids, wd in zip(groups, (0.01, 0.0))]}
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer,
                  "grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 0}, "epoch": 3}
    torch.save(checkpoint, path)
    return checkpoint


def test_phase2_continues_a_reference_phase1_checkpoint(shards, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    saved = reference_checkpoint(out / "ckpt_7038.pt", step=7038)
    assert run_pretraining.main(_args(shards["train"], out, "--phase2", "--resume_from_checkpoint",
                                      "--phase1_end_step", "7038", steps=2)) == 0
    assert "started from reference checkpoint" in caplog.text
    phase2 = load_checkpoint(out / "ckpt_7040.pt")
    assert phase2["phase"] == 2 and phase2["train_state"]["step"] == 2
    first = phase2["optimizer"]["state"][0]
    assert first["step"].item() == 2  # the step restarted with the phase; the moments carried over (not zero-init)
    assert not torch.allclose(first["exp_avg"], torch.zeros_like(first["exp_avg"]))
    assert (out / "ckpt_7038.pt").exists() and torch.equal(
        load_checkpoint(out / "ckpt_7038.pt")["model"]["cls.predictions.bias"], saved["model"]["cls.predictions.bias"])


def test_same_phase_resume_of_a_reference_checkpoint_keeps_step_and_schedule(shards, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    reference_checkpoint(out / "ckpt_4.pt", step=4)
    assert run_pretraining.main(_args(shards["train"], out, "--resume_from_checkpoint", steps=6)) == 0
    assert "continued reference checkpoint" in caplog.text and "step 4" in caplog.text
    final = load_checkpoint(out / "ckpt_6.pt")
    assert final["train_state"]["step"] == 6 and final["scheduler"]["last_epoch"] == 6
    assert final["optimizer"]["state"][0]["step"].item() == 6
    assert final["grad_scaler"] == {}  # fp32 here: the scaler is off and its saved fp16 state is not applied


def test_export_to_reference_layout_round_trips_bit_for_bit(shards, tmp_path):
    from optimization import lamb_state_from_reference
    from scripts import convert_checkpoint

    out = tmp_path / "run"
    assert run_pretraining.main(_args(shards["train"], out, steps=2)) == 0
    ours = load_checkpoint(out / "ckpt_2.pt")
    assert convert_checkpoint.main([str(out / "ckpt_2.pt"), str(tmp_path / "ref" / "ckpt_2.pt")]) == 0
    exported = torch.load(tmp_path / "ref" / "ckpt_2.pt", weights_only=True)
    assert set(exported) == {"model", "optimizer", "grad_scaler", "epoch"}
    assert json.loads((tmp_path / "ref" / "bert_config.json").read_text())["hidden_act"] == "gelu"
    for group in exported["optimizer"]["param_groups"]:  # what the reference's --phase2 branch does to them
        assert group["step"].dtype == torch.int32 and int(group["step"]) == 2
        group["step"].zero_()
        group["lr"].fill_(4e-3)
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in exported["optimizer"]["state"].values())
    back, step = lamb_state_from_reference(torch.load(tmp_path / "ref" / "ckpt_2.pt", weights_only=True)["optimizer"])
    assert step == 2
    for index, state in ours["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(back["state"][index][key], state[key]), (index, key)
    for key, tensor in ours["model"].items():
        assert torch.equal(exported["model"][key], tensor)
    # and run_pretraining.py takes the exported file as a reference phase-1 checkpoint
    phase2 = tmp_path / "phase2"
    phase2.mkdir()
    (phase2 / "ckpt_2.pt").write_bytes((tmp_path / "ref" / "ckpt_2.pt").read_bytes())
    assert run_pretraining.main(_args(shards["train"], phase2, "--phase2", "--resume_from_checkpoint",
                                      "--phase1_end_step", "2", steps=1)) == 0


def test_reference_flags_take_effect(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretraining.main(_args(shards["train"], out, "--profile", "--profile-start", "1", "--log_freq", "2",
                                      "--num_train_epochs", "0.05", steps=50)) == 0
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    assert trace["traceEvents"]
    logged = sorted(_losses(out / "dllogger.json"))
    final = load_checkpoint(max(out.glob("ckpt_*.pt"), key=lambda p: int(p.stem.split("_")[1])))
    per_epoch = len(get_pretraining_data_loader(shards["train"], vocab_file=VOCAB, batch_size=8, seed=42))
    assert final["train_state"]["step"] == math.ceil(0.05 * per_epoch) < 50  # stopped after 5% of a pass
    assert all(step % 2 == 0 for step in logged)
    assert run_pretraining.main(_args(shards["train"], tmp_path / "cg", "--cuda_graphs")) == 1
    assert "--cuda_graphs needs a CUDA device" in capsys.readouterr().err
    assert run_pretraining.main(_args(shards["train"], tmp_path / "jit", "--disable_jit_fusions", "--compile")) == 1
    assert "--disable_jit_fusions" in capsys.readouterr().err
