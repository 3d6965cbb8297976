"""Deterministic, resumable, rank-sharded batches for training (:class:`StepLoader`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from pathvl.config import TrainConfig
from pathvl.dist import DistInfo

__all__ = ["StepLoader"]


class StepLoader:
    """Deterministic, resumable, rank-sharded batches over a map-style dataset.

    Epoch ``e`` uses the permutation drawn from ``seed`` and ``e``; global batch ``i`` is the block
    ``perm[i * B * W : (i + 1) * B * W]`` (``B`` the per-rank batch, ``W`` the world size) and rank ``r``
    takes every ``W``-th index of it, so a run on ``W`` processes sees the same global batches as one
    process with batch ``B * W``. The incomplete last global batch is dropped (gathered losses need the
    same batch size on every rank). The position (epoch, batch) advances as batches are handed out, so
    ``state_dict()`` saved between steps puts a resumed run exactly where it stopped.

    A dataset with a ``set_epoch(epoch)`` method is told the epoch before each pass (so random patch and
    sub-caption samples change from epoch to epoch and are the same again on a resume). For an exact
    resume with ``num_workers > 0``, a dataset's own randomness must come from the sample index and the
    epoch, not from a worker's running generator.

    Args:
        dataset: Map-style dataset returning samples the ``collate_fn`` combines into a dict.
        batch_size: Per-rank batch size.
        seed: Seed of the permutations.
        shuffle: Shuffle each epoch; otherwise the dataset order.
        rank: This process's rank.
        world_size: Number of processes.
        num_workers: DataLoader workers.
        collate_fn: Batch collation (torch's default when None).
        pin_memory: Pin host memory (for CUDA).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.num_batches = self.num_samples // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out

    @classmethod
    def from_config(
        cls, dataset: Dataset, cfg: TrainConfig, dist_info: DistInfo, collate_fn: Callable | None = None
    ) -> StepLoader:
        """A loader with the batch size, workers, shuffling and seed of ``cfg``."""
        return cls(
            dataset,
            cfg.data.batch_size,
            seed=cfg.run.seed,
            shuffle=cfg.data.shuffle,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
        )

    def __len__(self) -> int:
        return self.num_batches

    def _epoch_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**63)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of sample indices for ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self._epoch_seed(epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        usable = self.num_batches * self.batch_size * self.world_size
        mine = order[:usable][self.rank :: self.world_size]  # (num_batches * batch_size,)
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.num_batches)]

    def __iter__(self) -> Iterator[Any]:
        """Yields the rest of the current epoch (the next epoch when this one is used up)."""
        if self.batch >= self.num_batches:
            self.epoch, self.batch = self.epoch + 1, 0
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):  # before the workers get their copy of the dataset
            set_epoch(self.epoch)
        batches = self.epoch_batches(self.epoch)[self.batch :]
        # Own generator: creating the loader must not draw from the global RNG (exact resume).
        g = torch.Generator().manual_seed(self._epoch_seed(self.epoch) * 7 + self.batch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            generator=g,
        )
        for batch in loader:
            self.batch += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position for the checkpoint."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Moves to a saved position (takes effect at the next ``iter``)."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
