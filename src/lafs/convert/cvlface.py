"""``cvlface_vit`` / ``cvlface_vit_kprpe``: CVLface's face ViT, plain and with KP-RPE.

CVLface (``mk-minchul/CVLface`` @ d3d09c9, ``cvlface/research/recognition/code/run_v1/models/{vit,vit_kprpe}/``)
``VisionTransformer`` and ``VisionTransformerWithKPRPE`` as saved by ``BaseModel.save_pretrained`` (``net.*``,
``pretrained_model/model.pt``) or in the Hugging Face hub wrapper (``model.net.*``, ``model.safetensors``). Keys
``patch_embed.proj.*`` (a conv, turned into lafs's linear token embedding), ``pos_embed``, ``blocks.{i}.{norm1,
attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``, ``feature.{0..3}.*`` and, for KP-RPE, ``keypoint_linear.*``;
``mask_token`` (training only) is dropped. The head count is not in the weights: it comes from the config saved
beside them (``model.yaml`` / hub ``config.json``: ``name`` small = 8 heads, base = 16), else from the KP-RPE table's
width, else from the depth of CVLface's only two presets (12 -> small, 24 -> base). ``color_space: BGR`` (the model
flips its input) is folded into the first layer's weights, so the converted model takes RGB like every lafs model.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from torch import Tensor

from .formats import Converted, ConvertError, Format, Rule, depth_of, need, pick_size, refuse_unmatched, rename_keys

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
    from ..models.rpe import num_buckets

    name = "cvlface_vit_kprpe" if kprpe else "cvlface_vit"
    mapped, dropped, unmatched = rename_keys(state, CVLFACE_RULES, CVLFACE_DROP)
    refuse_unmatched(name, unmatched)
    conv = need(mapped, "encoder.to_embedding.weight", name)
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
    tokens = need(mapped, "encoder.pos_embedding", name).shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConvertError(f"{name}: pos_embed holds {tokens} tokens, not a square grid")
    depth = depth_of(mapped, "encoder.blocks.")
    if need(mapped, "encoder.blocks.0.attn.to_qkv.weight", name).shape != (3 * dim, dim):
        raise ConvertError(f"{name}: blocks.0.attn.qkv.weight is not (3 dim, dim) = ({3 * dim}, {dim})")
    w0, w2 = need(mapped, "encoder.proj.0.weight", name), need(mapped, "encoder.proj.2.weight", name)
    if w0.shape[0] != w2.shape[0] or w2.shape[0] != w2.shape[1]:
        raise ConvertError(f"{name}: feature head {dim} -> {w0.shape[0]} -> {w2.shape[0]}; lafs's flatten head "
                           "projects straight to the embedding size, so the embedding must equal the width")
    structural: dict[str, Any] = {"img_size": side * patch, "patch_size": patch, "dim": dim, "depth": depth,
                                  "mlp_dim": need(mapped, "encoder.blocks.0.ff.net.0.weight", name).shape[0],
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
        out, twice_kp = need(mapped, "encoder.kprpe.linear.weight", name).shape
        k = num_buckets(ratio)
        ctx = rpe.get("ctx_type")
        if ctx in ("rel_keypoint", "keypoint") and out == k:
            variant = "relative" if ctx == "rel_keypoint" else "absolute"
            if variant == "absolute":
                notes.append("ctx_type keypoint: CVLface emits a (B, 1, 1, K) table that its gather reads out of "
                             "range (its rpe_options.py); lafs's absolute variant gives every query that row, so "
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
    size = pick_size(model, structural)
    return Converted(model, size, {**structural, **behaviour}, mapped, dropped, notes, head="adaface")


VIT_FORMAT = Format(
    "cvlface_vit", "CVLface ViT (insightface face ViT, flattened-token head)",
    "mk-minchul/CVLface @ d3d09c9 cvlface/research/recognition/code/run_v1/models/vit/vit.py",
    lambda keys: _detect_cvlface(keys, False), lambda s, m: _cvlface_to_lafs(s, m, False))
KPRPE_FORMAT = Format(
    "cvlface_vit_kprpe", "CVLface ViT + KP-RPE (VisionTransformerWithKPRPE)",
    "mk-minchul/CVLface @ d3d09c9 cvlface/research/recognition/code/run_v1/models/vit_kprpe/{vit,rpe_options}.py",
    lambda keys: _detect_cvlface(keys, True), lambda s, m: _cvlface_to_lafs(s, m, True))
