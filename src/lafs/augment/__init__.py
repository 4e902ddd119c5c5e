"""Views on a training batch: supervised "w/ Aug" / "w/o Aug" augmentation and Mixup (``supervised``), the DINO /
LAFS multi-crop views (``multicrop``) and the crop and colour jitter both use (``ops``)."""

from lafs.augment.supervised import MIXUP_PRESETS, RANDAUGMENT_OPS, Mixup, SupervisedAugment, rand_augment_op

__all__ = ["MIXUP_PRESETS", "RANDAUGMENT_OPS", "Mixup", "SupervisedAugment", "rand_augment_op"]
