"""Keypoints that do not belong to the faces, for `lafs eval --keypoints` (does a KP-RPE model use its keypoints?):
``mean``: every image gets the set's mean keypoints; ``shuffled``: every image gets another image's (a seeded
permutation). Both keep the set's mean, so `lafs eval` brings the pixels to the model's geometry by the same
similarity as with the true keypoints; only what the model is told about each face changes.

    python docs/analysis/keypoint_swap.py SET_kps.npy OUT_PREFIX   # writes OUT_PREFIX_mean.npy, OUT_PREFIX_shuffled.npy
    lafs eval CKPT --sets SET.bin --keypoints OUT_PREFIX_mean.npy --amp auto --out OUT
"""
import sys

import numpy as np

kps_path, prefix = sys.argv[1:3]
k = np.load(kps_path)
np.save(f"{prefix}_mean.npy", np.broadcast_to(k.mean(0), k.shape).astype(np.float32).copy())
np.save(f"{prefix}_shuffled.npy", k[np.random.default_rng(0).permutation(len(k))].astype(np.float32))
print(kps_path, k.shape, "per-image std of the keypoints (px):", float(k.std(0).mean()))
