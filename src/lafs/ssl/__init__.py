"""Self-supervised pretraining components: DINO (Caron et al., ICCV 2021) as LAFS uses it, and the LAFS landmark
views (Sun et al., CVPR 2024)."""

from lafs.ssl.dino import (
    TEACHER_TEMP_PRESETS,
    DINOHead,
    DINOLoss,
    cancel_last_layer_grads,
    clip_gradients_per_param,
    ema_update,
    mean_entropy,
    momentum_at,
    teacher_entropy,
    teacher_student_kl,
    teacher_temp_at,
    teacher_temp_at_step,
    weight_decay_at,
)

METHODS = ("dino", "lafs")  # the self-supervised methods `lafs pretrain` runs (ssl.method)

__all__ = [
    "METHODS", "TEACHER_TEMP_PRESETS", "DINOHead", "DINOLoss", "cancel_last_layer_grads", "clip_gradients_per_param",
    "ema_update", "mean_entropy", "momentum_at", "teacher_entropy", "teacher_student_kl", "teacher_temp_at",
    "teacher_temp_at_step", "weight_decay_at",
]
