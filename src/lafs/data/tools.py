"""The file work of ``lafs data detect``, ``align``, ``bin`` and ``misalign``: sets in, keypoint sidecars and aligned crops out.

Image folders come in the layouts of :mod:`lafs.data.sources` (identity folders, a flat folder, or a ``path[,label]``
list); keypoint rows follow that order. The detector is the optional extra of :mod:`lafs.data.detect`, imported only
when something is detected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_write, atomic_write_bytes
from .datasets import decode_image, encode_image, load_keypoints
from .sources import image_list


def _set_images(src: Path, list_file) -> tuple[list[tuple[str, bytes]], str]:
    """(name, encoded bytes) of every image of a ``.bin`` or an image folder, in order; and the set's kind."""
    if src.is_file():
        from .pairs import read_bin

        images, _ = read_bin(src)
        return [(f"{src}: image {i}", data) for i, data in enumerate(images)], "bin"
    files = image_list(src, list_file)
    return [(str(p), p.read_bytes()) for p in files.paths], "folder"


@dataclass
class DetectResult:
    out: Path
    images: int
    misses: list[int]  # positions that got the template
    miss_list: Path | None  # the file naming them

    def summary(self) -> str:
        line = f"wrote {self.out}: {self.images} x 5 x 2 keypoints; {len(self.misses)} images without a detected face"
        if self.misses:
            line += f" got the template (first: {self.misses[:5]})"
        if self.miss_list is not None:
            line += f"; listed in {self.miss_list}"
        return line


def template_list_path(out: str | Path) -> Path:
    """Where ``detect --on-miss template`` names the images that got the template: ``<out stem>_template.txt``."""
    out = Path(out)
    return out.with_name(out.stem + "_template.txt")


def detect_set(src: str | Path, out: str | Path | None = None, *, color: str = "rgb", threshold: float = 0.0,
               upsample: int | None = None, on_miss: str = "error", list_file: str | Path | None = None
               ) -> DetectResult:
    """5-point keypoints of every image of a ``.bin`` or an image folder with the optional detector -> ``out``
    (default: ``<stem>_kps.npy`` beside a ``.bin``, ``keypoints.npy`` in a folder). ``upsample``: dlib's doublings
    before the scan (None: 1 up to 640 px, else 0; each costs ~4x). ``on_miss="template"``: an image without a face
    gets the ArcFace template (taken as an aligned crop) and is listed, position and name, in
    ``<out stem>_template.txt``."""
    from . import detect

    if on_miss not in ("error", "template"):
        raise ValueError(f"on_miss must be 'error' or 'template', got {on_miss!r}")
    if upsample is not None and not 0 <= int(upsample) <= 4:
        raise ValueError(f"--upsample must be 0..4 (each doubling costs ~4x the time), got {upsample}")
    src = Path(src)
    items, kind = _set_images(src, list_file)
    kps = np.empty((len(items), 5, 2), np.float32)
    misses: list[int] = []
    for i, (name, data) in enumerate(items):
        img = decode_image(data, color, source=name)
        try:
            kps[i] = detect.detect_keypoints(img, name, threshold=threshold, upsample=upsample)
        except ValueError:
            if on_miss == "error":
                raise
            from ..geometry import template

            kps[i] = template(112) * (np.array(img.shape[1::-1]) / 112)  # the crop is taken as aligned
            misses.append(i)
    out = Path(out or (src.with_name(src.stem + "_kps.npy") if kind == "bin" else src / "keypoints.npy"))
    atomic_write(out, lambda fh: np.save(fh, kps))
    miss_list = None
    if on_miss == "template":
        miss_list = template_list_path(out)
        text = f"# images of {src} without a detected face, given the ArcFace template in {out.name}: row<TAB>image\n"
        atomic_write_bytes(miss_list, (text + "".join(f"{i}\t{items[i][0]}\n" for i in misses)).encode())
    return DetectResult(out, len(items), misses, miss_list)


