"""``lafs eval``, ``lafs probe``, ``lafs embed`` and ``lafs verify``: scoring and using a model file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError


def cmd_probe(args: argparse.Namespace) -> int:
    """k-NN and linear identification of held-out images of labelled records with a frozen model (eval/probe.py),
    beside the same probes of raw and PCA-whitened pixels."""
    import json

    import numpy as np
    import torch

    from ..data.datasets import RecordDataset
    from ..eval.embedding import embed_images
    from ..eval.floors import PCAWhitening, raw_pixel_embeddings
    from ..eval.probe import probe_features, split_probe_gallery
    from ..io import atomic_write_bytes

    rec = Path(args.data)
    if not rec.is_file():
        raise ConfigError(f"--data: {rec} not found (a labelled .rec with its .idx)")
    kps_path = rec.with_name(rec.stem + "_kps.npy")
    ds = RecordDataset(rec, keypoints=str(kps_path) if kps_path.is_file() else False)
    gal, pro = split_probe_gallery(ds.labels, args.identities, args.seed)
    idx = np.sort(np.concatenate([gal, pro]))
    images = torch.from_numpy(np.stack([ds._load_chw(int(i)) for i in idx]))
    labels = ds.labels[idx]
    ks = tuple(int(k) for k in args.k.split(","))
    rows = {}
    if args.model:
        from ..embedder import load_embedder

        embedder = load_embedder(args.model, args.device)
        kps = ds.keypoints[idx] if ds.keypoints is not None else None
        seen = _probe_geometry(images, kps, embedder.geometry, rec)
        feats = embed_images(embedder, seen, batch_size=args.batch_size, device=args.device).numpy()
        rows[embedder.description] = probe_features(feats, labels, identities=None, seed=args.seed, ks=ks,
                                                    linear=not args.no_linear)
    if args.floors or not args.model:
        rows["raw pixels"] = probe_features(raw_pixel_embeddings(images, args.floor_size), labels, seed=args.seed,
                                            ks=ks, linear=not args.no_linear)
        pca = PCAWhitening().fit(images, components=min(args.floor_components, len(images) - 1), size=args.floor_size)
        rows["PCA-whitened pixels (fitted on these images)"] = probe_features(
            pca.transform(images), labels, seed=args.seed, ks=ks, linear=not args.no_linear)
    first = next(iter(rows.values()))
    print(f"probe: {first['identities']} identities of {rec.name}, {first['gallery']} gallery / training images, "
          f"one probe each (chance {100 * first['chance']:.2f} %)")
    cols = [f"knn{k}" for k in ks] + ([] if args.no_linear else ["linear"])
    width = max(len(n) for n in rows)
    print(f"{'features':<{width}}  " + "  ".join(f"{c + ' %':>9}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{100 * r[c]:9.2f}" if c in r else f"{'-':>9}" for c in cols))
    if args.out:
        out = Path(args.out) / "probe.json"
        atomic_write_bytes(out, json.dumps({"data": str(rec), "seed": args.seed, "results": rows}, indent=2).encode())
        print(f"wrote {out}")
    return 0


def _probe_geometry(images, kps, geometry: str | None, rec: Path):
    """The records brought to the model's training geometry (from their keypoints; else taken as ArcFace)."""
    from ..data.align import to_geometry
    from ..geometry import get_geometry

    if geometry is None:
        return images
    out, _, note = to_geometry(images, get_geometry(geometry), kps, name=rec.stem)
    print(note)
    return out


