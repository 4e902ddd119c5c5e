"""Usage: patch_shuffle.py SET.bin [CKPT ...]

Is a token model's face embedding a bag of patches? Shuffle the 8 x 8 patches of 32 faces of SET (one seeded
permutation for all) and compare how far each embedding moves with how far apart the embeddings of different faces
are (mean Euclidean distance of the normalised embeddings; ratio ~0: the model ignores where a patch sits). Without
checkpoints: fViT-mini at initialisation under the pooling and init options of docs/results.md; with checkpoints:
those trained models (fViT models only: the shuffle is of the grid patches)."""
import sys

import torch
import torch.nn.functional as F

from lafs.data.datasets import to_model_range
from lafs.data.pairs import load_bin
from lafs.embedder import load_backbone
from lafs.models.registry import build_backbone


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor, p: int = 8) -> torch.Tensor:
    b, c, h, w = x.shape
    g = h // p
    t = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, p, p)[:, perm]
    return t.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def sensitivity(model: torch.nn.Module, x: torch.Tensor, xs: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        a = F.normalize(model(x)["embedding"].float(), dim=1)
        b = F.normalize(model(xs)["embedding"].float(), dim=1)
    moved = float((a - b).norm(dim=1).mean())
    apart = float(torch.cdist(a, a).sum() / (len(a) * (len(a) - 1)))
    return moved, apart


images, _ = load_bin(sys.argv[1])
x = to_model_range(images[:32])
torch.manual_seed(0)
xs = shuffle_patches(x, torch.randperm((x.shape[-1] // 8) ** 2))
if len(sys.argv) > 2:
    models = [(ck, load_backbone(ck)[0]) for ck in sys.argv[2:]]
else:
    variants = [dict(), dict(attn_scale="head_dim"), dict(token_init="normal"),
                dict(token_init="normal", attn_scale="head_dim"), dict(pool="mean"), dict(pool="flatten"),
                dict(token_init="sincos"), dict(attn_init="mimetic"), dict(token_init="sincos", attn_init="mimetic"),
                dict(token_init="sincos", attn_init="mimetic", attn_scale="head_dim")]
    models = []
    for kw in variants:
        torch.manual_seed(0)
        models.append((f"fvit mini {kw or 'preset'}", build_backbone("fvit", "mini", **kw)))
for name, model in models:
    moved, apart = sensitivity(model.eval(), x, xs)
    print(f"{name}: shuffle moves {moved:.4f}, faces apart {apart:.4f}, ratio {moved / apart:.3f}")
