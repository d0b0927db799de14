"""configurations.yml and scripts/configurations.py: the reference's 14 multi-node jobs plus DGX A100/H100 ones,
each a valid global batch for run_pretraining.py, printed as the sbatch lines the reference README shows."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

import utils
from scripts import configurations

FILE = REPO / "configurations.yml"
# The reference's configurations.yml: job -> NNODES BATCHSIZE LR GRADIENT_STEPS PHASE.
REFERENCE = {
    "bert--DGX1": (1, 8192, "6e-3", 512, 1), "bert--DGX1_4x8x16x128": (4, 2048, "6e-3", 128, 1),
    "bert--DGX1_16x8x16x32": (16, 512, "6e-3", 32, 1), "bert--DGX2": (1, 4096, "6e-3", 64, 1),
    "bert--DGX2_4x16x64x16": (4, 1024, "6e-3", 16, 1), "bert--DGX2_16x16x64x4": (16, 256, "6e-3", 4, 1),
    "bert--DGX2_64x16x64": (64, 64, "6e-3", 1, 1), "bert--DGX1_1x8x4x1024": (1, 4096, "4e-3", 1024, 2),
    "bert--DGX1_4x8x4x256": (4, 1024, "4e-3", 256, 2), "bert--DGX1_16x8x4x64": (16, 256, "4e-3", 64, 2),
    "bert--DGX2_1x16x8x256": (1, 2048, "4e-3", 256, 2), "bert--DGX2_4x16x8x64": (4, 512, "4e-3", 64, 2),
    "bert--DGX2_16x16x8x16": (16, 128, "4e-3", 16, 2), "bert--DGX2_64x16x8x4": (64, 32, "4e-3", 4, 2),
}


def test_the_file_loads_on_its_own_and_holds_the_reference_jobs():
    raw = yaml.safe_load(FILE.read_text())  # every anchor is defined in the file itself
    jobs = configurations.load(FILE)
    assert set(jobs) == {name for name in raw if not name.startswith(".")}
    for name, (nodes, batch, lr, accumulation, phase) in REFERENCE.items():
        assert jobs[name].variables == {"NNODES": str(nodes), "BATCHSIZE": str(batch), "LR": lr,
                                        "GRADIENT_STEPS": str(accumulation), "PHASE": str(phase)}, name
    systems = {job.gpus_per_node for job in jobs.values()}
    assert systems == {8, 16}
    assert any("A100" in name for name in jobs) and any("H100" in name for name in jobs)


@pytest.mark.parametrize("name", list(configurations.load(FILE)))
def test_every_job_is_a_valid_global_batch_that_its_name_describes(name):
    job = configurations.load(FILE)[name]
    micro = utils.check_batch_arithmetic(int(job.variables["BATCHSIZE"]), int(job.variables["GRADIENT_STEPS"]),
                                         job.world_size)
    assert job.global_batch == (65536 if job.variables["PHASE"] == "1" else 32768)
    sizes = re.search(r"_(\d+)x(\d+)x(\d+)(?:x(\d+))?$", name)
    if sizes:  # <nodes>x<GPUs per node>x<micro-batch>x<accumulation>
        nodes, gpus, named_micro, accumulation = sizes.groups()
        assert (int(nodes), int(gpus), int(named_micro)) == (job.nodes, job.gpus_per_node, micro)
        assert int(accumulation or 1) == int(job.variables["GRADIENT_STEPS"])


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.configurations", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_command_prints_the_reference_readme_lines(capsys):
    done = _cli("configurations.yml", "bert--DGX1_4x8x16x128")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "BATCHSIZE=2048 LR=6e-3 GRADIENT_STEPS=128 PHASE=1 sbatch -N4 --ntasks-per-node=8 run.sub\n"
    assert configurations.main([str(FILE), "bert--DGX1_4x8x4x256", "--after", "1234"]) == 0
    assert capsys.readouterr().out == ("BATCHSIZE=1024 LR=4e-3 GRADIENT_STEPS=256 PHASE=2 sbatch -N4 "
                                       "--ntasks-per-node=8 --dependency=afterok:1234 run.sub\n")
    assert configurations.main([str(FILE)]) == 0
    every = capsys.readouterr().out.splitlines()
    assert len(every) == len(configurations.load(FILE)) and every[0].startswith("bert--DGX1: BATCHSIZE=8192 ")


def test_bad_entries_are_one_line_naming_the_file_job_and_numbers(tmp_path, capsys):
    bad = tmp_path / "c.yml"
    bad.write_text("bert--odd:\n  system: {gpus_per_node: 8}\n"
                   "  variables: {NNODES: 2, BATCHSIZE: 1000, LR: 6e-3, GRADIENT_STEPS: 64, PHASE: 1}\n")
    assert configurations.main([str(bad), "bert--odd"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"configurations: error: {bad}: bert--odd: ")
    assert "--train_batch_size 1000 is not divisible by --gradient_accumulation_steps 64" in err
    bad.write_text("bert--x:\n  system: {gpus_per_node: 8}\n  variables: {NNODES: 2, BATCHSIZE: 64, PHASE: 3}\n")
    with pytest.raises(ValueError, match=r"bert--x: variables missing \['LR', 'GRADIENT_STEPS'\]"):
        configurations.load(bad)
    assert configurations.main(["configurations.yml", "bert--DGX3"]) == 1
    assert "no job bert--DGX3 in configurations.yml; jobs: bert--DGX1," in capsys.readouterr().err
