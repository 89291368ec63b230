"""Deterministic, resumable batches.

The order is a pure function of (seed, step): epoch e visits the dataset in the permutation drawn
from seed + e, epochs are concatenated, and step s takes positions [s*G, (s+1)*G) of that stream
(G = global batch). Resuming at step s therefore needs no saved iterator state, and any split of
the global batch over processes and accumulation steps sees the same samples.
"""
from __future__ import annotations

import torch


def global_batch_indices(num_items: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of the global batch at `step` (may straddle an epoch boundary)."""
    start = step * batch
    out, filled = [], 0
    while filled < batch:
        epoch, offset = divmod(start + filled, num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = perm[offset:offset + batch - filled]
        out.append(take)
        filled += len(take)
    return torch.cat(out)


def flip_mask(batch: int, seed: int, step: int) -> torch.Tensor:
    """Which samples of the global batch at `step` are mirrored (p = 1/2), reproducibly."""
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed * 100_003 + 7_919 * step + 1)) < 0.5


class BatchStream:
    """Yields this process's micro-batches (images, labels) for one optimizer step at a time.

    The global batch is split into world_size contiguous shards (one per rank) and each shard into
    grad_accum micro-batches.
    """

    def __init__(self, dataset, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, hflip: bool = False, num_workers: int = 0):
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"train.batch_size={global_batch} must be divisible by processes x grad_accum "
                             f"= {world_size} x {grad_accum}")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.hflip, self.num_workers = hflip, num_workers
        self.per_rank = global_batch // world_size
        self.micro = self.per_rank // grad_accum

    def _fetch(self, indices: torch.Tensor):
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(indices)
        if self.num_workers == 0:
            items = [self.dataset[int(i)] for i in indices]
        else:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, indices.tolist()),
                                                 batch_size=len(indices), num_workers=self.num_workers)
            return next(iter(loader))
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def step(self, step: int):
        """List of grad_accum (images, labels) micro-batches for this rank at `step`."""
        indices = global_batch_indices(len(self.dataset), self.global_batch, self.seed, step)
        lo = self.rank * self.per_rank
        mine = indices[lo:lo + self.per_rank]
        flip = flip_mask(self.global_batch, self.seed, step)[lo:lo + self.per_rank] if self.hflip else None
        if flip is not None and getattr(self.dataset, "has_flipped", False):
            images, labels = self.dataset.batch(mine, flip)            # latents extracted from mirrored images
        else:
            images, labels = self._fetch(mine)
            if flip is not None:
                flip = flip.view(-1, *[1] * (images.ndim - 1))         # images (B, C, H, W) or clips (B, C, F, H, W)
                images = torch.where(flip, images.flip(-1), images)
        return [(images[i:i + self.micro], labels[i:i + self.micro]) for i in range(0, self.per_rank, self.micro)]
