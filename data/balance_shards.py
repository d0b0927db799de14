"""Balance Parquet parts into shards of equal size (reference section 6.3 step 3, LDDL ``balance_dask_output``).

Every rank of the LDDL loader reads whole files and truncates each file to the smallest file's sample count, so
unequal files waste samples or hang ranks. This tool rewrites the parts under ``--indir`` as ``--num-shards``
files ``shard-<i>.parquet`` (per bin: ``shard-<i>.parquet_<bin_id>``) whose sample counts differ by at most one:
the first ``total % num_shards`` shards of a bin hold one extra sample (nothing is dropped), or, with
``--drop-remainder``, those extra samples are dropped so every shard of a bin holds exactly ``total // num_shards``.
It also writes ``.num_samples.json`` (file basename -> samples), which the loader reads instead of opening files.

Shard i is the i-th contiguous run of samples of the parts taken in name order; parts are already shuffled, so
no randomness is added here. Only the row groups a shard needs are read, shards are written in parallel
(``map_fn``: threads by default, Dask workers from ``preprocess_pretraining``), each to a temporary directory and
renamed into place only after all are complete; the inputs are deleted last unless ``--keep-orig`` is given.
The plan is computed in one pass from the files' footers, so there is no search that can fail to converge (the
era-A text sharder could loop forever, reference issue #1083) and memory holds at most a few row groups per shard.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from file_utils import atomic_write

NUM_SAMPLES_FILE = ".num_samples.json"
_BIN_SUFFIX = re.compile(r"\.parquet_(\d+)$")


def parquet_files(directory: str | os.PathLike) -> list[Path]:
    """Parquet files (``*.parquet`` and binned ``*.parquet_<bin>``) directly under ``directory``, sorted by name.

    Hidden files (temporaries) are skipped; names are sorted with numbers compared as numbers (part.2 < part.10).
    """
    def natural(path: Path) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    found = [
        p
        for p in Path(directory).iterdir()
        if p.is_file() and not p.name.startswith(".") and (p.name.endswith(".parquet") or _BIN_SUFFIX.search(p.name))
    ]
    return sorted(found, key=natural)


def bin_id_of(path: Path) -> Optional[int]:
    """The bin id of a ``*.parquet_<bin>`` file, None for an unbinned ``*.parquet``."""
    match = _BIN_SUFFIX.search(path.name)
    return int(match.group(1)) if match else None


def num_rows(path: Path) -> int:
    """Sample count of a Parquet file from its footer (the data is not read)."""
    return pq.ParquetFile(path).metadata.num_rows


def write_num_samples_cache(directory: str | os.PathLike) -> dict[str, int]:
    """(Re)write ``.num_samples.json`` for the Parquet files in ``directory`` (LDDL ``generate_num_samples_cache``)."""
    counts = {p.name: num_rows(p) for p in parquet_files(directory)}
    _write_json(Path(directory) / NUM_SAMPLES_FILE, counts)
    return counts


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=0, sort_keys=True)


@dataclass(frozen=True)
class ShardPlan:
    """What one output shard holds: ``pieces`` are ``(input path, first row, row count)`` in order."""

    output: str
    pieces: tuple[tuple[str, int, int], ...]
    schema_source: str

    @property
    def num_samples(self) -> int:
        return sum(count for _, _, count in self.pieces)


def plan_shards(
    files: Sequence[Path], counts: Sequence[int], num_shards: int, output_dir: Path, suffix: str, drop_remainder: bool
) -> list[ShardPlan]:
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
        plans.append(ShardPlan(str(output_dir / f"shard-{i}.parquet{suffix}"), tuple(pieces), str(files[0])))
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
    """Write one planned shard (to its temporary path); returns its sample count."""
    schema = pq.read_schema(plan.schema_source)
    tables = [_read_rows(path, first, count) for path, first, count in plan.pieces]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    pq.write_table(table.cast(schema), plan.output)
    return table.num_rows


def balance_shards(
    indir: str | os.PathLike,
    num_shards: int,
    outdir: Optional[str | os.PathLike] = None,
    bin_ids: Optional[Iterable[int]] = None,
    keep_orig: bool = False,
    drop_remainder: bool = False,
    map_fn: Optional[Callable[[Callable, list], list]] = None,
) -> dict[str, int]:
    """Rewrite the Parquet files of ``indir`` as ``num_shards`` balanced shards per bin in ``outdir``.

    Args:
        indir: directory of the parts (``*.parquet`` or ``*.parquet_<bin>``).
        num_shards: shards per bin.
        outdir: where the shards go (default ``indir``).
        bin_ids: bins to balance (default: all found); files of other bins are left alone.
        keep_orig: keep the input files (then no input may have the name of an output).
        drop_remainder: make all shards of a bin exactly equal by dropping ``total % num_shards`` samples.
        map_fn: ``map_fn(function, items) -> results``, used to write shards in parallel (default: a thread pool).

    Returns:
        The ``.num_samples.json`` content (shard basename -> samples), also written to ``outdir``.
    """
    indir = Path(indir)
    outdir = Path(outdir) if outdir is not None else indir
    if num_shards < 1:
        raise ValueError(f"--num-shards must be positive, got {num_shards}")
    if not indir.is_dir():
        raise FileNotFoundError(f"--indir {indir} is not a directory")
    files = parquet_files(indir)
    if not files:
        raise FileNotFoundError(f"no Parquet files under --indir {indir}")
    binned = {bin_id_of(p) is not None for p in files}
    if len(binned) > 1:
        raise ValueError(f"--indir {indir} mixes binned (*.parquet_<bin>) and unbinned (*.parquet) files")
    groups: dict[Optional[int], list[Path]] = {}
    for path in files:
        groups.setdefault(bin_id_of(path), []).append(path)
    if bin_ids is not None:
        wanted = set(bin_ids)
        missing = wanted - set(groups)
        if missing:
            raise ValueError(f"--bin-ids {sorted(missing)} have no files under {indir}")
        groups = {b: paths for b, paths in groups.items() if b in wanted}

    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".balance-", dir=outdir))
    try:
        plans = []
        inputs = [p for paths in groups.values() for p in paths]
        for bin_id in sorted(groups, key=lambda b: -1 if b is None else b):
            paths = groups[bin_id]
            suffix = "" if bin_id is None else f"_{bin_id}"
            plans += plan_shards(paths, [num_rows(p) for p in paths], num_shards, staging, suffix, drop_remainder)
        final = {Path(plan.output).name for plan in plans}
        clash = sorted(p.name for p in inputs if p.parent.resolve() == outdir.resolve() and p.name in final)
        if keep_orig and clash:
            raise ValueError(f"--keep-orig: inputs {clash[:3]} would be overwritten by shards; pass another --outdir")
        if map_fn is None:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                written = list(pool.map(write_shard, plans))
        else:
            written = list(map_fn(write_shard, plans))
        if not keep_orig:
            for path in inputs:
                path.unlink()
        counts = {}
        for plan, rows in zip(plans, written):
            name = Path(plan.output).name
            os.replace(plan.output, outdir / name)
            counts[name] = rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cache = {p.name: num_rows(p) for p in parquet_files(outdir) if p.name not in counts}
    cache.update(counts)
    _write_json(outdir / NUM_SAMPLES_FILE, cache)
    if any(rows == 0 for rows in counts.values()):
        print(f"warning: some shards under {outdir} are empty (fewer samples than --num-shards)", file=sys.stderr)
    return counts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The LDDL ``balance_dask_output`` flags, plus ``--drop-remainder`` and ``--num-samples-cache-only``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indir", required=True, help="Directory of the Parquet parts to balance.")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="Shards per bin to write (required unless --num-samples-cache-only).")
    parser.add_argument("--outdir", default=None, help="Output directory (default: --indir, replacing the parts).")
    parser.add_argument("--bin-ids", type=int, nargs="*", default=None,
                        help="Only balance these bins (default: every bin found).")
    parser.add_argument("--keep-orig", action=argparse.BooleanOptionalAction, default=False,
                        help="Keep the input parts (default: delete them once the shards are written).")
    parser.add_argument("--drop-remainder", action="store_true",
                        help="Drop total %% num-shards samples per bin so all shards are exactly equal.")
    parser.add_argument("--num-samples-cache-only", action="store_true",
                        help="Only rewrite .num_samples.json for the files in --indir (LDDL generate_num_samples_cache).")
    args = parser.parse_args(argv)
    if not args.num_samples_cache_only and args.num_shards is None:
        parser.error("--num-shards is required (or pass --num-samples-cache-only)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
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
