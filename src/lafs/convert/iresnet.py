"""``insightface_iresnet``: ``backbone.pth`` of insightface ``recognition/arcface_torch`` (``backbones/iresnet.py``).

:mod:`lafs.models.iresnet` uses its parameter names, so the mapping is the identity. Depth from the block counts,
width and embedding size from the shapes (CVLface's ``iresnet_insightface`` wrapper, ``net.*``, is the same).
``color_space: BGR`` in a saved CVLface config is folded into the first layer's weights, so the model takes RGB.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from torch import Tensor

from .formats import Converted, ConvertError, Format, depth_of, need, pick_size, refuse_unmatched

_IRESNET_KEY = re.compile(
    r"(conv1\.weight|(bn1|bn2|features)\.(weight|bias|running_mean|running_var|num_batches_tracked)|prelu\.weight"
    r"|fc\.(weight|bias)"
    r"|layer[1-4]\.\d+\.((bn[123]|downsample\.1)\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|conv[12]\.weight|prelu\.weight|downsample\.0\.weight))")


def _detect_iresnet(keys: Collection[str]) -> bool:
    return {"conv1.weight", "prelu.weight", "layer1.0.conv1.weight", "fc.weight", "features.running_mean"} <= set(keys)


def _iresnet_to_lafs(state: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    from ..models.iresnet import IRESNET_LAYERS

    name = "insightface_iresnet"
    refuse_unmatched(name, [k for k in state if not _IRESNET_KEY.fullmatch(k)])
    layers = tuple(depth_of(state, f"layer{i}.") for i in range(1, 5))
    depth = next((d for d, blocks in IRESNET_LAYERS.items() if blocks == layers), None)
    if depth is None:
        raise ConvertError(f"{name}: blocks per stage {layers} are no IResNet lafs builds "
                           f"({', '.join(f'{d}: {b}' for d, b in IRESNET_LAYERS.items())})")
    width = need(state, "conv1.weight", name).shape[0]
    emb, flat = need(state, "fc.weight", name).shape
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
    size = pick_size("iresnet", structural)
    return Converted("iresnet", size, structural, state, [], notes)


FORMAT = Format(
    "insightface_iresnet", "insightface arcface_torch IResNet backbone.pth (r18 / r34 / r50 / r100)",
    "deepinsight/insightface recognition/arcface_torch/backbones/iresnet.py", _detect_iresnet, _iresnet_to_lafs)
