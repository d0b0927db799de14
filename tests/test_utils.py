"""Tests of the shared run toolkit: ranks, logging format, checkpoints, RNG state and the training loop."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import utils
from file_utils import CheckpointError


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
    assert records[0]["type"] == "METADATA" and records[0]["metric"] == "run_start"  # the run separator
    assert records[1]["type"] == "METADATA" and records[1]["metric"] == "final_loss"
    assert records[2]["step"] == "PARAMETER" and records[2]["data"] == {"SEED": 42}
    assert records[3]["step"] == [0, 5] and records[3]["data"]["average_loss"] == 8.5
    assert records[4]["step"] == []
    for record in records:
        assert list(record)[:4] == ["timestamp", "datetime", "elapsedtime", "type"]
        float(record["timestamp"])
    out = capsys.readouterr().out
    assert "Training Epoch: 0 Training Iteration: 5 average_loss : 8.5" in out
    assert "final_loss : 1.235" in out
    # A second run with the same file (a resume, or phase 2) appends after its own separator, flushing each record.
    again = utils.setup_logger(path, enabled=True)
    again.log(step=(0, 6), data={"average_loss": 7.0})
    records = [json.loads(line[5:]) for line in path.read_text().splitlines()]
    assert len(records) == 7 and records[5]["metric"] == "run_start" and records[6]["step"] == [0, 6]


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
    with pytest.raises(CheckpointError, match=r"could not write .*ckpt_2\.pt .*GiB free there\): Boom") as caught:
        manager.save(2, {"x": torch.zeros(3)})
    assert isinstance(caught.value.__cause__, Boom)
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


def _train(model, batches, optimizer, precision="fp32", loss_fn=_mse, state=None, on_step=None, **loop):
    """Run utils.train_loop on CPU with a constant learning rate unless a scheduler factor is given."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, loop.pop("lr_factor", lambda s: 1.0))
    run = utils.Run(utils.RunEnv(), precision, utils.Logger())
    parts = utils.TrainParts(model, loss_fn, optimizer, scheduler, utils.make_grad_scaler(precision, run.device))
    config = utils.LoopConfig(progress=False, **loop)
    return utils.train_loop(run, parts, utils.IteratorBatches(batches), config, state, on_step)


def _run(model, x, y, micro, accum, steps, clip=1.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = ({"x": x[i:i + micro], "y": y[i:i + micro]} for _ in range(steps) for i in range(0, len(x), micro))
    return _train(model, batches, optimizer, gradient_accumulation_steps=accum, max_steps=steps, max_grad_norm=clip,
                  lr_factor=lambda s: 1.0 / (1 + s))


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
    result = _train(model, [{"x": x, "y": y}] * 100, optimizer, state=state, gradient_accumulation_steps=2,
                    max_steps=7)
    assert state.step == 7 and result.steps == 7 and state.sequences == 7 * 2 * 16
    final = _mse(model, {"x": x, "y": y}).item()
    assert result.sequences_per_second > 0 and result.final_loss == pytest.approx(final, rel=0.5)


def test_non_finite_loss_stops_without_touching_weights():
    model, x, y = _toy_problem()
    before = [p.detach().clone() for p in model.parameters()]
    bad = {"x": x, "y": torch.full_like(y, float("nan"))}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(utils.NonFiniteLossError, match="3 consecutive steps"):
        _train(model, [bad] * 10, optimizer, max_steps=10, max_consecutive_skips=3)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_on_step_can_stop_the_loop():
    model, x, y = _toy_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = _train(model, [{"x": x, "y": y}] * 10, optimizer, max_steps=10, on_step=lambda s: s.step == 3)
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
    before = _mse(model, {"x": x, "y": y}).item()
    seen = []

    def loss_fn(net, batch):
        out = net(batch["x"])
        seen.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch["y"])

    _train(model, [{"x": x, "y": y}] * 20, optimizer, precision="bf16", loss_fn=loss_fn, max_steps=20)
    assert set(seen) == {torch.bfloat16}  # the forward really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert _mse(model, {"x": x, "y": y}).item() < before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_gradient_with_finite_loss_is_skipped_under_lamb(precision):
    """LAMB clips by itself, so the loop passes no clip norm; it still measures the norm and skips the NaN step."""
    from optimization import build_optimizer

    model, x, y = _toy_problem()
    poison_at = {2}
    calls = []

    def loss_fn(net, batch):
        calls.append(None)
        loss = nn.functional.mse_loss(net(batch["x"]).float(), batch["y"])
        if len(calls) in poison_at:  # sqrt(0 * w) is 0, but its gradient is 0.5 / sqrt(0) * 0 = NaN
            loss = loss + torch.sqrt(net[0].weight.sum() * 0.0)
        return loss

    optimizer = build_optimizer("lamb", model.parameters(), lr=0.01)
    state = utils.TrainState()
    result = _train(model, [{"x": x, "y": y}] * 10, optimizer, precision=precision, loss_fn=loss_fn, state=state,
                    max_steps=5, max_grad_norm=None)
    assert result.steps == 5 and state.step == 5 and state.skipped_steps == 1 and len(calls) == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(s["exp_avg"]).all() for s in optimizer.state.values())


