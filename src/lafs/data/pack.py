"""``lafs data pack``: image files -> insightface ``.rec``/``.idx`` (+ ``<stem>_kps.npy``, ``<stem>_crc32.txt``).

Every image is decoded before it is packed: a file OpenCV cannot decode stops the pack with an error naming it, or
with ``skip_bad`` is left out, named on the console and in ``<stem>_skipped.txt`` beside the output (its keypoint
row goes with it; an identity left without images is dropped and the rest renumbered 0..K-1). Images are stored
as they are, or re-encoded as JPEG at ``quality`` (1-100). Sources: :mod:`lafs.data.sources` (identity folders, or a
flat folder with a ``path,label`` list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..io import atomic_write, atomic_write_bytes
from .datasets import load_keypoints
from .recordio import checksum_path, write_face_records
from .sources import image_list


@dataclass
class PackResult:
    out: Path
    images: int
    identities: int
    skipped: list[str] = field(default_factory=list)  # one line per file left out: path and why
    written: list[Path] = field(default_factory=list)  # the files besides the .rec/.idx

    def summary(self) -> str:
        extra = f", {', '.join(p.name for p in self.written)}" if self.written else ""
        line = f"wrote {self.out} (+ .idx{extra}): {self.images} images of {self.identities} identities"
        if self.skipped:
            line += f"; {len(self.skipped)} undecodable file(s) left out:\n" + "\n".join(
                f"  {s}" for s in self.skipped[:20]) + (f"\n  ... and {len(self.skipped) - 20} more"
                                                       if len(self.skipped) > 20 else "")
        return line


def _encoded(path: Path, quality: int | None) -> bytes:
    """The bytes to store for ``path``: as stored, or re-encoded at JPEG ``quality``; ValueError when it does not
    decode."""
    data = path.read_bytes()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot decode image ({len(data)} bytes)")
    if quality is None:
        return data
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])  # BGR in, true colours stored
    if not ok:
        raise ValueError(f"{path}: JPEG encoding failed")
    return buf.tobytes()


def pack_images(folder: str | Path, out: str | Path, *, list_file: str | Path | None = None,
                keypoints: str | Path | None = None, checksum: bool = False, quality: int | None = None,
                skip_bad: bool = False) -> PackResult:
    """Pack the images of ``folder`` (or of ``list_file``) into ``out``; ``keypoints``: an (N, K, 2) array with one
    row per source image, in source order, written as ``<stem>_kps.npy`` in packed order."""
    if quality is not None and not 1 <= int(quality) <= 100:
        raise ValueError(f"--quality must be 1..100, got {quality}")
    src = image_list(folder, list_file)
    labels = src.require_labels("lafs data pack")
    kps = load_keypoints(keypoints, len(src)) if keypoints else None  # validates the row count first
    out = Path(out)
    kept, data, skipped = [], [], []
    for i, path in enumerate(src.paths):
        try:
            data.append(_encoded(path, quality))
        except ValueError as err:
            if not skip_bad:
                raise ValueError(f"{err}; nothing was packed (--skip-bad leaves such files out and lists "
                                 "them)") from None
            skipped.append(str(err))
            continue
        kept.append(i)
    if not kept:
        raise ValueError(f"{src.source}: no image decodes; nothing to pack")
    kept_arr = np.asarray(kept)
    # records grouped by identity in ascending order (insightface); identities left without images are dropped
    order = kept_arr[np.argsort(labels[kept_arr], kind="stable")]
    position = {int(i): j for j, i in enumerate(kept)}
    _, new_labels = np.unique(labels[order], return_inverse=True)
    n, k = write_face_records(out, ((int(lab), data[position[int(i)]]) for lab, i in zip(new_labels, order)),
                              checksum=checksum)
    result = PackResult(out, n, k, skipped)
    if checksum:
        result.written.append(checksum_path(out))
    if kps is not None:
        rows = kps[order]
        result.written.append(atomic_write(out.with_name(out.stem + "_kps.npy"), lambda fh: np.save(fh, rows)))
    skipped_file = out.with_name(out.stem + "_skipped.txt")
    if skipped:
        atomic_write_bytes(skipped_file, "".join(f"{s}\n" for s in skipped).encode())
        result.written.append(skipped_file)
    else:
        skipped_file.unlink(missing_ok=True)  # an earlier pack's list would describe other records
    return result
