"""Imprinted class centres for a finetune (Qi, Brown and Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018,
§3.2): each class centre W_j of the margin head starts as the L2-normalised mean of the normalised embeddings of
class j's training images under the initial backbone, instead of a random vector.

Why: a few-shot finetune of a pretrained backbone (LAFS §4, Table 3) starts with a random head, whose first
gradients reach the backbone as noise and wash out much of what pretraining learned (docs/results.md, "Calibrating
the demo"). With imprinted centres the head starts as the nearest-class-mean classifier of the pretrained features,
so the first steps refine the features instead. Neither LAFS nor its code does this: ``finetune.head_init=imprint``
is an option, off by default (``random``, the paper's).

The embeddings are those of the un-augmented training images (the task's augmentation runs in its forward, not
here), in eval mode, without flip; classes without an image in the training set (a few-shot subset keeps the full
label space) keep their random centre. Every rank computes the same centres from the same images, so DDP replicas
agree without a broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.sampler import collate


@torch.no_grad()
def class_means(embed, dataset, num_classes: int, batch_size: int = 256,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(num_classes x D mean of the L2-normalised embeddings per class, num_classes counts). ``embed(images,
    keypoints)`` maps a batch to B x D; labels outside ``[0, num_classes)`` are an error naming the label."""
    sums, counts = None, torch.zeros(num_classes, dtype=torch.long)
    # its own generator: iterating a loader must not consume the global RNG (the run's random stream stays that
    # of a run without imprinting, and a resumed run's)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator())
    for batch in loader:
        labels = batch["label"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
            raise ValueError(f"finetune.head_init=imprint: label {bad} is outside the head's {num_classes} classes")
        kp = batch.get("keypoints")
        emb = embed(batch["image"].to(device), None if kp is None else kp.to(device))
        emb = F.normalize(emb.float(), dim=1).cpu()
        if sums is None:
            sums = torch.zeros(num_classes, emb.shape[1])
        sums.index_add_(0, labels, emb)
        counts += torch.bincount(labels, minlength=num_classes)
    if sums is None:
        raise ValueError("finetune.head_init=imprint: the training set is empty")
    return sums / counts.clamp(min=1).unsqueeze(1).float(), counts


@torch.no_grad()
def imprint_head(task: nn.Module, dataset, batch_size: int = 256, device: torch.device | str = "cpu") -> int:
    """Set ``task.head.weight``'s rows to the normalised class means of ``task.embed`` over ``dataset`` (§3.2 of
    Qi et al.); returns how many classes were imprinted. The task's train/eval mode is restored."""
    weight = getattr(task.head, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        raise ValueError(f"finetune.head_init=imprint needs a margin head with a class-centre matrix, got "
                         f"{type(task.head).__name__} (head.partial_fc shards its centres: not supported)")
    was_training = task.training
    task.eval()
    try:
        means, counts = class_means(task.embed, dataset, weight.shape[0], batch_size, device)
    finally:
        task.train(was_training)
    if means.shape[1] != weight.shape[1]:
        raise ValueError(f"finetune.head_init=imprint: embeddings of size {means.shape[1]}, head centres of size "
                         f"{weight.shape[1]}")
    present = (counts > 0).to(weight.device)
    # the head normalises its centres, so only the direction matters; keep the random centres' norm so the
    # weight decay and the optimizer's step sizes meet the same scale as with the default init
    norm = weight.data.norm(dim=1, keepdim=True)
    imprinted = F.normalize(means, dim=1).to(weight.device, weight.dtype) * norm
    weight.data[present] = imprinted[present]
    return int(present.sum())
