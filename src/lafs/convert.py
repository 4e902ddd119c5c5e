"""Released face-recognition weights -> lafs checkpoints (``lafs convert SRC -o OUT [--from FORMAT]``).

A converted checkpoint is an ordinary lafs checkpoint: the ``config`` YAML (``lafs.config.to_yaml``) whose model
section rebuilds the released network exactly, and ``model`` with the weights under ``backbone.*``. So ``lafs eval``,
``lafs embed``, ``lafs verify``, ``lafs export`` and ``lafs finetune --init`` take it as they take a trained run's
checkpoint. A ``MODEL_CARD.md`` beside it records where the weights came from and what was assumed (a card already
there that describes another model, such as a training run's, is never overwritten: convert into a folder of its own).

Formats (:data:`FORMATS`; detected from the key names when ``--from`` is not given):

- ``part_fvit_official``: Part fViT / LAFS, class ``ViT_face_landmark_patch8`` of ``szlbiubiubiu/Part_fViT``
  (``vit_pytorch_my/vit_face_withlandmark.py`` @ 966d555) and ``szlbiubiubiu/LAFS_CVPR2024``
  (``face_pre_pro/ViT_face.py`` @ 5b8edd3, landmark CNN ``face_pre_pro/mobilenet.py``). Keys ``stn.features.*``
  (MobileNetV3 trunk), ``output_layer.1.*``, ``patch_to_embedding.*``, ``cls_token``, ``pos_embedding``,
  ``transformer.layers.{i}.{0,1}.fn.*``, ``mlp_head.0.*``; the CosFace classifier ``loss.weight`` is dropped. With the
  landmark CNN it becomes ``part_fvit`` with the released sampler (``patch_layout: reference``); the LAFS
  self-supervised teacher has no ``stn`` and, fed a 112 x 112 image, the official forward cuts it into the 8 x 8 grid:
  it becomes ``fvit`` (finetune it as Part fViT with ``--init`` plus ``--landmark-init``).
- ``insightface_iresnet``: ``backbone.pth`` of insightface ``recognition/arcface_torch`` (``backbones/iresnet.py``);
  :mod:`lafs.models.iresnet` uses its parameter names, so the mapping is the identity. Depth from the block counts,
  width and embedding size from the shapes (CVLface's ``iresnet_insightface`` wrapper, ``net.*``, is the same).
- ``cvlface_vit`` / ``cvlface_vit_kprpe``: CVLface (``mk-minchul/CVLface`` @ d3d09c9,
  ``cvlface/research/recognition/code/run_v1/models/{vit,vit_kprpe}/``) ``VisionTransformer`` and
  ``VisionTransformerWithKPRPE`` as saved by ``BaseModel.save_pretrained`` (``net.*``, ``pretrained_model/model.pt``)
  or in the Hugging Face hub wrapper (``model.net.*``, ``model.safetensors``). Keys ``patch_embed.proj.*`` (a conv,
  turned into lafs's linear token embedding), ``pos_embed``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
  mlp.fc2}.*``, ``norm.*``, ``feature.{0..3}.*`` and, for KP-RPE, ``keypoint_linear.*``; ``mask_token`` (training
  only) is dropped. The head count is not in the weights: it comes from the config saved beside them
  (``model.yaml`` / hub ``config.json``: ``name`` small = 8 heads, base = 16), else from the KP-RPE table's width,
  else from the depth of CVLface's only two presets (12 -> small, 24 -> base). ``color_space: BGR`` (the model flips
  its input) is folded into the first layer's weights (here and for IResNet), so the converted model takes RGB
  like every lafs model.

Files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the LAFS pretraining checkpoint
stores as ``args``, is the one class allowed besides tensors) or ``safetensors``. Wrapper prefixes (``module.``,
``_orig_mod.``, ``backbone.``, ``model.``, ``net.``) are stripped; a checkpoint holding several state dicts is read
from ``teacher``, ``state_dict``, ``model`` or ``student``, in that order.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pickle
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .train.pretrained import _strip as strip_prefixes

ENTRIES = ("teacher", "state_dict", "model", "student")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "net.")
CARD_NAME = "MODEL_CARD.md"


@dataclass
class Converted:
    """The result of one format's ``to_lafs``: a lafs backbone (name, size preset, config overrides) and its state."""

    model: str
    size: str
    overrides: dict[str, Any]
    state: dict[str, Tensor]  # backbone state dict, lafs names (without "backbone.")
    dropped: list[str] = field(default_factory=list)  # source keys deliberately not converted (classifier, ...)
    notes: list[str] = field(default_factory=list)  # what was inferred or assumed, for the log and the card
    head: str | None = None  # the margin head the source was trained with, where known
    fmt: str = ""
    source: str = ""  # file the weights came from
    entry: str = ""  # the entry of the file that held the state dict
    sha256: str = ""

    def summary(self) -> str:
        lines = [f"{self.source} [{self.entry}] ({self.fmt}): {len(self.state)} tensors -> {self.model}-{self.size}"]
        if self.dropped:
            lines.append(f"  dropped (not part of the backbone): {len(self.dropped)}: " + ", ".join(self.dropped[:8])
                         + (", ..." if len(self.dropped) > 8 else ""))
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class Format:
    """A foreign layout: ``detect(keys)`` on the prefix-stripped key names; ``to_lafs(state, meta)`` (``meta``: the
    config saved beside the weights, or {})."""

    name: str
    description: str
    origin: str  # where the layout is defined (repository, file, commit)
    detect: Callable[[Collection[str]], bool]
    to_lafs: Callable[[dict[str, Tensor], dict[str, Any]], Converted]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


