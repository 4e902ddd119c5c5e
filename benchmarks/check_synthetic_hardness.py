"""Hardness check of the synthetic faces (lafs.data.synthetic): is identity hard to read from pixels?

Three verification ROC AUCs on ``synthetic_pairs`` of identities never used for training:

(a) raw pixels: cosine similarity of flattened, mean-subtracted grayscale images (should be near chance);
(b) an untrained network (Part fViT-micro, 56 x 56 input): cosine of its embeddings (near chance);
(c) a trained network: fViT-micro (or any backbone) + CosFace (AdamW, warm-up + cosine) trained for
    ``--steps`` steps of ``--batch-size`` on CPU (1000 x 128: ~3 min on 2 idle cores) on ``--train-ids``
    identities x ``--images-per-id`` images rendered once and kept in memory (well above chance).

Also prints the generator's speed (images/s, one process). Every number is measured in this run.

    python benchmarks/check_synthetic_hardness.py                  # all of it, ~4 min on 2 idle CPU cores
    python benchmarks/check_synthetic_hardness.py --steps 0        # (a), (b) and speed only (~10 s)

Training is budgeted in steps, not seconds, so that a busy machine changes the run time, not the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lafs.data.synthetic import SyntheticConfig, SyntheticFaces, raw_pixel_pair_scores, synthetic_pairs
from lafs.eval.metrics import roc_auc
from lafs.heads import build_head
from lafs.models import build_backbone


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> float NCHW in [-1, 1] at ``size`` x ``size`` (cv2.INTER_AREA)."""
    if images.shape[1] != size:
        images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def model_scores(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    x = to_tensor(images, model.img_size)
    emb = torch.cat([model(x[i:i + batch])["embedding"] for i in range(0, len(x), batch)])
    emb = F.normalize(emb.float(), dim=1)
    return (emb[0::2] * emb[1::2]).sum(dim=1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--train-ids", type=int, default=1000)
    ap.add_argument("--images-per-id", type=int, default=8)
    ap.add_argument("--heldout-ids", type=int, default=1000)
    ap.add_argument("--model", default="fvit", help="backbone trained for (c), micro size")
    ap.add_argument("--untrained", default="part_fvit", help="backbone scored untrained for (b), micro size")
    ap.add_argument("--steps", type=int, default=1000, help="training steps for (c) (~3 min, 2 idle cores); 0: skip")
    ap.add_argument("--minutes", type=float, default=0.0, help="optional wall-clock cap on training (0: none)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--save", help="save the trained backbone's state_dict here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="SyntheticConfig overrides, e.g. --set max_rotation_deg=10 noise_prob=0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    res: dict = {}

    n_total = args.train_ids + args.heldout_ids
    cfg = SyntheticConfig()
    for kv in args.set:
        key, value = kv.split("=", 1)
        setattr(cfg, key, type(getattr(cfg, key))(float(value)) if key != "img_size" else int(value))
    cfg.__post_init__()
    res["config"] = dataclasses.asdict(cfg)
    faces = SyntheticFaces(n_total, seed=args.seed, config=cfg)
    heldout = range(args.train_ids, n_total)

    # speed: fresh identities and images, one process (after a short warm-up)
    speed_faces = SyntheticFaces(100_000, seed=args.seed + 1, config=cfg)
    for k in range(20):
        speed_faces.render(99_999 - k, 0)
    t0 = time.perf_counter()
    for k in range(500):
        speed_faces.render(k, k)
    res["images_per_s"] = 500 / (time.perf_counter() - t0)
    print(f"speed: {res['images_per_s']:.0f} images/s (500 renders of 500 new identities, one process)")

    images, issame, _ = synthetic_pairs(faces, args.pairs, seed=args.seed + 7, identities=heldout)
    res["auc_raw_pixels"] = roc_auc(raw_pixel_pair_scores(images), issame)
    print(f"(a) raw-pixel AUC, {args.pairs} held-out pairs: {res['auc_raw_pixels']:.3f}")

    untrained = build_backbone(args.untrained, "micro").eval()
    res["auc_untrained"] = roc_auc(model_scores(untrained, images), issame)
    print(f"(b) untrained {args.untrained}-micro AUC: {res['auc_untrained']:.3f}")

    if args.steps > 0:
        model = build_backbone(args.model, "micro")
        res["auc_before_training"] = roc_auc(model_scores(model, images), issame)
        t0 = time.perf_counter()
        ids = np.repeat(np.arange(args.train_ids), args.images_per_id)
        idx = np.tile(np.arange(args.images_per_id), args.train_ids)
        train_images, _ = faces.batch(ids.tolist(), idx.tolist())
        x_all = to_tensor(train_images, model.img_size)
        y_all = torch.from_numpy(ids)
        del train_images
        print(f"rendered {len(ids)} training images in {time.perf_counter() - t0:.1f} s")

        head = build_head("cosface", model.embedding_size, args.train_ids)
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
        budget = args.minutes * 60.0 if args.minutes > 0 else float("inf")
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        step, losses = 0, []
        model.train()
        while step < args.steps and time.perf_counter() - t0 < budget:
            frac = max(step / args.steps, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:  # linear warm-up, cosine decay over the step (or time) budget
                g["lr"] = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
            b = torch.randint(0, len(y_all), (args.batch_size,), generator=gen)
            x = x_all[b]
            flip = torch.rand(len(b), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = head(model(x)["embedding"], y_all[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 100 == 0:
                print(f"  step {step}  loss {np.mean(losses[-100:]):.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
        res["train_steps"] = step
        res["train_images_seen"] = step * args.batch_size
        res["train_seconds"] = time.perf_counter() - t0
        res["loss_first_last"] = [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))]
        res["auc_trained_heldout"] = roc_auc(model_scores(model, images), issame)
        tr_images, tr_same, _ = synthetic_pairs(faces, args.pairs, seed=args.seed + 8,
                                                identities=range(args.train_ids))
        res["auc_trained_train_ids_new_images"] = roc_auc(model_scores(model, tr_images), tr_same)
        print(f"(c) {args.model}-micro + CosFace, {step} steps x {args.batch_size} in {res['train_seconds']:.0f} s "
              f"(loss {res['loss_first_last'][0]:.2f} -> {res['loss_first_last'][1]:.2f}): held-out AUC "
              f"{res['auc_before_training']:.3f} before -> {res['auc_trained_heldout']:.3f} after "
              f"(training identities, unseen images: {res['auc_trained_train_ids_new_images']:.3f})")
        if args.save:
            torch.save(model.state_dict(), args.save)
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
