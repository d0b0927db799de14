"""Fault tests: the recipe broken as users break it (kill -9 mid-save, SIGTERM, a full disk, a read-only data
folder, bad configs and flags, damaged checkpoints, a killed rank under torchrun). Nothing may be lost, and every
failure is one line that names the file or flag at fault."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

import run_glue
import run_pretraining
import run_squad
import utils
from file_utils import load_checkpoint
from modeling import BertConfig, BertForPreTraining, BertForQuestionAnswering, BertModel

VOCAB = REPO / "vocab" / "vocab"
TINY = REPO / "bert_configs" / "tiny.json"
SQUAD_V2 = REPO / "data" / "sample" / "squad" / "v2.0" / "dev-v2.0.json"
SST2 = REPO / "data" / "sample" / "glue" / "SST-2"


def pretrain_args(input_dir: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["--input_dir", str(input_dir), "--config_file", str(TINY), "--vocab_file", str(VOCAB),
            "--output_dir", str(out), "--do_train", "--train_batch_size", "8", "--max_steps", str(steps),
            "--learning_rate", "5e-3", "--warmup_proportion", "0.1", "--max_seq_length", "64",
            "--max_predictions_per_seq", "10", "--num_workers", "0", "--log_freq", "1",
            "--json-summary", str(out / "dllogger.json"), "--disable_progress_bar", *extra]


def error_of(main, argv: list[str], capsys) -> str:
    """Run an entry script's main, expect exit status 1 and one line on stderr; return that line."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0], err
    return err[0]


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """A tmpfs (or a read-only bind) at ``target``, for the length of the block; skips when mounting is refused."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or 'not root'}): needs root with CAP_SYS_ADMIN")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: kill -9, SIGTERM, a full disk, damaged files, pruning across phases
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(pretraining_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "1",
                                              steps=6)) == 0
    return out


def test_kill_9_at_random_points_of_checkpoint_writes(pretraining_shards, uninterrupted, tmp_path):
    """Several trials: SIGKILL while checkpoints are written every step, then resume. Every checkpoint left loads,
    the restart clears the temporary files, and the final weights equal an uninterrupted run's."""
    rng = random.Random(0)
    expected = load_checkpoint(uninterrupted / "ckpt_6.pt")["model"]
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        argv = pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "1",
                             "--resume_from_checkpoint", steps=6)
        proc = subprocess.Popen([sys.executable, "run_pretraining.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        for line in proc.stdout:
            if "Training Iteration: 1 " in line:
                break
            assert time.time() < deadline, "training did not start"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait(timeout=60)
        for path in out.glob("ckpt_*.pt"):
            load_checkpoint(path)  # complete, whatever moment the kill hit
        assert run_pretraining.main(argv) == 0
        assert not list(out.glob(".*.tmp")), "a restart removes what the killed save left"
        final = load_checkpoint(out / "ckpt_6.pt")["model"]
        for key, tensor in expected.items():
            assert torch.equal(final[key], tensor), (trial, key)


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(pretraining_shards, uninterrupted, tmp_path,
                                                                   caplog):
    out = tmp_path / "run"
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "2",
                                              "--steps_this_run", "4", steps=6)) == 0
    newest = out / "ckpt_4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short, as a failing disk or a careless rsync leaves
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "2",
                                              "--resume_from_checkpoint", steps=6)) == 0
    assert "skipping ckpt_4.pt" in caplog.text
    final = load_checkpoint(out / "ckpt_6.pt")["model"]
    for key, tensor in load_checkpoint(uninterrupted / "ckpt_6.pt")["model"].items():
        assert torch.equal(final[key], tensor), key


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(pretraining_shards, tmp_path, capsys):
    # One tiny checkpoint (weights and LAMB moments) is ~51 MiB: 80 MiB holds one but not a second beside it.
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=80m", "tmpfs") as out:
        message = error_of(run_pretraining.main, pretrain_args(pretraining_shards["train"], out / "run",
                                                              "--num_steps_per_checkpoint", "1", steps=3), capsys)
        assert "could not write" in message and "ckpt_2.pt" in message and "GiB free" in message
        assert [p.name for p in (out / "run").glob("ckpt_*.pt")] == ["ckpt_1.pt"]
        load_checkpoint(out / "run" / "ckpt_1.pt")
        assert not list((out / "run").glob(".*.tmp"))


