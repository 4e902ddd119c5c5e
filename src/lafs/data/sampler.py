"""Resumable, distributed batch order: the data position is part of a checkpoint.

Epoch ``e`` visits a random permutation seeded by ``(seed, e)`` in *global* batches of
``batch_size x world_size`` images; rank ``r`` (the global rank, so multi-node runs shard correctly) takes
slice ``r`` of each global batch. So a 2-process run with batch B sees exactly the images of a 1-process
run with batch 2B, in the same order, and the position ``(epoch, batch)`` alone restores the stream: a run
resumed at batch k of epoch e continues with the batch an uninterrupted run would have drawn. The last
incomplete global batch of an epoch is dropped (every rank must step together).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        global_batch = batch_size * world_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one global batch of {global_batch} "
                f"(train.batch_size={batch_size} x {world_size} processes)"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batches_per_epoch = num_samples // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Next iteration starts at batch ``batch`` of epoch ``epoch``."""
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"batch {batch} outside 0..{self.batches_per_epoch} of an epoch")
        self.epoch, self.start_batch = epoch, batch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.num_samples, generator=g).numpy()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = self.order(self.epoch)
        gb = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            lo = b * gb + self.rank * self.batch_size
            yield order[lo : lo + self.batch_size].tolist()


def collate(items: list[dict]) -> dict:
    """A batch of dataset items: images and labels stacked, keypoints when every item has them, and the messages
    of the bad records skipped to serve them (the training loop counts those)."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
    }
    if all("keypoints" in it for it in items):  # KP-RPE: the keypoints ride with their images
        batch["keypoints"] = torch.stack([it["keypoints"] for it in items])
    bad = [m for it in items for m in it.get("bad_records", ())]
    if bad:  # records the dataset skipped to serve these items (counted by the loop, across workers)
        batch["bad_records"] = bad
    return batch