def cmd_embed(args: argparse.Namespace) -> int:
    """Unit-norm embeddings of image files -> .npy (one row per file, in order) + a .txt list of the files."""
    import numpy as np

    from ..embedder import load_embedder
    from ..inference import embed_files
    from ..io import atomic_write, atomic_write_bytes

    embedder = load_embedder(args.model, args.device)
    emb = embed_files(embedder, args.images, args.detect, args.batch_size, not args.no_flip, args.device)
    out = Path(args.out)
    atomic_write(out, lambda fh: np.save(fh, emb))
    atomic_write_bytes(out.with_suffix(".txt"), "".join(f"{p}\n" for p in args.images).encode())
    print(f"{embedder.description}: {emb.shape[0]} images -> {emb.shape[1]}-d unit embeddings, wrote {out} "
          f"(+ {out.with_suffix('.txt').name}: the files, in row order)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..embedder import load_embedder
    from ..inference import verify

    embedder = load_embedder(args.model, args.device)
    r = verify(embedder, args.image_a, args.image_b, args.threshold, args.detect)
    line = f"cosine similarity {r['score']:.4f}"
    if r["threshold"] is None:
        line += "; no threshold stored with this model (train with data.val, or pass --threshold)"
    else:
        verdict = "same person" if r["same"] else "different people"
        line += f": {verdict} at threshold {r['threshold']:.4f} ({r['threshold_source']})"
    print(line)
    return 0


def _prepare_floors(args: argparse.Namespace, set_paths: list[str], model_path, model_hash: str) -> dict | None:
    """``lafs eval --floors``: fit the PCA floor and build the untrained network before any set is embedded, so a bad
    ``--floor-fit`` fails fast; prints why a floor cannot be computed. None without ``--floors``."""
    if not args.floors:
        return None
    if not set_paths:
        raise ConfigError("--floors scores .bin pair sets: give --sets (or --pairs with --embeddings)")
    from ..eval import report

    ctx = report.floor_context(model_path, model_hash, args.floor_fit, color=args.color, size=args.floor_size,
                               components=args.floor_components, max_images=args.floor_max_images,
                               device=args.device)
    for note in ctx["notes"]:
        print(note)
    return ctx


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model file, or precomputed embeddings, on verification sets, the affine-sensitivity curve, IJB-B/C and
    rank-k identification; tables + eval.json + roc.png / sensitivity.png."""
    import time

    from ..eval import report

    thresholds = None if args.thresholds == "reference" else args.thresholds
    flip = not args.no_flip
    results, extra, meta = [], [], {"thresholds": args.thresholds, "flip": flip, "flip_mode": args.flip_mode}
    floor_ctx, floor_sets, cache = None, [], None
    if args.embeddings:
        if args.model or not args.pairs:
            raise ConfigError("--embeddings EMB.npy goes with --pairs SET.bin (one embedding row per image, in order), "
                              "without a model file")
        from ..data.pairs import read_bin

        floor_sets = [args.pairs]
        floor_ctx = _prepare_floors(args, floor_sets, None, "")
        from ..io_safe import load_array

        emb = load_array(args.embeddings, "an N x D embedding array")
        _, issame = read_bin(args.pairs)
        results.append(report.score_pairs(emb, issame, Path(args.pairs).stem, thresholds))
        meta.update(model=f"embeddings {args.embeddings}", flip="as given", flip_mode="as given")
    else:
        if not args.model or not (args.sets or args.affine_curve or args.ijb or args.identification):
            raise ConfigError("lafs eval MODEL --sets a.bin,b.bin [--affine-curve crops.bin] [--ijb ROOT] "
                              "[--identification DIR] (or --embeddings EMB.npy --pairs SET.bin)")
        from ..embedder import load_embedder

        embedder = load_embedder(args.model, args.device, amp=args.amp, compile=args.compile)
        meta.update(model=embedder.description, model_hash=embedder.file_hash, precision=embedder.precision)
        cache = None if args.no_cache else (args.cache or str(Path.home() / ".cache" / "lafs" / "embeddings"))
        common = {"batch_size": args.batch_size, "device": args.device, "flip": flip, "flip_mode": args.flip_mode}
        floor_sets = args.sets.split(",") if args.sets else []
        for path in floor_sets:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--sets: {path} not found")
        floor_ctx = _prepare_floors(args, floor_sets, args.model, embedder.file_hash)
        for path in floor_sets:
            start = time.perf_counter()
            emb, issame, cached = report.set_embeddings(embedder, path, embedder.file_hash, color=args.color,
                                                        cache_dir=cache, keypoints_path=args.keypoints, **common)
            r = report.score_pairs(emb, issame, Path(path).stem, thresholds)
            r["seconds"], r["cached"] = time.perf_counter() - start, cached
            results.append(r)
        if args.affine_curve:
            if not Path(args.affine_curve).is_file():
                raise FileNotFoundError(f"--affine-curve: {args.affine_curve} not found")
            r = report.sensitivity_report(embedder, args.affine_curve, args.keypoints, steps=args.steps,
                                          interpolation=args.interpolation, border=args.border, color=args.color,
                                          thresholds=thresholds,
                                          **common)
            from ..eval.robustness import format_sensitivity

            extra.append(format_sensitivity(r))
            results.append(r)
        for root in args.ijb.split(",") if args.ijb else []:
            from ..eval.ijb import format_ijb_result

            r = report.ijb_report(embedder, root, args.ijb_name, mode=args.ijb_mode, model_hash=embedder.file_hash,
                                  cache_dir=cache, batch_size=args.batch_size, device=args.device)
            extra.append(format_ijb_result(r))
            results.append(r)
        if args.identification:
            r = report.identification_report(embedder, args.identification, **common)
            extra.append(f"{r['name']}: {r['probes']} probes, {r['gallery']} gallery, {r['distractors']} distractors: "
                         + ", ".join(f"rank-{k} {100 * v:.2f} %" for k, v in r["rank"].items()))
            results.append(r)
    floors = None
    if floor_ctx is not None:
        floors = report.floors_report(floor_ctx, floor_sets, color=args.color, flip=flip, flip_mode=args.flip_mode,
                                      thresholds=thresholds, batch_size=args.batch_size, device=args.device,
                                      cache_dir=cache, keypoints_path=args.keypoints)
    print(f"model: {meta['model']}; flip test: {meta['flip']} ({meta['flip_mode']}); thresholds: {args.thresholds}")
    pair_results = [r for r in results if "_dist" in r]
    if pair_results:
        print(report.format_table(pair_results, floors["sets"] if floors else None))
    if floors:
        s = floors["settings"]
        print("floors (same protocol and flip test): raw pixels at each set's own size; "
              + (f"PCA-whitened: {s['components']} components of {s['size']} px pixels, fitted on {floors['fit']}; "
                 if floors["fit"] else "")
              + (f"untrained net: {floors['untrained']}" if floors["untrained"] else "")
              + ". A model is only as good as its margin over these rows.")
    for text in extra:
        print(text)
    if args.out:
        for path in report.write_report(results, args.out, meta, floors):
            print(f"wrote {path}")
    return 0



def register(sub) -> None:
    """Add ``eval``, ``probe``, ``embed`` and ``verify`` to the ``lafs`` subcommands."""
    p = sub.add_parser("eval", help="verification accuracy, AUC, EER, TAR@FAR of a model file on .bin sets",
                       description="Score a lafs checkpoint (train/finetune/pretrain), a TorchScript or an ONNX "
                       "embedding model on .bin pair sets, or precomputed embeddings of another framework.")
    p.add_argument("model", nargs="?", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("--sets", help="comma-separated .bin files (LFW, CFP-FP, AgeDB-30, ...)")
    p.add_argument("--embeddings", help="N x D .npy, one row per image of --pairs, in its order")
    p.add_argument("--pairs", help="the .bin whose pairs --embeddings belong to")
    p.add_argument("--out", help="folder for eval.json, roc.png and sensitivity.png")
    p.add_argument("--affine-curve", metavar="CROPS.bin",
                   help="detector crops (.bin) + keypoints: accuracy from the crop (t=0) to the aligned face (t=1), "
                   "the affine-sensitivity curve of KP-RPE (Kim et al., CVPR 2024)")
    p.add_argument("--keypoints", help="(images, 5, 2) .npy for --affine-curve or keypoint models "
                   "(default: <set>_kps.npy beside the .bin)")
    p.add_argument("--steps", type=int, default=6, help="evenly spaced t in [0, 1] for --affine-curve")
    p.add_argument("--interpolation", choices=("similarity", "linear"), default="similarity",
                   help="similarity: scale^t, t*angle, centre on a line (every step a similarity); "
                   "linear: (1-t) I + t M entry-wise")
    p.add_argument("--border", choices=("constant", "replicate", "reflect"), default="constant",
                   help="fill where a warped crop has no pixels (constant = black, as align_face / insightface)")
    p.add_argument("--ijb", metavar="ROOT", help="IJB-B/C folder(s) with loose_crop/ and meta/ (comma-separated)")
    p.add_argument("--ijb-name", help="ijbb or ijbc (default: the folder name)")
    p.add_argument("--ijb-mode", default="N1D1F1",
                   help="N1/N0 keep/normalise image feature norms, D1/D0 detector-score weighting, F1/F0 flip test")
    p.add_argument("--identification", metavar="DIR",
                   help="rank-1/5/20 from DIR/probe/<id>/*, DIR/gallery/<id>/*, optional DIR/distractors/")
    p.add_argument("--thresholds", choices=("reference", "exact"), default="reference",
                   help="reference: insightface arange(0, 4, 0.01) (comparable with papers); exact: every midpoint")
    p.add_argument("--flip-mode", choices=("sum", "concat"), default="sum")
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.add_argument("--color", choices=("rgb", "bgr"), default="rgb", help="channel order the .bin stores")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "auto", "bf16", "fp16"), default="none",
                   help="lafs checkpoints under autocast (bf16: CPU or GPU; fp16: GPU; auto: bf16 where the hardware "
                        "has bf16 units, as train.amp=auto); fp32 embeddings out")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (lafs checkpoints; compiles first)")
    p.add_argument("--cache", help="embedding cache folder (default ~/.cache/lafs/embeddings)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--floors", action="store_true",
                   help="also score each set's floors (raw pixels, PCA-whitened pixels, the untrained network): "
                   "rows beside the model's accuracy and a floors block in eval.json")
    p.add_argument("--floor-fit", metavar="PATH",
                   help="unlabelled training images for the PCA floor: .rec, image folder, .bin or uint8 "
                   "N x 3 x H x W .npy, crops in the geometry the model sees (default: the checkpoint run's data.train)")
    p.add_argument("--floor-size", type=int, default=32, help="PCA floor: area-downsampled to this size (default 32)")
    p.add_argument("--floor-components", type=int, default=256, help="PCA floor: principal directions (default 256)")
    p.add_argument("--floor-max-images", type=int, default=20000,
                   help="PCA floor: at most this many fit images, a seeded subsample (default 20000)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("probe", help="k-NN / linear identification of held-out images with a frozen model",
                       description="From labelled records, each identity with >= 2 images gives one probe image "
                       "(seeded); the rest are its gallery (k-NN) or training images (linear). Without a model, "
                       "or with --floors, raw and PCA-whitened pixels are probed the same way.")
    p.add_argument("model", nargs="?", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("--data", required=True, help="labelled .rec (identities the model did not train on)")
    p.add_argument("--identities", type=int, default=1000, help="identities probed, drawn with --seed")
    p.add_argument("--k", default="1,20", help="comma-separated k of the k-NN (1 = nearest; >1 DINO's vote)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--floors", action="store_true", help="also probe raw and PCA-whitened pixels")
    p.add_argument("--floor-size", type=int, default=32)
    p.add_argument("--floor-components", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for probe.json")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("embed", help="unit-norm face embeddings of image files -> .npy",
                       description="Aligned 112x112 crops are embedded as they are; other photos go through the "
                       "optional 5-point detector and alignment (extra detect).")
    p.add_argument("model", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--out", default="embeddings.npy", help="N x D .npy (+ the file list as .txt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.set_defaults(func=cmd_embed)
    verify_p = sub.add_parser("verify", help="cosine score of two face images and the same/different decision")
    verify_p.add_argument("model", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    verify_p.add_argument("image_a")
    verify_p.add_argument("image_b")
    verify_p.add_argument("--threshold", type=float, help="cosine threshold (default: stored with the model)")
    verify_p.set_defaults(func=cmd_verify)
    for q in (p, verify_p):
        q.add_argument("--detect", choices=("auto", "always", "never"), default="auto",
                       help="auto: detect + align anything that is not a 112x112 crop")
        q.add_argument("--device", default="cpu")
