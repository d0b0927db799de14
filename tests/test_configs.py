"""scripts/configs/*.sh: every function of the reference's config files, under its exact name, echoes the
reference's values, in the order the run_*.sh wrappers read them; the project's own functions still run.

The tables below are the reference's values (NVIDIA DeepLearningExamples PyTorch/LanguageModeling/BERT, its latest
version and the earlier one whose names the project used first), written out here rather than taken from the
scripts. Paths are the only translation: the reference's /workspace/bert is this repository, its vocab is
vocab/vocab, and $BERT_PREP_WORKING_DIR is set to PREP. Each config file is sourced once, in one bash process that
calls every function in its own subshell and prints the outputs between markers.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREP = "/prep"  # $BERT_PREP_WORKING_DIR in these tests
VOCAB = str(REPO / "vocab" / "vocab")
MARK = "@@config-test@@"


def run_all(config: str, calls: list[str], cwd: Path = REPO) -> dict[str, tuple[int, list[str]]]:
    """Source scripts/configs/<config> in bash and run each call (a function with its arguments, or a snippet) in
    a subshell; returns call -> (exit status, words printed). The call "declare -F" lists the functions defined."""
    script = ('source "$1" || exit 99; shift\n'
              f'for call in "$@"; do echo "{MARK} $call"; ( eval "$call" ) 2>&1; echo "{MARK} rc $?"; done')
    env = {k: v for k, v in os.environ.items()
           if k not in ("INIT_CHECKPOINT", "RESULTS_DIR", "SLURM_JOB_NUM_NODES")}
    env["BERT_PREP_WORKING_DIR"] = PREP
    source = f"scripts/configs/{config}" if cwd == REPO else str(REPO / "scripts" / "configs" / config)
    done = subprocess.run(["bash", "-c", script, "bash", source, *calls], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results: dict[str, tuple[int, list[str]]] = {}
    call, words = None, []
    for line in done.stdout.splitlines():
        if line.startswith(f"{MARK} rc "):
            results[call] = (int(line.split()[-1]), words)
        elif line.startswith(f"{MARK} "):
            call, words = line[len(MARK) + 1:], []
        else:
            words.extend(line.split())
    assert list(results) == calls
    return results


def defined_functions(results: dict[str, tuple[int, list[str]]]) -> set[str]:
    """Names from `declare -F` output (declare -f NAME ...)."""
    words = results["declare -F"][1]
    return {words[i + 2] for i, word in enumerate(words) if word == "declare"}


def check_table(results: dict[str, tuple[int, list[str]]], table: dict[str, list[str]]) -> None:
    for function, expected in table.items():
        status, words = results[function]
        assert status == 0, f"{function}: {' '.join(words)}"
        assert words == expected, f"{function}:\n  got      {words}\n  expected {expected}"


# ---------------------------------------------------------------------------------------------------------------
# pretrain_config.sh: the 32 arguments of run_pretraining.sh
# ---------------------------------------------------------------------------------------------------------------


def pretrain(batch, precision, gpus, accum, batch2, accum2, allreduce_fp16, dask_workers) -> list[str]:
    """The reference's 32 echoed values; only batch sizes, precision, GPUs, accumulation, fp16 all-reduce and the
    number of Dask workers differ between its systems."""
    values = [
        batch, "6e-3", precision, gpus, "0.2843", "7038", "200", "false", "true", "true", accum, "42",
        "bert_lamb_pretraining", "true", allreduce_fp16, batch2, "4e-3", "0.128", "1563", accum2,
        f"{PREP}/pretrain/phase1/unbinned/parquet/", f"{PREP}/pretrain/phase2/bin_size_64/parquet/", str(REPO),
        "None", f"{PREP}/wikipedia/source/", dask_workers, "128", "4", "0.9", "64", "static",
        "bert_configs/large.json",
    ]
    return [str(v) for v in values]


PRETRAIN_REFERENCE = {  # the latest reference
    "dgxa100-80g_8gpu_fp16": pretrain(8192, "fp16", 8, 32, 4096, 128, "true", 128),
    "dgxa100-80g_8gpu_tf32": pretrain(8192, "tf32", 8, 64, 4096, 256, "false", 128),
    "dgx1-32g_8gpu_fp16": pretrain(8192, "fp16", 8, 64, 4096, 256, "true", 128),
    "dgx1-32g_8gpu_fp32": pretrain(8192, "fp32", 8, 128, 4096, 512, "false", 128),
}
PRETRAIN_EARLIER = {  # the earlier reference's names
    "dgxa10080g_8gpu_fp16": pretrain(8192, "fp16", 8, 32, 4096, 128, "true", 128),
    "dgxa10080g_8gpu_tf32": pretrain(8192, "tf32", 8, 64, 4096, 256, "false", 128),
    "dgxa100_8gpu_fp16": pretrain(8192, "fp16", 8, 128, 4096, 256, "true", 128),
    "dgxa100_8gpu_tf32": pretrain(8192, "tf32", 8, 128, 4096, 512, "false", 128),
    "dgx2_16gpu_fp16": pretrain(4096, "fp16", 16, 64, 2048, 256, "true", 64),
    "dgx2_16gpu_fp32": pretrain(4096, "fp32", 16, 128, 2048, 512, "false", 64),
    "dgx1_8gpu_fp16": pretrain(8192, "fp16", 8, 512, 4096, 1024, "true", 64),
    "dgx1_8gpu_fp32": pretrain(8192, "fp32", 8, 1024, 4096, 2048, "false", 64),
}
PRETRAIN_PROJECT = ["h100_1gpu_bf16", "cpu_demo"]


def test_pretrain_config_functions():
    calls = [*PRETRAIN_REFERENCE, *PRETRAIN_EARLIER, *PRETRAIN_PROJECT, "declare -F"]
    results = run_all("pretrain_config.sh", calls)
    check_table(results, PRETRAIN_REFERENCE)
    check_table(results, PRETRAIN_EARLIER)
    status, h100 = results["h100_1gpu_bf16"]
    assert status == 0 and len(h100) == 32 and h100[2:4] == ["bf16", "1"] and h100[29] == "64"
    status, demo = results["cpu_demo"]
    assert status == 0 and len(demo) == 32 and demo[2:4] == ["fp32", "0"] and demo[29] == "none"
    assert demo[22] == str(REPO) and demo[20] == str(REPO / "results" / "cpu_demo_data" / "phase1" / "parquet") + "/"
    public = {f for f in defined_functions(results) if not f.startswith("_")}
    assert public == {*PRETRAIN_REFERENCE, *PRETRAIN_EARLIER, *PRETRAIN_PROJECT}


def test_config_paths_do_not_depend_on_the_working_directory(tmp_path):
    results = run_all("pretrain_config.sh", ["dgx1-32g_8gpu_fp16"], cwd=tmp_path)
    assert results["dgx1-32g_8gpu_fp16"] == (0, PRETRAIN_REFERENCE["dgx1-32g_8gpu_fp16"])


# ---------------------------------------------------------------------------------------------------------------
# squad_config.sh: the first 11 arguments of run_squad.sh
# ---------------------------------------------------------------------------------------------------------------


def squad(batch, learning_rate, warmup, precision, gpus) -> list[str]:
    values = [REPO / "checkpoints" / "bert_uncased.pt", "2.0", batch, learning_rate, warmup, precision, gpus, "1",
              f"{PREP}/download/squad/v1.1", VOCAB, REPO / "results" / "SQuAD"]
    return [str(v) for v in values]


SQUAD_REFERENCE = {
    "dgxa100-80g_8gpu_fp16": squad(32, "4.6e-5", "0.2", "fp16", 8),
    "dgxa100-80g_8gpu_tf32": squad(32, "4.6e-5", "0.2", "tf32", 8),
    "dgx1-32g_8gpu_fp16": squad(32, "4.6e-5", "0.2", "fp16", 8),
    "dgx1-32g_8gpu_fp32": squad(16, "4.6e-5", "0.2", "fp32", 8),
}
SQUAD_EARLIER = {  # DGX-1 (16 GB): the reference's 10 / 4 sequences per GPU at 3e-5; warm-up 0.1, as run_squad.sh
    "dgxa10080g_8gpu_fp16_p2binned": squad(32, "4.6e-5", "0.2", "fp16", 8),
    "dgxa10080g_8gpu_tf32_p2binned": squad(32, "4.6e-5", "0.2", "tf32", 8),
    "dgxa100_8gpu_fp16": squad(32, "3e-5", "0.1", "fp16", 8),
    "dgxa100_8gpu_tf32": squad(16, "3e-5", "0.1", "tf32", 8),
    "dgx2_16gpu_fp16_p2binned": squad(16, "4.6e-5", "0.2", "fp16", 16),
    "dgx2_16gpu_fp16": squad(16, "3e-5", "0.1", "fp16", 16),
    "dgx2_16gpu_fp32": squad(8, "3e-5", "0.1", "fp32", 16),
    "dgx1_8gpu_fp16": squad(10, "3e-5", "0.1", "fp16", 8),
    "dgx1_8gpu_fp32": squad(4, "3e-5", "0.1", "fp32", 8),
}
SQUAD_PROJECT = {  # not given by the reference notes: the binned DGX-1 variant takes dgx1_8gpu_fp16's batch
    "dgx1_8gpu_fp16_p2binned": squad(10, "4.6e-5", "0.2", "fp16", 8),
}


def test_squad_config_functions():
    demo = "cpu_demo /x/ckpt_10.pt"
    results = run_all("squad_config.sh", [*SQUAD_REFERENCE, *SQUAD_EARLIER, *SQUAD_PROJECT, demo, "declare -F"])
    check_table(results, SQUAD_REFERENCE)
    check_table(results, SQUAD_EARLIER)
    check_table(results, SQUAD_PROJECT)
    status, words = results[demo]
    assert status == 0 and len(words) == 14 and words[0] == "/x/ckpt_10.pt" and words[6] == "0"
    public = {f for f in defined_functions(results) if not f.startswith("_")}
    assert public == {*SQUAD_REFERENCE, *SQUAD_EARLIER, *SQUAD_PROJECT, "cpu_demo"}


# ---------------------------------------------------------------------------------------------------------------
# glue_config.sh: the first 14 arguments of run_glue.sh
# ---------------------------------------------------------------------------------------------------------------

# The reference's rule: batch per GPU = global batch / GPUs; accumulation doubles from 1 until batch / accumulation
# fits the system's capacity (sequences of 128 per GPU and micro-batch).
TASKS = {  # task settings: folder, global batch, learning rate, warm-up
    "mrpc": ("MRPC", 128, "1.8e-5", "0.3"),  # the latest reference (and the earlier *_p2binned)
    "sst-2": ("SST-2", 1024, "1e-5", "0.1"),
    "mrpc_unbinned": ("MRPC", 128, "2.4e-5", "0.1"),  # the earlier reference's dgxa100 / dgx2 functions
    "sst-2_dgxa100_fp16": ("SST-2", 1024, "3e-5", "0.1"),
    "sst-2_dgxa100_tf32": ("SST-2", 512, "2e-5", "0.1"),
    "sst-2_dgx2": ("SST-2", 1024, "3e-5", "0.1"),
    "sst-2_dgx1-32g_fp32": ("SST-2", 512, "1e-5", "0.1"),
}
CAPACITY = {"dgxa100-80g_fp16": 256, "dgxa100-80g_tf32": 128, "dgx1-32g_fp16": 128, "dgx1-32g_fp32": 64,
            "dgxa100_fp16": 128, "dgxa100_tf32": 64, "dgx2_fp16": 128, "dgx2_fp32": 64}


def glue(task: str, system: str, gpus: int) -> list[str]:
    folder, global_batch, learning_rate, warmup = TASKS[task]
    batch, accumulation = global_batch // gpus, 1
    while batch // accumulation > CAPACITY[system]:
        accumulation *= 2
    values = [REPO / "checkpoints" / "bert_uncased.pt", f"{PREP}/download/glue/{folder}/", VOCAB,
              REPO / "bert_configs" / "large.json", REPO / "results" / folder, task.split("_")[0], gpus, batch,
              accumulation, learning_rate, warmup, "3", "-1.0", system.split("_")[-1]]
    return [str(v) for v in values]


GLUE_REFERENCE = {}
GLUE_EARLIER = {}
for _gpus in (1, 2, 4, 8):
    for _prec in ("fp16", "tf32"):
        for _task in ("mrpc", "sst-2"):
            GLUE_REFERENCE[f"{_task}_dgxa100-80g_{_gpus}gpu_{_prec}"] = glue(_task, f"dgxa100-80g_{_prec}", _gpus)
            GLUE_EARLIER[f"{_task}_dgxa10080g_{_gpus}gpu_{_prec}_p2binned"] = glue(_task, f"dgxa100-80g_{_prec}",
                                                                                    _gpus)
        GLUE_EARLIER[f"mrpc_dgxa100_{_gpus}gpu_{_prec}"] = glue("mrpc_unbinned", f"dgxa100_{_prec}", _gpus)
        GLUE_EARLIER[f"sst-2_dgxa100_{_gpus}gpu_{_prec}"] = glue(f"sst-2_dgxa100_{_prec}", f"dgxa100_{_prec}", _gpus)
    for _prec in ("fp16", "fp32"):
        GLUE_REFERENCE[f"mrpc_dgx1-32g_{_gpus}gpu_{_prec}"] = glue("mrpc", f"dgx1-32g_{_prec}", _gpus)
        _sst2 = "sst-2_dgx1-32g_fp32" if _prec == "fp32" else "sst-2"
        GLUE_REFERENCE[f"sst-2_dgx1-32g_{_gpus}gpu_{_prec}"] = glue(_sst2, f"dgx1-32g_{_prec}", _gpus)
for _gpus in (1, 2, 4, 8, 16):
    for _prec in ("fp16", "fp32"):
        GLUE_EARLIER[f"mrpc_dgx2_{_gpus}gpu_{_prec}"] = glue("mrpc_unbinned", f"dgx2_{_prec}", _gpus)
        GLUE_EARLIER[f"sst-2_dgx2_{_gpus}gpu_{_prec}"] = glue("sst-2_dgx2", f"dgx2_{_prec}", _gpus)

# The reference's helpers, which users may call themselves: what each sets.
GLUE_HELPERS = {
    "commons": "commons; echo $init_checkpoint $vocab_file $config_file $max_steps",
    "mrpc_commons": "commons; mrpc_commons; echo $data_dir $out_dir $task_name $global_batch_size $learning_rate"
                    " $warmup_proportion $epochs",
    "sst-2_commons": "commons; sst-2_commons; echo $data_dir $out_dir $task_name $global_batch_size $learning_rate"
                     " $warmup_proportion $epochs",
    "dgxa100-80g_fp16_commons": "dgxa100-80g_fp16_commons; echo $batch_size_capacity $precision",
    "dgxa100-80g_tf32_commons": "dgxa100-80g_tf32_commons; echo $batch_size_capacity $precision",
    "dgx1-32g_fp16_commons": "dgx1-32g_fp16_commons; echo $batch_size_capacity $precision",
    "dgx1-32g_fp32_commons": "dgx1-32g_fp32_commons; echo $batch_size_capacity $precision",
    "sst-2_dgx1-32g_fp32_commons": "sst-2_dgx1-32g_fp32_commons; echo $global_batch_size",
    "batch_size_and_gradient_accumulation_steps": "global_batch_size=1024 num_gpu=2 batch_size_capacity=64;"
                                                  " batch_size_and_gradient_accumulation_steps;"
                                                  " echo $batch_size $gradient_accumulation_steps",
    "print_arguments_in_order": "commons; mrpc_commons; dgx1-32g_fp32_commons; num_gpu=4;"
                                " batch_size_and_gradient_accumulation_steps; print_arguments_in_order",
}
GLUE_HELPER_VALUES = {
    "commons": [str(REPO / "checkpoints" / "bert_uncased.pt"), VOCAB, str(REPO / "bert_configs" / "large.json"),
                "-1.0"],
    "mrpc_commons": [f"{PREP}/download/glue/MRPC/", str(REPO / "results" / "MRPC"), "mrpc", "128", "1.8e-5", "0.3",
                     "3"],
    "sst-2_commons": [f"{PREP}/download/glue/SST-2/", str(REPO / "results" / "SST-2"), "sst-2", "1024", "1e-5",
                      "0.1", "3"],
    "dgxa100-80g_fp16_commons": ["256", "fp16"],
    "dgxa100-80g_tf32_commons": ["128", "tf32"],
    "dgx1-32g_fp16_commons": ["128", "fp16"],
    "dgx1-32g_fp32_commons": ["64", "fp32"],
    "sst-2_dgx1-32g_fp32_commons": ["512"],
    "batch_size_and_gradient_accumulation_steps": ["512", "8"],
    "print_arguments_in_order": glue("mrpc", "dgx1-32g_fp32", 4),
}
# Project helpers: the earlier reference's ones, and the names the project used before.
GLUE_PROJECT_HELPERS = {
    "mrpc_commons_p2binned", "sst-2_commons_p2binned", "mrpc_commons_unbinned", "sst-2_dgxa100_fp16_commons",
    "sst-2_dgxa100_tf32_commons", "sst-2_dgx2_commons", "dgxa10080g_fp16_commons", "dgxa10080g_tf32_commons",
    "dgxa100_fp16_commons", "dgxa100_tf32_commons", "dgx2_fp16_commons", "dgx2_fp32_commons",
}


def test_glue_config_functions():
    assert len(GLUE_REFERENCE) == 32 and len(GLUE_EARLIER) == 52
    # Values the reference notes state outright, as a check on the rule above.
    assert GLUE_REFERENCE["mrpc_dgxa100-80g_8gpu_fp16"][5:12] == ["mrpc", "8", "16", "1", "1.8e-5", "0.3", "3"]
    assert GLUE_REFERENCE["sst-2_dgxa100-80g_1gpu_fp16"][7:11] == ["1024", "4", "1e-5", "0.1"]
    assert GLUE_REFERENCE["sst-2_dgx1-32g_1gpu_fp32"][7:9] == ["512", "8"]
    demo = "cpu_demo /x/ckpt_10.pt"
    helpers = list(GLUE_HELPERS.values())
    results = run_all("glue_config.sh", [*GLUE_REFERENCE, *GLUE_EARLIER, *helpers, demo, "declare -F"])
    check_table(results, GLUE_REFERENCE)
    check_table(results, GLUE_EARLIER)
    check_table(results, {GLUE_HELPERS[name]: values for name, values in GLUE_HELPER_VALUES.items()})
    status, words = results[demo]
    assert status == 0 and len(words) == 14 and words[0] == "/x/ckpt_10.pt" and words[5:7] == ["sst-2", "0"]
    public = {f for f in defined_functions(results) if not f.startswith("_")}
    assert public == {*GLUE_REFERENCE, *GLUE_EARLIER, *GLUE_HELPERS, *GLUE_PROJECT_HELPERS, "cpu_demo"}


# ---------------------------------------------------------------------------------------------------------------
# The echoed lists line up with the wrappers' positional arguments (PYTHON=echo prints the commands)
# ---------------------------------------------------------------------------------------------------------------


def echo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a dry run: PYTHON=echo, data and results under tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("INIT_CHECKPOINT", "SLURM_JOB_NUM_NODES", "VOCAB_FILE", "CHECKPOINTS_DIR")}
    env.update(PYTHON="echo", BERT_PREP_WORKING_DIR=str(tmp_path / "prep"), RESULTS_DIR=str(tmp_path / "results"))
    return env


def run_wrapper(wrapper: str, config: str, function: str, tmp_path: Path) -> list[list[str]]:
    """Run scripts/<wrapper> $(source scripts/configs/<config> && <function>) with PYTHON=echo; returns the
    printed command lines, split into words."""
    script = f'bash scripts/{wrapper} $(source scripts/configs/{config} && {function})'
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=echo_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line.split() for line in done.stdout.splitlines()]


def flags(words: list[str]) -> dict[str, str]:
    """--name=value and --name value pairs (a flag with no value maps to "")."""
    out = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, _, value = word.partition("=")
            if not value and i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
            out[name] = value
    return out


def test_pretrain_config_lines_up_with_run_pretraining_sh(tmp_path):
    lines = run_wrapper("run_pretraining.sh", "pretrain_config.sh", "dgx1-32g_8gpu_fp16", tmp_path)
    # CODEDIR (#23) is the repository, so the wrapper ran its run_pretraining.py under 8 processes.
    launched = [flags(w) for w in lines if w[:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8",
                                                     "run_pretraining.py"]]
    prepared = [flags(w) for w in lines if w[:2] == ["-m", "data.preprocess_pretraining"]]
    assert len(launched) == 2 and len(prepared) == 2
    prep = tmp_path / "prep"
    phase1, phase2 = launched
    assert {k: phase1.get(k) for k in ("--input_dir", "--train_batch_size", "--learning_rate", "--warmup_proportion",
                                       "--max_steps", "--num_steps_per_checkpoint", "--seed", "--num_workers",
                                       "--gradient_accumulation_steps", "--config_file", "--fp16",
                                       "--allreduce_post_accumulation", "--allreduce_post_accumulation_fp16")} == {
        "--input_dir": f"{prep}/pretrain/phase1/unbinned/parquet/", "--train_batch_size": "8192",
        "--learning_rate": "6e-3", "--warmup_proportion": "0.2843", "--max_steps": "7038",
        "--num_steps_per_checkpoint": "200", "--seed": "42", "--num_workers": "4",
        "--gradient_accumulation_steps": "64", "--config_file": "bert_configs/large.json", "--fp16": "",
        "--allreduce_post_accumulation": "", "--allreduce_post_accumulation_fp16": ""}
    assert "--resume_from_checkpoint" not in phase1 and "--init_checkpoint" not in phase1
    assert {k: phase2.get(k) for k in ("--input_dir", "--train_batch_size", "--learning_rate", "--warmup_proportion",
                                       "--max_steps", "--gradient_accumulation_steps", "--phase1_end_step")} == {
        "--input_dir": f"{prep}/pretrain/phase2/bin_size_64/parquet/", "--train_batch_size": "4096",
        "--learning_rate": "4e-3", "--warmup_proportion": "0.128", "--max_steps": "1563",
        "--gradient_accumulation_steps": "256", "--phase1_end_step": "7038"}
    for shards, sink, seq in ((prepared[0], phase1["--input_dir"], "128"), (prepared[1], phase2["--input_dir"], "512")):
        # 128 shards per worker x 4 loader workers x 1 node x 8 GPUs; 128 Dask workers; static masking.
        assert shards["--sink"] == sink and shards["--target-seq-length"] == seq
        assert (shards["--wikipedia"], shards["--num-blocks"], shards["--local-n-workers"]) == \
               (f"{prep}/wikipedia/source/", "4096", "128")
        assert shards["--sample-ratio"] == "0.9" and shards["--seed"] == "42" and "--masking" in shards
    assert "--bin-size" not in prepared[0] and prepared[1]["--bin-size"] == "64"
    assert phase1["--keep_checkpoints"] == phase2["--keep_checkpoints"] == "3"  # KEEP_CHECKPOINTS' default
    logs = sorted(p.name for p in (tmp_path / "results").glob("*.log"))
    assert [name.split(".")[1] for name in logs] == ["pyt_bert_pretraining_phase1_fp16_gbs65536",
                                                     "pyt_bert_pretraining_phase2_fp16_gbs65536"]


def test_squad_config_lines_up_with_run_squad_sh(tmp_path):
    squad_dir = tmp_path / "prep" / "download" / "squad" / "v1.1"
    squad_dir.mkdir(parents=True)
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (squad_dir / name).write_text("{}")
    lines = run_wrapper("run_squad.sh", "squad_config.sh", "dgx1-32g_8gpu_fp32", tmp_path)
    words = lines[-1]
    assert words[:3] == ["-m", "torch.distributed.run", "--nproc_per_node=8"]
    got = flags(words)
    assert {k: got[k] for k in ("--init_checkpoint", "--num_train_epochs", "--train_batch_size", "--learning_rate",
                                "--warmup_proportion", "--seed", "--train_file", "--vocab_file", "--output_dir")} == {
        "--init_checkpoint": str(REPO / "checkpoints" / "bert_uncased.pt"), "--num_train_epochs": "2.0",
        "--train_batch_size": "16", "--learning_rate": "4.6e-5", "--warmup_proportion": "0.2", "--seed": "1",
        "--train_file": str(squad_dir / "train-v1.1.json"), "--vocab_file": VOCAB,
        "--output_dir": str(tmp_path / "results" / "SQuAD")}
    assert "--fp16" not in got and "--do_predict" in got and "--do_eval" in got


@pytest.mark.parametrize("function,expected", [
    ("mrpc_dgx1-32g_8gpu_fp16", {"--task_name": "mrpc", "--train_batch_size": "16",
                                 "--gradient_accumulation_steps": "1", "--learning_rate": "1.8e-5",
                                 "--warmup_proportion": "0.3", "--num_train_epochs": "3", "--max_steps": "-1.0",
                                 "--fp16": ""}),
    ("sst-2_dgx1-32g_1gpu_fp32", {"--task_name": "sst-2", "--train_batch_size": "512",
                                  "--gradient_accumulation_steps": "8", "--learning_rate": "1e-5",
                                  "--warmup_proportion": "0.1", "--num_train_epochs": "3", "--max_steps": "-1.0"}),
])
def test_glue_config_lines_up_with_run_glue_sh(function, expected, tmp_path):
    words = run_wrapper("run_glue.sh", "glue_config.sh", function, tmp_path)[-1]
    got = flags(words)
    assert {k: got.get(k) for k in expected} == expected
    assert ("--fp16" in got) == ("--fp16" in expected)
    gpus = function.split("_")[2].removesuffix("gpu")
    assert (words[:3] == ["-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]) == (gpus != "1")
    task = "MRPC" if expected["--task_name"] == "mrpc" else "SST-2"
    assert got["--data_dir"] == f"{tmp_path}/prep/download/glue/{task}/"
    assert got["--output_dir"] == str(tmp_path / "results" / task)
    assert (got["--vocab_file"], got["--config_file"]) == (VOCAB, str(REPO / "bert_configs" / "large.json"))


# ---------------------------------------------------------------------------------------------------------------
# run_pretraining.sh's own defaults: the data folders (#21, #22) and phase2_bin_size (#30) of the reference, which
# are the folders data/create_datasets_from_start.sh writes
# ---------------------------------------------------------------------------------------------------------------


def run_pretraining_sh(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/run_pretraining.sh", *args], cwd=REPO, env=echo_env(tmp_path),
                          capture_output=True, text=True, timeout=120)


def preprocess_calls(stdout: str) -> list[dict[str, str]]:
    return [flags(line.split()) for line in stdout.splitlines() if line.startswith("-m data.preprocess_pretraining")]


def test_shell_run_pretraining_defaults_read_what_create_datasets_writes(tmp_path):
    prep = tmp_path / "prep"
    (prep / "wikipedia").mkdir(parents=True)
    (prep / "wikipedia" / ".extracted").touch()  # extraction done: the script goes on to the Parquet shards
    created = subprocess.run(["bash", "data/create_datasets_from_start.sh"], cwd=REPO, env=echo_env(tmp_path),
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
    written = [(call["--sink"], call["--target-seq-length"], call.get("--bin-size"))
               for call in preprocess_calls(created.stdout)]
    assert written == [(f"{prep}/pretrain/phase1/unbinned/parquet", "128", None),
                       (f"{prep}/pretrain/phase2/bin_size_64/parquet", "512", "64")]

    run = run_pretraining_sh(["8192", "6e-3", "fp32", "0"], tmp_path)  # everything else at its default
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    read = [(call["--sink"].rstrip("/"), call["--target-seq-length"], call.get("--bin-size"))
            for call in preprocess_calls(run.stdout)]
    assert read == written
    inputs = [flags(line.split())["--input_dir"] for line in run.stdout.splitlines()
              if line.startswith("run_pretraining.py ")]
    assert inputs == [f"{prep}/pretrain/phase1/unbinned/parquet/", f"{prep}/pretrain/phase2/bin_size_64/parquet/"]


def test_shell_run_pretraining_validates_phase2_bin_size(tmp_path):
    def args(bin_size: str) -> list[str]:
        return ["", "", "fp32", "0", *[""] * 25, bin_size]  # argument 30; the others at their defaults

    unbinned = run_pretraining_sh(args("none"), tmp_path)
    assert unbinned.returncode == 0, unbinned.stderr
    assert [call.get("--bin-size") for call in preprocess_calls(unbinned.stdout)] == [None, None]
    binned = run_pretraining_sh(args("128"), tmp_path / "binned")
    assert binned.returncode == 0, binned.stderr
    assert [call.get("--bin-size") for call in preprocess_calls(binned.stdout)] == [None, "128"]
    for bad in ("48", "64x"):
        refused = run_pretraining_sh(args(bad), tmp_path / "bad")
        assert refused.returncode == 1 and "run_pretraining.py" not in refused.stdout
        assert f"phase2_bin_size (argument 30) must be none, 32, 64, 128, 256 or 512, got '{bad}'" in refused.stderr
    assert not (tmp_path / "bad").exists()  # refused before making any folder
