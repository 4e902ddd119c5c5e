"""Typed run configuration: dataclass schemas, YAML files and dotted command-line overrides.

``load_config("x.yaml", ["model.depth=6"])`` merges, in order, the schema defaults, the YAML file and the
overrides, and checks every key and value against the schema (OmegaConf structured configs). A key that
the schema does not have, a value of the wrong type or a value outside a field's ``choices`` is a
:class:`ConfigError` that names the key, where it came from and, for a typo, the closest valid key.
``save_config`` writes the resolved config next to a run's outputs.

Model fields left at ``None`` take the value of the chosen size preset (``models/registry.py``). A field whose
values a registry of the package defines (backbones, their options, heads, optimizers, schedules, data sources,
autocast precisions, augmentation presets, SSL methods) takes its choices from that registry (:func:`registered`),
read when a config is checked; :func:`choice` lists the few whose values are intrinsic (a module's train/eval mode)
or live in this file (the LAFS landmark options).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .geometry import GEOMETRIES
from .io import atomic_write_bytes


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and its source."""


def choice(default: Any, choices: tuple, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def registered(default: Any, registry: str, help: str = "") -> Any:
    """A choice among the names a registry of the package defines (:func:`registry_names`), so that each list lives
    once, beside the code it selects. ``None`` is allowed where it is the default (the size preset's value)."""
    return field(default=default, metadata={"registry": registry, "help": help})


def _registries() -> dict[str, tuple]:
    # Imported when a config is checked, not with this module: the registries live beside torch code, and
    # `lafs --help` imports this module. Read at each check, so a backbone registered later is a valid name.
    from .augment.supervised import PRESETS as AUGMENT_PRESETS
    from .data.datasets import COLORS, SOURCES
    from .heads.margin import HEADS
    from .models import landmark_cnn, part_fvit, rpe, vit
    from .models.precision import AMP_CHOICES
    from .models.registry import BACKBONES
    from .ssl import METHODS, TEACHER_TEMP_PRESETS
    from .ssl.lafs import SHUFFLE_SCOPES
    from .train.optim import CLIP_MODES, LR_SCHEDULES, OPTIMIZERS

    return {
        "backbones": tuple(BACKBONES), "drop_path_schedules": vit.DROP_PATH_SCHEDULES, "attn_scales": vit.ATTN_SCALES,
        "pools": vit.POOLS, "token_inits": vit.TOKEN_INITS, "attn_inits": vit.ATTN_INITS, "mlp_acts": vit.MLP_ACTS, "weight_inits": vit.WEIGHT_INITS,
        "rpes": vit.RPES, "irpe_modes": rpe.IRPE_MODES, "kprpe_variants": rpe.KPRPE_VARIANTS,
        "patch_layouts": part_fvit.PATCH_LAYOUTS, "landmark_rescales": landmark_cnn.RESCALES,
        "landmark_output_inits": landmark_cnn.OUTPUT_INITS,
        "keypoint_sources": part_fvit.KEYPOINT_SOURCES, "heads": HEADS,
        "colors": COLORS, "augment_presets": tuple(AUGMENT_PRESETS),
        "ssl_methods": ("none", *METHODS),  # none: supervised, `lafs train`
        "teacher_temp_schedules": tuple(TEACHER_TEMP_PRESETS), "shuffle_scopes": SHUFFLE_SCOPES,
        "optimizers": tuple(OPTIMIZERS), "lr_schedules": LR_SCHEDULES, "clip_modes": CLIP_MODES,
        "data_sources": SOURCES, "geometries": tuple(GEOMETRIES),
        "amp_precisions": AMP_CHOICES,  # none: fp32, no autocast; auto: bf16 where it pays
    }


def allowed_values(f: dataclasses.Field) -> tuple | None:
    """The values a config field accepts: its ``choices``, or its registry's names (with ``None`` where that is the
    default); None for a field that takes any value of its type."""
    if "registry" in f.metadata:
        names = _registries()[f.metadata["registry"]]
        return (None, *names) if f.default is None else names
    return f.metadata.get("choices")


def fraction(replaces: tuple[str, ...], help: str = "", length_of: str | None = None) -> Any:
    """A run-relative schedule key (``lafs.train.schedules``): None, or a fraction of the run's optimizer steps in
    [0, 1] (one per value of the section's key ``length_of``, for a step schedule) that replaces the epoch/step
    keys ``replaces`` of the same section. ``check_fractions`` enforces the range and refuses both set."""
    return field(default=None, metadata={"replaces": replaces, "length_of": length_of, "help": help})


# train.select_on: no model selection (best.pt = the last validated step)
SELECT_LAST = "last"


@dataclass
class ModelConfig:
    name: str = registered("part_fvit", "backbones", "backbone")
    size: str = "micro"
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    num_landmarks: Optional[int] = None
    dim: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    dim_head: Optional[int] = None
    mlp_dim: Optional[int] = None
    dropout: Optional[float] = None
    emb_dropout: Optional[float] = None
    attn_dropout: Optional[float] = None
    drop_path: Optional[float] = None
    drop_path_schedule: Optional[str] = registered(None, "drop_path_schedules")
    attn_scale: Optional[str] = registered(None, "attn_scales", "dim: reference code; head_dim: standard")
    pool: Optional[str] = registered(None, "pools", "flatten: insightface face ViT head")
    embedding_size: Optional[int] = None
    token_init: Optional[str] = registered(None, "token_inits", "CLS/pos init: normal = reference N(0,1), trunc_normal = DINO std 0.02, sincos = 2-D sin-cos grid")
    attn_init: Optional[str] = registered(None, "attn_inits", "default: PyTorch's / weight_init; mimetic: Trockman & Kolter 2023 (models/mimetic.py)")
    patch_layout: Optional[str] = registered(None, "patch_layouts")
    landmark_width_mult: Optional[float] = None
    landmark_dropout: Optional[float] = None
    # the landmark CNN's min-max rescale: joint over x and y (Part fViT's code) or per_axis (models/landmark_cnn.py)
    landmark_rescale: Optional[str] = registered(None, "landmark_rescales",
                                                 "joint: reference code; per_axis: x and y each span the face")
    # the landmark CNN's output layer at init: PyTorch's default (Part fViT's code) or a grid (models/landmark_cnn.py)
    landmark_output_init: Optional[str] = registered(None, "landmark_output_inits",
                                                     "reference: PyTorch default Linear init; grid: fViT's patch grid")
    width: Optional[int] = None
    mlp_act: Optional[str] = registered(None, "mlp_acts")
    weight_init: Optional[str] = registered(None, "weight_inits")
    rpe: Optional[str] = registered(None, "rpes", "relative position encoding (models/rpe.py)")
    rpe_mode: Optional[str] = registered(None, "irpe_modes", "iRPE mode")
    rpe_on: Optional[str] = None  # iRPE contextual terms: any of "qkv"
    rpe_shared_head: Optional[bool] = None
    rpe_ratio: Optional[float] = None
    kprpe_variant: Optional[str] = registered(None, "kprpe_variants", "KP-RPE f(P)")
    num_keypoints: Optional[int] = None
    keypoint_source: Optional[str] = registered(None, "keypoint_sources", "Part fViT + KP-RPE: keypoints P from the data or the landmark CNN")

    def overrides(self) -> dict[str, Any]:
        """The options set explicitly (not None), as keyword arguments for ``build_backbone``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("name", "size") and getattr(self, f.name) is not None
        }


@dataclass
class HeadConfig:
    name: str = registered("cosface", "heads", "margin softmax")
    scale: Optional[float] = None  # s; None = the head's paper value (64)
    margin: Optional[float] = None  # m; None = paper value (CosFace 0.4, ArcFace 0.5, AdaFace 0.4)
    h: float = 0.333  # AdaFace
    t_alpha: float = 0.01  # AdaFace
    partial_fc: bool = False  # shard the class centres over ranks (heads/partial_fc.py)
    sample_rate: float = 1.0  # Partial FC: fraction of each shard's centres used per step (positives always)


@dataclass
class OptimConfig:
    name: str = registered("adamw", "optimizers")
    lr: float = 1e-3
    weight_decay: float = 0.05
    landmark_weight_decay: Optional[float] = None  # landmark CNN >= 2-D params; None = weight_decay (ref: 0.05 vs 0.1)
    momentum: float = 0.9  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    schedule: str = registered("cosine", "lr_schedules", "after the warm-up, per optimizer step")
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # added to warmup_epochs (handy for step-budgeted runs)
    # the warm-up as a fraction of the run's optimizer steps (DINO: 10 of 100 epochs = 0.1); replaces both above
    warmup_fraction: Optional[float] = fraction(("warmup_epochs", "warmup_steps"), "lr warm-up, share of the run")
    min_lr: float = 1e-6
    clip_grad: Optional[float] = None  # max grad norm; None = no clipping (supervised reference)
    clip_mode: str = registered("global", "clip_modes", "per_param: DINO's clip_gradients, each tensor on its own")
    weight_decay_end: Optional[float] = None  # cosine weight_decay -> weight_decay_end per step (DINO 0.04 -> 0.4)
    lr_scale_batch: Optional[int] = None  # lr x global_batch / lr_scale_batch (DINO/LAFS: lr 5e-4 at 256)
    # AdamW's fused kernel (one pass over all parameters instead of a dozen foreach passes); None = where the
    # device has one (CPU, CUDA). Its updates equal the foreach ones to float rounding.
    fused: Optional[bool] = None
    # layer-wise lr decay of a ViT (lafs.train.optim.layer_ids): block k of L trains at lr x layer_decay^(L - k), the
    # embeddings and landmark CNN at lr x layer_decay^(L + 1), the heads at lr. The LAFS code builds 0.58 and never
    # applies it; None (the default) = one lr for every parameter, as that code runs
    layer_decay: Optional[float] = None

    def __post_init__(self) -> None:
        if self.layer_decay is not None and not 0.0 < float(self.layer_decay) <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class DataConfig:
    """Training and validation data. ``source: synthetic`` renders faces in memory (the embedded default)."""

    source: str = registered("synthetic", "data_sources")
    train: list[str] = field(default_factory=list)  # .rec files or image folders, concatenated (labels offset)
    color: str = registered("rgb", "colors", "channel order the training files store (LAFS README: MS1MV3 BGR)")
    index: Optional[str] = None  # few-shot / subset index file (.npy of positions, `lafs data subset`)
    val: list[str] = field(default_factory=list)  # .bin verification sets evaluated during training
    val_color: str = registered("rgb", "colors")
    # the face geometry of the training crops (lafs.geometry): verification sets in another geometry are
    # brought to it by one similarity per set (from their keypoint sidecar's mean, else the ArcFace template), in
    # training and in `lafs eval` of the checkpoint. None: sets are only resized to the model's input (no warp)
    geometry: Optional[str] = registered(None, "geometries", "geometry of the training crops")
    num_identities: int = 16  # synthetic
    images_per_identity: int = 8  # synthetic
    val_pairs: int = 200  # synthetic: pairs of held-out identities
    val_identities: int = 32  # synthetic: held-out identities for val_pairs
    seed: int = 0  # synthetic identities
    # synthetic: strength of the per-image nuisances (pose, expression, light, blur, noise, occluders, clutter),
    # 1 = the generator's defaults, 0 = none (lafs.data.synthetic.SyntheticConfig.scaled); identities never change
    nuisance: float = 1.0
    # synthetic: SyntheticConfig fields set after the scaling, e.g. {occluder_prob: 0, max_rotation_deg: 25}
    synthetic: dict = field(default_factory=dict)
    # DataLoader worker processes: "auto" (sized from the cores, lafs.data.workers) or an integer >= 0
    workers: Any = "auto"
    # bad records (unreadable, undecodable, failing their checksum) a run may skip in all, each once: they are logged,
    # counted in metrics.jsonl, summary.json and the model card; one more stops the run naming it
    max_bad_records: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.nuisance) <= 1.0:
            raise ConfigError(f"data.nuisance must be in [0, 1], got {self.nuisance}")
        if self.synthetic:
            from .data.synthetic import SyntheticConfig

            try:
                SyntheticConfig.scaled(float(self.nuisance), **dict(self.synthetic))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"data.synthetic {dict(self.synthetic)}: {err}") from None
        # "auto" resolves here, on the machine that loads the config, so the trainer always sees an integer
        from .data.workers import resolve_workers

        try:
            self.workers = resolve_workers(self.workers)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class AugmentConfig:
    """The official LAFS code's "w/ Aug" = webface4m (RandAugment m1, mixup 0.1) / ms1mv3 (m2, mixup 0.2); "w/o Aug"
    = flip."""

    preset: str = registered("flip", "augment_presets", "misalign: KP-RPE's random similarity (keypoints follow)")
    mixup_alpha: Optional[float] = None  # None = the preset's (0.2)
    mixup_prob: Optional[float] = None  # None = the preset's


@dataclass
class TrainConfig:
    batch_size: int = 32  # per process; global batch = batch_size x processes x accumulation
    steps: int = 60  # optimizer steps (ignored when epochs is set)
    # train for this many minutes of steps instead: the first steps are timed and fix the step count (loop.py)
    budget_minutes: Optional[float] = None
    budget_timed_steps: int = 5  # steps timed (after one untimed step) to turn budget_minutes into steps
    epochs: Optional[float] = None
    accumulation: int = 1
    amp: str = registered("none", "amp_precisions", "fp16 uses a GradScaler (CUDA only); auto: bf16 on CUDA with bf16 "
                                                   "and on CPUs with AMX or AVX-512 BF16, fp32 elsewhere")
    # torch.compile (inductor) of the task's forward (training) and embedding (validation); the first steps, which
    # compile, are logged apart (first_steps_s) and never timed by train.budget_minutes
    compile: bool = False
    # NHWC conv weights and activations for the CNNs (landmark CNN, IResNet): oneDNN's faster conv kernels on CPU
    channels_last: bool = True
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    # how long a collective waits for a missing rank (a stopped or hung process) before the run fails with an
    # error instead of stalling: torch's default is 30 minutes; lower it where steps are short
    dist_timeout_minutes: float = 30.0
    log_every: int = 10
    val_every: int = 0  # optimizer steps; 0 = at the end only
    ckpt_every: int = 0  # optimizer steps; 0 = at the end of every epoch
    keep_last: int = 2
    # finite weights only (train/guard.py): undo a step whose update made a weight non-finite, so no checkpoint holds
    # one. Off: only non-finite losses are skipped (benchmarks/bench_step_guard.py measures what it costs)
    step_guard: bool = True
    max_nonfinite: int = 5  # consecutive skipped steps (non-finite loss or update) that stop the run
    # skipped steps in all that stop the run: more than this share of the steps so far (and more than max_nonfinite)
    max_skipped_fraction: float = 0.1
    # log each trunk's drift from its start, ||theta - theta_0|| / ||theta_0||, at every validation
    # (train/monitors.py; one CPU copy of the trunk's weights)
    monitors: bool = True
    # the validation set (file stem, e.g. celeba64_val) whose accuracy chooses best.pt; None = the first of
    # data.val. Model selection on a test set (LFW) would report a tuned number, so a run whose only pairs are a
    # test set says "last": no selection, best.pt is the last validated step and the sets are monitors only
    select_on: Optional[str] = None
    # measure every validation set's floors before the first step (raw pixels, PCA-whitened pixels fitted on the
    # run's training images, the untrained network: one extra validation), logged and on the model card. Off by
    # default because of that cost (grids and the demo measure floors once for all their arms); the cpu presets
    # turn it on
    floors: bool = False
    # batch norm over the global batch under DDP (landmark CNN, IResNet), on any backend (train/sync_bn.py): a
    # multi-process run then normalises as one process with the same global batch does
    sync_bn: bool = False


# LAFS §3.5: a, the landmark CNN frozen; b, trained freely (the released code); c, trained with beta x MSE to the
# frozen CNN's landmarks (the paper). lafs.train.supervised reads them from here.
LANDMARK_OPTIONS = ("a", "b", "c")
HEAD_INITS = ("random", "imprint")


@dataclass
class FinetuneConfig:
    """Finetuning from a pretrained ViT with the landmark options of LAFS §3.5 (the official code loads the teacher).

    ``landmark`` applies when finetuning (``init`` or ``landmark_init`` set); training from scratch is the
    stage-1 recipe (Part fViT, BMVC 2022, §3), where the landmark CNN learns from the identity loss alone (option b).
    """

    init: Optional[str] = None  # pretrained backbone checkpoint (LAFS/DINO teacher or supervised)
    landmark_init: Optional[str] = None  # supervised Part fViT checkpoint whose landmark CNN is used
    from_scratch: bool = False  # lafs finetune with neither: the recipe from random weights (a few-shot baseline)
    landmark: str = choice("c", LANDMARK_OPTIONS, "a: frozen CNN; b: trained freely (released code); c: + beta*MSE (paper)")
    # the margin head's class centres at the start: random (the paper's), or imprinted with each class's mean
    # embedding under the initial backbone (Qi et al., CVPR 2018, §3.2; lafs.train.imprint)
    head_init: str = choice("random", HEAD_INITS, "random (paper) | imprint: class-mean embeddings")
    beta_schedule: list[float] = field(default_factory=lambda: [1000.0, 100.0, 1.0, 0.11, 0.0])
    beta_epochs: list[int] = field(default_factory=lambda: [0, 8, 14, 21, 28])
    # the beta steps as fractions of the run (one per beta_schedule value, from 0, increasing), applied per step;
    # the reference's epochs 0/8/14/21/28 of its 34 are about [0, 0.235, 0.412, 0.618, 0.824]. Replaces beta_epochs
    beta_fractions: Optional[list[float]] = fraction(  # noqa: RUF009 (a dataclasses.field whose default is None)
        ("beta_epochs",), "option c beta steps, shares of the run", length_of="beta_schedule")


@dataclass
class SSLConfig:
    """Self-supervised pretraining, ``lafs pretrain``: DINO (Caron et al., ICCV 2021) or LAFS (§3, Eq. 5-6, Alg. 1).

    Defaults are the paper's where it has one (perturb_alpha 2, shuffle) and the released code's otherwise
    (out_dim 100000 in its presets, sampling with replacement); the presets in configs/ name each choice.
    """

    method: str = registered("none", "ssl_methods", "none: supervised (lafs train)")
    landmark_init: Optional[str] = None  # supervised Part fViT checkpoint: its landmark CNN, frozen (LAFS §3.2)
    out_dim: int = 65536  # DINO 65536; the LAFS code 100000
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp_schedule: str = registered("dino", "teacher_temp_schedules", "dino: 0.04 -> 0.07; lafs_code: 0.07 -> 0.04")
    warmup_teacher_temp: Optional[float] = None  # None = the schedule preset's
    teacher_temp: Optional[float] = None
    warmup_teacher_temp_epochs: Optional[int] = None
    # the temperature warm-up as a fraction of the run, linear per step (DINO: 30 of 100 epochs, about 0.3)
    warmup_teacher_temp_fraction: Optional[float] = fraction(("warmup_teacher_temp_epochs",),
                                                             "teacher temperature warm-up, share of the run")
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # EMA momentum, cosine to momentum_teacher_end per step
    momentum_teacher_end: float = 1.0
    freeze_last_layer: int = 1  # epochs with the prototype layer's grads cancelled
    # the frozen-prototype phase as a fraction of the run (DINO: 1 of 100 epochs = 0.01); replaces freeze_last_layer
    freeze_last_layer_fraction: Optional[float] = fraction(("freeze_last_layer",), "prototype layer frozen, share")
    # the two modes of a torch module (nn.Module.train / eval): intrinsic, so listed here rather than in a registry
    teacher_mode: str = choice("eval", ("eval", "train"), "train: the reference code's teacher keeps dropout/drop-path")
    num_local: int = 8  # student-only views per image (2 global views + num_local)
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # crop area fraction, every LAFS view
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # DINO local crops only
    local_size: Optional[int] = None  # DINO local crop side; None = 48/112 of the model input
    subset_size: Optional[int] = None  # LAFS student landmarks; None = 36/196 of num_landmarks
    replacement: bool = True  # LAFS subset drawn with replacement (the released code's randint)
    shuffle: str = registered("student", "shuffle_scopes", "landmark shuffle scope; both = paper Eq. 4")
    perturb_alpha: float = 2.0  # Eq. 6, pixels of a 112 x 112 face (paper best 2, code 5)
    # Gaussian-blur sigma range of the views in pixels of a 112 x 112 face (the LAFS code's (0.1, 2) at 112 px;
    # DINO's at 224 px), scaled to the model input like perturb_alpha: a 64 px view gets (0.057, 1.14)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # DINO's colour jitter (brightness, contrast, saturation, hue; p = 0.8) and grayscale probability, every view
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    grayscale_prob: float = 0.2
    # DINOv2 (Oquab et al. 2024, §4) options, off by default (DINO and LAFS have neither): the teacher's targets by
    # Sinkhorn-Knopp instead of the EMA centre, and the KoLeo spreading term on the student's embedding of each
    # global view (DINOv2: weight 0.1)
    centering: str = choice("ema", ("ema", "sinkhorn"), "teacher centring: DINO's EMA centre or DINOv2's Sinkhorn-Knopp")
    koleo_weight: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    out_dir: str = "runs/demo"


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.append(key)
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, key + ".")
    return keys


def _explain(err: OmegaConfBaseException, source: str, schema: type, key: str = "?") -> ConfigError:
    key = getattr(err, "full_key", None) or key
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Missing key" in msg or "ConfigKeyError" in type(err).__name__:
        valid = _all_keys(schema())
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    return ConfigError(f"invalid value for config key '{key}' in {source}: {msg}")


def _check_choices(node: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif (choices := allowed_values(f)) is not None and value not in choices:
            allowed = ", ".join(repr(c) if c is not None else "null" for c in choices)
            raise ConfigError(f"config key '{prefix}{f.name}' is {value!r}; allowed: {allowed}")


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_fractions(node: Any, prefix: str = "") -> None:
    """The run-relative schedule keys (``fraction`` fields): each value in [0, 1], a step schedule's fractions one
    per value and from 0 up, and never together with a non-default value of an epoch/step key they replace."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_fractions(value, f"{prefix}{f.name}.")
            continue
        if "replaces" not in f.metadata or value is None:
            continue
        key = f"{prefix}{f.name}"
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        # `not 0 <= v <= 1` also catches NaN
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0
                             for v in values):
            raise ConfigError(f"config key '{key}' is {value!r}; a fraction of the run must lie in [0, 1]")
        if f.metadata.get("length_of"):
            other = f"{prefix}{f.metadata['length_of']}"
            n = len(getattr(node, f.metadata["length_of"]))
            if len(values) != n:
                raise ConfigError(f"config key '{key}' has {len(values)} fractions but '{other}' has {n} values; "
                                  "give one fraction per value")
            if values[0] != 0 or values != sorted(values):
                raise ConfigError(f"config key '{key}' is {value!r}; the fractions must start at 0 and increase")
        by_name = {g.name: g for g in dataclasses.fields(node)}
        for name in f.metadata["replaces"]:
            default = _field_default(by_name[name])
            if getattr(node, name) != default:
                raise ConfigError(
                    f"config keys '{key}' and '{prefix}{name}' are both set ({key}={value!r}, {prefix}{name}="
                    f"{getattr(node, name)!r}): the fraction replaces '{prefix}{name}'; set only one of them "
                    f"(leave '{prefix}{name}' at its default {default!r})")