def align_folder(images: str | Path, keypoints: str | Path, out: str | Path, size: int = 112,
                 list_file: str | Path | None = None) -> int:
    """Align every image of a folder (any :mod:`lafs.data.sources` layout) by its keypoint row onto the ArcFace
    template at ``size``; crops go to ``out`` under the same relative paths, their keypoints to
    ``out/keypoints.npy`` (same row order). Returns the image count."""
    import cv2

    from .align import align_face, align_keypoints

    src = image_list(images, list_file)
    kps = load_keypoints(keypoints, len(src))
    out = Path(out)
    aligned_kps = np.empty_like(kps)
    for i, path in enumerate(src.paths):
        img = decode_image(path.read_bytes(), "rgb", str(path))
        crop, m = align_face(img, kps[i], size=size)
        aligned_kps[i] = align_keypoints(kps[i], m)
        target = out / path.relative_to(src.root)
        atomic_write_bytes(target, encode_image(crop) if target.suffix.lower() in (".jpg", ".jpeg")
                           else cv2.imencode(target.suffix, cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))[1].tobytes())
    atomic_write(out / "keypoints.npy", lambda fh: np.save(fh, aligned_kps))
    return len(src)


def bin_keypoints(bin_path: str | Path, image_paths: list[Path], image_root: str | Path, *,
                  keypoints: str | Path | None = None, detect: bool = False, upsample: int | None = None) -> Path:
    """Write the ``<stem>_kps.npy`` sidecar of a ``.bin`` built from ``image_paths`` (its images in order): rows of
    ``keypoints`` (one per image of ``image_root`` in folder order, what ``lafs data detect IMAGES`` writes), or
    detected (``detect``). Returns the sidecar's path."""
    from .pairs import sidecar_keypoints

    if keypoints is not None and detect:
        raise ValueError("--keypoints and --detect exclude each other: give the points or detect them")
    if keypoints is not None:
        folder = image_list(image_root)
        table = load_keypoints(keypoints, len(folder))
        row = {p.resolve(): i for i, p in enumerate(folder.paths)}
        missing = [p for p in image_paths if p.resolve() not in row]
        if missing:
            raise ValueError(f"{keypoints}: no row for {missing[0]} (rows follow the images of {image_root} in folder "
                             "order)")
        rows = table[[row[p.resolve()] for p in image_paths]]
    else:
        from . import detect as detector

        rows = np.stack([detector.detect_keypoints(decode_image(p.read_bytes(), "rgb", str(p)), str(p),
                                                   upsample=upsample) for p in image_paths]).astype(np.float32)
    return atomic_write(sidecar_keypoints(bin_path), lambda fh: np.save(fh, rows))


def misalign_set(bin_path: str | Path, out: str | Path, *, keypoints: str | Path | None = None, rotate: float = 30.0,
                 scale=(0.7, 1.3), shift: float = 0.15, seed: int = 0, border: str = "constant") -> str:
    """A misaligned copy of a verification set: every image warped by its own seeded similarity
    (``eval.robustness.random_similarities``) with its keypoints moved with the pixels. Writes ``out`` (.bin, the same
    pairs), ``<out stem>_kps.npy`` and ``<out stem>_affines.npy`` (the (N, 2, 3) warps). Returns a
    summary line."""
    from ..eval.robustness import random_similarities, warp_crops
    from .pairs import load_bin, load_set_keypoints, sidecar_keypoints, write_bin

    bin_path, out = Path(bin_path), Path(out)
    if out.resolve() == bin_path.resolve():
        raise ValueError(f"{out}: the output would overwrite its input set")
    images, issame = load_bin(bin_path)
    kps = load_set_keypoints(bin_path, keypoints, len(images))
    affines, draws = random_similarities(len(images), images.shape[-1], rotate=rotate, scale=scale, shift=shift,
                                         seed=seed)
    warped, moved = warp_crops(images, kps, affines, border=border)
    # JPEG at quality 95 as every set here; PNG would make LFW's 12,000 images 4x larger
    write_bin(out, [encode_image(np.ascontiguousarray(img), quality=95) for img in warped.permute(0, 2, 3, 1).numpy()],
              issame)
    kps_path = atomic_write(sidecar_keypoints(out), lambda fh: np.save(fh, moved.astype(np.float32)))
    aff_path = atomic_write(out.with_name(out.stem + "_affines.npy"), lambda fh: np.save(fh, affines))
    inside = float(np.mean(np.all((moved >= 0) & (moved <= images.shape[-1] - 1), axis=(1, 2))))
    return (f"wrote {out} ({len(issame)} pairs, {len(images)} images warped: rotation +-{rotate:g} deg, scale "
            f"{scale[0]:g}-{scale[1]:g}, shift +-{100 * shift:g} %, seed {seed}; |angle| mean "
            f"{np.abs(draws['angle']).mean():.1f} deg; {100 * inside:.1f} % of faces keep all 5 keypoints inside), "
            f"{kps_path.name}, {aff_path.name}")
