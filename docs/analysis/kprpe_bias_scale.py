"""Usage: kprpe_bias_scale.py CKPT SET.bin SET_kps.npy

KP-RPE's keypoint table after training: how large is the keypoint-dependent part of f(P) next to its constant part
(W_L's bias, an iRPE-like per-bucket bias) and next to the attention logits q.k*scale, and how much does it vary
between faces? 512 faces of a set brought to the model's geometry (lafs eval's own code, the whole set's mean)."""
import sys
import numpy as np
import torch
from lafs.embedder import load_backbone
from lafs.data.pairs import load_bin, load_set_keypoints
from lafs.eval.report import set_in_geometry
from lafs.models.vit import Attention

ckpt, bin_path, kps_path = sys.argv[1:4]
bb, desc = load_backbone(ckpt)
print(desc)
vit = bb if hasattr(bb, "kprpe") else next(m for m in bb.modules() if getattr(m, "kprpe", None) is not None)
images, _ = load_bin(bin_path)
kps = load_set_keypoints(bin_path, kps_path, len(images))
images, kps = set_in_geometry(images, kps, bin_path, "celeba64", kps_path)
idx = np.random.default_rng(0).choice(len(images), 512, replace=False)
images, kps = images[idx], kps[idx]
kp = (torch.as_tensor(kps).float() + 0.5) / vit.img_size
n = vit.num_tokens
pos = vit._token_positions(n, None, "cpu")
lin = vit.kprpe.linear
print(f"W_L weight |.|_F {lin.weight.norm():.3f} (max {lin.weight.abs().max():.3f}), bias |.|_F {lin.bias.norm():.3f}")
logit_std = []
def hook(mod, inp, out):
    b, n_, _ = out.shape
    q, k, _ = out.view(b, n_, 3, mod_heads[mod], -1).permute(2, 0, 3, 1, 4).unbind(0)
    lg = (q @ k.transpose(-2, -1)) * mod_scale[mod]
    logit_std.append((float(lg.std(-1).median()), float(lg.std())))
mod_heads, mod_scale = {}, {}
for m in bb.modules():
    if isinstance(m, Attention):
        mod_heads[m.to_qkv], mod_scale[m.to_qkv] = m.heads, m.scale
        m.to_qkv.register_forward_hook(hook)
with torch.no_grad():
    x = images.float() / 127.5 - 1.0
    bb(x, keypoints=torch.as_tensor(kps).float())
    d = vit.kprpe.offsets(kp, pos)
    for layer in range(vit.kprpe.depth):
        t = vit.kprpe.table(d, layer)  # B, H, N, K
        h, k = t.shape[1], t.shape[3]
        const = lin.bias[layer * h * k:(layer + 1) * h * k].view(1, h, 1, k)
        var = t - const
        print(f"layer {layer}: logits std within a query's row (median) {logit_std[layer][0]:.2f}, overall {logit_std[layer][1]:.2f}; table: constant part std {const.std():.3f}, "
              f"keypoint part std {var.std():.3f}, its spread across faces {var.std(0).mean():.3f}")
