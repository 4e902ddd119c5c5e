"""Views on a training batch (ARCHITECTURE.md): supervised "w/ Aug" / "w/o Aug" augmentation and Mixup."""

from lafs.augment.supervised import MIXUP_PRESETS, RANDAUGMENT_OPS, Mixup, SupervisedAugment, rand_augment_op

__all__ = ["MIXUP_PRESETS", "RANDAUGMENT_OPS", "Mixup", "SupervisedAugment", "rand_augment_op"]
