"""``lafs data check``: validate a ``.rec``/``.idx`` or ``.bin`` and summarise it, listing every bad record."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from .datasets import load_keypoints
from .pairs import read_bin
from .recordio import RecordIOError, RecordReader, face_record_index, image_keys


def _decodes(data: bytes) -> bool:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


def shots_histogram(labels: np.ndarray) -> dict[int, int]:
    """images-per-identity -> number of identities with that many images."""
    counts = np.bincount(labels) if len(labels) else np.array([], dtype=np.int64)
    return dict(sorted(Counter(int(c) for c in counts if c > 0).items()))


def check_rec(path: str | Path, decode: bool = True) -> dict:
    """Every record of a ``.rec``: heads and labels (a bad one is listed, not fatal), images (decoded unless
    ``decode=False``), each record against its crc32 when the file was packed with ``--checksum`` (a mismatch, or a
    record without a checksum, is listed) and the ``<stem>_kps.npy`` keypoint sidecar when present (one finite row per
    image)."""
    path = Path(path)
    if path.suffix == ".idx":
        path = path.with_suffix(".rec")
    reader = RecordReader(path)
    bad: list[str] = []
    try:
        keys, labels = face_record_index(reader, bad)
        bad_keys = set(image_keys(reader)) - set(keys)  # listed already, by their heads
    except RecordIOError as err:  # the file as a whole (its header record, a stray label): nothing to index
        return {"file": str(path), "records": len(reader), "images": 0, "identities": 0, "shots_histogram": {},
                "bad_records": [str(err)]}
    for key in keys:
        try:
            header, data = reader.read_header(key)
            if decode and not _decodes(data):
                bad.append(f"record {key} at byte {reader.idx[key]}: cannot decode image ({len(data)} bytes)")
        except RecordIOError as err:
            bad.append(str(err))
    if reader.checksums is not None:
        images = set(keys)
        for key in reader.keys:
            if key not in reader.checksums:
                bad.append(f"{reader.checksum_path}: record {key} has no checksum")
            elif key not in images and key not in bad_keys:  # the header and identity records too
                try:
                    reader.read(key)
                except RecordIOError as err:
                    bad.append(str(err))
    report = {
        "file": str(path),
        "records": len(reader),
        "images": len(keys),
        "identities": int(len(np.unique(labels))),
        "shots_histogram": shots_histogram(labels),
        "checksums": (f"{reader.checksum_path} (crc32 of every record, verified)" if reader.checksum_path
                      else "none (packed without --checksum: only the structure and decoding are checked)"),
    }
    sidecar = path.with_name(path.stem + "_kps.npy")
    if sidecar.is_file():
        report["keypoints"] = str(sidecar)
        bad += check_sidecar(sidecar, len(image_keys(reader)))
    report["bad_records"] = bad
    return report


def check_sidecar(path: Path, images: int) -> list[str]:
    """Problems of a keypoint sidecar: its shape against the image count, non-finite rows (listed by row)."""
    try:
        kps = load_keypoints(path, images)  # the loader a training run uses: its shape check and message
    except OSError as err:
        return [f"{path}: cannot read keypoints ({err})"]
    except ValueError as err:
        return [str(err)]
    rows = np.flatnonzero(~np.isfinite(kps).all(axis=(1, 2)))
    return [f"{path}: row {int(r)} holds non-finite keypoints" for r in rows]


def check_bin(path: str | Path, decode: bool = True) -> dict:
    images, issame = read_bin(path)
    bad = [f"image {i}: cannot decode ({len(b)} bytes)" for i, b in enumerate(images) if decode and not _decodes(b)]
    return {"file": str(path), "pairs": int(len(issame)), "same": int(issame.sum()),
            "different": int((~issame).sum()), "images": len(images), "bad_records": bad}


def check_file(path: str | Path, decode: bool = True) -> dict:
    suffix = Path(path).suffix
    if suffix in (".rec", ".idx"):
        return check_rec(path, decode)
    if suffix == ".bin":
        return check_bin(path, decode)
    raise ValueError(f"{path}: cannot check a '{suffix}' file (expected .rec, .idx or .bin)")


def format_report(report: dict) -> str:
    lines = [f"{k}: {v}" for k, v in report.items() if k != "bad_records"]
    bad = report["bad_records"]
    lines.append(f"bad records: {len(bad)}")
    lines += [f"  {b}" for b in bad[:50]]
    if len(bad) > 50:
        lines.append(f"  ... and {len(bad) - 50} more")
    return "\n".join(lines)
