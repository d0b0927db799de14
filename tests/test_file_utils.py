"""file_utils: atomic writes, checkpoints, cached downloads (http with Range, s3 via moto), safe extraction."""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import file_utils
from file_utils import (
    CheckpointError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    atomic_path,
    atomic_write,
    cached_path,
    download_file,
    load_checkpoint,
    load_state_dict_file,
    remove_stale_temp_files,
    safe_extract,
    save_checkpoint,
    sha256sum,
)

# --- a local HTTP server that speaks Range / If-Range -------------------------------------------------------------

class FileServer:
    """Threaded HTTP server on 127.0.0.1 serving in-memory files, with byte ranges, ETags and fault injection.

    ``files`` maps URL paths to bytes; ``requests`` records ``(path, headers)`` of every GET; ``bytes_sent`` counts
    body bytes; ``truncate[path] = n`` makes the next response for ``path`` stop after ``n`` body bytes and close.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bytes_sent = 0
        self.truncate: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                owner.requests.append((path, dict(self.headers)))
                body = owner.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                start, status = 0, 200
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if wanted and self.headers.get("If-Range", etag) == etag:
                    start, status = int(wanted.group(1)), 206
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                payload = body[start:]
                self.send_response(status)
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(payload)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = owner.truncate.pop(path, None)
                if cut is not None:
                    payload = payload[:cut]
                    self.close_connection = True
                self.wfile.write(payload)
                owner.bytes_sent += len(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[dict[str, str]]:
        return [headers for seen, headers in self.requests if seen == path]

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_utils, "RETRY_BACKOFF_S", 0.01)


def closed_port_url(path: str = "/x.bin") -> str:
    """A URL on 127.0.0.1 whose port has nothing listening, so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


PAYLOAD = bytes(range(256)) * 3000  # 768,000 bytes: several 1 MiB chunks are not needed to exercise resume


# --- core: atomic writes and checkpoints ------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("new")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_failure_leaves_neither_target_nor_temporary(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out" / "shard.h5"
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".shard.h5.") and tmp.name.endswith(".tmp")
            tmp.write_bytes(b"half a file")
            raise error
    assert list(target.parent.iterdir()) == []


def test_atomic_path_success_renames_onto_the_target(tmp_path: Path) -> None:
    target = tmp_path / "shard.parquet"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.exists() and target.read_bytes() == b"old"  # the old file stays until the block succeeds
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions of a plainly created file


def test_remove_stale_temp_files_only_removes_matching_temporaries(tmp_path: Path) -> None:
    keep = [tmp_path / name for name in ("ckpt_1.pt", ".hidden", ".ckpt_1.pt.tmp", ".ckpt_1.pt.12345.tmp", "x.tmp",
                                         ".ckpt.pt.ab12cd34.old")]
    for path in keep:
        path.write_bytes(b"")
    stale = [tmp_path / ".ckpt_1.pt.ab12cd34.tmp", tmp_path / ".ckpt_2.pt.0123abcd.tmp"]
    other = tmp_path / "..num_samples.json.99aa88bb.tmp"
    for path in [*stale, other]:
        path.write_bytes(b"partial")
    (tmp_path / ".ckpt_3.pt.abcdef01.tmp").mkdir()  # not a file: left alone
    assert remove_stale_temp_files(tmp_path, "ckpt_*.pt") == sorted(stale)
    assert remove_stale_temp_files(tmp_path) == [other]
    assert all(path.exists() for path in keep) and (tmp_path / ".ckpt_3.pt.abcdef01.tmp").is_dir()
    assert remove_stale_temp_files(tmp_path / "missing") == []
    with atomic_write(tmp_path / "ckpt_4.pt") as handle:  # the name a killed writer would leave is matched
        assert file_utils._temp_target(Path(handle.name).name) == "ckpt_4.pt"


