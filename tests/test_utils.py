"""Tests of the shared run toolkit: ranks, logging format, checkpoints, RNG state and the training loop."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import utils


def test_ranks_without_distributed():
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()
    utils.barrier()  # a no-op, must not hang


def test_ranks_from_slurm_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[07-08]")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert utils._ranks_from_env() == (5, 1, 8)
    import os
    assert os.environ["MASTER_ADDR"] == "node07" and os.environ["MASTER_PORT"] == "29500"


def test_ranks_from_torchrun_env_win_over_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert utils._ranks_from_env() == (2, 0, 4)


def test_batch_arithmetic_error_names_the_numbers():
    assert utils.check_batch_arithmetic(32, 4, 2) == 8
    with pytest.raises(ValueError, match=r"--train_batch_size 30 is not divisible by --gradient_accumulation_steps 4"):
        utils.check_batch_arithmetic(30, 4, 1)


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert utils.resolve_precision(False, False, cpu) == "fp32"
    assert utils.resolve_precision(False, True, cpu) == "bf16"
    with pytest.raises(ValueError, match="--fp16"):
        utils.resolve_precision(True, False, cpu)
    with pytest.raises(ValueError, match="mutually exclusive"):
        utils.resolve_precision(True, True, cpu)
    assert not utils.make_grad_scaler("bf16", cpu).is_enabled()


def test_dllogger_format(tmp_path, capsys):
    path = tmp_path / "sub" / "dllogger.json"
    logger = utils.setup_logger(path, enabled=True)
    logger.metadata("final_loss", {"unit": None, "format": ":.3f"})
    logger.log(step="PARAMETER", data={"SEED": 42})
    logger.log(step=(0, 5), data={"average_loss": torch.tensor(8.5), "final_loss": 1.23456})
    logger.log(step=tuple(), data={"e2e_train_time": 3.0})
    logger.flush()
    lines = path.read_text().splitlines()
    assert all(line.startswith("DLLL {") for line in lines)
    records = [json.loads(line[5:]) for line in lines]
    assert records[0]["type"] == "METADATA" and records[0]["metric"] == "final_loss"
    assert records[1]["step"] == "PARAMETER" and records[1]["data"] == {"SEED": 42}
    assert records[2]["step"] == [0, 5] and records[2]["data"]["average_loss"] == 8.5
    assert records[3]["step"] == []
    for record in records:
        assert list(record)[:4] == ["timestamp", "datetime", "elapsedtime", "type"]
        float(record["timestamp"])
    out = capsys.readouterr().out
    assert "Training Epoch: 0 Training Iteration: 5 average_loss : 8.5" in out
    assert "final_loss : 1.235" in out


def test_logger_on_other_ranks_writes_nothing(tmp_path, capsys):
    logger = utils.setup_logger(tmp_path / "x.json", enabled=False)
    logger.log(step=(0, 1), data={"loss": 1.0})
    logger.flush()
    assert not (tmp_path / "x.json").exists() and capsys.readouterr().out == ""


def test_checkpoint_manager_keeps_newest_and_ignores_partial(tmp_path):
    manager = utils.CheckpointManager(tmp_path, keep=3)
    (tmp_path / ".ckpt_9.pt.abc.tmp").write_bytes(b"partial")  # what a killed writer leaves
    for step in (10, 20, 30, 40):
        manager.save(step, {"model": {"w": torch.full((2,), float(step))}, "step": step})
    assert [s for s, _ in manager.checkpoints()] == [20, 30, 40]
    assert manager.latest().name == "ckpt_40.pt"
    assert manager.load(manager.latest())["step"] == 40


def test_checkpoint_write_killed_midway_leaves_previous(tmp_path, monkeypatch):
    manager = utils.CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"x": torch.ones(3)})

    class Boom(RuntimeError):
        pass

    def exploding_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise Boom()

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(Boom):
        manager.save(2, {"x": torch.zeros(3)})
    assert [s for s, _ in manager.checkpoints()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt"]


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    utils.set_seed(3)
    state = utils.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.set_seed(99)
    utils.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _toy_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    return model, x, y


def _mse(net, batch):
    return nn.functional.mse_loss(net(batch["x"]), batch["y"])


def _run(model, x, y, micro, accum, steps, clip=1.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = utils.make_grad_scaler("fp32", torch.device("cpu"))
    batches = ({"x": x[i:i + micro], "y": y[i:i + micro]} for _ in range(steps) for i in range(0, len(x), micro))
    return utils.train_loop(model, batches, _mse, optimizer, scheduler, scaler, env=utils.RunEnv(),
                            precision="fp32", gradient_accumulation_steps=accum, max_steps=steps,
                            max_grad_norm=clip, progress=False)


def test_gradient_accumulation_equals_one_big_batch():
    big, x, y = _toy_problem()
    small, _, _ = _toy_problem()
    _run(big, x, y, micro=16, accum=1, steps=5)
    _run(small, x, y, micro=4, accum=4, steps=5)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_train_loop_stops_at_max_steps_and_reports():
    model, x, y = _toy_problem()
    state = utils.TrainState()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = iter([{"x": x, "y": y}] * 100)
    result = utils.train_loop(model, batches, _mse, optimizer, scheduler, utils.make_grad_scaler("fp32", torch.device("cpu")),
                              env=utils.RunEnv(), precision="fp32", gradient_accumulation_steps=2, max_steps=7,
                              state=state, progress=False)
    assert state.step == 7 and result.steps == 7 and state.sequences == 7 * 2 * 16
    assert result.sequences_per_second > 0 and result.final_loss == pytest.approx(_mse(model, {"x": x, "y": y}).item(), rel=0.5)


def test_non_finite_loss_stops_without_touching_weights():
    model, x, y = _toy_problem()
    before = [p.detach().clone() for p in model.parameters()]
    bad = {"x": x, "y": torch.full_like(y, float("nan"))}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(utils.NonFiniteLossError, match="3 consecutive steps"):
        utils.train_loop(model, iter([bad] * 10), _mse, optimizer, scheduler,
                         utils.make_grad_scaler("fp32", torch.device("cpu")), env=utils.RunEnv(), precision="fp32",
                         gradient_accumulation_steps=1, max_steps=10, progress=False, max_consecutive_skips=3)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_on_step_can_stop_the_loop():
    model, x, y = _toy_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    result = utils.train_loop(model, iter([{"x": x, "y": y}] * 10), _mse, optimizer, scheduler,
                              utils.make_grad_scaler("fp32", torch.device("cpu")), env=utils.RunEnv(),
                              precision="fp32", gradient_accumulation_steps=1, max_steps=10, progress=False,
                              on_step=lambda s: s.step == 3)
    assert result.stopped_early and result.steps == 3


def test_bert_flops_formula_matches_hand_count():
    class Cfg:
        hidden_size, intermediate_size, num_hidden_layers, vocab_size, padded_vocab_size = 4, 8, 2, 10, 16

    # per layer weights 4*16 + 2*4*8 = 128 -> 256 for 2 layers; seq 3: 6*256*3 = 4608; attention 12*2*9*4 = 864;
    # MLM head on 1 row: 6*(16 + 64) = 480.
    assert utils.bert_flops_per_sequence(Cfg, 3, masked_tokens=1) == 4608 + 864 + 480
    assert utils.peak_flops(torch.device("cpu"), "bf16") is None


def test_bf16_autocast_trains_on_cpu():
    model, x, y = _toy_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = _mse(model, {"x": x, "y": y}).item()
    seen = []

    def loss_fn(net, batch):
        out = net(batch["x"])
        seen.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch["y"])

    utils.train_loop(model, iter([{"x": x, "y": y}] * 20), loss_fn, optimizer, scheduler,
                     utils.make_grad_scaler("bf16", torch.device("cpu")), env=utils.RunEnv(), precision="bf16",
                     gradient_accumulation_steps=1, max_steps=20, progress=False)
    assert set(seen) == {torch.bfloat16}  # the forward really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert _mse(model, {"x": x, "y": y}).item() < before