def test_phase2_never_prunes_phase1s_checkpoint(pretraining_shards, tmp_path):
    out = tmp_path / "run"
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, steps=2)) == 0
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, "--phase2", "--resume_from_checkpoint",
                                              "--phase1_end_step", "2", "--num_steps_per_checkpoint", "1",
                                              "--keep_checkpoints", "1", steps=3)) == 0
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_2.pt", "ckpt_5.pt"]


def test_phase1_end_step_below_phase1s_last_step_is_refused(pretraining_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, steps=4)) == 0
    message = error_of(run_pretraining.main, pretrain_args(
        pretraining_shards["train"], out, "--phase2", "--resume_from_checkpoint", "--phase1_end_step", "2"), capsys)
    assert "--phase1_end_step 2" in message and "ckpt_4.pt" in message
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_4.pt"]


def test_resume_with_another_config_names_both(pretraining_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, steps=2)) == 0
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**json.loads(TINY.read_text()), "num_hidden_layers": 3}))
    argv = pretrain_args(pretraining_shards["train"], out, "--resume_from_checkpoint")
    argv[argv.index("--config_file") + 1] = str(deeper)
    message = error_of(run_pretraining.main, argv, capsys)
    assert str(TINY) in message and str(deeper) in message and "num_hidden_layers 2 vs 3" in message