def test_checkpoint_round_trip_and_clear_errors(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}}
    save_checkpoint(state, tmp_path / "ckpt.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ckpt.pt")["model"]["w"], state["model"]["w"])
    assert set(load_state_dict_file(tmp_path / "ckpt.pt")) == {"w"}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    assert sha256sum(tmp_path / "bad.pt") == hashlib.sha256(b"not a checkpoint").hexdigest()


class _WritesMarker:
    """Unpickling this runs ``Path(marker).write_text("pwned")``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_load_checkpoint_refuses_arbitrary_objects_with_its_own_explanation(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _WritesMarker(marker)}, evil)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert not marker.exists()  # nothing of the pickle ran
    assert message.startswith(f"checkpoint {evil} is not loaded: it holds Python objects other than tensors")
    assert "arbitrary code" in message and "convert it" in message and "\n" not in message
    assert "Re-running" not in message and "trusted source" not in message  # torch's own advice is left out
    assert message.index("(torch: ") > message.index("convert it")  # torch's detail comes last, shortened
    # The suggested conversion works on a trusted file of that kind, and its output then loads safely.
    trusted = tmp_path / "trusted.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, trusted)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(trusted)
    command = re.search(r'python -c "(.*)" and use', str(info.value)).group(1)
    subprocess.run([sys.executable, "-c", command], check=True, timeout=120)
    assert torch.equal(load_state_dict_file(tmp_path / "trusted.pt.weights.pt")["w"], torch.ones(2))
    # A file torch.save did not write is "not a torch.save file", not one holding objects.
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match=r"plain\.pkl: not a torch\.save file \(truncated, corrupt"):
        load_checkpoint(tmp_path / "plain.pkl")


# --- cached_path / download_file over HTTP ---------------------------------------------------------------------

def test_http_download_then_cache_hit_without_network(server: FileServer, tmp_path: Path) -> None:
    server.files["/data/vocab.txt"] = PAYLOAD
    url = server.url("/data/vocab.txt")
    first = cached_path(url, cache_dir=tmp_path, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert first.read_bytes() == PAYLOAD
    assert first.parent == tmp_path and first.name.endswith("-vocab.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no .partial / .validator left
    server.httpd.shutdown()  # from here on the network is gone: the cached copy must be enough
    again = cached_path(url, cache_dir=tmp_path, md5=hashlib.md5(PAYLOAD).hexdigest(), progress=False)
    assert again == first and len(server.gets("/data/vocab.txt")) == 1


def test_cache_dir_defaults_to_env(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/f.bin"] = b"abc"
    monkeypatch.setenv("BERT_CACHE", str(tmp_path / "cache"))
    assert cached_path(server.url("/f.bin"), progress=False).parent == tmp_path / "cache"


def test_same_basename_from_two_urls_does_not_collide(server: FileServer, tmp_path: Path) -> None:
    server.files["/a/vocab.txt"], server.files["/b/vocab.txt"] = b"first", b"second"
    a = cached_path(server.url("/a/vocab.txt"), cache_dir=tmp_path, progress=False)
    b = cached_path(server.url("/b/vocab.txt"), cache_dir=tmp_path, progress=False)
    assert a != b and a.read_bytes() == b"first" and b.read_bytes() == b"second"


def test_resume_partial_file_with_range(server: FileServer, tmp_path: Path) -> None:
    server.files["/big.bin"] = PAYLOAD
    dest = tmp_path / "big.bin"
    half = len(PAYLOAD) // 2
    (tmp_path / "big.bin.partial").write_bytes(PAYLOAD[:half])
    download_file(server.url("/big.bin"), dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.gets("/big.bin")[0]["Range"] == f"bytes={half}-"
    assert server.bytes_sent == len(PAYLOAD) - half


def test_partial_file_that_is_already_complete_is_just_renamed(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.partial").write_bytes(PAYLOAD)  # a run that died between the last byte and the rename
    assert download_file(server.url("/f.bin"), tmp_path / "f.bin", progress=False).read_bytes() == PAYLOAD
    assert server.bytes_sent == 0


def test_interrupted_transfer_is_retried_from_where_it_stopped(server: FileServer, tmp_path: Path) -> None:
    server.files["/big.bin"] = PAYLOAD
    server.truncate["/big.bin"] = 100_000  # first response dies after 100 kB
    dest = download_file(server.url("/big.bin"), tmp_path / "big.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    first, second = server.gets("/big.bin")
    assert "Range" not in first and second["If-Range"].startswith('"')
    kept = int(re.fullmatch(r"bytes=(\d+)-", second["Range"]).group(1))  # whole chunks written before the cut
    assert 0 < kept <= 100_000 and server.bytes_sent == 100_000 + len(PAYLOAD) - kept


def test_changed_remote_file_restarts_instead_of_splicing(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.partial").write_bytes(b"x" * 1000)
    (tmp_path / "f.bin.partial.validator").write_text('"an-older-version"')
    dest = download_file(server.url("/f.bin"), tmp_path / "f.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD  # If-Range did not match: the server sent the whole file


def test_checksum_mismatch_deletes_download_and_names_hashes(server: FileServer, tmp_path: Path) -> None:
    server.files["/f.bin"] = PAYLOAD
    url = server.url("/f.bin")
    with pytest.raises(ChecksumError) as info:
        cached_path(url, cache_dir=tmp_path, sha256="0" * 64, progress=False)
    message = str(info.value)
    assert url in message and "0" * 64 in message and hashlib.sha256(PAYLOAD).hexdigest() in message
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_fails_fast_with_clear_error(tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(DownloadError, match="offline") as info:
        cached_path(url, cache_dir=tmp_path, progress=False)
    assert url in str(info.value) and isinstance(info.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_http_404_is_not_retried(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/missing.json")
    with pytest.raises(DownloadError, match="404") as info:
        cached_path(url, cache_dir=tmp_path, progress=False)
    assert url in str(info.value) and len(server.gets("/missing.json")) == 1


def test_local_paths_are_returned_as_is(tmp_path: Path) -> None:
    local = tmp_path / "vocab.txt"
    local.write_text("[PAD]\n")
    assert cached_path(local) == local
    assert cached_path(local.as_uri()) == local
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        cached_path(tmp_path / "nope.txt")
    with pytest.raises(ChecksumError, match="vocab.txt"):
        cached_path(local, md5="0" * 32)
    assert local.exists()  # a user's own file is never deleted on mismatch


def test_download_file_copies_local_sources(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    dest = download_file(tmp_path / "src.txt", tmp_path / "out" / "dst.txt", sha256=digest)
    assert dest.read_text() == "hello"


# --- s3:// against moto's S3 server on 127.0.0.1 ------------------------------------------------------------------

@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto_server.start()
    host, port = moto_server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        moto_server.stop()


def test_s3_download_resume_and_errors(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="corpus")
    client.put_object(Bucket="corpus", Key="wiki/part-0.txt", Body=PAYLOAD)
    url = "s3://corpus/wiki/part-0.txt"

    path = cached_path(url, cache_dir=tmp_path / "cache", sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert path.read_bytes() == PAYLOAD and path.name.endswith("-part-0.txt")

    # Resume: a partial file tagged with the object's ETag keeps its bytes (here deliberately marked) and only the
    # rest is fetched with a ranged GET; the marker bytes surviving proves the existing prefix was not re-fetched.
    etag = client.head_object(Bucket="corpus", Key="wiki/part-0.txt")["ETag"]
    dest = tmp_path / "resumed.txt"
    (tmp_path / "resumed.txt.partial").write_bytes(b"#" * 1000)
    (tmp_path / "resumed.txt.partial.validator").write_text(etag)
    assert download_file(url, dest, progress=False).read_bytes() == b"#" * 1000 + PAYLOAD[1000:]

    # A partial file from another version of the object (ETag differs) is thrown away, not spliced.
    (tmp_path / "fresh.txt.partial").write_bytes(b"#" * 1000)
    (tmp_path / "fresh.txt.partial.validator").write_text('"stale"')
    assert download_file(url, tmp_path / "fresh.txt", progress=False).read_bytes() == PAYLOAD

    with pytest.raises(DownloadError, match="s3://corpus/missing.txt"):
        download_file("s3://corpus/missing.txt", tmp_path / "missing.txt", progress=False)


# --- safe_extract ----------------------------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        for name, data in members.items():
            handle.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as handle:
        for info in members:
            data = b"payload" if info.isreg() else b""
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_safe_extract_zip_and_tar_atomically(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "CoLA.zip", {"CoLA/train.tsv": b"a\tb\n", "CoLA/original/raw.tsv": b"x"})
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "CoLA" / "train.tsv").read_bytes() == b"a\tb\n"
    with pytest.raises(FileExistsError, match="out"):
        safe_extract(archive, tmp_path / "out")
    tarball = _tar(tmp_path / "t.tar.bz2", [_member("d/f.txt"), _member("d/alias", tarfile.SYMTYPE, "f.txt"),
                                            _member("d/same", tarfile.LNKTYPE, "d/f.txt")], mode="w:bz2")
    safe_extract(tarball, tmp_path / "out", overwrite=True)
    assert (out / "d" / "alias").resolve() == (out / "d" / "f.txt").resolve()
    assert (out / "d" / "same").read_bytes() == b"payload" and not (out / "CoLA").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CoLA.zip", "out", "t.tar.bz2"]  # no temp folders


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_safe_extract_refuses_escaping_zip_members(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"evil"})
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(name))):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


@pytest.mark.parametrize("member", [
    _member("../evil.txt"),
    _member("/tmp/evil.txt"),
    _member("link", tarfile.SYMTYPE, "../../outside"),
    _member("sub/link", tarfile.SYMTYPE, "/etc/passwd"),
    _member("hard", tarfile.LNKTYPE, "../outside"),
    _member("fifo", tarfile.FIFOTYPE),
], ids=["dotdot", "absolute", "symlink-up", "symlink-absolute", "hardlink-up", "fifo"])
def test_safe_extract_refuses_escaping_tar_members(tmp_path: Path, member: tarfile.TarInfo) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [_member("fine.txt"), member])
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(member.name))):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz"]


def test_safe_extract_rejects_non_archives(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(ValueError, match="notes.txt"):
        safe_extract(tmp_path / "notes.txt", tmp_path / "out")


CHAIN = [("l1", tarfile.SYMTYPE, "."), ("l1/l2", tarfile.SYMTYPE, ".."), ("l1/l2/escape.txt", tarfile.REGTYPE, "")]
"""``l1 -> .`` then ``l1/l2 -> ..``: each link alone stays inside by its own path, together they lead out."""


@pytest.fixture(params=["stdlib filter", "no stdlib filter"])
def tar_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the stdlib's tar "data" filter and again without it (as on Pythons that lack it), so that
    passing proves the project's own checks refuse what they must."""
    if request.param == "no stdlib filter":
        monkeypatch.setattr(file_utils, "_TAR_DATA_FILTER", None)
    elif file_utils._TAR_DATA_FILTER is None:
        pytest.skip("this Python has no tarfile.data_filter")
    return request.param


