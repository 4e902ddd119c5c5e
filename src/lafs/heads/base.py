"""What a trainer asks of a classifier beyond ``head(embeddings, labels) -> loss``: its state across processes.

Every head mixes in :class:`ClassifierState`. Its defaults describe a replicated head, the plain case: each rank
holds the whole classifier, DistributedDataParallel keeps the copies equal, a checkpoint holds its ``state_dict``
with the rest of the model and its optimizer state as it is. A head that splits its class centres over the ranks
(Partial FC, An et al., ICCVW 2021, §3.2: each GPU stores a 1/k share of the centres) sets ``sharded`` and overrides
the hooks: ``full_state_dict`` / ``load_full_state_dict`` gather the whole state on save and keep this rank's share
on load, ``gather_rows`` / ``shard_rows`` do the same for optimizer state shaped like the centres (momentum, Adam
moments). The trainer calls the hooks and never asks which head it holds, as in insightface's arcface_torch
(``partial_fc_v2.py``), where the classifier is built outside the training loop and passed in.
"""

from __future__ import annotations

from torch import Tensor


class ClassifierState:
    """Mixin for ``nn.Module`` heads: the hooks a trainer uses to wrap, save and resume a classifier."""

    sharded: bool = False
    """True when the parameters differ per rank: DDP must neither broadcast nor average them, and a checkpoint
    holds the gathered ``full_state_dict`` instead of this rank's ``state_dict``."""
    supports_mixup: bool = True
    """Whether ``head(embeddings, labels, labels_b, lam)`` (mixup's soft targets) is accepted."""

    def full_state_dict(self) -> dict:
        """The whole classifier's state (collective for a sharded head): here a detached copy of ``state_dict``."""
        return {key: value.detach().clone() for key, value in self.state_dict().items()}

    def load_full_state_dict(self, state: dict) -> None:
        """Load a ``full_state_dict`` saved with any number of processes."""
        self.load_state_dict(state)

    def gather_rows(self, shard: Tensor) -> Tensor:
        """This rank's rows of something shaped like the centres -> all rows (collective for a sharded head)."""
        return shard

    def shard_rows(self, full: Tensor) -> Tensor:
        """All rows of something shaped like the centres -> this rank's rows."""
        return full
