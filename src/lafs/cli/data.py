"""``lafs data pack | detect | bin | subset | align | synth | check``: building and checking face data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError


def cmd_data_pack(args: argparse.Namespace) -> int:
    from ..data.datasets import ImageFolderDataset
    from ..data.recordio import write_face_records
    from ..io import atomic_write_bytes

    ds = ImageFolderDataset(args.folder)
    n, k = write_face_records(args.out, ((int(ds.labels[i]), ds.raw(i)) for i in range(len(ds))))
    if args.keypoints:
        from ..data.datasets import load_keypoints

        load_keypoints(args.keypoints, n)  # validates the row count before copying
        atomic_write_bytes(Path(args.out).with_name(Path(args.out).stem + "_kps.npy"), Path(args.keypoints).read_bytes())
    print(f"wrote {args.out} (+ .idx): {n} images of {k} identities")
    return 0


def cmd_data_detect(args: argparse.Namespace) -> int:
    """5-point keypoints of every image of a .bin (or an identity/image folder, folder order) with the detector."""
    import numpy as np

    from ..data.datasets import decode_image
    from ..data.detect import detect_keypoints
    from ..io import atomic_write

    src = Path(args.input)
    if src.is_file():
        from ..data.pairs import read_bin

        images, _ = read_bin(src)
        items = ((f"{src}: image {i}", data) for i, data in enumerate(images))
        n = len(images)
    else:
        from ..data.datasets import ImageFolderDataset

        ds = ImageFolderDataset(src)
        items = ((str(ds.paths[i]), ds.raw(i)) for i in range(len(ds)))
        n = len(ds)
    kps = np.empty((n, 5, 2), np.float32)
    misses = []
    for i, (name, data) in enumerate(items):
        img = decode_image(data, args.color, source=name)
        try:
            kps[i] = detect_keypoints(img, name, threshold=args.threshold)
        except ValueError:
            if args.on_miss == "error":
                raise
            from ..geometry import template

            kps[i] = template(112) * (np.array(img.shape[1::-1]) / 112)  # the crop is taken as aligned
            misses.append(i)
    out = Path(args.out or (src.with_name(src.stem + "_kps.npy") if src.is_file() else src / "keypoints.npy"))
    atomic_write(out, lambda fh: np.save(fh, kps))
    print(f"wrote {out}: {n} x 5 x 2 keypoints; {len(misses)} images without a detected face"
          + (f" got the template (first: {misses[:5]})" if misses else ""))
    return 0


def cmd_data_bin(args: argparse.Namespace) -> int:
    from ..data.pairs import bin_from_csv, bin_from_lfw_pairs, read_bin

    build = bin_from_csv if str(args.pairs).endswith(".csv") else bin_from_lfw_pairs
    out = build(args.pairs, args.images, args.out)
    _, issame = read_bin(out)
    print(f"wrote {out}: {len(issame)} pairs ({int(issame.sum())} same, {int((~issame).sum())} different)")
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
    import cv2
    import numpy as np

    from ..data.align import align_face, align_keypoints
    from ..data.datasets import ImageFolderDataset, decode_image, encode_image, load_keypoints
    from ..io import atomic_write, atomic_write_bytes

    ds = ImageFolderDataset(args.images)
    kps = load_keypoints(args.keypoints, len(ds))
    out = Path(args.out)
    aligned_kps = np.empty_like(kps)
    for i, path in enumerate(ds.paths):
        img = decode_image(path.read_bytes(), "rgb", str(path))
        crop, m = align_face(img, kps[i], size=args.size)
        aligned_kps[i] = align_keypoints(kps[i], m)
        target = out / path.relative_to(ds.root)
        atomic_write_bytes(target, encode_image(crop) if target.suffix.lower() in (".jpg", ".jpeg")
                           else cv2.imencode(target.suffix, cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))[1].tobytes())
    atomic_write(out / "keypoints.npy", lambda fh: np.save(fh, aligned_kps))
    print(f"aligned {len(ds)} images to {args.size}x{args.size} in {out} (+ keypoints.npy)")
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
    data = sub.add_parser("data", help="pack, build, subset, align, synthesise and check face data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("pack", help="image folder (identity/image.jpg) -> insightface .rec/.idx")
    p.add_argument("folder")
    p.add_argument("out", help="output .rec (the .idx is written beside it)")
    p.add_argument("--keypoints", help="(N, 5, 2) .npy in folder order, copied to <out>_kps.npy")
    p.set_defaults(func=cmd_data_pack)
    p = data.add_parser("detect", help="5-point keypoints of a .bin or image folder with the optional detector "
                        '(pip install "lafs-face[detect]") -> <set>_kps.npy')
    p.add_argument("input", help=".bin pair file or identity/image folder")
    p.add_argument("-o", "--out", help="default: <set>_kps.npy beside the .bin (the sidecar lafs eval reads)")
    p.add_argument("--color", choices=("rgb", "bgr"), default="rgb", help="channel order the .bin stores")
    p.add_argument("--threshold", type=float, default=0.0, help="added to the detector threshold; < 0 finds more")
    p.add_argument("--on-miss", choices=("error", "template"), default="error",
                   help="no face found: stop naming the image, or use the ArcFace template (an aligned crop)")
    p.set_defaults(func=cmd_data_detect)

    p = data.add_parser("bin", help="LFW pairs.txt (or CSV path1,path2,issame) + image folder -> .bin")
    p.add_argument("pairs")
    p.add_argument("images")
    p.add_argument("out")
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
    p = data.add_parser("align", help="images (identity/image.jpg) + (N,5,2) keypoints -> aligned folder")
    p.add_argument("images")
    p.add_argument("keypoints")
    p.add_argument("out")
    p.add_argument("--size", type=int, default=112)
    p.set_defaults(func=cmd_data_align)
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
