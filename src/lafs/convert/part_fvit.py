"""``part_fvit_official``: Part fViT / LAFS weights of the official code.

Class ``ViT_face_landmark_patch8`` of ``szlbiubiubiu/Part_fViT`` (``vit_pytorch_my/vit_face_withlandmark.py``
@ 966d555) and ``szlbiubiubiu/LAFS_CVPR2024`` (``face_pre_pro/ViT_face.py`` @ 5b8edd3, landmark CNN
``face_pre_pro/mobilenet.py``). Keys ``stn.features.*`` (MobileNetV3 trunk), ``output_layer.1.*``,
``patch_to_embedding.*``, ``cls_token``, ``pos_embedding``, ``transformer.layers.{i}.{0,1}.fn.*``, ``mlp_head.0.*``;
the CosFace classifier ``loss.weight`` is dropped. With the landmark CNN it becomes ``part_fvit`` with the released
sampler (``patch_layout: reference``); the LAFS self-supervised teacher has no ``stn`` and, fed a 112 x 112 image, the
official forward cuts it into the 8 x 8 grid: it becomes ``fvit`` (finetune it as Part fViT with ``--init`` plus
``--landmark-init``).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from torch import Tensor

from .formats import Converted, ConvertError, Format, Rule, depth_of, need, pick_size, refuse_unmatched, rename_keys

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
    mapped, dropped, unmatched = rename_keys(state, PART_FVIT_RULES, PART_FVIT_DROP)
    refuse_unmatched(name, unmatched)
    dim, token_dim = need(mapped, "encoder.to_embedding.weight", name).shape
    patch = math.isqrt(token_dim // 3)
    if 3 * patch * patch != token_dim:
        raise ConvertError(f"{name}: patch_to_embedding takes {token_dim} features, not 3 x p x p")
    inner = need(mapped, "encoder.blocks.0.attn.to_qkv.weight", name).shape[0] // 3
    if inner % OFFICIAL_DIM_HEAD:
        raise ConvertError(f"{name}: to_qkv gives {inner} features per q/k/v, not a multiple of dim_head 64")
    tokens = need(mapped, "encoder.pos_embedding", name).shape[1] - 1
    structural = {"img_size": 112, "patch_size": patch, "dim": dim, "depth": depth_of(mapped, "encoder.blocks."),
                  "heads": inner // OFFICIAL_DIM_HEAD, "dim_head": OFFICIAL_DIM_HEAD,
                  "mlp_dim": need(mapped, "encoder.blocks.0.ff.net.0.weight", name).shape[0]}
    # the released forward: logits scaled by dim ** -0.5, CLS pooled, LayerNorm head, GELU, constant DropPath
    behaviour = {"attn_scale": "dim", "pool": "cls", "mlp_act": "gelu", "drop_path_schedule": "constant"}
    notes = [f"heads = {inner} / dim_head {OFFICIAL_DIM_HEAD} (the official Attention's fixed head width)",
             "input 112 x 112 (the official landmark rescale is hard-coded to [0, 111] pixels)",
             ("channel order not recorded in the weights: the LAFS README says MS1MV3 was used in BGR order and "
              "WebFace4M in RGB; lafs feeds RGB. `lafs eval --color bgr` on an RGB .bin feeds the "
              "model BGR, for comparison")]
    if any(k.startswith("landmark_cnn.") for k in mapped):
        landmarks = need(mapped, "landmark_cnn.output_layer.weight", name).shape[0] // 2
        if landmarks != tokens:
            raise ConvertError(f"{name}: output_layer predicts {landmarks} landmarks but pos_embedding holds "
                               f"{tokens} tokens")
        if need(mapped, "landmark_cnn.trunk.features.0.weight", name).shape[0] != 16:
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
    size = pick_size(model, structural)
    return Converted(model, size, {**structural, **behaviour}, mapped, dropped, notes, head="cosface")


FORMAT = Format(
    "part_fvit_official", "Part fViT / LAFS (ViT_face_landmark_patch8), with or without the landmark CNN",
    "szlbiubiubiu/Part_fViT vit_pytorch_my/vit_face_withlandmark.py @ 966d555; szlbiubiubiu/LAFS_CVPR2024 "
    "face_pre_pro/ViT_face.py @ 5b8edd3, face_pre_pro/mobilenet.py @ fd916d8",
    _detect_part_fvit, _part_fvit_to_lafs)
