"""Partial FC: a model-parallel, optionally sampled margin-softmax classifier for 100k+ identities.

An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021
(arXiv:2010.05222; insightface ``arcface_torch/partial_fc_v2.py`` is the reference implementation).

What is sharded. The class centres W (num_classes x D) are split by rows over the ranks: rank r owns the
contiguous block ``shard_range(num_classes, r, world_size)`` and only that block lives in its
:class:`~lafs.heads.margin.MarginHead` (``margin_head.weight``). The embeddings and labels of the local batches
are all-gathered, so each rank scores the whole global batch against its own centres; the softmax
cross-entropy is then computed across the shards (all_reduce MAX of the row maxima, all_reduce SUM of the
exponential sums, the target logit contributed by the rank that owns the label), and every rank returns the
same scalar: the mean over the GLOBAL batch. The full logit matrix never exists anywhere.

What is sampled. With ``sample_rate < 1`` each rank keeps, per step, max(#positives, int(sample_rate *
num_local)) of its centres: every centre whose class occurs in the global batch (the positives), the rest drawn
uniformly without replacement from its other centres (the negatives), using torch's global RNG (so a
trainer that saves and restores the RNG state resumes exactly). Unsampled centres take no part in the step
and get an exactly zero gradient. With ``sample_rate == 1`` nothing is sampled and no RNG is consumed.

Gradient convention. The backbone is wrapped in DistributedDataParallel, which AVERAGES its gradients over the
ranks; PartialFC is not (its weight differs per rank) and gets no DDP hooks. The embedding all-gather is
differentiable: its backward sums the gradients every rank computed for the gathered embeddings (each rank
only sees its own columns of the softmax) and hands this rank its own rows multiplied by world_size. After
DDP's averaging the backbone gradient therefore equals the gradient of the global-batch mean loss, exactly
as in single-process training on the global batch. The weight-shard gradient needs no correction: it is the
gradient of the global-batch mean loss with respect to this rank's rows. Every rank must call ``backward``
(the all-gather's backward is a collective).

AdaFace. Its running norm statistics are updated from the norms of the gathered (global) batch, so every
rank keeps identical statistics and ``full_state_dict`` can take them from any rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassifierState
from .margin import MarginHead, build_head

__all__ = ["PartialFC", "build_partial_fc"]

# Rows generated per chunk when initialising a shard from the full-matrix distribution (bounds peak memory).
_INIT_CHUNK_ROWS = 8192


def _resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def _all_gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; rank r contributes ``sizes[r]`` rows."""
    # all_gather needs equal shapes on all ranks: pad to the largest block, trim afterwards
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    tensor = tensor.contiguous()
    blocks = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(blocks, tensor)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)])


class _AllGatherEmbeddings(torch.autograd.Function):
    """All-gather whose backward sums over ranks and scales by world_size (see the module docstring)."""

    @staticmethod
    def forward(ctx, local: Tensor, sizes: list[int], rank: int) -> Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        ctx.world_size = len(sizes)
        return _all_gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # each rank holds d(loss)/d(gathered) through its own columns only; the sum over ranks is the full
        # gradient. Summed in fp32: bf16 partial sums would lose the small contributions.
        dtype = grad.dtype
        total = grad.to(torch.float32, copy=True).contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        mine = total[ctx.start : ctx.stop] * ctx.world_size  # undoes DDP's averaging of the backbone
        return mine.to(dtype), None, None


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits whose columns are split over ranks.

    ``logits``: global batch x this rank's (sampled) classes, fp32. ``labels``: the column of each row's
    target on this rank, -1 where another rank owns it; every row must be owned by exactly one rank.
    Returns the same scalar on every rank; the gradient is with respect to this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, world_size: int) -> Tensor:
        distributed = world_size > 1
        row_max = logits.max(dim=1).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        owned = labels >= 0
        target = shifted.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        target = torch.where(owned, target, torch.zeros_like(target))
        exp = shifted.exp_()  # shifted is a fresh tensor: reuse its memory for the softmax
        sum_exp = exp.sum(dim=1)
        if distributed:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM)
            dist.all_reduce(target, op=dist.ReduceOp.SUM)
        # log-sum-exp form rather than -log(softmax[target]): no underflow to log(0) at s = 64
        loss = (sum_exp.log() - target).mean()
        softmax = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, labels)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, labels = ctx.saved_tensors
        owned = labels >= 0
        grad = softmax.clone()
        grad.scatter_add_(1, labels.clamp_min(0)[:, None], -owned.to(grad.dtype)[:, None])
        grad.mul_(grad_loss / softmax.shape[0])
        return grad, None, None


