"""Paths and bytes: atomic writes, safe checkpoint read/write, sha256, cached downloads, safe archive extraction."""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import secrets
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # torch is imported where used: Dask workers that only tokenize never pay for it
    import torch

PathLike = str | os.PathLike
"""A filesystem path: a ``str`` or any ``os.PathLike`` such as ``pathlib.Path``; the one alias the project uses."""

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong kind; the message names the file."""


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.tmp$")  # atomic_path's .<target name>.<random>.tmp


@contextlib.contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds, else remove it.

    The temporary file is ``.<target name>.<8 hex digits>.tmp`` in ``target``'s folder: hidden, and on the same
    filesystem, so the rename is atomic and readers see either the old complete ``target`` or the new complete one,
    never a partial file. It exists (empty) when the block starts; write it with anything that takes a path (h5py,
    pyarrow, ``open``). Its data is flushed to disk before the rename. Any exception in the block, KeyboardInterrupt
    included, removes it and propagates; only a process killed outright leaves it behind, for
    :func:`remove_stale_temp_files`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_file(target)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (:func:`atomic_path`) and rename it over ``path`` only if the block
    succeeds; ``mode``, ``encoding`` and ``newline`` are those of :func:`open`.

    Readers therefore see either the old complete file or the new complete file, never a partial one.
    """
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as handle:
        yield handle