@pytest.mark.parametrize("members, refused", [
    (CHAIN, "l1/l2"),
    ([("a", tarfile.DIRTYPE, ""), ("a/up", tarfile.SYMTYPE, "../.."), ("a/up/x.txt", tarfile.REGTYPE, "")], "a/up"),
    # Each link is inside when it is added; the later `b -> .` turns `a -> b/..` into the folder's parent.
    ([("a", tarfile.SYMTYPE, "b/.."), ("b", tarfile.SYMTYPE, ".")], "a"),
    ([("l1", tarfile.SYMTYPE, "."), ("hard", tarfile.LNKTYPE, "l1/../secret")], "hard"),
    ([("loop1", tarfile.SYMTYPE, "loop2"), ("loop2", tarfile.SYMTYPE, "loop1"), ("loop1/x", tarfile.REGTYPE, "")],
     "loop2"),
], ids=["chain", "dir-link-up", "later-link-redirects", "hardlink-through-link", "loop"])
def test_safe_extract_resolves_symlink_chains(tmp_path: Path, tar_filter: str, members: list, refused: str) -> None:
    archive = _tar(tmp_path / "chain.tar", [_member(*m) for m in members], mode="w")
    calls = []
    real_extractall = tarfile.TarFile.extractall

    def extractall(self, *args, **kwargs):  # records whether extraction started at all
        calls.append(kwargs.get("filter"))
        return real_extractall(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tarfile.TarFile, "extractall", extractall)
        with pytest.raises(UnsafeArchiveError) as info:
            safe_extract(archive, tmp_path / "out" / "dest")
    message = str(info.value)
    assert message.startswith(f"{archive}: refusing") and repr(refused) in message and "\n" not in message
    assert calls == []  # refused by the project's own check, before tarfile wrote anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.tar", "out"]
    assert list((tmp_path / "out").iterdir()) == []  # no escape.txt beside dest, no temporary folder left


