"""Pre-training data loader: LDDL Parquet or reference HDF5 shards -> masked BERT batches, sharded and resumable.

This module holds the epoch plan, the dataset that follows it and the loader the trainer uses; shards are listed and
read by ``data.shards`` and their rows turned into masked batches by ``data.batches``.

How an epoch is laid out (every rank and every DataLoader worker computes the same plan from the shard list, the
seed and the epoch, so nothing is communicated):

1. Shards are grouped by bin (unbinned data is one bin). Per bin, the shard list is shuffled with an RNG seeded by
   ``(seed, epoch)`` (identical on every rank) and read as one concatenated stream of N samples.
2. Rank ``r`` takes the contiguous slice ``[r * n, (r + 1) * n)`` of that stream, ``n = N // world_size``. Every rank
   therefore gets exactly the same number of samples and batches (DDP needs equal step counts) whatever the number
   of shards; the ``N % world_size`` (< world_size) samples at the end of the shuffled stream are left out of that
   epoch only (a different few each epoch). With balanced shards whose count divides ``world_size`` this is the
   reference's ``files[rank::world_size]`` assignment up to relabelling, and each rank reads only its own files.
3. The rank's stream is shuffled in blocks of ``shuffle_buffer_size`` samples (a uniform permutation inside each
   block, seeded per block), standing in for LDDL's shuffle buffer of the same size, and cut into batches of
   ``batch_size`` (the last batch of a bin may be smaller).
4. Binned data: the order in which the bins' batches are drawn is a random interleaving seeded by ``(seed, epoch)``
   (each step picks a bin with probability proportional to its remaining batches, as LDDL does); it depends only on
   per-bin counts, which are identical on every rank, so every rank draws the same bin at each step.

The rank's batch sequence is thus a pure function of (shards, seed, epoch, rank, world_size, batch_size): it does not
depend on ``num_workers``. Worker ``w`` of ``W`` builds batches ``start + w, start + w + W, ...`` and the DataLoader
hands them out round-robin, i.e. in order. The price is that each worker reads every shard of its rank (it keeps
only the blocks it needs in memory); the gain is that results are identical for any ``num_workers`` and a resume
only needs the number of batches consumed, with no skipping through data.

Batches are dicts of CPU tensors: ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels`` ([B, S] int64,
``labels`` -1 where not masked) and ``next_sentence_labels`` ([B] int64, 1 = random next). S is the batch's longest
sequence rounded up to ``sequence_length_alignment``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batches import assemble_fixed, assemble_pairs
from data.formats import ShardError
from data.ragged import offsets_of
from data.shards import FixedRows, PairRows, ShardReader, ShardSet, Vocab, find_shards
from file_utils import PathLike

logger = logging.getLogger(__name__)

STATE_VERSION = 1

# Independent RNG streams: every random decision is seeded by (seed, epoch, stream, ...), never by a shared state.
_FILE_ORDER, _BIN_ORDER, _BLOCK_ORDER, _MASKING = range(4)


# --------------------------------------------------------------------------------------------------------------------
# The epoch plan
# --------------------------------------------------------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass
class _BinPlan:
    """This rank's samples of one bin for one epoch, as pieces: row ranges of shards cut at shuffle-block edges."""

    index: int  # position of the bin in the sorted bin ids
    num_samples: int  # samples of this bin for this rank
    piece_shard: np.ndarray  # shard index of each piece
    piece_rows: np.ndarray  # [P, 2] row range [lo, hi) inside the shard
    piece_start: np.ndarray  # [P + 1] position of each piece in the rank's stream


@dataclass
class _EpochPlan:
    bins: list[_BinPlan]
    step_bin: np.ndarray  # [J] which bin the rank's batch j is drawn from
    step_batch: np.ndarray  # [J] which batch of that bin


