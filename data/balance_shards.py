"""Balance Parquet parts into shards of equal size (reference section 6.3 step 3, LDDL ``balance_dask_output``).

Every rank of the LDDL loader reads whole files and truncates each file to the smallest file's sample count, so
unequal files waste samples or hang ranks. This tool rewrites the parts under ``--indir`` as ``--num-shards``
files ``shard-<i>.parquet`` (per bin: ``shard-<i>.parquet_<bin_id>``) whose sample counts differ by at most one:
the first ``total % num_shards`` shards of a bin hold one extra sample (nothing is dropped), or, with
``--drop-remainder``, those extra samples are dropped so every shard of a bin holds exactly ``total // num_shards``.
It also writes ``.num_samples.json`` (file basename -> samples), which the loader reads instead of opening files.

Shard i is the i-th contiguous run of samples of the parts taken in name order; parts are already shuffled, so
no randomness is added here. The plan is computed in one pass from the files' footers, so there is no search that
can fail to converge (the era-A text sharder could loop forever, reference issue #1083), only the row groups a
shard needs are read (memory holds a few row groups per shard), and shards are written in parallel (``map_fn``:
threads by default, Dask workers from ``preprocess_pretraining``).

A run that stops at any point (an error, Ctrl-C, a killed job) loses no sample, and running it again finishes it:
  1. the shards are written into a hidden staging folder under ``--outdir``; the inputs are not touched;
  2. a commit record (``.balance-commit.json``) naming the shards and the inputs to delete is written atomically:
     from then on the staged shards hold the data;
  3. the shards are renamed into place (an input with a shard's name is thereby replaced);
  4. only then are the other inputs deleted (unless ``--keep-orig``), ``.num_samples.json`` written, and the
     staging folder and commit record removed.
A run that finds a commit record first completes steps 3-4 of the interrupted run; one that finds only a staging
folder (stopped before step 2, with every input still in place) removes it. The loader refuses a directory that
holds a commit record.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data.formats import (
    BALANCE_COMMIT_FILE,
    NUM_SAMPLES_FILE,
    num_rows,
    parquet_bin_id,
    parquet_files,
    shard_file_name,
    write_num_samples,
    write_parquet,
)
from file_utils import PathLike, atomic_write, remove_stale_temp_files

_STAGING_PREFIX = ".balance-"


def write_num_samples_cache(directory: PathLike) -> dict[str, int]:
    """(Re)write ``.num_samples.json`` for the Parquet files in ``directory`` (LDDL ``generate_num_samples_cache``)."""
    counts = {p.name: num_rows(p) for p in parquet_files(directory)}
    write_num_samples(directory, counts)
    return counts


@dataclass(frozen=True)
class ShardPlan:
    """What one output shard holds: ``pieces`` are ``(input path, first row, row count)`` in order."""

    output: str
    pieces: tuple[tuple[str, int, int], ...]
    schema_source: str

    @property
    def num_samples(self) -> int:
        return sum(count for _, _, count in self.pieces)


def plan_shards(files: Sequence[Path], counts: Sequence[int], num_shards: int, output_dir: Path,
                bin_id: int | None, drop_remainder: bool) -> list[ShardPlan]:
    """Assign contiguous sample ranges of ``files`` to ``num_shards`` shards of (almost) equal size."""
    total = sum(counts)
    base, extra = divmod(total, num_shards)
    sizes = [base + (0 if drop_remainder or i >= extra else 1) for i in range(num_shards)]
    plans, file_index, row = [], 0, 0
    for i, size in enumerate(sizes):
        pieces = []
        while size > 0:
            while counts[file_index] - row == 0:
                file_index, row = file_index + 1, 0
            take = min(size, counts[file_index] - row)
            pieces.append((str(files[file_index]), row, take))
            row += take
            size -= take
        plans.append(ShardPlan(str(output_dir / shard_file_name(i, bin_id)), tuple(pieces), str(files[0])))
    return plans


def _read_rows(path: str, first: int, count: int) -> pa.Table:
    """Rows ``[first, first + count)`` of a Parquet file, reading only the row groups that hold them."""
    source = pq.ParquetFile(path)
    groups, group_first, start = [], 0, None
    for g in range(source.metadata.num_row_groups):
        group_rows = source.metadata.row_group(g).num_rows
        if group_first + group_rows > first and group_first < first + count:
            if start is None:
                start = group_first
            groups.append(g)
        group_first += group_rows
    return source.read_row_groups(groups).slice(first - start, count)


def write_shard(plan: ShardPlan) -> int:
    """Write one planned shard (into the staging folder); returns its sample count."""
    schema = pq.read_schema(plan.schema_source)
    tables = [_read_rows(path, first, count) for path, first, count in plan.pieces]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    write_parquet(table.cast(schema), plan.output)
    return table.num_rows


def balance_shards(
    indir: PathLike,
    num_shards: int,
    outdir: PathLike | None = None,
    bin_ids: Iterable[int] | None = None,
    keep_orig: bool = False,
    drop_remainder: bool = False,
    map_fn: Callable[[Callable, list], list] | None = None,
) -> dict[str, int]:
    """Rewrite the Parquet files of ``indir`` as ``num_shards`` balanced shards per bin in ``outdir``.

    An interrupted earlier run into ``outdir`` is completed first (see the module docstring); if it was run with
    the same arguments, that completes the job and its counts are returned.

    Args:
        indir: directory of the parts (``*.parquet`` or ``*.parquet_<bin>``).
        num_shards: shards per bin.
        outdir: where the shards go (default ``indir``).
        bin_ids: bins to balance (default: all found); files of other bins are left alone.
        keep_orig: keep the input files (then no input may have the name of an output).
        drop_remainder: make all shards of a bin exactly equal by dropping ``total % num_shards`` samples.
        map_fn: ``map_fn(function, items) -> results``, used to write shards in parallel (default: a thread pool).

    Returns:
        The balanced shards' basenames -> samples (also in ``outdir``'s ``.num_samples.json``).
    """
    indir = Path(indir)
    outdir = Path(outdir) if outdir is not None else indir
    if num_shards < 1:
        raise ValueError(f"--num-shards must be positive, got {num_shards}")
    wanted = None if bin_ids is None else sorted(set(bin_ids))
    request = {"indir": str(indir.resolve()), "num_shards": num_shards, "bin_ids": wanted, "keep_orig": keep_orig,
               "drop_remainder": drop_remainder}
    interrupted = _finish_interrupted_run(outdir)
    if interrupted is not None and interrupted["request"] == request:
        return interrupted["shards"]
    if not indir.is_dir():
        raise FileNotFoundError(f"--indir {indir} is not a directory")
    files = parquet_files(indir)
    if not files:
        raise FileNotFoundError(f"no Parquet files under --indir {indir}")
    binned = {parquet_bin_id(p.name) is not None for p in files}
    if len(binned) > 1:
        raise ValueError(f"--indir {indir} mixes binned (*.parquet_<bin>) and unbinned (*.parquet) files")
    groups: dict[int | None, list[Path]] = {}
    for path in files:
        groups.setdefault(parquet_bin_id(path.name), []).append(path)
    if wanted is not None:
        missing = set(wanted) - set(groups)
        if missing:
            raise ValueError(f"--bin-ids {sorted(missing)} have no files under {indir}")
        groups = {b: paths for b, paths in groups.items() if b in wanted}

    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=outdir))
    try:
        plans = []
        inputs = [p for paths in groups.values() for p in paths]
        for bin_id in sorted(groups, key=lambda b: -1 if b is None else b):
            paths = groups[bin_id]
            plans += plan_shards(paths, [num_rows(p) for p in paths], num_shards, staging, bin_id, drop_remainder)
        final = {Path(plan.output).name for plan in plans}
        clash = sorted(p.name for p in inputs if p.parent.resolve() == outdir.resolve() and p.name in final)
        if keep_orig and clash:
            raise ValueError(f"--keep-orig: inputs {clash[:3]} would be overwritten by shards; pass another --outdir")
        if map_fn is None:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                written = list(pool.map(write_shard, plans))
        else:
            written = list(map_fn(write_shard, plans))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit = {
        "request": request,
        "staging": staging.name,
        "shards": {Path(plan.output).name: rows for plan, rows in zip(plans, written)},
        "delete": [] if keep_orig else [str(p.resolve()) for p in inputs],
    }
    with atomic_write(outdir / BALANCE_COMMIT_FILE, "w", encoding="utf-8") as handle:
        json.dump(commit, handle, indent=1)
    return _complete(outdir, commit)


def _complete(outdir: Path, commit: dict[str, Any]) -> dict[str, int]:
    """Steps 3 and 4 of the module docstring for a committed run; a partly completed run can be completed again."""
    staging = outdir / commit["staging"]
    counts: dict[str, int] = commit["shards"]
    for name in counts:
        if (staging / name).exists():
            os.replace(staging / name, outdir / name)
    lost = [name for name in counts if not (outdir / name).is_file()]
    if lost:
        raise RuntimeError(f"{outdir}: balanced shards {lost[:3]} are missing from the staging folder and the output; "
                           f"the inputs listed in {BALANCE_COMMIT_FILE} are kept")
    shards = {(outdir / name).resolve() for name in counts}
    for path in map(Path, commit["delete"]):
        if path.resolve() not in shards:  # an input of a shard's name was replaced by that shard in the step above
            path.unlink(missing_ok=True)
    cache = {p.name: num_rows(p) for p in parquet_files(outdir) if p.name not in counts}
    cache.update(counts)
    write_num_samples(outdir, cache)
    shutil.rmtree(staging, ignore_errors=True)
    (outdir / BALANCE_COMMIT_FILE).unlink()
    if any(rows == 0 for rows in counts.values()):
        print(f"warning: some shards under {outdir} are empty (fewer samples than --num-shards)", file=sys.stderr)
    return counts


def _finish_interrupted_run(outdir: Path) -> dict[str, Any] | None:
    """Complete a run into ``outdir`` that stopped after its commit; remove what a run stopped before it left.

    Returns the completed run's commit record, or None when there was none.
    """
    if not outdir.is_dir():
        return None
    commit = None
    commit_file = outdir / BALANCE_COMMIT_FILE
    if commit_file.is_file():
        commit = json.loads(commit_file.read_text(encoding="utf-8"))
        print(f"completing the interrupted balancing recorded in {commit_file}", file=sys.stderr)
        _complete(outdir, commit)
    for staging in outdir.glob(_STAGING_PREFIX + "*"):
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
    for name in (BALANCE_COMMIT_FILE, NUM_SAMPLES_FILE):
        remove_stale_temp_files(outdir, name)
    return commit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The LDDL ``balance_dask_output`` flags, plus ``--drop-remainder`` and ``--num-samples-cache-only``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indir", required=True, help="Directory of the Parquet parts to balance.")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="Shards per bin to write (required unless --num-samples-cache-only).")
    parser.add_argument("--outdir", default=None, help="Output directory (default: --indir, replacing the parts).")
    parser.add_argument("--bin-ids", type=int, nargs="*", default=None,
                        help="Only balance these bins (default: every bin found).")
    parser.add_argument("--keep-orig", action=argparse.BooleanOptionalAction, default=False,
                        help="Keep the input parts (default: delete them once the shards are in place).")
    parser.add_argument("--drop-remainder", action="store_true",
                        help="Drop total %% num-shards samples per bin so all shards are exactly equal.")
    parser.add_argument("--num-samples-cache-only", action="store_true",
                        help="Only rewrite .num_samples.json for the files in --indir "
                             "(LDDL generate_num_samples_cache).")
    args = parser.parse_args(argv)
    if not args.num_samples_cache_only and args.num_shards is None:
        parser.error("--num-shards is required (or pass --num-samples-cache-only)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = parse_args(argv)
    try:
        if args.num_samples_cache_only:
            counts = write_num_samples_cache(args.indir)
        else:
            counts = balance_shards(
                args.indir, args.num_shards, args.outdir, args.bin_ids, args.keep_orig, args.drop_remainder
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(counts)} files, {sum(counts.values())} samples; counts in {NUM_SAMPLES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
