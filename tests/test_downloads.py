"""data.download: each dataset end to end against a mirror on 127.0.0.1 (no internet); MRPC built as GLUE does."""
from __future__ import annotations

import bz2
import dataclasses
import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, shared_path
from test_file_utils import FileServer, closed_port_url

import file_utils
from data import download
from file_utils import ChecksumError, UnsafeArchiveError


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_utils, "RETRY_BACKOFF_S", 0.01)


@pytest.fixture
def mirror() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


def serve(srv: FileServer, mirror_path: str, data: bytes) -> None:
    srv.files[f"/mirror/{mirror_path}"] = data


def glue_zip(folder: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as handle:
        for name, data in files.items():
            handle.writestr(f"{folder}/{name}", data)
    return buffer.getvalue()


def test_squad_downloads_and_checks_published_md5(mirror: FileServer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    base = mirror.url("/mirror")
    for version, files in download.SQUAD.items():
        for name, remote in files.items():
            body = json.dumps({"version": version, "data": []}).encode() if name.endswith(".json") else b"# eval\n"
            serve(mirror, remote.mirror_path, body)
    # The served stand-ins are not the real files, so the published md5 must reject them ...
    with pytest.raises(ChecksumError, match=r"squad/v1\.1/train-v1\.1\.json.*981b29407e0affa3b1b156f72073b945"):
        download.download_squad(tmp_path, mirror=base, progress=False)
    assert not (tmp_path / "download" / "squad" / "v1.1" / "train-v1.1.json").exists()
    # ... and with the stand-ins' own digests every file lands where run_squad.sh expects it.
    for files in download.SQUAD.values():
        for name, remote in files.items():
            digest = hashlib.md5(mirror.files[f"/mirror/{remote.mirror_path}"]).hexdigest()
            monkeypatch.setitem(files, name, dataclasses.replace(remote, md5=digest))
    squad_dir = download.download_squad(tmp_path, mirror=base, progress=False)
    assert sorted(p.relative_to(squad_dir).as_posix() for p in squad_dir.rglob("*")) == [
        "v1.1", "v1.1/dev-v1.1.json", "v1.1/evaluate-v1.1.py", "v1.1/train-v1.1.json",
        "v2.0", "v2.0/dev-v2.0.json", "v2.0/evaluate-v2.0.py", "v2.0/train-v2.0.json"]
    assert json.loads((squad_dir / "v2.0" / "dev-v2.0.json").read_text())["version"] == "v2.0"


def test_mrpc_built_exactly_as_glue(mirror: FileServer, tmp_path: Path) -> None:
    for name in ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt", "dev_ids.tsv"):
        serve(mirror, f"mrpc/{name}", shared_path("mrpc", name).read_bytes())
    mrpc_dir = download.download_mrpc(tmp_path, mirror=mirror.url("/mirror"), progress=False)
    assert mrpc_dir == tmp_path / "download" / "glue" / "MRPC"
    for name in ("train.tsv", "dev.tsv", "test.tsv"):  # GLUE's real outputs, byte for byte (BOM header included)
        assert (mrpc_dir / name).read_bytes() == shared_path("mrpc", name).read_bytes(), name


def test_mrpc_handles_crlf_corpus_and_rejects_bad_rows(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = ["1\t10\t11\tA cat sat.\tThe cat sat.", "0\t20\t21\tHe said \"no\".\tShe left."]
    (tmp_path / "msr_paraphrase_train.txt").write_bytes("\r\n".join([header, *rows, ""]).encode())
    (tmp_path / "msr_paraphrase_test.txt").write_bytes("\r\n".join([header, rows[1], ""]).encode())
    (tmp_path / "dev_ids.tsv").write_text("20\t21\n")
    download.format_mrpc(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "train.tsv").read_text(encoding="utf-8") == f"{header}\n{rows[0]}\n"
    assert (tmp_path / "out" / "dev.tsv").read_text(encoding="utf-8") == f"{header}\n{rows[1]}\n"
    assert (tmp_path / "out" / "test.tsv").read_text(encoding="utf-8") == (
        "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t20\t21\tHe said \"no\".\tShe left.\n")
    (tmp_path / "msr_paraphrase_test.txt").write_text(f"{header}\n1\t2\tonly three fields\n", encoding="utf-8")
    with pytest.raises(download.MrpcFormatError, match=r"msr_paraphrase_test\.txt:2"):
        download.format_mrpc(tmp_path, tmp_path / "out")


def test_glue_tasks_unpack_into_task_folders_once(mirror: FileServer, tmp_path: Path) -> None:
    serve(mirror, "glue/CoLA.zip", glue_zip("CoLA", {"train.tsv": b"gj04\t1\t\tOur friends won't buy it.\n",
                                                     "dev.tsv": b"", "original/raw/in_domain_train.tsv": b""}))
    serve(mirror, "glue/QQP-clean.zip", glue_zip("QQP", {"train.tsv": b"id\tqid1\n", "dev.tsv": b""}))
    serve(mirror, "glue/SST-2.zip", glue_zip("SST-2", {"train.tsv": b"sentence\tlabel\nfine \t1\n"}))
    base = mirror.url("/mirror")
    glue_dir = download.download_glue(tmp_path, ["CoLA", "QQP"], mirror=base, progress=False)
    assert (glue_dir / "CoLA" / "train.tsv").read_bytes().startswith(b"gj04\t1")
    assert (glue_dir / "CoLA" / "original" / "raw" / "in_domain_train.tsv").exists()
    assert (glue_dir / "QQP" / "train.tsv").exists()
    assert sorted(p.name for p in glue_dir.iterdir()) == ["CoLA", "QQP"]  # archives and temp folders removed
    assert download.main(["--dataset", "sst-2", "cola", "--outdir", str(tmp_path), "--mirror", base,
                          "--no-progress"]) == 0
    assert (glue_dir / "SST-2" / "train.tsv").read_bytes() == b"sentence\tlabel\nfine \t1\n"
    assert len(mirror.gets("/mirror/glue/CoLA.zip")) == 1  # a finished task is not fetched again


def test_glue_archive_with_escaping_member_is_refused(mirror: FileServer, tmp_path: Path) -> None:
    serve(mirror, "glue/RTE.zip", glue_zip("RTE", {"train.tsv": b"", "../../../evil.sh": b"rm -rf ~"}))
    with pytest.raises(UnsafeArchiveError, match="evil.sh"):
        download.download_glue_task("RTE", tmp_path, mirror=mirror.url("/mirror"), progress=False)
    glue_dir = tmp_path / "download" / "glue"
    assert not (glue_dir / "RTE").exists() and not list(tmp_path.rglob("evil.sh"))
    assert sorted(p.name for p in glue_dir.iterdir()) == ["RTE.zip"]  # kept for inspection; rerun re-checks it


def test_vocab_from_mirror_is_digest_checked(mirror: FileServer, tmp_path: Path) -> None:
    base = mirror.url("/mirror")
    serve(mirror, "vocab/vocab.txt", b"[PAD]\n[UNK]\n")
    with pytest.raises(ChecksumError, match="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"):
        download.download_vocab(tmp_path, mirror=base, progress=False)
    assert not list(tmp_path.rglob("vocab.txt*"))
    real = (REPO / "vocab" / "vocab").read_bytes()
    serve(mirror, "vocab/vocab.txt", real)
    path = download.download_vocab(tmp_path, mirror=base, progress=False)
    assert path == tmp_path / "download/google_pretrained_weights/uncased_L-24_H-1024_A-16/vocab.txt"
    assert path.read_bytes() == real and len(real.splitlines()) == 30522


def test_vocab_without_mirror_uses_bundled_copy_offline(tmp_path: Path) -> None:
    path = download.download_vocab(tmp_path, progress=False)
    assert file_utils.sha256sum(path) == download.VOCAB.sha256


def test_wikipedia_dump_resumes_and_local_folder_mirror(mirror: FileServer, tmp_path: Path) -> None:
    text = b"".join(b"<page><title>%d</title><text>%x</text></page>\n" % (i, i * 7919) for i in range(5000))
    dump = bz2.compress(text)
    assert len(dump) > 5000
    serve(mirror, "wikipedia/enwiki-latest-pages-articles.xml.bz2", dump)
    dest = tmp_path / "wikipedia" / "wikicorpus-en.xml.bz2"
    dest.parent.mkdir()
    (dest.parent / (dest.name + ".partial")).write_bytes(dump[:500])  # an earlier run was cut off here
    assert download.download_wikipedia(tmp_path, mirror=mirror.url("/mirror"), progress=False) == dest
    assert dest.read_bytes() == dump and mirror.bytes_sent == len(dump) - 500
    # A mirror can be a plain folder with the same layout (offline clusters).
    folder = tmp_path / "mirror"
    (folder / "wikipedia").mkdir(parents=True)
    (folder / "wikipedia" / "zhwiki-latest-pages-articles.xml.bz2").write_bytes(dump)
    assert download.main(["--dataset", "wikicorpus_zh", "--outdir", str(tmp_path / "wd"), "--mirror", str(folder),
                          "--no-progress"]) == 0
    assert (tmp_path / "wd" / "wikipedia" / "wikicorpus-zh.xml.bz2").read_bytes() == dump


def test_cli_reports_unreachable_host_and_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base = closed_port_url("/mirror")
    monkeypatch.setenv(download.MIRROR_ENV, base)  # the env var works like --mirror
    assert download.main(["--dataset", "mrpc", "--outdir", str(tmp_path), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert f"{base}/mrpc/msr_paraphrase_train.txt" in error and "offline" in error
    with pytest.raises(SystemExit):
        download.main(["--dataset", "bookcorpus"])


# --- data/create_datasets_from_start.sh, with a stand-in interpreter that records each step ---------------------

STUB = """#!{python}
import json, os, sys
from pathlib import Path
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[3:]
def flag(name):
    return Path(args[args.index(name) + 1])
if sys.argv[2] == "data.extract_wikipedia":
    flag("--output-dir").mkdir(parents=True)
    (flag("--output-dir") / "0.txt").write_text("wiki-1 text\\n")
if sys.argv[2] == "data.preprocess_pretraining":
    flag("--sink").mkdir(parents=True)
    (flag("--sink") / ".num_samples.json").write_text("{{}}")
"""


def run_script(tmp_path: Path, *args: str) -> tuple[int, list[list[str]], str]:
    """Run the script with ``args``; return its exit status, the recorded ``[-m, module, flags...]`` calls, stderr."""
    stub, log = tmp_path / "python-stub", tmp_path / "calls.jsonl"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "BERT_PREP_WORKING_DIR": str(tmp_path / "wd")}
    done = subprocess.run(["bash", str(REPO / "data" / "create_datasets_from_start.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return done.returncode, calls, done.stderr


def test_create_datasets_script_runs_each_step_once_with_valid_flags(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "3", "8", "static")
    assert code == 0, err
    assert [call[1] for call in calls] == ["data.download", "data.extract_wikipedia",
                                           "data.preprocess_pretraining", "data.preprocess_pretraining"]
    parsed = [importlib.import_module(call[1]).parse_args(call[2:]) for call in calls]  # the real CLIs accept them
    wd = tmp_path / "wd"
    assert set(parsed[0].dataset) == {"wikicorpus_en", "squad", "glue", "vocab"} and parsed[0].outdir == str(wd)
    assert parsed[1].input == str(wd / "wikipedia" / "wikicorpus-en.xml.bz2") and parsed[1].num_workers == 3
    assert parsed[1].output_dir == str(wd / "wikipedia" / "source" / "en")
    phase1, phase2 = parsed[2], parsed[3]
    assert (phase1.target_seq_length, phase1.bin_size) == (128, None)
    assert (phase2.target_seq_length, phase2.bin_size) == (512, 64)
    assert phase1.sink == str(wd / "pretrain" / "phase1" / "unbinned" / "parquet")
    assert phase2.sink == str(wd / "pretrain" / "phase2" / "bin_size_64" / "parquet")
    assert phase1.masking and phase2.num_blocks == 8 and phase2.wikipedia == str(wd / "wikipedia" / "source")
    assert phase1.vocab_file == str(wd / download.VOCAB_PATH)

    code, calls, err = run_script(tmp_path)  # everything is complete: only the (idempotent) download step runs
    assert code == 0 and [call[1] for call in calls] == ["data.download"], err


def test_create_datasets_script_stops_on_bad_args_and_unfinished_output(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "2", "8", "sometimes")
    assert code != 0 and "masking" in err and calls == []
    (tmp_path / "wd" / "wikipedia" / "source" / "en").mkdir(parents=True)
    (tmp_path / "wd" / "wikipedia" / "source" / "en" / "0.txt").write_text("half")
    code, calls, err = run_script(tmp_path, "2", "8")
    assert code != 0 and "unfinished extraction" in err and [call[1] for call in calls] == ["data.download"]