class PretrainingDataset(IterableDataset):
    """Yields this rank's batches of one epoch (``epoch``), from batch ``start_batch`` on; see the module docstring.

    Inside a DataLoader worker ``w`` of ``W`` it yields batches ``start_batch + w :: W`` so that the DataLoader's
    round-robin hands all batches out in order.
    """

    def __init__(self, shard_set: ShardSet, vocab: Vocab | None, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 12345, masked_lm_prob: float = 0.15,
                 max_seq_length: int | None = None, max_predictions_per_seq: int | None = None,
                 sequence_length_alignment: int = 8, shuffle_buffer_size: int = 16384,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        if shard_set.format == "parquet" and vocab is None:
            raise ValueError("--vocab_file is required to read Parquet shards (they hold WordPiece strings)")
        self.shard_set = shard_set
        self.vocab = vocab
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.masked_lm_prob = masked_lm_prob
        self.max_seq_length = max_seq_length
        self.max_predictions_per_seq = max_predictions_per_seq
        self.alignment = sequence_length_alignment
        self.block_size = shuffle_buffer_size
        self.vocab_size = vocab_size
        self.bin_ids = sorted({shard.bin_id for shard in shard_set.shards})
        totals = [sum(s.num_samples for s in shard_set.shards if s.bin_id == b) for b in self.bin_ids]
        self.samples_per_rank = [total // world_size for total in totals]
        self.dropped_per_epoch = sum(totals) - world_size * sum(self.samples_per_rank)
        self.num_batches = sum(math.ceil(n / batch_size) for n in self.samples_per_rank)
        if self.num_batches == 0:
            raise ValueError(f"{shard_set.input_dir} holds {sum(totals)} samples, too few for {world_size} ranks")
        self.epoch = 0
        self.start_batch = 0

    def plan(self, epoch: int) -> _EpochPlan:
        """This rank's layout of ``epoch`` (pure function of the configuration and the epoch)."""
        bins = []
        for index, bin_id in enumerate(self.bin_ids):
            members = [i for i, shard in enumerate(self.shard_set.shards) if shard.bin_id == bin_id]
            order = np.asarray(members)[_rng(self.seed, epoch, _FILE_ORDER, bin_id).permutation(len(members))]
            counts = np.array([self.shard_set.shards[i].num_samples for i in order], dtype=np.int64)
            bins.append(self._bin_plan(index, order, offsets_of(counts), self.samples_per_rank[index]))
        per_bin = np.array([math.ceil(b.num_samples / self.batch_size) for b in bins], dtype=np.int64)
        step_bin = np.repeat(np.arange(len(bins)), per_bin)
        if len(bins) > 1:  # a uniform interleaving == drawing bins with probability proportional to batches left
            step_bin = _rng(self.seed, epoch, _BIN_ORDER).permutation(step_bin)
        order = np.argsort(step_bin, kind="stable")
        step_batch = np.empty_like(step_bin)
        step_batch[order] = np.arange(len(step_bin)) - np.repeat(offsets_of(per_bin)[:-1], per_bin)
        return _EpochPlan(bins, step_bin, step_batch)

    def _bin_plan(self, index: int, shard_order: np.ndarray, stream_offsets: np.ndarray, n: int) -> _BinPlan:
        lo, hi = self.rank * n, (self.rank + 1) * n
        shards, ranges, starts = [], [], []
        for k, shard in enumerate(shard_order):
            begin, end = max(lo, stream_offsets[k]), min(hi, stream_offsets[k + 1])
            cut = begin
            while cut < end:  # split at shuffle-block edges so a worker holds only the blocks it is using
                block_end = min(end, lo + ((cut - lo) // self.block_size + 1) * self.block_size)
                shards.append(int(shard))
                ranges.append((cut - stream_offsets[k], block_end - stream_offsets[k]))
                starts.append(cut - lo)
                cut = block_end
        starts.append(n)
        return _BinPlan(index, n, np.asarray(shards, dtype=np.int64),
                        np.asarray(ranges, dtype=np.int64).reshape(-1, 2), np.asarray(starts, dtype=np.int64))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor] | _WorkerShardError]:
        info = get_worker_info()
        if info is None:
            return self.iter_batches(self.epoch, range(self.start_batch, self.num_batches))
        steps = range(self.start_batch + info.id, self.num_batches, info.num_workers)
        return _shard_errors_as_items(self.iter_batches(self.epoch, steps))

    def iter_batches(self, epoch: int, steps: Sequence[int]) -> Iterator[dict[str, torch.Tensor]]:
        """Build the rank's batches ``steps`` (increasing) of ``epoch``."""
        plan = self.plan(epoch)
        reader = ShardReader(self.shard_set, self.vocab, self.max_seq_length, self.vocab_size)
        pieces: dict[tuple[int, int], PairRows | FixedRows] = {}
        blocks: dict[tuple[int, int], np.ndarray] = {}
        for step in steps:
            bin_plan = plan.bins[plan.step_bin[step]]
            first = int(plan.step_batch[step]) * self.batch_size
            last = min(first + self.batch_size, bin_plan.num_samples)
            # This and later batches of the bin start in block `oldest` or after: drop what lies before it.
            oldest = first // self.block_size
            for key in [key for key in blocks if key[0] == bin_plan.index and key[1] < oldest]:
                del blocks[key]
            for key in [key for key in pieces if key[0] == bin_plan.index
                        and bin_plan.piece_start[key[1]] // self.block_size < oldest]:
                del pieces[key]
            stream = np.sort(self._shuffled(epoch, bin_plan, np.arange(first, last), blocks))
            piece_of = np.searchsorted(bin_plan.piece_start, stream, side="right") - 1
            parts = []
            for piece in np.unique(piece_of):
                key = (bin_plan.index, int(piece))
                if key not in pieces:
                    shard = self.shard_set.shards[bin_plan.piece_shard[piece]]
                    pieces[key] = reader.read(shard, *map(int, bin_plan.piece_rows[piece]))
                parts.append(pieces[key].take(stream[piece_of == piece] - bin_plan.piece_start[piece]))
            if self.shard_set.format == "hdf5":
                yield assemble_fixed(FixedRows.concat(parts), self.alignment, self.max_seq_length)
            else:
                rng = _rng(self.seed, epoch, _MASKING, self.rank, step)
                yield assemble_pairs(PairRows.concat(parts), self.vocab, rng, self.masked_lm_prob,
                                      self.max_predictions_per_seq, self.alignment, self.max_seq_length)

    def _shuffled(self, epoch: int, bin_plan: _BinPlan, positions: np.ndarray,
                  blocks: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
        """Map batch positions to stream positions through the per-block permutations."""
        block = positions // self.block_size
        out = np.empty_like(positions)
        for b in np.unique(block):
            key = (bin_plan.index, int(b))
            if key not in blocks:
                size = min(self.block_size, bin_plan.num_samples - int(b) * self.block_size)
                blocks[key] = _rng(self.seed, epoch, _BLOCK_ORDER, self.rank, bin_plan.index, b).permutation(size)
            selected = block == b
            out[selected] = b * self.block_size + blocks[key][positions[selected] - b * self.block_size]
        return out


@dataclass
class _WorkerShardError:
    """A ShardError raised in a DataLoader worker, handed to the main process as an item of the stream.

    Raised there, torch would re-raise it in the main process with a multi-line "Caught ShardError in DataLoader
    worker process 0. Original Traceback ..." message; as an item it arrives in batch order and the loader raises
    the original one-line ShardError.
    """

    message: str


def _shard_errors_as_items(batches: Iterator[dict[str, torch.Tensor]],
                           ) -> Iterator[dict[str, torch.Tensor] | _WorkerShardError]:
    """Yield ``batches``; a ShardError ends them with a ``_WorkerShardError`` item (worker processes only)."""
    try:
        yield from batches
    except ShardError as err:
        yield _WorkerShardError(str(err))


# --------------------------------------------------------------------------------------------------------------------
# The loader the trainer uses
# --------------------------------------------------------------------------------------------------------------------

_STATE_CONFIG_KEYS = ("seed", "world_size", "batch_size", "shuffle_buffer_size", "num_samples", "num_shards")


class PretrainingDataLoader:
    """Epoch-aware, resumable iterator over a rank's pre-training batches.

    ``iter(loader)`` runs the rest of the current epoch (all of it after a fresh start) and then advances ``epoch``;
    call it again for the next epoch, or use ``batches()``, an endless generator over epochs. ``len(loader)`` is the
    number of batches per epoch, the same on every rank. Keep one live iterator at a time.

    ``state_dict()`` counts the batches handed out so far (a batch counts as consumed when it is yielded), so save it
    after the step that used the last batch; the trainer in ``utils.train_loop`` takes batches without prefetching.
    """

    def __init__(self, dataset: PretrainingDataset, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batches_consumed = 0  # batches of `epoch` handed out
        self.samples_consumed = 0  # sequences in those batches (this rank)

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batches_consumed >= len(self):
            self._next_epoch()
        self.dataset.epoch, self.dataset.start_batch = self.epoch, self.batches_consumed
        # A private generator: creating a DataLoader iterator otherwise draws from torch's global RNG, which would
        # shift the trainer's dropout masks and break bitwise resume (all randomness here is seeded explicitly).
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.epoch))
        for batch in loader:
            if isinstance(batch, _WorkerShardError):
                raise ShardError(batch.message)
            self.batches_consumed += 1
            self.samples_consumed += int(batch["input_ids"].shape[0])
            yield batch
        if self.batches_consumed != len(self):
            raise RuntimeError(f"epoch {self.epoch} ended after {self.batches_consumed} of {len(self)} batches")
        self._next_epoch()

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches, epoch after epoch (``epoch`` advances as each one ends)."""
        while True:
            yield from self

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batches_consumed = 0
        self.samples_consumed = 0

    def state_dict(self) -> dict[str, int]:
        """The data position as plain ints (loads with ``weights_only=True``); identical on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self.samples_consumed,
            "seed": self.dataset.seed,
            "world_size": self.dataset.world_size,
            "batch_size": self.dataset.batch_size,
            "shuffle_buffer_size": self.dataset.block_size,
            "num_samples": self.dataset.shard_set.num_samples,
            "num_shards": len(self.dataset.shard_set.shards),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next batches are the ones an uninterrupted run would have produced.

        Raises ValueError naming the keys when the state was saved with another seed, world size, batch size,
        shuffle buffer or data set (the remaining samples would not be those the saved run had left).
        """
        missing = [key for key in ("epoch", "batches_consumed", *_STATE_CONFIG_KEYS) if key not in state]
        if missing:
            raise ValueError(f"data loader state lacks {missing}")
        current = self.state_dict()
        changed = {key: (state[key], current[key]) for key in _STATE_CONFIG_KEYS if int(state[key]) != current[key]}
        if changed:
            detail = ", ".join(f"{key} saved {saved} now {now}" for key, (saved, now) in changed.items())
            raise ValueError(f"cannot resume the data position exactly: {detail}")
        if not 0 <= int(state["batches_consumed"]) <= len(self):
            raise ValueError(f"data loader state has batches_consumed={state['batches_consumed']}, "
                             f"but an epoch has {len(self)} batches")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        self.samples_consumed = int(state.get("samples_consumed", 0))


def get_pretraining_data_loader(input_dir: PathLike, *, vocab_file: PathLike | None, batch_size: int,
                                rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 12345,
                                masked_lm_prob: float = 0.15, max_seq_length: int | None = None,
                                max_predictions_per_seq: int | None = None, sequence_length_alignment: int = 8,
                                shuffle_buffer_size: int = 16384, pin_memory: bool = False,
                                start_state: Mapping[str, Any] | None = None,
                                vocab_size: int | None = None) -> PretrainingDataLoader:
    """Build the loader for ``input_dir`` (Parquet or HDF5 shards, detected by file names).

    Args:
        input_dir: directory of shards (searched recursively).
        vocab_file: WordPiece vocabulary, one token per line; needed for Parquet (HDF5 holds ids already).
        batch_size: sequences per batch on this rank (micro-batch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: DataLoader worker processes; 0 builds batches in this process. Results do not depend on it.
        seed: base seed of every random choice (shard order, shuffling, bin order, masking).
        masked_lm_prob: dynamic masking probability (Parquet without masked_lm_* columns).
        max_seq_length: if set, a sample longer than this is an error naming its shard; batches are not padded past it.
        max_predictions_per_seq: if set, caps dynamic masking per sequence (static masks are used as stored).
        sequence_length_alignment: batches are padded to their longest sequence rounded up to this.
        shuffle_buffer_size: samples per shuffle block (LDDL's default buffer size).
        pin_memory: pin batches for faster host-to-GPU copies.
        start_state: a ``state_dict()`` to continue from.
        vocab_size: if set, the model's number of token ids (e.g. ``BertConfig.padded_vocab_size``): a vocabulary
            file with more tokens is an error, and so is a token id >= ``vocab_size`` read from a shard (a
            ShardError naming the file and the id, raised when the batch holding it is built).

    Raises:
        ValueError: a bad argument, named. FileNotFoundError / ShardError: see ``data.shards.find_shards``.
        ShardError (while iterating, also from DataLoader workers, as the same one-line message): a shard that
            cannot be read or holds bad rows.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("seed", seed, 0),
                             ("sequence_length_alignment", sequence_length_alignment, 1),
                             ("shuffle_buffer_size", shuffle_buffer_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0.0 <= masked_lm_prob <= 1.0:
        raise ValueError(f"masked_lm_prob must be in [0, 1], got {masked_lm_prob}")
    if max_predictions_per_seq is not None and max_predictions_per_seq < 1:
        raise ValueError(f"max_predictions_per_seq must be >= 1, got {max_predictions_per_seq}")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    shard_set = find_shards(input_dir)
    vocab = Vocab.from_file(vocab_file) if vocab_file is not None else None
    if vocab is not None and vocab_size is not None and vocab.size > vocab_size:
        raise ValueError(f"vocab_file {vocab_file} has ids up to {vocab.size - 1}, more than the model's vocab_size "
                         f"{vocab_size} allows")
    dataset = PretrainingDataset(
        shard_set, vocab, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
        masked_lm_prob=masked_lm_prob, max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq, sequence_length_alignment=sequence_length_alignment,
        shuffle_buffer_size=shuffle_buffer_size, vocab_size=vocab_size)
    logger.info("%s: %d %s shard(s)%s, %d samples (%s masking); %d batches of %d per epoch on each of %d rank(s), "
                "%d sample(s) left out per epoch so ranks stay equal",
                shard_set.input_dir, len(shard_set.shards), shard_set.format,
                f" in {len(dataset.bin_ids)} bins" if shard_set.binned else "", shard_set.num_samples,
                "static" if shard_set.static_masking else "dynamic", dataset.num_batches, batch_size, world_size,
                dataset.dropped_per_epoch)
    loader = PretrainingDataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
    if start_state is not None:
        loader.load_state_dict(start_state)
    return loader
