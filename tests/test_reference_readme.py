"""Every command line of the reference README's "Quick Start Guide" and "Advanced" sections (and the two example
calls of its "Benchmarking" section), typed as a reference user types them, with only GPUs, data and checkpoints
substituted.

The table COMMANDS says, for each line, its README section and how it is checked:

* dry: run as typed with PYTHON=echo (tests/test_configs.py's dry-run environment) and a fake nvidia-smi listing
  the reference's 8 GPUs; the wrapper must exit 0, and every Python command it prints must be accepted by that
  script's own argument parser.
* flags: the flags must be accepted by the script's parser (nothing is run).
* run: run end to end in-process with tiny substitutes (a random tiny model, the bundled vocabulary).
* stale: the README's argument order predates the reference's own wrapper (the wrappers here keep the wrapper's
  order), so the line misplaces its values; the wrapper must refuse it, naming the misplaced value.
* skip: not checked here, with the reason.

Placeholders (<...>, /workspace/bert/...) become files under a temporary folder.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_configs import echo_env, run_wrapper

SECTION_QS = "Quick Start Guide"
SECTION_PARAMS = "Advanced / Parameters"
SECTION_CLI = "Advanced / Command-line options"
SECTION_TRAIN = "Advanced / Training process"
SECTION_INFER = "Advanced / Inference process"
SECTION_BENCH = "Performance / Benchmarking"

PRETRAIN_FLAGS = (  # "The complete list of the available parameters for the run_pretraining.py script"
    "--input_dir {tmp}/in --config_file {config} --bert_model bert-large-uncased --output_dir {tmp}/out "
    "--init_checkpoint {ckpt} --max_seq_length 128 --max_predictions_per_seq 20 --train_batch_size 64 "
    "--learning_rate 6e-3 --max_steps 7038 --warmup_proportion 0.2843 --seed 42 --gradient_accumulation_steps 128 "
    "--allreduce_post_accumulation --allreduce_post_accumulation_fp16 --amp --fp16 --loss_scale 0 --log_freq 1 "
    "--resume_from_checkpoint --num_steps_per_checkpoint 200 --phase2 --phase1_end_step 7038"
    " --vocab_file {vocab}")  # required by the reference's script too, though the list leaves it out
SQUAD_FLAGS = (  # "The main script specific parameters" of run_squad.py
    "--bert_model bert-large-uncased --train_file train-v1.1.json --predict_file dev-v1.1.json "
    "--max_seq_length 384 --doc_stride 128 --max_query_length 64 --n_best_size 20 --max_answer_length 30 "
    "--verbose_logging --do_lower_case --version_2_with_negative --null_score_diff_threshold 0.0"
    " --output_dir {tmp}/SQuAD --init_checkpoint {ckpt} --vocab_file {vocab} --config_file {config}")  # required
SLURM = "skip: run on a real one-node SLURM, and as dry runs of every configurations.yml job, by tests/test_slurm.py"
EDIT = "skip: edits a default inside the script; the same values are passed positionally in the lines below"

COMMANDS: list[tuple[str, str, str]] = [
    (SECTION_QS, "git clone https://github.com/NVIDIA/DeepLearningExamples.git",
     "skip: fetches the reference; this checkout takes its place"),
    (SECTION_QS, "cd DeepLearningExamples/PyTorch/LanguageModeling/BERT",
     "skip: the reference's folder; tests run in this repository's root"),
    (SECTION_QS, "bash scripts/docker/build.sh", "docker build --network=host --rm --pull --no-cache -t bert ."),
    (SECTION_QS, "bash scripts/docker/launch.sh", "docker run --rm --gpus"),
    (SECTION_QS, "data/create_datasets_from_start.sh", "dry"),  # /workspace/bert/ is the repository root
    (SECTION_QS, "bash scripts/run_pretraining.sh", "dry"),
    (SECTION_QS, "bash scripts/run_squad.sh {ckpt}", "dry"),
    (SECTION_QS, "bash scripts/run_glue.sh {ckpt}", "dry"),
    (SECTION_QS, 'mode=${11:-"eval"}', EDIT),
    (SECTION_QS, 'mode=${11:-"prediction"}', EDIT),
    (SECTION_QS, "bash scripts/run_squad.sh {ckpt} 2.0 4 3e-5 0.1 fp16 8 1 {squad} {vocab} {tmp}/SQuAD eval", "dry"),
    (SECTION_QS, "bash scripts/run_squad.sh {ckpt} 2.0 4 3e-5 0.1 fp16 8 1 {squad} {vocab} {tmp}/SQuAD prediction",
     "dry"),
    (SECTION_QS, "bash scripts/run_glue.sh {ckpt} {glue} {vocab} {config} {tmp}/MRPC mrpc 8 16 1 2.4e-5 0.1 3 -1.0 "
     "fp16 2 eval", "dry"),
    (SECTION_QS, "bash scripts/run_glue.sh {ckpt} {glue} {vocab} {config} {tmp}/MRPC mrpc 8 16 1 2.4e-5 0.1 3 -1.0 "
     "fp16 2 prediction", "dry"),
    (SECTION_QS, "bash scripts/run_squad.sh $(source scripts/configs/squad_config.sh && dgxa100-80g_8gpu_fp16)",
     "dry"),
    (SECTION_QS, "bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && mrpc_dgxa100-80g_8gpu_fp16)",
     "dry"),
    (SECTION_QS, "bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && sst-2_dgxa100-80g_8gpu_fp16)",
     "dry"),
    (SECTION_QS, "bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && "
     "dgxa100-80g_8gpu_fp16)", "dry"),
    (SECTION_PARAMS, "python run_pretraining.py " + PRETRAIN_FLAGS, "flags"),
    (SECTION_PARAMS, "python run_squad.py " + SQUAD_FLAGS, "flags"),
    (SECTION_PARAMS, "BATCHSIZE=2048 LR=6e-3 GRADIENT_STEPS=128 PHASE=1 sbatch -N4 --ntasks-per-node=8 run.sub",
     SLURM),
    (SECTION_PARAMS, "BATCHSIZE=1024 LR=4e-3 GRADIENT_STEPS=256 PHASE=2 sbatch -N4 --ntasks-per-node=8 run.sub",
     SLURM),
    (SECTION_CLI, "python run_pretraining.py --help", "run"),
    (SECTION_CLI, "python run_squad.py --help", "run"),
    (SECTION_CLI, "python run_glue.py --help", "run"),
    # The usage line names "bash run_pretraining.sh" and 21 arguments; its first 15 are in the wrapper's order (the
    # 16th, <accumulate_into_fp16>, is not an argument of the reference's wrapper), so they are given, with the
    # phase-1 values the section lists.
    (SECTION_TRAIN, "bash scripts/run_pretraining.sh 64 6e-3 fp16 8 0.2843 7038 200 false true true 128 42 "
     "bert_lamb_pretraining true true", "dry"),
    (SECTION_TRAIN, "bash scripts/run_pretraining.sh", "dry"),
    (SECTION_TRAIN, "bash scripts/run_squad.sh {ckpt} 2.0 4 3e-5 fp16 8 1 {squad} {vocab} {tmp}/SQuAD train "
     "{config}", "stale: unknown precision '8'"),
    (SECTION_TRAIN, "bash scripts/run_glue.sh {ckpt} {glue} {vocab} {config} {tmp}/MRPC mrpc 8 16 1 2.4e-5 0.1 3 "
     "fp16 2 'train eval'", "stale: unknown precision '2'"),
    (SECTION_INFER, "bash scripts/run_squad.sh {ckpt}", "dry"),
    (SECTION_INFER, "bash scripts/run_glue.sh {ckpt}", "dry"),
    (SECTION_INFER, 'python inference.py --bert_model "bert-large-uncased" --init_checkpoint={qa} '
     '--config_file="{qa_config}" --vocab_file={vocab}  --question="What food does Harry like?" '
     '--context="My name is Harry and I grew up in Canada. I love apples."', "run"),
    (SECTION_INFER, "triton/README.md", "file"),
    (SECTION_BENCH, "bash scripts/run_squad.sh /workspace/bert/bert_large_uncased.pt 2.0 4 3e-5 fp16 8 42 {squad} "
     "/workspace/bert/scripts/vocab/vocab {tmp}/SQuAD train /workspace/bert/bert_config.json -1",
     "stale: unknown precision '8'"),
    (SECTION_BENCH, "bash scripts/run_squad.sh /workspace/bert/bert_large_uncased.pt 2.0 4 3e-5 fp16 8 42 {squad} "
     "/workspace/bert/scripts/vocab/vocab {tmp}/SQuAD eval /workspace/bert/bert_config.json -1",
     "stale: unknown precision '8'"),
]

# Entry points the wrappers print, with the module and parser function that must accept their flags.
PARSERS = {"run_pretraining.py": ("run_pretraining", "parse_arguments"),
           "run_squad.py": ("run_squad", "parse_arguments"),
           "run_glue.py": ("run_glue", "parse_arguments"),
           "run_swag.py": ("run_swag", "parse_arguments"),
           "inference.py": ("inference", "parse_arguments"),
           "data.download": ("data.download", "parse_args"),
           "data.extract_wikipedia": ("data.extract_wikipedia", "parse_args"),
           "data.preprocess_pretraining": ("data.preprocess_pretraining", "parse_args")}


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_encoder) -> dict[str, str]:
    """The substitutes for the README's placeholders: a tiny encoder and QA model, the bundled vocab, data folders
    (SQuAD v1.1 names with stand-in files: a dry run reads nothing but their names) and a fake nvidia-smi."""
    from modeling import BertConfig, BertForQuestionAnswering

    tmp = tmp_path_factory.mktemp("readme")
    init, config = tiny_encoder
    torch.manual_seed(0)
    qa = tmp / "qa"  # room for the reference's --max_seq_length 384
    qa_config = BertConfig.from_json_file(config)
    qa_config.max_position_embeddings = 512
    qa_config.to_json_file(tmp / "qa_config.json")
    BertForQuestionAnswering(qa_config).save_pretrained(qa)
    squad = tmp / "prep" / "download" / "squad" / "v1.1"
    squad.mkdir(parents=True)
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (squad / name).write_text('{"version": "1.1", "data": []}')
    glue = tmp / "prep" / "download" / "glue" / "MRPC"
    glue.mkdir(parents=True)
    (tmp / "prep" / "wikipedia").mkdir()
    (tmp / "prep" / "wikipedia" / ".extracted").touch()  # data/create_datasets_from_start.sh goes on to the shards
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA A100-SXM4-80GB (UUID: x-$i)"; done\n')
    fake.chmod(0o755)
    docker = bin_dir / "docker"  # records its arguments: the Quick Start's docker scripts run up to the docker call
    docker.write_text('#!/bin/sh\necho "docker $*" >> "$(dirname "$0")/docker.log"\n')
    docker.chmod(0o755)
    return {"tmp": str(tmp), "ckpt": str(init), "config": str(config), "qa": str(qa),
            "qa_config": str(tmp / "qa_config.json"), "squad": str(squad),
            "glue": str(glue), "vocab": str(REPO / "vocab" / "vocab"), "bin": str(bin_dir)}


def parse_with(entry: str, argv: list[str]) -> object:
    """Parse argv with the entry point's own parser; an unknown or malformed flag fails the test, naming it."""
    module, function = PARSERS[entry]
    parser = getattr(importlib.import_module(module), function)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser(argv)
    except SystemExit as exc:
        pytest.fail(f"{entry} rejects {shlex.join(argv)}:\n{err.getvalue()}")
        raise AssertionError from exc