class PartialFC(ClassifierState, nn.Module):
    """Margin softmax loss over class centres sharded across ranks, with optional centre sampling.

    ``margin_head`` holds this rank's shard: its ``num_classes`` is the shard size ``num_local`` and its rows are
    the global classes ``class_start .. class_start + num_local - 1``. PartialFC uses its ``weight`` and its
    ``margin_logits``; ``forward(embeddings, labels)`` returns the global-batch mean loss (module docstring:
    what is sharded, what is sampled, and the gradient convention). Use ``full_state_dict`` /
    ``load_full_state_dict`` for checkpoints, not ``state_dict``: they hold the whole weight and so resume on
    any number of processes.

    After a sampled forward, ``sampled_index`` holds the sorted local rows that took part (else None).

    For a trainer it is a sharded :class:`~lafs.heads.base.ClassifierState`: the hooks below gather and shard the
    centres and their optimizer state; mixup's soft targets are not supported.
    """

    sharded = True
    supports_mixup = False

    def __init__(
        self,
        margin_head: MarginHead,
        num_classes: int,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = _resolve_rank_world(rank, world_size)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes = int(num_classes)
        self.class_start, self.num_local = self.shard_range(self.num_classes, self.rank, self.world_size)
        if margin_head.weight.shape[0] != self.num_local:
            raise ValueError(
                f"rank {self.rank} of {self.world_size} owns {self.num_local} of {self.num_classes} classes, "
                f"but the margin head has {margin_head.weight.shape[0]} centres (build it with num_classes="
                f"{self.num_local}, or use build_partial_fc)"
            )
        self.margin_head = margin_head
        self.embedding_size = int(margin_head.weight.shape[1])
        self.sample_rate = float(sample_rate)
        # at least one column per rank: the distributed softmax takes a max over this rank's columns
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.sampling = self.num_sample < self.num_local
        self.sampled_index: Tensor | None = None

    @staticmethod
    def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
        """(class_start, num_local) of ``rank``: contiguous, sizes differ by at most one, lower ranks larger."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_classes < world_size:
            raise ValueError(f"{num_classes} classes cannot be split over {world_size} ranks (one at least each)")
        base, extra = divmod(num_classes, world_size)
        return rank * base + min(rank, extra), base + (1 if rank < extra else 0)

    @property
    def weight(self) -> nn.Parameter:
        """This rank's shard of the class centres (num_local x D)."""
        return self.margin_head.weight

    def _shard_sizes(self) -> list[int]:
        return [self.shard_range(self.num_classes, r, self.world_size)[1] for r in range(self.world_size)]

    def _require_process_group(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"PartialFC with world_size={self.world_size} needs torch.distributed initialised")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"PartialFC was built for world_size={self.world_size}, the process group has {dist.get_world_size()}"
            )

    def _check_labels(self, labels: Tensor) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            values = labels[bad].unique().tolist()
            shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
            raise ValueError(f"labels must be class ids in [0, {self.num_classes}); got {shown}")

    @torch.no_grad()
    def sample(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Draw this step's centres for the global-batch ``labels``.

        Returns (index, local_labels): the sorted local rows kept (all positives plus random negatives, at
        least ``num_sample`` in all) and each row's target column within ``index``, -1 where another rank owns
        the class. Consumes ``num_local`` draws of the global RNG whatever the labels, so the RNG stream does not
        depend on the data.
        """
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        positives = torch.unique(local[mine])
        scores = torch.rand(self.num_local, device=self.weight.device)
        scores[positives] = 2.0  # above any uniform draw: topk keeps every positive first
        keep = max(self.num_sample, positives.numel())
        index = scores.topk(keep, sorted=False).indices.sort().values
        column = torch.searchsorted(index, local.clamp(0, self.num_local - 1))
        return index, torch.where(mine, column, torch.full_like(column, -1))

    def _local_labels(self, labels: Tensor) -> Tensor:
        if self.world_size == 1:
            return labels
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        return torch.where(mine, local, torch.full_like(local, -1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"expected embeddings B x D and labels B, got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings have size {embeddings.shape[1]}, the class centres {self.embedding_size}")
        labels = labels.long()
        if self.world_size > 1:
            self._require_process_group()
            count = torch.tensor([embeddings.shape[0]], device=embeddings.device)
            # local batches may differ in size (a last partial batch): gather the sizes first
            sizes = [int(n) for n in _all_gather_rows(count, [1] * self.world_size).tolist()]
            labels = _all_gather_rows(labels, sizes)
            # checked on the gathered labels so that every rank raises together instead of hanging
            self._check_labels(labels)
            embeddings = _AllGatherEmbeddings.apply(embeddings, sizes, self.rank)
        else:
            self._check_labels(labels)

        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            norms = embeddings.norm(dim=1)  # AdaFace's quality proxy; the head detaches it
            if self.sampling:
                index, local_labels = self.sample(labels)
                self.sampled_index = index
                # row-wise normalisation commutes with row selection: normalise only the kept rows
                cosine = self.margin_head.cosine(embeddings, self.weight[index])
            else:
                local_labels = self._local_labels(labels)
                cosine = self.margin_head.cosine(embeddings)
            logits = self.margin_head.margin_logits(cosine, local_labels, norms)
            if self.world_size == 1:
                return F.cross_entropy(logits, local_labels)
            return _DistSoftmaxCrossEntropy.apply(logits, local_labels, self.world_size)

    # -- checkpoints ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def gather_rows(self, shard: Tensor) -> Tensor:
        """num_local x ... (this rank's rows of something shaped like the weight) -> num_classes x ...

        For the weight and its optimizer state (momentum, Adam moments). Collective when world_size > 1.
        """
        if shard.dim() == 0 or shard.shape[0] != self.num_local:
            raise ValueError(f"expected {self.num_local} rows (this rank's shard), got shape {tuple(shard.shape)}")
        if self.world_size == 1:
            return shard.detach().clone()
        self._require_process_group()
        return _all_gather_rows(shard.detach(), self._shard_sizes())

    def shard_rows(self, full: Tensor) -> Tensor:
        """num_classes x ... -> this rank's num_local x ... rows (a copy)."""
        if full.dim() == 0 or full.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows (all classes), got shape {tuple(full.shape)}")
        return full[self.class_start : self.class_start + self.num_local].clone()

    def full_state_dict(self) -> dict:
        """The margin head's state with the whole weight (num_classes x D) gathered from all ranks.

        Loadable into a plain ``build_head(name, D, num_classes)`` as well. Buffers (AdaFace statistics) are
        identical on every rank and are taken from this one. Collective when world_size > 1.
        """
        state = {key: value.detach().clone() for key, value in self.margin_head.state_dict().items()}
        state["weight"] = self.gather_rows(self.weight)
        return state

    def load_full_state_dict(self, state: dict) -> None:
        """Load a ``full_state_dict`` (from any number of processes), keeping this rank's rows."""
        weight = state["weight"]
        if tuple(weight.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"checkpoint weight is {tuple(weight.shape)}, expected ({self.num_classes}, {self.embedding_size})"
            )
        local = dict(state)
        local["weight"] = self.shard_rows(weight)
        self.margin_head.load_state_dict(local)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, rank={self.rank}, world_size={self.world_size}, "
            f"class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}"
        )


@torch.no_grad()
def _init_shard_as_full(weight: Tensor, num_classes: int, class_start: int, seed: int) -> None:
    """Fill ``weight`` with rows class_start.. of a xavier-uniform num_classes x D matrix drawn from ``seed``.

    Why: a shard initialised on its own would use the shard's fan-out (a larger bound on more ranks) and,
    with the same seed on every rank, repeat the same centres on every shard. Generating the full matrix
    chunk by chunk from one seed gives the same initial centres for any number of processes.
    """
    num_local, dim = weight.shape
    bound = math.sqrt(6.0 / (num_classes + dim))
    generator = torch.Generator().manual_seed(seed)
    stop = class_start + num_local
    for first in range(0, stop, _INIT_CHUNK_ROWS):
        last = min(first + _INIT_CHUNK_ROWS, num_classes)
        chunk = torch.empty(last - first, dim).uniform_(-bound, bound, generator=generator)
        lo, hi = max(first, class_start), min(last, stop)
        if lo < hi:
            weight[lo - class_start : hi - class_start].copy_(chunk[lo - first : hi - first])


def build_partial_fc(
    head_name: str,
    embedding_size: int,
    num_classes: int,
    sample_rate: float = 1.0,
    rank: int | None = None,
    world_size: int | None = None,
    **head_kwargs,
) -> PartialFC:
    """A PartialFC whose margin head (``build_head(head_name, embedding_size, num_local, **head_kwargs)``) owns
    this rank's shard.

    The shard is initialised as this rank's rows of one xavier-uniform num_classes x D matrix whose seed is a
    single draw of torch's global RNG: ranks seeded alike start from the same full matrix whatever the
    number of processes, and the global RNG advances by the same amount on every rank.
    """
    rank, world_size = _resolve_rank_world(rank, world_size)
    class_start, num_local = PartialFC.shard_range(num_classes, rank, world_size)
    seed = int(torch.randint(0, 2**62, ()).item())
    # the head's own initialisation is overwritten below; keep it from advancing the global RNG by a
    # rank-dependent amount
    with torch.random.fork_rng(devices=[]):
        head = build_head(head_name, embedding_size, num_local, **head_kwargs)
    _init_shard_as_full(head.weight, num_classes, class_start, seed)
    return PartialFC(head, num_classes, sample_rate, rank, world_size)