def test_safe_extract_keeps_links_that_stay_inside(tmp_path: Path, tar_filter: str) -> None:
    members = [_member("d", tarfile.DIRTYPE), _member("here", tarfile.SYMTYPE, "."),
               _member("here/d/f.txt"), _member("d/up", tarfile.SYMTYPE, ".."), _member("d/up/g.txt"),
               _member("d/sub", tarfile.DIRTYPE), _member("d/sub/back", tarfile.SYMTYPE, "../f.txt"),
               _member("d/hard", tarfile.LNKTYPE, "here/d/f.txt")]
    out = safe_extract(_tar(tmp_path / "ok.tar", members, mode="w"), tmp_path / "out")
    assert (out / "d" / "f.txt").read_bytes() == b"payload" and (out / "g.txt").read_bytes() == b"payload"
    assert (out / "d" / "sub" / "back").resolve() == (out / "d" / "f.txt").resolve()
    assert (out / "d" / "hard").read_bytes() == b"payload"


def test_safe_extract_zip_chain_is_refused_not_followed(tmp_path: Path) -> None:
    # zipfile writes symlink entries as plain files; the chain's third member would need `l1` as a folder.
    archive = tmp_path / "chain.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, target in (("l1", "."), ("l1/l2", "..")):
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK: a symlink entry as Info-ZIP stores it
            handle.writestr(info, target)
        handle.writestr("l1/l2/escape.txt", b"evil")
    with pytest.raises(UnsafeArchiveError, match=r"chain\.zip: refusing member 'l1/l2'.*'l1'"):
        safe_extract(archive, tmp_path / "out" / "dest")
    assert list((tmp_path / "out").iterdir()) == []
    # Without the member that needs it as a folder, a symlink entry is a small plain file inside the folder.
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as handle:
        info = zipfile.ZipInfo("l1")
        info.external_attr = (0o120777 << 16)
        handle.writestr(info, "..")
    out = safe_extract(tmp_path / "link.zip", tmp_path / "link")
    assert not (out / "l1").is_symlink() and (out / "l1").read_text() == ".."


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_safe_extract_gives_the_folder_mkdir_permissions(tmp_path: Path, kind: str) -> None:
    archive = (_zip(tmp_path / "a.zip", {"d/f.txt": b"x"}) if kind == "zip" else
               _tar(tmp_path / "a.tar.gz", [_member("d/f.txt")]))
    old = os.umask(0o027)
    try:
        out = safe_extract(archive, tmp_path / "out")
        out2 = safe_extract(archive, tmp_path / "out", overwrite=True)
    finally:
        os.umask(old)
    assert out == out2 and out.stat().st_mode & 0o777 == 0o750  # 0o777 & ~umask, as mkdir gives (mkdtemp: 0o700)