def printed_commands(stdout: str) -> list[tuple[str, list[str]]]:
    """(entry point, its arguments) of every Python command a PYTHON=echo dry run printed."""
    found = []
    for line in stdout.splitlines():
        words = line.split()
        for i, word in enumerate(words):
            name = Path(word).name
            if name in PARSERS:
                found.append((name, words[i + 1:]))
                break
            if word == "-m" and i + 1 < len(words) and words[i + 1] in PARSERS:
                found.append((words[i + 1], words[i + 2:]))
                break
    return found


def dry_run(command: str, places: dict[str, str]) -> subprocess.CompletedProcess:
    tmp = Path(places["tmp"])
    env = echo_env(tmp)
    env["PATH"] = f"{places['bin']}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("section,command,how", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_reference_readme_command(section, command, how, places, capsys):
    if how.startswith("skip"):
        pytest.skip(f"{section}: {how.removeprefix('skip: ')}")
    command = command.format(**places)
    if how == "file":  # the README points to a document: it must be there and name the scripts it walks through
        text = (REPO / command).read_text(encoding="utf-8")
        assert all(f"{name}.py" in text for name in ("export_model", "run_inference_on_triton",
                                                       "run_performance_on_triton"))
        return
    if how.startswith("docker "):
        log = Path(places["bin"]) / "docker.log"
        log.unlink(missing_ok=True)
        done = dry_run(command, places)
        assert done.returncode == 0, done.stdout + done.stderr
        assert log.read_text().splitlines()[0].startswith(how), log.read_text()
        return
    if how == "dry":
        words = command.split()
        if words[2:3] == ["$(source"] and words[4] == "&&":  # a config function: test_configs' helper
            config, function = Path(words[3]).name, words[5].rstrip(")")
            lines = run_wrapper(Path(words[1]).name, config, function, Path(places["tmp"]))
            stdout = "\n".join(" ".join(line) for line in lines)
        else:
            done = dry_run(command, places)
            assert done.returncode == 0, f"{section}: {command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            stdout = done.stdout
        commands = printed_commands(stdout)
        assert commands, f"{section}: {command} printed no Python command:\n{stdout[-3000:]}"
        for entry, argv in commands:
            parse_with(entry, argv)
    elif how.startswith("stale"):
        done = dry_run(command, places)
        assert done.returncode != 0 and how.removeprefix("stale: ") in done.stderr, done.stdout + done.stderr
        assert not printed_commands(done.stdout)  # refused before any command was assembled
    else:
        words = shlex.split(command)
        assert words[0] == "python"
        entry, argv = words[1], words[2:]
        module = importlib.import_module(PARSERS[entry][0])
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as exit_info:
                module.parse_arguments(argv)
            assert exit_info.value.code == 0
            out = capsys.readouterr().out
            assert out.startswith("usage:") and "--help" in out
            return
        args = parse_with(entry, argv)
        if how == "flags":
            return
        assert entry == "inference.py" and args.bert_model == "bert-large-uncased"
        code = module.main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "question: What food does Harry like?"
        assert lines[2].removeprefix("answer: ") in args.context  # a span of the context (random model)


def test_table_covers_each_section():
    sections = {section for section, _, _ in COMMANDS}
    assert {SECTION_QS, SECTION_PARAMS, SECTION_CLI, SECTION_TRAIN, SECTION_INFER} <= sections
    assert all(how in ("dry", "flags", "run", "file") or how.startswith(("skip: ", "stale: ", "docker "))
               for _, _, how in COMMANDS)