def test_train_result_mean_loss_is_the_mean_of_step_losses():
    model, x, y = _toy_problem()
    seen = []

    def loss_fn(net, batch):
        loss = _mse(net, batch)
        seen.append(loss.item())
        return loss

    result = _train(model, [{"x": x[:8], "y": y[:8]}, {"x": x[8:], "y": y[8:]}] * 3, torch.optim.SGD(
        model.parameters(), lr=0.05), loss_fn=loss_fn, gradient_accumulation_steps=2, max_steps=3)
    steps = [(seen[i] + seen[i + 1]) / 2 for i in range(0, 6, 2)]
    assert result.mean_loss == pytest.approx(sum(steps) / 3, rel=1e-6)
    assert result.final_loss == pytest.approx(steps[-1], rel=1e-6)


def test_shuffled_batches_deal_each_epoch_once_over_ranks():
    seen = {rank: [] for rank in range(2)}
    for rank in range(2):
        source = utils.ShuffledBatches(7, 2, seed=3, make_batch=lambda rows: {"rows": rows}, rank=rank, world_size=2)
        batches = source.batches()
        for _ in range(2):  # ceil(ceil(7 / 2) / 2) micro-batches per epoch
            seen[rank].extend(next(batches)["rows"].tolist())
        assert source.epoch == 0
        next(batches)
        assert source.epoch == 1
    everything = seen[0] + seen[1]
    assert len(everything) == 8 and set(everything) == set(range(7))  # one example repeated to even the ranks
    assert utils.steps_per_epochs(7, 2, world_size=2, gradient_accumulation_steps=1, epochs=1.0) == 2
    assert utils.steps_per_epochs(100, 4, world_size=1, gradient_accumulation_steps=2, epochs=1.5) == 18


def test_run_job_logs_info_on_rank_zero_and_turns_only_user_errors_into_exit_1(tmp_path, capsys, caplog):
    import argparse
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    args = argparse.Namespace(seed=1, fp16=False, bf16=False, loss_scale=0.0, no_cuda=True, local_rank=-1)
    summary = tmp_path / "dllogger.json"

    def body(run):
        logging.getLogger("optimization").info("optimizer lamb chosen")
        assert run.precision == "fp32" and run.is_main

    with caplog.at_level(logging.NOTSET):
        assert utils.run_job("x.py", args, lambda a, world: None, body, json_summary=summary) == 0
    assert "optimizer lamb chosen" in caplog.text
    assert '"SEED": 1' in summary.read_text()

    def bad(run):
        raise ValueError("--foo is wrong")

    assert utils.run_job("x.py", args, lambda a, world: None, bad, json_summary=None) == 1
    assert capsys.readouterr().err.strip() == "x.py: error: --foo is wrong"

    def bug(run):
        raise KeyError("scheduler")

    with pytest.raises(KeyError):  # a programming error keeps its traceback
        utils.run_job("x.py", args, lambda a, world: None, bug, json_summary=None)


def test_run_job_checks_flags_before_writing_the_log(tmp_path, capsys):
    import argparse

    summary = tmp_path / "dllogger.json"
    summary.write_text("previous run\n")
    args = argparse.Namespace(seed=1, fp16=False, bf16=True, loss_scale=128.0, no_cuda=True)
    assert utils.run_job("x.py", args, lambda a, world: None, lambda run: None, json_summary=summary) == 1
    assert "--loss_scale only applies with --fp16" in capsys.readouterr().err
    assert summary.read_text() == "previous run\n"


def test_cached_features_rebuild_on_key_change_and_survive_an_unwritable_folder(tmp_path, caplog):
    env = utils.RunEnv()
    path = tmp_path / "cache.pt"
    built = []

    def build():
        built.append(None)
        return {"ids": torch.arange(len(built))}

    first = utils.cached_features(path, "k1", build, env)
    assert torch.equal(utils.cached_features(path, "k1", build, env)["ids"], first["ids"]) and len(built) == 1
    utils.cached_features(path, "k2", build, env)
    assert len(built) == 2 and "rebuilding" in caplog.text
    not_a_folder = tmp_path / "file"  # writing under a regular file fails even for root, like a read-only folder
    not_a_folder.write_text("")
    assert torch.equal(utils.cached_features(not_a_folder / "c.pt", "k", build, env)["ids"], torch.arange(3))
    assert "could not write the features cache" in caplog.text


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or utils.platform.machine() != "x86_64",
                    reason="prepack_linears packs on x86 CPUs with a oneDNN build of PyTorch only")
@pytest.mark.parametrize("act", ["gelu", "gelu_erf", "relu"])
def test_prepacked_linears_give_the_same_logits(act, monkeypatch):
    from modeling import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, hidden_act=act, max_position_embeddings=64)
    model = BertForQuestionAnswering(config)
    with pytest.raises(ValueError, match="model.eval"):
        utils.prepack_linears(model)
    model.eval()
    ids = torch.randint(0, 120, (3, 40))
    segments, mask = (ids > 60).long(), torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        before = model(ids, segments, mask)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert utils.prepack_linears(model, rows_hint=120) == linears == 2 * 6 + 2  # q k v o ffn1 ffn2, pooler, QA
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with torch.inference_mode():
        after = model(ids, segments, mask)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    plain = BertForQuestionAnswering(config).eval()
    monkeypatch.setattr(utils.platform, "machine", lambda: "aarch64")
    assert utils.prepack_linears(plain) == 0 and isinstance(plain.qa_outputs, nn.Linear)
    monkeypatch.setattr(utils.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert utils.prepack_linears(plain) == 0 and isinstance(plain.qa_outputs, nn.Linear)
