"""``lafs data pack | detect | bin | subset | align | misalign | synth | check``: building and checking face data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError


def cmd_data_pack(args: argparse.Namespace) -> int:
    from ..data.pack import pack_images

    print(pack_images(args.folder, args.out, list_file=args.list, keypoints=args.keypoints, checksum=args.checksum,
                      quality=args.quality, skip_bad=args.skip_bad).summary())
    return 0


def cmd_data_detect(args: argparse.Namespace) -> int:
    """5-point keypoints of every image of a .bin (or an image folder, folder order) with the detector."""
    from ..data.tools import detect_set

    print(detect_set(args.input, args.out, color=args.color, threshold=args.threshold, upsample=args.upsample,
                     on_miss=args.on_miss, list_file=args.list).summary())
    return 0


def cmd_data_bin(args: argparse.Namespace) -> int:
    from ..data.pairs import build_bin, read_bin

    out, sidecar = build_bin(args.pairs, args.images, args.out, keypoints=args.keypoints, detect=args.detect)
    _, issame = read_bin(out)
    print(f"wrote {out}: {len(issame)} pairs ({int(issame.sum())} same, {int((~issame).sum())} different)"
          + (f" and {sidecar}" if sidecar else ""))
    return 0


def cmd_data_subset(args: argparse.Namespace) -> int:
    from ..data.datasets import RecordDataset
    from ..data.fewshot import fewshot_index, holdout_identities, save_index, unlabelled_index
    from ..data.pairs import bin_from_dataset, pairs_from_labels

    dataset = RecordDataset(args.rec, keypoints=bool(args.holdout_pairs))
    labels = dataset.labels
    held = None
    if args.holdout:
        held = holdout_identities(labels, args.holdout, args.holdout_seed)
    elif args.holdout_pairs:
        raise ConfigError("--holdout-pairs needs --holdout K (the identities the pairs are drawn from)")
    if args.unlabelled:
        positions, report = unlabelled_index(labels, args.seed, args.fraction, exclude=held)
    else:
        shots = None if args.shots == "all" else int(args.shots)
        positions, report = fewshot_index(labels, args.fraction, shots, args.seed, allow_fewer=args.allow_fewer,
                                          exclude=held)
    out = save_index(args.out, positions, report)
    print(report.summary() + (f" (excluding {len(held)} held-out identities)" if held is not None else ""))
    print(f"wrote {out} (+ {Path(out).with_suffix('.json').name})")
    if args.holdout_pairs:
        pairs, issame = pairs_from_labels(labels, held, args.pairs, args.holdout_seed)
        written = bin_from_dataset(dataset, pairs, issame, args.holdout_pairs)
        print(f"wrote {written}: {len(issame)} pairs of the {len(held)} held-out identities (validation split)")
    return 0


def cmd_data_align(args: argparse.Namespace) -> int:
    from ..data.tools import align_folder

    n = align_folder(args.images, args.keypoints, args.out, args.size, list_file=args.list)
    print(f"aligned {n} images to {args.size}x{args.size} in {args.out} (+ keypoints.npy)")
    return 0


def cmd_data_misalign(args: argparse.Namespace) -> int:
    from ..data.tools import misalign_set

    try:
        print(misalign_set(args.set, args.out, keypoints=args.keypoints, rotate=args.rotate, scale=args.scale,
                           shift=args.shift, seed=args.seed, border=args.border))
    except ValueError as err:
        raise ConfigError(f"lafs data misalign: {err}") from None
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..data.datasets import encode_image
    from ..data.recordio import write_face_records
    from ..data.synthetic import generate
    from ..io import atomic_write

    total = args.identities * args.images_per_id
    kps = np.empty((total, 5, 2), np.float32)

    def samples():
        stream = generate(args.identities, args.images_per_id, seed=args.seed)
        for i, (img, label, kp) in enumerate(tqdm(stream, total=total, desc="synth", unit="img", disable=not sys.stderr.isatty())):
            kps[i] = kp
            yield label, encode_image(img, quality=args.quality)

    out = Path(args.out)
    n, k = write_face_records(out, samples())
    kps_path = atomic_write(out.with_name(out.stem + "_kps.npy"), lambda fh: np.save(fh, kps))
    print(f"wrote {out} (+ .idx, {kps_path.name}): {n} images of {k} synthetic identities, seed {args.seed}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data.check import check_file, format_report

    report = check_file(args.file, decode=not args.no_decode)
    print(format_report(report))
    return 1 if report["bad_records"] else 0


def register(sub) -> None:
    """Add ``data`` and its subcommands to the ``lafs`` subcommands."""
    data = sub.add_parser("data", help="pack, build, subset, align, misalign, synthesise and check face data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("pack", help="image folder (identity/image.jpg, or any folder with --list) -> insightface "
                        ".rec/.idx")
    p.add_argument("folder")
    p.add_argument("out", help="output .rec (the .idx is written beside it)")
    p.add_argument("--list", metavar="LIST.csv", help="images to pack: lines 'path,label', paths relative to folder")
    p.add_argument("--keypoints", help="(N, 5, 2) .npy in folder (or --list) order, written to <out>_kps.npy")
    p.add_argument("--checksum", action="store_true", help="store a crc32 per record in <out>_crc32.txt, verified "
                   "on every read and by lafs data check (the .rec/.idx stay MXNet's format)")
    p.add_argument("--quality", type=int, metavar="Q", help="re-encode every image as JPEG at quality Q (1-100); "
                   "default: store the files as they are")
    p.add_argument("--skip-bad", action="store_true", help="leave out files that do not decode, listed in "
                   "<out>_skipped.txt (default: stop naming the file)")
    p.set_defaults(func=cmd_data_pack)
    p = data.add_parser("detect", help="5-point keypoints of a .bin or image folder with the optional detector "
                        '(pip install "lafs-face[detect]") -> <set>_kps.npy')
    p.add_argument("input", help=".bin pair file, or an image folder (identity/image, flat, or with --list)")
    p.add_argument("--list", metavar="LIST.csv", help="the folder's images: lines 'path' or 'path,label'")
    p.add_argument("--upsample", type=int, metavar="N", help="times the detector doubles the image before its scan "
                   "(0-4; default 1 up to 640 px, else 0; each doubling finds 2x smaller faces at ~4x the time)")
    p.add_argument("-o", "--out", help="default: <set>_kps.npy beside the .bin (the sidecar lafs eval reads)")
    p.add_argument("--color", choices=("rgb", "bgr"), default="rgb", help="channel order the .bin stores")
    p.add_argument("--threshold", type=float, default=0.0, help="added to the detector threshold; < 0 finds more")
    p.add_argument("--on-miss", choices=("error", "template"), default="error",
                   help="no face found: stop naming the image, or use the ArcFace template (an aligned crop) and "
                   "list the image in <out>_template.txt")
    p.set_defaults(func=cmd_data_detect)

    p = data.add_parser("bin", help="LFW pairs.txt (or CSV path1,path2,issame) + image folder -> .bin")
    p.add_argument("pairs")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--keypoints", metavar="KPS.npy", help="also write <out>_kps.npy from these (N, 5, 2) keypoints, "
                   "one row per image of the images folder in folder order (what lafs data detect IMAGES writes)")
    p.add_argument("--detect", action="store_true", help="also write <out>_kps.npy with the optional detector")
    p.set_defaults(func=cmd_data_bin)
    p = data.add_parser("subset", help="few-shot index file: fraction of identities x k shots (seeded)")
    p.add_argument("rec")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of identities, chosen at random")
    p.add_argument("--shots", default="all", help="images per identity: an integer or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabelled", action="store_true", help="1-shot unlabelled pretraining set")
    p.add_argument("--allow-fewer", action="store_true", help="take all images of identities with < shots")
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="leave K random identities out of the subset: a validation split of the training identities")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out identities and their pairs "
                   "(keep it fixed across --shots and --seed so every subset leaves out the same identities)")
    p.add_argument("--holdout-pairs", metavar="VAL.bin", help="write verification pairs of the held-out identities")
    p.add_argument("--pairs", type=int, default=600, help="pairs in --holdout-pairs (half genuine)")
    p.add_argument("-o", "--out", required=True, help="output .npy of dataset positions (+ .json report)")
    p.set_defaults(func=cmd_data_subset)
    p = data.add_parser("align", help="images (identity/image.jpg, flat, or --list) + (N,5,2) keypoints -> aligned "
                        "folder")
    p.add_argument("images")
    p.add_argument("keypoints")
    p.add_argument("out")
    p.add_argument("--list", metavar="LIST.csv", help="the folder's images: lines 'path' or 'path,label'")
    p.add_argument("--size", type=int, default=112)
    p.set_defaults(func=cmd_data_align)
    p = data.add_parser("misalign", help="a .bin + its keypoints -> a seeded misaligned copy (each image warped by a "
                        "random similarity, keypoints moved with it): robustness beyond the training range")
    p.add_argument("set", help="the .bin to misalign (keypoints: its <stem>_kps.npy or --keypoints)")
    p.add_argument("-o", "--out", required=True, help="output .bin (+ <stem>_kps.npy, <stem>_affines.npy)")
    p.add_argument("--keypoints", metavar="KPS.npy", help="(images, 5, 2) pixels, one row per image of the set")
    p.add_argument("--rotate", type=float, default=30.0, help="rotation uniform in +-DEG (default 30)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.7, 1.3), metavar=("LOW", "HIGH"),
                   help="scale uniform in [LOW, HIGH] (default 0.7 1.3)")
    p.add_argument("--shift", type=float, default=0.15, help="shift of each axis uniform in +-FRACTION of the side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--border", choices=("constant", "replicate", "reflect"), default="constant",
                   help="what fills the uncovered pixels (constant: black, as align_face)")
    p.set_defaults(func=cmd_data_misalign)
    p = data.add_parser("synth", help="procedural synthetic identities -> .rec/.idx + keypoints")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--images-per-id", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("-o", "--out", required=True, help="output .rec")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("check", help="validate a .rec/.idx/.bin: counts, identities, shots, bad records")
    p.add_argument("file")
    p.add_argument("--no-decode", action="store_true", help="do not decode the images (faster)")
    p.set_defaults(func=cmd_data_check)