def _merge(base: DictConfig, other: Any, source: str, schema: type, key: str = "?") -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source, schema, key) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``'model.depth=6'`` -> ``('model.depth', 6)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=6)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
    return key.strip(), value


def _parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), schema: type = Config,
                text: str | None = None, source: str = "config text") -> Any:
    """Schema defaults <- YAML file (or ``text``, e.g. the config stored in a checkpoint) <- dotted overrides,
    validated; returns a ``schema`` instance.

    ``path`` is a file, or the name of a packaged preset (``micro/supervised_synthetic``, see ``lafs.presets``) so
    that an installed package finds its presets from any folder; a file on disk wins over a preset of the same name.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        from .presets import resolve

        path = resolve(path, "configs")
        cfg = _merge(cfg, _parse_yaml(path.read_text(), f"config file {path}"), f"file {path}", schema)
    if text is not None:
        cfg = _merge(cfg, _parse_yaml(text, source), source, schema)
    for item in overrides:
        key, value = parse_override(item)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(cfg, nested, f"override '{item}'", schema, key)
    obj = OmegaConf.to_object(cfg)
    _check_choices(obj)
    check_fractions(obj)
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``out_dir`` (atomically) and return its path."""
    return atomic_write_bytes(Path(out_dir) / name, to_yaml(cfg).encode())