def remove_stale_temp_files(folder: PathLike, target_glob: str = "*") -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` / :func:`atomic_write` left in ``folder`` by killed runs.

    Only regular files named ``.<target>.<8 hex digits>.tmp`` whose ``<target>`` matches ``target_glob`` (``fnmatch``
    syntax, e.g. ``"ckpt_*.pt"``) are removed. A write in progress has such a name too: call this only when no other
    process writes into ``folder`` (e.g. at start-up, before any writer runs). A missing folder holds nothing.

    Returns:
        The paths removed, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        target = _temp_target(entry.name)
        if target is None or not fnmatch.fnmatchcase(target, target_glob):
            continue
        if entry.is_symlink() or not entry.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        logger.info("removed stale temporary file %s", entry)
        removed.append(entry)
    return removed


def _create_temp_file(target: Path) -> Path:
    """Create an empty ``.<target name>.<8 hex digits>.tmp`` beside ``target`` (a name no one else holds)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 less the umask: the permissions of any new file (mkstemp would give 0o600).
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _temp_target(name: str) -> str | None:
    """The target name of a temporary file named by :func:`atomic_path`, or None for any other name."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def _fsync(path: Path) -> None:
    """Flush a closed file's data to disk, so that a rename never makes an incompletely stored file visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary name, then rename: a crash mid-write leaves any previous file intact."""
    import torch

    with atomic_write(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True`` (never full pickle); clear errors name the file.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds Python objects besides tensors and
            plain containers (which only a full unpickling, able to run arbitrary code, could rebuild).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _weights_only_detail(str(exc))
        if "global" not in detail.lower():  # an opcode the safe unpickler does not know: not a torch.save file
            raise CheckpointError(f"cannot read checkpoint {path}: not a torch.save file (truncated, corrupt or "
                                  f"written by another program; torch: {detail})") from exc
        convert = (f"python -c \"import torch; c = torch.load({str(path)!r}, weights_only=False); "
                   f"torch.save({{'model': c.get('model', c) if isinstance(c, dict) else c.state_dict()}}, "
                   f"{str(path) + '.weights.pt'!r})\"")
        raise CheckpointError(
            f"checkpoint {path} is not loaded: it holds Python objects other than tensors and plain containers "
            "(dicts, lists, numbers, strings), and unpickling those can run arbitrary code. If you trust the file, "
            f"convert it once to plain weights with {convert} and use the new file (torch: {detail})") from exc
    except Exception as exc:  # torch raises several types for truncated / corrupt files
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first[:300]} (the file may be "
                              "truncated or corrupt)") from exc


def _weights_only_detail(message: str) -> str:
    """The cause in torch's weights_only refusal (which global or opcode), without its advice to load unsafely."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    cause = next((line for line in lines if "GLOBAL" in line), None)
    if cause is None:
        cause = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
    cause = cause.removeprefix("WeightsUnpickler error:").strip()
    return cause.split(". ")[0].rstrip(".")[:300]


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file of any supported kind: ``.safetensors`` or a torch pickle (``.bin``/``.pt``/``.pth``).

    A torch file may hold a bare state dict or the reference's ``{"model": state_dict}``; the inner dict is returned.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    import torch

    obj = load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def utf8_error(path: PathLike) -> str | None:
    """Where a file stops being UTF-8, as "line N: not UTF-8 text (reason at byte B)", or None when it decodes.
    The file is decoded whole, so that line and byte are the file's, not those of a reader's buffer."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text ({exc.reason} at byte {exc.start})"
    return None


def sha256sum(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays constant."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- cached downloads: local paths, http(s) and s3 ---------------------------------------------------------------

CONNECT_TIMEOUT_S = 10.0
"""Seconds a server gets to accept a connection, so an offline machine fails in seconds instead of hanging."""
READ_TIMEOUT_S = 60.0
"""Seconds without a byte before a transfer counts as stalled (it is then retried from where it stopped)."""
RETRIES = 2
"""Extra attempts after a network failure; each one resumes the partial file instead of starting over."""
RETRY_BACKOFF_S = 1.0
"""Pause before retry ``n`` is ``n * RETRY_BACKOFF_S`` seconds."""
CHUNK_SIZE = 1 << 16
"""Bytes per read: an interrupted transfer loses at most the chunk in flight; the rest stays in the partial file."""


class DownloadError(OSError):
    """A remote file could not be fetched (unreachable host, not found, interrupted); the message names the URL."""


class ChecksumError(DownloadError):
    """A file's digest differs from the expected one; the message names the source and both digests."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction folder; the message names the archive and member."""


class _Transient(Exception):
    """A failure worth another attempt: connection refused or reset, timeout, 5xx status, short read."""


def default_cache_dir() -> Path:
    """Where :func:`cached_path` keeps downloads: ``$BERT_CACHE`` if set, else ``~/.cache/bert_recipe``."""
    return Path(os.environ.get("BERT_CACHE") or Path.home() / ".cache" / "bert_recipe")


def is_remote(url_or_path: PathLike) -> bool:
    """True for ``http://``, ``https://`` and ``s3://`` addresses; False for local paths and ``file://`` URLs."""
    return urlparse(str(url_or_path)).scheme in ("http", "https", "s3")


def cached_path(
    url_or_path: PathLike,
    cache_dir: PathLike | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Return a local path for a local file or a URL, downloading a URL only the first time.

    Local paths (and ``file://`` URLs) come back as they are, after the optional digest check. ``http(s)://`` and
    ``s3://`` URLs are fetched with :func:`download_file` into ``cache_dir`` (default :func:`default_cache_dir`) as
    ``<hash of URL>-<basename>``, so two URLs that both end in ``vocab.txt`` never share a file. A complete cached
    file is returned without touching the network.

    Raises:
        FileNotFoundError: a local path that does not exist.
        DownloadError: the URL could not be fetched (the message says the machine may be offline).
        ChecksumError: the file does not match ``sha256`` / ``md5`` (a downloaded file is deleted first).
    """
    source = str(url_or_path)
    if not is_remote(source):
        path = _local_path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if sha256 or md5:
            _verify(path, sha256, md5, source=str(path), delete=False)
        return path
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    return download_file(source, cache / f"{key}-{_basename(source)}", sha256=sha256, md5=md5, progress=progress)


def download_file(
    url_or_path: PathLike,
    dest: PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch one file to exactly ``dest`` and return ``dest``; a rerun resumes where an interrupted one stopped.

    Bytes go to ``<dest>.partial`` (its HTTP ETag / Last-Modified or S3 ETag kept in ``<dest>.partial.validator``,
    so a resume never splices two versions of a file together); the partial file is renamed to ``dest`` only once it
    is complete and matches the given digests. An existing ``dest`` that matches (or when no digest is given) is
    returned without any network access; one that does not match is fetched again. A local source is copied the
    same way, so a download mirror can be a plain folder.
    """
    dest = Path(dest)
    source = str(url_or_path)
    if dest.is_file():
        try:
            _verify(dest, sha256, md5, source=str(dest), delete=False)
            return dest
        except ChecksumError as exc:
            logger.warning("%s; fetching it again", exc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    if is_remote(source):
        logger.info("downloading %s -> %s", source, dest)
        _fetch_with_retries(source, partial, progress)
    else:
        local = _local_path(source)
        if not local.is_file():
            raise FileNotFoundError(f"no such file: {local}")
        shutil.copyfile(local, partial)
    _verify(partial, sha256, md5, source=source, delete=True)
    os.replace(partial, dest)
    _validator_file(partial).unlink(missing_ok=True)
    return dest


def _local_path(source: str) -> Path:
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(source).expanduser()


def _basename(url: str) -> str:
    return unquote(PurePosixPath(urlparse(url).path).name) or "download"


def _validator_file(partial: Path) -> Path:
    return partial.with_name(partial.name + ".validator")


def _read_validator(partial: Path) -> str:
    try:
        return _validator_file(partial).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def _write_validator(partial: Path, validator: str) -> None:
    if validator:
        _validator_file(partial).write_text(validator, encoding="utf-8")
    else:
        _validator_file(partial).unlink(missing_ok=True)


def _discard_partial(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _validator_file(partial).unlink(missing_ok=True)


def _verify(path: Path, sha256: str | None, md5: str | None, *, source: str, delete: bool) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the given digests; with ``delete`` remove it first."""
    expected = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if not expected:
        return
    digests = {name: hashlib.new(name) for name in expected}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            for digest in digests.values():
                digest.update(chunk)
    for name, value in expected.items():
        actual = digests[name].hexdigest()
        if actual != value:
            if delete:
                _discard_partial(path)
            note = "; the bad download was deleted, run again to fetch it anew" if delete else f" (file {path})"
            raise ChecksumError(f"checksum mismatch for {source}: expected {name} {value}, got {actual}{note}")


def _fetch_with_retries(url: str, partial: Path, progress: bool) -> None:
    """Run the fetcher for ``url``'s scheme, retrying transient failures a couple of times, then fail clearly."""
    fetch: Callable[[str, Path, bool], None] = _fetch_s3 if url.startswith("s3://") else _fetch_http
    last: _Transient | None = None
    for attempt in range(RETRIES + 1):
        if attempt:
            logger.warning("download of %s failed (%s); retry %d of %d", url, last, attempt, RETRIES)
            time.sleep(RETRY_BACKOFF_S * attempt)
        try:
            fetch(url, partial, progress)
            return
        except _Transient as exc:
            last = exc
    kept = partial.stat().st_size if partial.exists() else 0
    if kept:
        raise DownloadError(
            f"download of {url} failed after {RETRIES + 1} attempts: {last}; the {kept} bytes received are kept in "
            f"{partial} and running again resumes from there"
        )
    raise DownloadError(
        f"cannot download {url}: {last}. Check the address; this machine may be offline or unable to reach the "
        "host (a mirror or a pre-downloaded local file avoids the network)"
    )


def _stream_to(partial: Path, chunks: Iterator[bytes], start: int, total: int | None, desc: str,
               progress: bool) -> None:
    """Append (``start`` > 0) or write ``chunks`` to ``partial`` with a progress bar; check the final size."""
    from tqdm.auto import tqdm

    with open(partial, "ab" if start else "wb") as handle, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
    ) as bar:
        for chunk in chunks:
            handle.write(chunk)
            bar.update(len(chunk))
        handle.flush()
        os.fsync(handle.fileno())
    size = partial.stat().st_size
    if total is not None and size > total:
        _discard_partial(partial)
        raise _Transient(f"received {size} bytes but the file has {total}; starting over")
    if total is not None and size < total:
        raise _Transient(f"connection closed after {size} of {total} bytes")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000); unknown parts are None."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[len("bytes "):].partition("/")
    first = span.split("-", 1)[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _fetch_http(url: str, partial: Path, progress: bool) -> None:
    """One HTTP(S) attempt: resume via ``Range`` + ``If-Range`` when a partial file exists, else start fresh."""
    import requests

    offset = partial.stat().st_size if partial.exists() else 0
    # identity: a gzip-encoded body would make byte offsets and Content-Length refer to different bytes.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _read_validator(partial)
        if validator:
            headers["If-Range"] = validator  # the server sends the whole new file if it changed since
    try:
        with requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as resp:
            if resp.status_code == 416 and offset:
                if _content_range(resp.headers.get("Content-Range"))[1] == offset:
                    return  # the partial file already holds every byte; only the rename was missing
                _discard_partial(partial)
                raise _Transient(f"server refused to resume at byte {offset}; starting over")
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
            if resp.status_code >= 400:
                raise DownloadError(f"cannot download {url}: HTTP {resp.status_code} {resp.reason}")
            start = 0
            if resp.status_code == 206:
                start = _content_range(resp.headers.get("Content-Range"))[0] or 0
                if start != offset:
                    _discard_partial(partial)
                    raise _Transient(f"server resumed at byte {start} instead of {offset}; starting over")
            else:
                etag = resp.headers.get("ETag", "")
                _write_validator(partial, etag if etag and not etag.startswith("W/") else
                                 resp.headers.get("Last-Modified", ""))
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length is not None and length.isdigit() else None
            _stream_to(partial, resp.iter_content(CHUNK_SIZE), start, total, _basename(url), progress)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's cause, without the wrapping
        raise _Transient(f"{type(exc).__name__}: {reason or exc}") from exc
    except requests.RequestException as exc:
        raise DownloadError(f"cannot download {url}: {type(exc).__name__}: {exc}") from exc


def _s3_client() -> Any:
    """A boto3 S3 client honouring ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; anonymous when no credentials."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"total_max_attempts": 1})  # our own loop retries, resuming the partial file
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=UNSIGNED))  # public buckets need no account
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return session.client("s3", endpoint_url=endpoint, config=config)


def _fetch_s3(url: str, partial: Path, progress: bool) -> None:
    """One S3 attempt: ranged ``GetObject`` pinned to the object's ETag when a partial file exists."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise DownloadError(f"malformed S3 URL {url}: expected s3://<bucket>/<key>")
    try:
        client = _s3_client()
        head = client.head_object(Bucket=bucket, Key=key)
        total, etag = int(head["ContentLength"]), head.get("ETag", "")
        offset = partial.stat().st_size if partial.exists() else 0
        if offset and (offset > total or _read_validator(partial) != etag):
            offset = 0  # the object changed (or the partial file is not ours): start over
        if offset and offset == total:
            return
        request = {"Bucket": bucket, "Key": key}
        if offset:
            request.update(Range=f"bytes={offset}-", IfMatch=etag)
        else:
            _write_validator(partial, etag)
        body = client.get_object(**request)["Body"]
        _stream_to(partial, body.iter_chunks(CHUNK_SIZE), offset, total, _basename(url), progress)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status == 412:
            _discard_partial(partial)
            raise _Transient("the object changed while resuming; starting over") from exc
        if status >= 500 or error.get("Code") in ("SlowDown", "RequestTimeout"):
            raise _Transient(f"S3 {error.get('Code')}: {error.get('Message')}") from exc
        raise DownloadError(f"cannot download {url}: S3 error {error.get('Code') or status}"
                            f"{': ' + error['Message'] if error.get('Message') else ''}") from exc
    except (ConnectionError, HTTPClientError, IncompleteReadError) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
    except BotoCoreError as exc:
        raise DownloadError(f"cannot download {url}: {type(exc).__name__}: {exc}") from exc


# --- safe archive extraction ---------------------------------------------------------------------------------------

_ZIP_SUFFIXES = (".zip",)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_TAR_DATA_FILTER = getattr(tarfile, "data_filter", None)
"""The stdlib's "data" extraction filter (Python >= 3.11.4, 3.10.12), a second guard behind our own checks."""
_MAX_LINK_HOPS = 40  # Linux's limit on symlinks followed in one path lookup (ELOOP beyond it)


def safe_extract(archive: PathLike, dest: PathLike, *, overwrite: bool = False) -> Path:
    """Extract a zip or tar (plain, .gz, .bz2, .xz) archive into folder ``dest`` in one step; return ``dest``.

    Every member is checked before anything is written, by resolving its path as the filesystem will, through the
    symlinks that earlier members of the same archive create (``l1 -> .`` then ``l1/l2 -> ..`` makes
    ``l1/l2/x`` land beside ``dest``): a member whose resolved path leaves ``dest``, an absolute path or ``..``
    component, a symlink or hard link whose resolved target leaves ``dest`` (also after later members are in
    place), a symlink loop, or a device / FIFO entry raises :class:`UnsafeArchiveError` naming the archive and the
    member. These checks do not depend on the stdlib's tar filters, which older Pythons lack; where they exist
    they run as well. Zip symlink entries are written as small regular files by :mod:`zipfile`, so they cannot
    escape; a zip whose member would need a file entry as its folder is refused too.

    Members go to a temporary folder beside ``dest`` that is renamed to ``dest`` only when extraction finished, so
    ``dest`` is either absent or complete; ``dest`` gets the permissions of a folder made by ``mkdir`` (0o777 less
    the umask). An existing ``dest`` is an error unless ``overwrite`` replaces it.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"extraction target already exists: {dest} (pass overwrite=True to replace it)")
    name = archive.name.lower()
    if name.endswith(_ZIP_SUFFIXES) or (not name.endswith(_TAR_SUFFIXES) and zipfile.is_zipfile(archive)):
        extract: Callable[[Path, Path], None] = _extract_zip
    elif name.endswith(_TAR_SUFFIXES) or tarfile.is_tarfile(archive):
        extract = _extract_tar
    else:
        raise ValueError(f"{archive} is neither a zip nor a tar archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(dest, "extracting")
    try:
        extract(archive, tmp)
        if dest.exists():
            old = _make_temp_dir(dest, "old")
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _make_temp_dir(dest: Path, kind: str) -> Path:
    """Create ``.<dest name>.<8 hex digits>.<kind>`` beside ``dest`` with ``mkdir``'s permissions (mkdtemp: 0o700)."""
    while True:
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.{kind}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _member_parts(archive: Path, name: str) -> list[str]:
    """The components of member ``name``; an absolute path, a drive letter or a ``..`` is refused."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}, whose path leaves the extraction folder")
    return list(path.parts)


class _ArchiveTree:
    """The symlinks an archive has created so far, to resolve member paths as the kernel will after extraction.

    Paths are tuples of components below the extraction folder; ``None`` stands for "outside it".
    """

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.links: dict[tuple[str, ...], tuple[str, str]] = {}  # location -> (link target, member name)

    def resolve(self, parts: Sequence[str], member: str) -> tuple[str, ...] | None:
        """Where ``parts`` (from the extraction folder) ends up after following the symlinks created so far, the
        last component included; ``member`` is named in the error for a symlink loop."""
        resolved: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return None  # above the extraction folder
                resolved.pop()
                continue
            location = (*resolved, part)
            if location in self.links:
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise UnsafeArchiveError(f"{self.archive}: refusing member {member!r}, whose path goes through "
                                             f"a symlink loop at {'/'.join(location)!r}")
                target = self.links[location][0].replace("\\", "/")
                if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
                    return None
                pending = target.split("/") + pending  # relative to the folder holding the link
                continue
            resolved.append(part)
        return tuple(resolved)

    def add_member(self, name: str, link: str | None = None, hardlink: bool = False) -> None:
        """Check a member against the tree so far and record it; raise :class:`UnsafeArchiveError` if it escapes."""
        parts = _member_parts(self.archive, name)
        if link is None or hardlink:
            # Files and folders are written through a symlink already at their path (open() and chmod() follow
            # it), and a hard link over an existing path falls back to writing the file there.
            if self.resolve(parts, name) is None:
                raise UnsafeArchiveError(f"{self.archive}: refusing member {name!r}, which an earlier symlink "
                                         "of the archive sends outside the extraction folder")
            # A hard link's target is a path from the extraction folder (tarfile joins it to the folder).
            target = PurePosixPath(link.replace("\\", "/")) if hardlink else None
            if target is not None and (target.is_absolute() or (len(link) > 1 and link[1] == ":")
                                       or self.resolve(target.parts, name) is None):
                raise UnsafeArchiveError(f"{self.archive}: refusing hard link member {name!r} -> {link!r}, which "
                                         "points outside the extraction folder")
            return
        if not parts:
            raise UnsafeArchiveError(f"{self.archive}: refusing symlink member {name!r} at the extraction folder")
        folder = self.resolve(parts[:-1], name)
        if folder is None:
            raise UnsafeArchiveError(f"{self.archive}: refusing symlink member {name!r}, which an earlier symlink "
                                     "of the archive sends outside the extraction folder")
        location = (*folder, parts[-1])
        self.links[location] = (link, name)
        if self.resolve(location, name) is None:
            raise UnsafeArchiveError(f"{self.archive}: refusing symlink member {name!r} -> {link!r}, which points "
                                     "outside the extraction folder")

    def check_final(self) -> None:
        """Every symlink must still resolve inside once all members are in place (a later link can redirect an
        earlier one: ``a -> b/..`` is inside until ``b -> .`` arrives)."""
        for location, (link, name) in self.links.items():
            if self.resolve(location, name) is None:
                raise UnsafeArchiveError(f"{self.archive}: refusing symlink member {name!r} -> {link!r}, which "
                                         "points outside the extraction folder once the archive's other links "
                                         "are in place")


def _extract_zip(archive: Path, root: Path) -> None:
    with zipfile.ZipFile(archive) as handle:
        infos = handle.infolist()
        files: dict[tuple[str, ...], str] = {}
        for info in infos:
            parts = tuple(_member_parts(archive, info.filename))
            if not info.is_dir() and parts:
                files[parts] = info.filename
        for info in infos:
            parts = tuple(_member_parts(archive, info.filename))
            for depth in range(1, len(parts)):
                if parts[:depth] in files:
                    raise UnsafeArchiveError(
                        f"{archive}: refusing member {info.filename!r}, whose folder is the file member "
                        f"{files[parts[:depth]]!r} (a symlink entry, which is extracted as a plain file?)")
        handle.extractall(root)


def _extract_tar(archive: Path, root: Path) -> None:
    with tarfile.open(archive) as handle:
        members = handle.getmembers()
        tree = _ArchiveTree(archive)
        for member in members:
            if member.ischr() or member.isblk() or member.isfifo():
                raise UnsafeArchiveError(f"{archive}: refusing special-file member {member.name!r}")
            tree.add_member(member.name, member.linkname if member.issym() or member.islnk() else None,
                            hardlink=member.islnk())
        tree.check_final()
        if _TAR_DATA_FILTER is None:
            handle.extractall(root, members=members)
            return
        try:
            handle.extractall(root, members=members, filter=_TAR_DATA_FILTER)
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"{archive}: refusing member {exc.tarinfo.name!r}: {exc}") from exc