def test_sigterm_checkpoints_and_the_requeued_run_finishes(pretraining_shards, uninterrupted, tmp_path):
    out = tmp_path / "run"
    argv = pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "100",
                         "--resume_from_checkpoint", steps=6)
    proc = subprocess.Popen([sys.executable, "run_pretraining.py", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Training Iteration: 2 " in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "preempted_at_step" in rest, rest
    assert run_pretraining.main(argv) == 0
    final = load_checkpoint(out / "ckpt_6.pt")["model"]
    for key, tensor in load_checkpoint(uninterrupted / "ckpt_6.pt")["model"].items():
        assert torch.equal(final[key], tensor), key


def test_non_finite_weights_are_never_saved(tmp_path):
    manager = utils.CheckpointManager(tmp_path)
    manager.save(1, {"model": {"w": torch.ones(2)}})
    with pytest.raises(utils.NonFiniteLossError, match="ckpt_2.pt"):
        manager.save(2, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert [p.name for p in tmp_path.glob("ckpt_*.pt")] == ["ckpt_1.pt"]


def test_elastic_restart_after_a_killed_rank_ends_like_an_undisturbed_run(pretraining_shards, tmp_path):
    """torchrun --max-restarts 1 with 2 ranks; one rank is killed (SIGKILL) after the first checkpoint. The group
    restarts from the last checkpoint and ends with the weights of an undisturbed 2-rank run (each rank gets its
    own RNG state back, and the restarted group does not read the dead group's addresses from the store)."""
    def launch(out: Path, restarts: int) -> subprocess.Popen:
        argv = pretrain_args(pretraining_shards["train"], out, "--num_steps_per_checkpoint", "2",
                             "--resume_from_checkpoint", steps=6)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 f"--max-restarts={restarts}", "run_pretraining.py", *argv], cwd=REPO,
                                env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    calm = launch(tmp_path / "calm", 0)
    calm_out, _ = calm.communicate(timeout=600)
    assert calm.returncode == 0, calm_out[-3000:]
    out = tmp_path / "killed"
    agent = launch(out, 1)
    deadline = time.time() + 300
    while not (out / "ckpt_2.pt").exists():
        assert time.time() < deadline and agent.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = agent.communicate(timeout=600)
    assert agent.returncode == 0, output[-3000:]
    expected = load_checkpoint(tmp_path / "calm" / "ckpt_6.pt")["model"]
    final = load_checkpoint(out / "ckpt_6.pt")["model"]
    for key, tensor in expected.items():
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Bad flags, configs and inputs
# ----------------------------------------------------------------------------------------------------------------


def test_numeric_flags_are_checked(pretraining_shards, tmp_path, capsys):
    shards = pretraining_shards["train"]
    for flag, value, expected in (("--learning_rate", "nan", "--learning_rate must be a finite number > 0"),
                                  ("--learning_rate", "inf", "--learning_rate must be a finite number > 0"),
                                  ("--train_batch_size", "0", "--train_batch_size must be a positive number")):
        argv = pretrain_args(shards, tmp_path / "run")
        argv[argv.index(flag) + 1] = value
        assert expected in error_of(run_pretraining.main, argv, capsys)
    with pytest.raises(SystemExit):  # argparse: a usage message naming the flag, exit status 2
        run_pretraining.parse_arguments(pretrain_args(shards, tmp_path / "run", "--max_steps", "nan"))
    assert "--max_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_rejected_run_leaves_the_previous_log_alone(pretraining_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_pretraining.main(pretrain_args(pretraining_shards["train"], out, steps=2)) == 0
    before = (out / "dllogger.json").read_text()
    error_of(run_pretraining.main, pretrain_args(pretraining_shards["train"], out, "--learning_rate", "-1"), capsys)
    assert (out / "dllogger.json").read_text() == before


def test_config_with_fewer_layers_than_the_checkpoint_is_an_error(tmp_path):
    big = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    BertModel(big).save_pretrained(tmp_path / "big")
    small = BertConfig(**{**big.to_dict(), "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\..*fewer layers"):
        BertForQuestionAnswering.from_pretrained(tmp_path / "big", config=small)


def test_config_vocab_smaller_than_the_checkpoints_is_an_error(tmp_path):
    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37)
    BertForPreTraining(config).save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="more than padding"):
        BertForPreTraining.from_pretrained(tmp_path / "model", config=BertConfig(**{**config.to_dict(),
                                                                                  "vocab_size": 500}))
    padded = BertConfig(**{**config.to_dict(), "vocab_size": 990})  # 992 rows; the checkpoint's last 10 are padding
    assert BertForPreTraining.from_pretrained(tmp_path / "model", config=padded).load_report.vocab_rows == (1000, 992)


def squad_argv(init: Path, config: Path, out: Path, *flags: str) -> list[str]:
    return ["--bert_model", "tiny", "--output_dir", str(out), "--init_checkpoint", str(init), "--vocab_file",
            str(VOCAB), "--config_file", str(config), "--do_lower_case", "--max_seq_length", "128", "--doc_stride",
            "64", "--max_query_length", "32", "--train_batch_size", "8", "--json-summary", str(out / "log.json"),
            "--disable-progress-bar", *flags]


def test_squad_v2_file_without_the_v2_flag_is_refused(tiny_encoder, tmp_path, capsys):
    init, config = tiny_encoder
    trained = tmp_path / "trained"
    assert run_squad.main(squad_argv(init, config, trained, "--do_train", "--train_file", str(SQUAD_V2),
                                     "--version_2_with_negative", "--max_steps", "1", "--skip_cache")) == 0
    message = error_of(run_squad.main, squad_argv(trained, config, tmp_path / "out", "--do_predict", "--do_eval",
                                                  "--predict_file", str(SQUAD_V2)), capsys)
    assert "--version_2_with_negative" in message and str(SQUAD_V2) in message


def test_squad_trains_beside_a_read_only_data_folder(tiny_encoder, tmp_path, caplog):
    init, config = tiny_encoder
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_bytes(SQUAD_V2.read_bytes())
    with mounted(data, "--bind", str(data)):
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(data)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot make a read-only bind mount: {remount.stderr.strip()}")
        assert run_squad.main(squad_argv(init, config, tmp_path / "out", "--do_train", "--train_file",
                                         str(data / "train.json"), "--version_2_with_negative", "--max_steps",
                                         "1")) == 0
    assert "could not write the features cache" in caplog.text


def test_glue_eval_without_a_classifier_is_refused(tiny_encoder, tmp_path, capsys):
    init, config = tiny_encoder
    argv = ["--data_dir", str(SST2), "--bert_model", "tiny", "--task_name", "sst-2", "--output_dir",
            str(tmp_path / "out"), "--init_checkpoint", str(init), "--vocab_file", str(VOCAB), "--config_file",
            str(config), "--do_lower_case", "--do_eval", "--max_seq_length", "64", "--skip_features_cache",
            "--disable_progress_bar"]
    message = error_of(run_glue.main, argv, capsys)
    assert "no classifier" in message and "--do_train" in message
    assert not (tmp_path / "out" / "results.txt").exists()