class ConvertError(ValueError):
    """A file that cannot be converted; the message names the file and the keys."""


# ----------------------------------------------------------------------------------------------------- renaming

Rule = tuple[str, str | Callable[[re.Match], str]]


def _rename(state: dict[str, Tensor], rules: list[Rule], drop: tuple[str, ...] = ()
            ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Apply the first matching ``(regex, template)`` rule to every key -> (renamed state, dropped keys, unmatched
    keys). ``drop``: regexes of keys that are known and deliberately not converted."""
    compiled = [(re.compile(p), t) for p, t in rules]
    dropping = [re.compile(p) for p in drop]
    out: dict[str, Tensor] = {}
    dropped, unmatched = [], []
    for key, value in state.items():
        for pattern, template in compiled:
            m = pattern.fullmatch(key)
            if m:
                out[template(m) if callable(template) else m.expand(template)] = value
                break
        else:
            (dropped if any(d.fullmatch(key) for d in dropping) else unmatched).append(key)
    return out, dropped, unmatched


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    """1 + the largest block index ``i`` of keys ``{prefix}{i}.*``."""
    idx = [int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)]
    return max(idx) + 1 if idx else 0


def _need(state: dict[str, Tensor], key: str, fmt: str) -> Tensor:
    if key not in state:
        raise ConvertError(f"{fmt}: the weights lack {key!r}, which every such model has")
    return state[key]


def _pick_size(model: str, structural: dict[str, Any]) -> str:
    """The first size preset of ``model`` whose values equal ``structural``; else the last preset (every structural
    option is set explicitly in the config anyway, so the preset only names the model)."""
    from .models.registry import get_backbone

    entry = get_backbone(model)
    # options a preset leaves out take the builder's defaults (IResNet's width 64, embedding 512)
    builder = {k: p.default for k, p in inspect.signature(entry.builder).parameters.items()
               if p.default is not inspect.Parameter.empty}
    for size, preset in entry.sizes.items():
        merged = {**builder, **entry.defaults, **preset}
        if all(merged.get(k) == v for k, v in structural.items()):
            return size
    return list(entry.sizes)[-1]


# -------------------------------------------------------------------------------- official Part fViT / LAFS

# ViT_face_landmark_patch8: self.stn = MobileNetV3_backbone (features[0] = conv_bn stem, features[1..15] =
# MobileBottleneck with .conv = the same 9-module sequence as lafs's Bottleneck.block); lafs's trunk flattens the
# stem into features[0..2], so official bottleneck i is lafs features[i + 2].
PART_FVIT_RULES: list[Rule] = [
    (r"stn\.features\.0\.([01])\.(\w+)", r"landmark_cnn.trunk.features.\1.\2"),
    (r"stn\.features\.(\d+)\.conv\.(.+)",
     lambda m: f"landmark_cnn.trunk.features.{int(m[1]) + 2}.block.{m[2]}"),
    (r"output_layer\.1\.(weight|bias)", r"landmark_cnn.output_layer.\1"),  # Sequential(Dropout, Linear)
    (r"cls_token", "encoder.cls_token"),
    (r"pos_embedding", "encoder.pos_embedding"),
    (r"patch_to_embedding\.(weight|bias)", r"encoder.to_embedding.\1"),
    # Transformer.layers[i] = [Residual_droppath(PreNorm(LN, Attention)), Residual_droppath(PreNorm(LN, FeedForward))]
    (r"transformer\.layers\.(\d+)\.0\.fn\.norm\.(weight|bias)", r"encoder.blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.weight", r"encoder.blocks.\1.attn.to_qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(weight|bias)", r"encoder.blocks.\1.attn.to_out.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.norm\.(weight|bias)", r"encoder.blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.([03])\.(weight|bias)", r"encoder.blocks.\1.ff.net.\2.\3"),
    (r"mlp_head\.0\.(weight|bias)", r"encoder.norm.\1"),  # the face embedding = LayerNorm(CLS)
]
# the margin classifier inside the model (CosFace/ArcFace weight, AdaFace kernel and statistics), DINO's projection
# head (the LAFS pretraining checkpoint's teacher is MultiCropWrapper(backbone, head))
PART_FVIT_DROP = (r"loss\..*", r"head\..*")
OFFICIAL_DIM_HEAD = 64  # Attention(dim_head=64), never changed by the released constructors


def _detect_part_fvit(keys: Collection[str]) -> bool:
    return "patch_to_embedding.weight" in keys and "transformer.layers.0.0.fn.norm.weight" in keys


def _part_fvit_to_lafs(state: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    name = "part_fvit_official"
    mapped, dropped, unmatched = _rename(state, PART_FVIT_RULES, PART_FVIT_DROP)
    _refuse_unmatched(name, unmatched)
    dim, token_dim = _need(mapped, "encoder.to_embedding.weight", name).shape
    patch = math.isqrt(token_dim // 3)
    if 3 * patch * patch != token_dim:
        raise ConvertError(f"{name}: patch_to_embedding takes {token_dim} features, not 3 x p x p")
    inner = _need(mapped, "encoder.blocks.0.attn.to_qkv.weight", name).shape[0] // 3
    if inner % OFFICIAL_DIM_HEAD:
        raise ConvertError(f"{name}: to_qkv gives {inner} features per q/k/v, not a multiple of dim_head 64")
    tokens = _need(mapped, "encoder.pos_embedding", name).shape[1] - 1
    structural = {"img_size": 112, "patch_size": patch, "dim": dim, "depth": _depth(mapped, "encoder.blocks."),
                  "heads": inner // OFFICIAL_DIM_HEAD, "dim_head": OFFICIAL_DIM_HEAD,
                  "mlp_dim": _need(mapped, "encoder.blocks.0.ff.net.0.weight", name).shape[0]}
    # the released forward: logits scaled by dim ** -0.5, CLS pooled, LayerNorm head, GELU, constant DropPath
    behaviour = {"attn_scale": "dim", "pool": "cls", "mlp_act": "gelu", "drop_path_schedule": "constant"}
    notes = [f"heads = {inner} / dim_head {OFFICIAL_DIM_HEAD} (the official Attention's fixed head width)",
             "input 112 x 112 (the official landmark rescale is hard-coded to [0, 111] pixels)",
             ("channel order not recorded in the weights: the LAFS README says MS1MV3 was used in BGR order and "
              "WebFace4M in RGB (lafs_spec §9.14); lafs feeds RGB. `lafs eval --color bgr` on an RGB .bin feeds the "
              "model BGR, for comparison")]
    if any(k.startswith("landmark_cnn.") for k in mapped):
        landmarks = _need(mapped, "landmark_cnn.output_layer.weight", name).shape[0] // 2
        if landmarks != tokens:
            raise ConvertError(f"{name}: output_layer predicts {landmarks} landmarks but pos_embedding holds "
                               f"{tokens} tokens")
        if _need(mapped, "landmark_cnn.trunk.features.0.weight", name).shape[0] != 16:
            raise ConvertError(f"{name}: the landmark CNN is not MobileNetV3-Large at width 1 (stem of "
                               f"{mapped['landmark_cnn.trunk.features.0.weight'].shape[0]} channels, not 16)")
        structural["num_landmarks"] = landmarks
        # extract_patches_pytorch_gridsample: offsets k - p/2 - 1/2 and transposed patches (models/part_fvit.py)
        behaviour.update(patch_layout="reference", landmark_width_mult=1.0)
        model = "part_fvit"
        notes.append("patch_layout: reference (the released sampler: window 1 px up-left, patches transposed)")
    else:
        grid = 112 // patch
        if tokens != grid * grid:
            raise ConvertError(f"{name}: no landmark CNN (stn.*) and {tokens} position embeddings, not the "
                               f"{grid} x {grid} grid the official forward cuts a 112 x 112 image into")
        model = "fvit"
        notes.append("no landmark CNN (stn.*), as in the LAFS pretraining teacher: the official forward on a 4-D "
                     "image takes the 8 x 8 grid patches -> fvit; to finetune as Part fViT use "
                     "`--init` with this file, `--landmark-init` with a converted supervised Part fViT and "
                     "model.patch_layout=reference")
    size = _pick_size(model, structural)
    return Converted(model, size, {**structural, **behaviour}, mapped, dropped, notes, head="cosface")


# ---------------------------------------------------------------------------------- insightface IResNet

_IRESNET_KEY = re.compile(
    r"(conv1\.weight|(bn1|bn2|features)\.(weight|bias|running_mean|running_var|num_batches_tracked)|prelu\.weight"
    r"|fc\.(weight|bias)"
    r"|layer[1-4]\.\d+\.((bn[123]|downsample\.1)\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|conv[12]\.weight|prelu\.weight|downsample\.0\.weight))")


def _detect_iresnet(keys: Collection[str]) -> bool:
    return {"conv1.weight", "prelu.weight", "layer1.0.conv1.weight", "fc.weight", "features.running_mean"} <= set(keys)


def _iresnet_to_lafs(state: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    from .models.iresnet import IRESNET_LAYERS

    name = "insightface_iresnet"
    _refuse_unmatched(name, [k for k in state if not _IRESNET_KEY.fullmatch(k)])
    layers = tuple(_depth(state, f"layer{i}.") for i in range(1, 5))
    depth = next((d for d, blocks in IRESNET_LAYERS.items() if blocks == layers), None)
    if depth is None:
        raise ConvertError(f"{name}: blocks per stage {layers} are no IResNet lafs builds "
                           f"({', '.join(f'{d}: {b}' for d, b in IRESNET_LAYERS.items())})")
    width = _need(state, "conv1.weight", name).shape[0]
    emb, flat = _need(state, "fc.weight", name).shape
    side = math.isqrt(flat // (8 * width))
    if 8 * width * side * side != flat:
        raise ConvertError(f"{name}: fc takes {flat} features, not 8 x {width} channels x a square map")
    notes = [f"depth {depth} from the blocks per stage {layers}; width {width}; {emb}-d embedding"]
    state = dict(state)
    if str(meta.get("color_space", "RGB")).upper() == "BGR":  # CVLface's wrapper of this network, BGR-trained
        state["conv1.weight"] = state["conv1.weight"].flip(1)
        notes.append("color_space BGR: the input channel flip folded into conv1 (the model takes RGB)")
    if side == 7:
        img = 112  # insightface: 112 -> 56 -> 28 -> 14 -> 7
    else:  # each stride-2 stage maps s to ceil(s / 2): a final side s comes from (16 s - 15)..16 s pixels
        img = 16 * side
        notes.append(f"a {side} x {side} final map: input size taken as {img} (any of {16 * side - 15}..{img} "
                     "gives it; insightface's is 112)")
    structural = {"depth": depth, "width": width, "img_size": img, "embedding_size": emb}
    size = _pick_size("iresnet", structural)
    return Converted("iresnet", size, structural, state, [], notes)


# --------------------------------------------------------------------------------------- CVLface ViT / KP-RPE

CVLFACE_RULES: list[Rule] = [
    (r"patch_embed\.proj\.(weight|bias)", r"encoder.to_embedding.\1"),  # conv weight reshaped below
    (r"pos_embed", "encoder.pos_embedding"),  # no CLS token
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.blocks.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.blocks.\1.attn.to_qkv.weight"),  # qkv_bias=False
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.blocks.\1.attn.to_out.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.blocks.\1.ff.net.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.blocks.\1.ff.net.3.\2"),
    (r"norm\.(weight|bias)", r"encoder.norm.\1"),
    # feature = Linear(N dim, dim) -> BN1d -> Linear(dim, out) -> BN1d: lafs's flatten head, module for module
    (r"feature\.([0-3])\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"encoder.proj.\1.\2"),
    # rel_keypoint_splithead_unshared: Linear(2 L, K H depth), outputs ordered (layer, head, bucket) as lafs's W_L
    (r"keypoint_linear\.(weight|bias)", r"encoder.kprpe.linear.\1"),
]
CVLFACE_DROP = (r"mask_token",)  # the masked-token training option (mask_ratio > 0), unused at inference
# models/vit{,_kprpe}/__init__.py: the only two configs (img 112, patch 8, embed_dim 512)
CVLFACE_PRESETS = {"small": {"depth": 12, "heads": 8, "dim": 512, "mlp_dim": 2560},
                   "base": {"depth": 24, "heads": 16, "dim": 512, "mlp_dim": 1536}}
CVLFACE_DEPTH = {p["depth"]: name for name, p in CVLFACE_PRESETS.items()}


def _detect_cvlface(keys: Collection[str], kprpe: bool) -> bool:
    base = {"patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "feature.0.weight"} <= set(keys)
    return base and (("keypoint_linear.weight" in keys) == kprpe)


def _cvlface_to_lafs(state: dict[str, Tensor], meta: dict[str, Any], kprpe: bool) -> Converted:
    from .models.rpe import num_buckets

    name = "cvlface_vit_kprpe" if kprpe else "cvlface_vit"
    mapped, dropped, unmatched = _rename(state, CVLFACE_RULES, CVLFACE_DROP)
    _refuse_unmatched(name, unmatched)
    conv = _need(mapped, "encoder.to_embedding.weight", name)
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise ConvertError(f"{name}: patch_embed.proj.weight {tuple(conv.shape)} is not a 3-channel square conv")
    dim, _, patch, _ = conv.shape
    notes = []
    if str(meta.get("color_space", "RGB")).upper() == "BGR":
        # BaseModel flips a BGR model's input (x.flip(1)); flipping the weights' input channels is the same map
        conv = conv.flip(1)
        notes.append("color_space BGR: the input channel flip folded into the token embedding (the model takes RGB)")
    # conv (dim, c, p1, p2) on a patch == linear on the (p1, p2, c)-ordered token (models/fvit.py grid_tokens)
    mapped["encoder.to_embedding.weight"] = conv.permute(0, 2, 3, 1).reshape(dim, -1).contiguous()
    tokens = _need(mapped, "encoder.pos_embedding", name).shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConvertError(f"{name}: pos_embed holds {tokens} tokens, not a square grid")
    depth = _depth(mapped, "encoder.blocks.")
    if _need(mapped, "encoder.blocks.0.attn.to_qkv.weight", name).shape != (3 * dim, dim):
        raise ConvertError(f"{name}: blocks.0.attn.qkv.weight is not (3 dim, dim) = ({3 * dim}, {dim})")
    w0, w2 = _need(mapped, "encoder.proj.0.weight", name), _need(mapped, "encoder.proj.2.weight", name)
    if w0.shape[0] != w2.shape[0] or w2.shape[0] != w2.shape[1]:
        raise ConvertError(f"{name}: feature head {dim} -> {w0.shape[0]} -> {w2.shape[0]}; lafs's flatten head "
                           "projects straight to the embedding size, so the embedding must equal the width")
    structural: dict[str, Any] = {"img_size": side * patch, "patch_size": patch, "dim": dim, "depth": depth,
                                  "mlp_dim": _need(mapped, "encoder.blocks.0.ff.net.0.weight", name).shape[0],
                                  "embedding_size": w2.shape[0]}
    rpe = meta.get("rpe_config") or {}
    ratio = float(rpe.get("ratio", 1.9))
    heads, why = None, ""
    if "name" in meta:
        preset = CVLFACE_PRESETS.get(meta["name"])
        if preset is None:
            raise ConvertError(f"{name}: the saved config names {meta['name']!r}; CVLface's are "
                               f"{', '.join(CVLFACE_PRESETS)}")
        found = {"depth": depth, "dim": dim, "mlp_dim": structural["mlp_dim"]}
        if any(found[k] != preset[k] for k in found):
            raise ConvertError(f"{name}: the saved config names {meta['name']!r} ({preset}) but the weights have "
                               f"{found}")
        heads, why = preset["heads"], f"the saved config's name {meta['name']!r}"
    if kprpe:
        # lafs's KP-RPE is the released configuration: contextual product buckets on the keys, one table per head
        for key, allowed in (("rpe_on", ("k",)), ("mode", ("ctx", "contextual")), ("method", ("product",)),
                             ("shared_head", (True,))):
            if key in rpe and rpe[key] not in allowed:
                raise ConvertError(f"{name}: rpe_config.{key} is {rpe[key]!r}; lafs's KP-RPE has {allowed[0]!r}")
        out, twice_kp = _need(mapped, "encoder.kprpe.linear.weight", name).shape
        k = num_buckets(ratio)
        ctx = rpe.get("ctx_type")
        if ctx in ("rel_keypoint", "keypoint") and out == k:
            variant = "relative" if ctx == "rel_keypoint" else "absolute"
            if variant == "absolute":
                notes.append("ctx_type keypoint: CVLface emits a (B, 1, 1, K) table that its gather reads out of "
                             "range (kprpe_spec §2.3); lafs's absolute variant gives every query that row, so "
                             "embeddings may differ from the released code's")
        elif ctx in (None, "rel_keypoint_splithead_unshared") and out % (k * depth) == 0:
            variant, from_table = "multihead", out // (k * depth)
            if heads is not None and heads != from_table:
                raise ConvertError(f"{name}: keypoint_linear gives {from_table} heads per layer but {why} means "
                                   f"{heads}")
            heads, why = from_table, f"keypoint_linear's {out} outputs = {k} buckets x heads x {depth} layers"
        else:
            raise ConvertError(f"{name}: keypoint_linear has {out} outputs (ctx_type {ctx!r}); lafs's KP-RPE takes "
                               f"{k} x heads x depth (rel_keypoint_splithead_unshared, the released model), or {k} "
                               "with a saved config naming rel_keypoint or keypoint")
        structural.update(num_keypoints=twice_kp // 2)
        behaviour = {"rpe": "kprpe", "kprpe_variant": variant, "rpe_ratio": ratio}
    else:
        behaviour = {}
    if heads is None and depth in CVLFACE_DEPTH:
        preset = CVLFACE_DEPTH[depth]
        heads = CVLFACE_PRESETS[preset]["heads"]
        why = f"depth {depth} = CVLface's {preset!r} config (no saved config found)"
    if heads is None or dim % heads:
        raise ConvertError(f"{name}: the head count is not in the weights and depth {depth} is neither CVLface "
                           "preset (12: small, 24: base); put the config CVLface saved with the weights "
                           "(model.yaml, with its 'name') beside the file")
    structural.update(heads=heads, dim_head=dim // heads)
    notes.insert(0, f"{heads} heads from {why}; head width {dim // heads}")
    # the insightface face ViT: dim // heads head width scaled by its own ** -0.5, ReLU6 MLP, flattened tokens
    behaviour.update(attn_scale="head_dim", pool="flatten", mlp_act="relu6", drop_path_schedule="linear")
    model = "vit_kprpe" if kprpe else "vit"
    size = _pick_size(model, structural)
    return Converted(model, size, {**structural, **behaviour}, mapped, dropped, notes, head="adaface")


# ------------------------------------------------------------------------------------------------ registry

register_format(Format(
    "part_fvit_official", "Part fViT / LAFS (ViT_face_landmark_patch8), with or without the landmark CNN",
    "szlbiubiubiu/Part_fViT vit_pytorch_my/vit_face_withlandmark.py @ 966d555; szlbiubiubiu/LAFS_CVPR2024 "
    "face_pre_pro/ViT_face.py @ 5b8edd3, face_pre_pro/mobilenet.py @ fd916d8",
    _detect_part_fvit, _part_fvit_to_lafs))
register_format(Format(
    "insightface_iresnet", "insightface arcface_torch IResNet backbone.pth (r18 / r34 / r50 / r100)",
    "deepinsight/insightface recognition/arcface_torch/backbones/iresnet.py", _detect_iresnet, _iresnet_to_lafs))
register_format(Format(
    "cvlface_vit", "CVLface ViT (insightface face ViT, flattened-token head)",
    "mk-minchul/CVLface @ d3d09c9 cvlface/research/recognition/code/run_v1/models/vit/vit.py",
    lambda keys: _detect_cvlface(keys, False), lambda s, m: _cvlface_to_lafs(s, m, False)))
register_format(Format(
    "cvlface_vit_kprpe", "CVLface ViT + KP-RPE (VisionTransformerWithKPRPE)",
    "mk-minchul/CVLface @ d3d09c9 cvlface/research/recognition/code/run_v1/models/vit_kprpe/{vit,rpe_options}.py",
    lambda keys: _detect_cvlface(keys, True), lambda s, m: _cvlface_to_lafs(s, m, True)))


# ------------------------------------------------------------------------------------------------ reading

def _refuse_unmatched(fmt: str, unmatched: list[str]) -> None:
    if unmatched:
        raise ConvertError(f"{fmt}: {len(unmatched)} keys this layout does not have: {', '.join(unmatched[:10])}"
                           + (", ..." if len(unmatched) > 10 else ""))


def _strip(key: str) -> str:
    return strip_prefixes(key, PREFIXES)


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The state dict in ``path`` (``.safetensors`` or a torch file) and the entry it came from, prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from None
        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            # weights only: a state dict is tensors; the LAFS pretraining checkpoint also pickles its argparse args
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise ConvertError(f"{path}: not a weights file torch.load can read safely (weights_only): "
                               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if isinstance(obj, dict) and isinstance(obj.get("config"), str) and isinstance(obj.get("model"), dict):
        raise ConvertError(f"{path}: already a lafs checkpoint; use it as it is")
    entry = "state dict"
    if not _is_state(obj):
        found = next((e for e in ENTRIES if isinstance(obj, dict) and _is_state(obj.get(e))), None)
        if found is None:
            what = f"entries {', '.join(map(str, obj))}" if isinstance(obj, dict) else type(obj).__name__
            raise ConvertError(f"{path}: no state dict of tensors (looked for the file itself and "
                               f"{', '.join(ENTRIES)}; found {what})")
        obj, entry = obj[found], found
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        k = _strip(key)
        if k in state:
            raise ConvertError(f"{path}: keys {key!r} and another both become {k!r} without their wrapper prefixes")
        state[k] = value
    return state, entry


def read_meta(path: str | Path) -> tuple[dict[str, Any], str]:
    """The model config CVLface saves beside its weights: ``model.yaml`` next to ``model.pt`` (``save_pretrained``),
    ``pretrained_model/model.yaml`` or the hub's ``config.json`` (``conf``). ({}, "") when there is none."""
    path = Path(path)
    for cand in (path.with_suffix(".yaml"), path.parent / "pretrained_model" / "model.yaml",
                 path.parent / "config.json"):
        if not cand.is_file() or cand == path:
            continue
        try:
            data = json.loads(cand.read_text()) if cand.suffix == ".json" else yaml.safe_load(cand.read_text())
        except (ValueError, yaml.YAMLError) as err:
            raise ConvertError(f"{cand}: the config beside the weights does not parse: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("conf"), dict):
            data = data["conf"]
        if isinstance(data, dict) and ("name" in data or "rpe_config" in data or "color_space" in data):
            return data, str(cand)
    return {}, ""


def detect_format(keys: Collection[str], path: str | Path = "weights") -> str:
    """The one registered format whose ``detect`` accepts ``keys``; an error listing the first keys otherwise."""
    hits = [name for name, f in FORMATS.items() if f.detect(keys)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConvertError(f"{path}: the keys fit several formats ({', '.join(hits)}); choose one with --from")
    first = list(keys)[:12]
    raise ConvertError(f"{path}: unknown weight layout ({len(keys)} tensors); known formats: {', '.join(FORMATS)}. "
                       f"First keys: {', '.join(first)}" + (", ..." if len(keys) > len(first) else ""))


def convert_state(state: dict[str, Tensor], fmt: str | None = None, meta: dict[str, Any] | None = None,
                  path: str | Path = "weights") -> Converted:
    """Prefix-stripped foreign ``state`` -> :class:`Converted`, checked against the lafs model's own state dict
    (built on the meta device: names and shapes, no memory)."""
    from .models import build_backbone

    name = fmt or detect_format(state.keys(), path)
    if name not in FORMATS:
        raise ConvertError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    try:
        conv = FORMATS[name].to_lafs(state, meta or {})
    except ConvertError as err:
        raise ConvertError(f"{path}: {err}") from None
    conv.fmt, conv.source = name, str(path)
    with torch.device("meta"):
        target = build_backbone(conv.model, conv.size, **conv.overrides).state_dict()
    for key in target:  # BatchNorm's counter is absent from files saved by old PyTorch versions
        if key.endswith("num_batches_tracked") and key not in conv.state:
            conv.state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in target if k not in conv.state]
    unexpected = [k for k in conv.state if k not in target]
    shapes = [f"{k} {tuple(conv.state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in conv.state and conv.state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConvertError(f"{path} ({name}): the converted weights do not fit {conv.model}-{conv.size}: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}")
    cast = sorted({str(v.dtype) for v in conv.state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if cast:
        conv.notes.append(f"{', '.join(cast)} tensors stored as float32")
    conv.state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in conv.state.items()}
    return conv


def _config_text(conv: Converted, out: Path) -> str:
    from .config import Config, ModelConfig, load_config, to_yaml

    cfg = Config()
    cfg.model = ModelConfig(name=conv.model, size=conv.size, **conv.overrides)
    # every source trained on insightface-aligned 112 x 112 crops (MS1M / WebFace, the ArcFace template)
    cfg.data.geometry = "arcface"
    cfg.data.workers = "auto"  # resolved on the machine that loads it, not frozen to this one's
    if conv.head:
        cfg.head.name = conv.head
    cfg.out_dir = str(out.parent)
    text = to_yaml(cfg)
    load_config(text=text, source="the converted config")  # the checkpoint must load: fail here, not later
    return text


def convert_file(src: str | Path, out: str | Path, fmt: str | None = None) -> Converted:
    """Convert ``src`` into the lafs checkpoint ``out`` and write ``MODEL_CARD.md`` beside it."""
    from .checkpoint import write_checkpoint
    from .io import atomic_write_bytes, file_hash

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConvertError(f"{out}: the output would overwrite the weights it is converted from")
    card = out.parent / CARD_NAME
    # the card describes one model: never overwrite a training run's card or another conversion's
    if card.is_file() and f"- **Checkpoint**: `{out.name}`, written by `lafs convert`" not in card.read_text():
        raise ConvertError(f"{card} already describes another model; convert into a folder of its own")
    state, entry = read_weights(src)
    meta, meta_path = read_meta(src)
    conv = convert_state(state, fmt, meta, src)
    conv.entry, conv.sha256 = entry, file_hash(src, digits=None)
    if meta_path:
        conv.notes.append(f"config beside the weights: {meta_path}")
    text = _config_text(conv, out)
    write_checkpoint({"config": text, "model": {f"backbone.{k}": v for k, v in conv.state.items()}, "step": 0,
                 "converted": {"source": str(src.resolve()), "sha256": conv.sha256, "format": conv.fmt,
                               "entry": entry, "dropped": conv.dropped, "notes": conv.notes}}, out)
    atomic_write_bytes(card, model_card(conv, out, text).encode())
    return conv


def model_card(conv: Converted, out: Path, config_text: str) -> str:
    """``MODEL_CARD.md`` of a converted checkpoint: origin, mapping, assumptions, config, how to use it."""
    from . import __version__

    fmt = FORMATS[conv.fmt]
    model_cfg = {k: v for k, v in yaml.safe_load(config_text)["model"].items() if v is not None}  # None: preset's
    model_yaml = yaml.safe_dump({"model": model_cfg}, sort_keys=False, allow_unicode=True).strip()
    overrides = " ".join(f"model.{k}={v}" for k, v in conv.overrides.items())
    params = sum(v.numel() for k, v in conv.state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    dropped = ""
    if conv.dropped:
        shown = ", ".join(f"`{k}`" for k in conv.dropped[:8]) + (", ..." if len(conv.dropped) > 8 else "")
        dropped = f"; dropped {len(conv.dropped)} not part of the backbone: {shown}"
    lines = [
        f"# Model card: {conv.model}-{conv.size} converted from {fmt.name}",
        "",
        f"- **Checkpoint**: `{out.name}`, written by `lafs convert` (lafs {__version__}).",
        (f"- **Weights from**: `{conv.source}` (entry `{conv.entry}`), sha256 `{conv.sha256}`. These weights "
         "were trained by others, not by lafs: they keep the licence and terms of their source."),
        f"- **Source layout**: {fmt.description}; defined in {fmt.origin}.",
        (f"- **Mapping**: {len(conv.state)} tensors ({params:,} parameters), each from one source tensor, onto "
         f"lafs `{conv.model}`{dropped}."),
        "- **Input**: RGB faces aligned to the ArcFace 5-point template, 112 x 112 (or the model size below), pixels "
        "x / 127.5 - 1 (`data.geometry: arcface`)."
        + (" KP-RPE: five keypoints per face (pixels of the input)." if conv.model == "vit_kprpe" else ""),
        ("- **Not verified here**: the accuracy of these weights. `lafs eval` measures it; compare with the "
         "numbers their authors published."),
        "",
        "## Inferred or assumed",
        "",
        *[f"- {n}" for n in conv.notes],
        "",
        "## Model config (stored in the checkpoint)",
        "",
        "```yaml",
        model_yaml,
        "```",
        "",
        "## Use",
        "",
        "```bash",
        f"lafs eval {out} --sets ../shared/data/lfw/lfw.bin",
        f"lafs embed {out} a.jpg b.jpg -o emb.npy",
        f"lafs finetune CONFIG.yaml --init {out} model.name={conv.model} model.size={conv.size} {overrides}",
        "```",
        "",
        ("`lafs finetune --init` reads the backbone weights by name; the finetuning config must build the same "
         "model (the overrides above), or its report lists the tensors it skipped."),
    ]
    return "\n".join(lines) + "\n"
