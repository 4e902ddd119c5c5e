"""Face datasets: insightface RecordIO and ``identity/image.jpg`` folders, with an identity index.

Each item is a dict: ``image`` (uint8 C x H x W, RGB), ``label`` (identity, int), ``index`` (dataset
position) and, when a keypoint sidecar is present, ``keypoints`` (5 x 2 float32 pixels). Positions are
0..N-1 over image records only, so few-shot index files (``fewshot.py``) address them directly.

Colour order is explicit: ``color="rgb"`` means the stored JPEG holds true colours (files encoded from BGR
arrays by OpenCV, the usual way, e.g. ``../shared/data``); ``color="bgr"`` means its channels were stored
swapped (images encoded from RGB arrays by OpenCV), and they are swapped back. The output is always RGB.

A bad record (unreadable, undecodable, or failing its checksum) raises an error naming the file, record and byte
offset; with ``max_bad_records = n > 0`` up to n distinct ones are skipped (the next position is served instead,
and the item carries the skipped records' messages under ``bad_records``, so a training run counts them across
DataLoader workers) and listed in ``bad_records``, per process; the (n+1)-th stops with
:class:`BadRecordsError`. With ``report_only`` set (the training loop, which enforces ``data.max_bad_records`` over
the whole run) a dataset skips and reports without a limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .recordio import RecordIOError, RecordReader, face_record_index, image_keys

COLORS = ("rgb", "bgr")
# ``data.source``: faces rendered in memory (data/synthetic.py), .rec/.idx files (RecordDataset), identity/image
# folders (ImageFolderDataset); lafs.train.run builds the training set from the one named
SOURCES = ("synthetic", "records", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BadRecordsError(RecordIOError, RuntimeError):
    """More bad records than ``max_bad_records``; one line naming the file and the latest record."""


def decode_image(data: bytes, color: str = "rgb", source: str = "image") -> np.ndarray:
    """Encoded bytes -> H x W x 3 uint8 RGB. ``color`` is the channel order the file stores."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{source}: cannot decode image ({len(data)} bytes)")
    # cv2 returns BGR for a true-colour file; a "bgr" file decodes already in RGB order.
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color == "rgb" else img


def decode_image_chw(data: bytes, color: str = "rgb", source: str = "image") -> np.ndarray:
    """Encoded bytes -> 3 x H x W uint8 RGB (contiguous): ``decode_image(...).transpose(2, 0, 1)``, the same bytes.

    The training data path: one ``cv2.split`` of the decoded BGR pixels straight into the three planes of the
    output (in RGB order for a true-colour file) replaces the BGR->RGB conversion plus the HWC->CHW copy, two
    full passes over the image, with one: about 10 -> 5 us at 64 px and 25 -> 6 us at 112 px on one core (AMD EPYC),
    next to a JPEG decode of 45 / 90 us (``benchmarks/bench_data.py`` times the whole item path both ways).
    """
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{source}: cannot decode image ({len(data)} bytes)")
    out = np.empty((3, *img.shape[:2]), np.uint8)
    cv2.split(img, [out[2], out[1], out[0]] if color == "rgb" else [out[0], out[1], out[2]])
    return out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1): the one input scaling of every model.

    The official LAFS code trains in [-1, 1] but evaluates in [-0.5, 0.5] (``x / 255 - 0.5``); lafs uses one
    scaling everywhere."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    # in place on the new float tensor: the scaling is memory-bound and costs as much as a small model on CPU
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def to_model_input(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (scaled by ``to_model_range``) or float [-1, 1] B x 3 x H x W -> float at ``size`` x ``size``
    (antialiased bilinear; ``size=None`` keeps the size). What every model entry point feeds its backbone."""
    x = to_model_range(images) if images.dtype == torch.uint8 else images
    if size and (x.shape[-1] != size or x.shape[-2] != size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return x


def resize_keypoints(keypoints: torch.Tensor, from_size: int, to_size: int | None) -> torch.Tensor:
    """Keypoints (pixels, centres at integers) of a ``from_size`` image -> of the image ``to_model_input`` makes:
    p' = (p + 0.5) * to / from - 0.5, the geometry of the resize (``align_corners=False``)."""
    if not to_size or to_size == from_size:
        return keypoints.float()
    return (keypoints.float() + 0.5) * (to_size / from_size) - 0.5


def encode_image(rgb: np.ndarray, quality: int = 95, color: str = "rgb") -> bytes:
    """H x W x 3 uint8 RGB -> JPEG bytes stored in ``color`` order (see module docstring)."""
    arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if color == "rgb" else rgb
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def load_keypoints(path: str | Path, count: int) -> np.ndarray:
    from ..io_safe import load_array

    kps = load_array(path, "a keypoint array")
    if kps.ndim != 3 or kps.shape[0] != count or kps.shape[2] != 2:
        raise ValueError(f"{path}: keypoints of shape {kps.shape}, expected ({count}, K, 2) for {count} images")
    return kps.astype(np.float32)


class FaceDataset(Dataset, ABC):
    """Shared logic: identity index, keypoints, bad-record policy. Subclasses implement ``_load``."""

    labels: np.ndarray

    def __init__(self, keypoints: str | Path | None, max_bad_records: int, name: str) -> None:
        self.max_bad_records = max_bad_records
        self.bad_records: list[str] = []
        self.report_only = False  # skip and report without a limit (the training loop counts and limits)
        self._bad_positions: set[int] = set()
        self.name = name
        self.keypoints = load_keypoints(keypoints, len(self.labels)) if keypoints is not None else None

    @property
    def num_identities(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def images_per_identity(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_identities)

    def identity_index(self) -> dict[int, np.ndarray]:
        """identity -> positions of its images."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.cumsum(np.concatenate([[0], self.images_per_identity()]))
        return {i: order[bounds[i] : bounds[i + 1]] for i in range(self.num_identities)}

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def _load(self, index: int) -> np.ndarray:
        """Decoded H x W x 3 uint8 RGB image of position ``index``; raises on a bad record."""

    def _load_chw(self, index: int) -> np.ndarray:
        """Decoded 3 x H x W uint8 RGB (contiguous) of position ``index``: what ``__getitem__`` serves.
        Subclasses that decode override it with one pass (``decode_image_chw``)."""
        return np.ascontiguousarray(self._load(index).transpose(2, 0, 1))

    @abstractmethod
    def raw(self, index: int) -> bytes:
        """Encoded image bytes of position ``index`` (no decoding)."""

    def __getitem__(self, index: int) -> dict:
        pos = index
        skipped: list[str] = []
        for _ in range(len(self)):
            if pos in self._bad_positions:  # known bad (counted when first met): served by the next position again
                pos = (pos + 1) % len(self)
                continue
            try:
                img = self._load_chw(pos)
                break
            except (RecordIOError, ValueError, OSError) as err:
                self._bad_positions.add(pos)
                self.bad_records.append(str(err))
                skipped.append(str(err))
                if len(self.bad_records) > self.max_bad_records and not self.report_only:
                    raise BadRecordsError(too_many_bad_records(self.name, self.bad_records,
                                                               self.max_bad_records)) from err
                pos = (pos + 1) % len(self)
        else:
            raise BadRecordsError(f"{self.name}: no record reads ({len(self.bad_records)} bad); last: "
                                  f"{self.bad_records[-1] if self.bad_records else '-'}")
        item = {
            "image": torch.from_numpy(img),
            "label": int(self.labels[pos]),
            "index": pos,
        }
        if self.keypoints is not None:
            item["keypoints"] = torch.from_numpy(self.keypoints[pos])
        if skipped:
            item["bad_records"] = skipped
        return item


def too_many_bad_records(name: str, bad: list[str], limit: int) -> str:
    """The one-line stop message: how many, the limit, the latest bad record (it names file, record and offset)."""
    return (f"{name}: {len(bad)} bad record(s), more than max_bad_records={limit} (data.max_bad_records); latest: "
            f"{bad[-1]} "
            "(`lafs data check` lists them all)")


def face_datasets(dataset) -> list[FaceDataset]:
    """The :class:`FaceDataset` parts of a training set (through ``Subset`` and :class:`ConcatFaceDataset`)."""
    if isinstance(dataset, FaceDataset):
        return [dataset]
    if hasattr(dataset, "datasets"):
        return [d for part in dataset.datasets for d in face_datasets(part)]
    if hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        return face_datasets(dataset.dataset)
    return []


class RecordDataset(FaceDataset):
    """insightface ``train.rec`` + ``train.idx``; keypoints from ``<stem>_kps.npy`` if present (row i = image i)."""

    def __init__(
        self,
        rec_path: str | Path,
        idx_path: str | Path | None = None,
        color: str = "rgb",
        keypoints: str | Path | None | bool = True,
        max_bad_records: int = 0,
    ) -> None:
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        self.reader = RecordReader(rec_path, idx_path)
        self.color = color
        # records whose head or label is unreadable count against max_bad_records and are left out of the index
        index_bad: list[str] = []
        self.keys, self.labels = face_record_index(self.reader, index_bad if max_bad_records > 0 else None)
        if len(index_bad) > max_bad_records:
            raise BadRecordsError(too_many_bad_records(str(rec_path), index_bad, max_bad_records))
        if keypoints is True:
            sidecar = Path(rec_path).with_name(Path(rec_path).stem + "_kps.npy")
            keypoints = sidecar if sidecar.is_file() else None
        elif keypoints is False:
            keypoints = None
        rows = None
        if index_bad and keypoints is not None:
            # the sidecar's row i is image i of the whole file: keep the rows of the records that stay
            where = {key: i for i, key in enumerate(image_keys(self.reader))}
            rows = np.array([where[key] for key in self.keys], dtype=np.int64)
        super().__init__(keypoints if rows is None else None, max_bad_records, str(rec_path))
        if rows is not None:
            self.keypoints = load_keypoints(keypoints, len(rows) + len(index_bad))[rows]
        self.bad_records = index_bad  # records left out of the index; reported by the run (summary.json)

    def _load(self, index: int) -> np.ndarray:
        return self._decode(index, decode_image)

    def _load_chw(self, index: int) -> np.ndarray:
        return self._decode(index, decode_image_chw)

    def _decode(self, index: int, decode) -> np.ndarray:
        key = self.keys[index]
        header, data = self.reader.read_header(key)
        label = int(np.asarray(header.label).ravel()[0]) if header.flag > 0 else int(header.label)
        if label != self.labels[index]:
            raise RecordIOError(
                f"{self.reader.rec_path}: record {key} at byte {self.reader.idx[key]}: label {label} "
                f"differs from the index ({self.labels[index]})"
            )
        try:
            return decode(data, self.color)
        except ValueError:
            raise RecordIOError(
                f"{self.reader.rec_path}: record {key} at byte {self.reader.idx[key]}: cannot decode "
                f"image ({len(data)} bytes)"
            ) from None

    def raw(self, index: int) -> bytes:
        """Encoded image bytes of position ``index`` (no decoding)."""
        return self.reader.read_header(self.keys[index])[1]


class ImageFolderDataset(FaceDataset):
    """``root/identity/image.jpg``; identities are the sorted sub-folder names, labels 0..K-1."""

    def __init__(
        self, root: str | Path, keypoints: str | Path | None = None, max_bad_records: int = 0
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.identities = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.identities:
            raise ValueError(f"{self.root}: no identity sub-folders (expected root/identity/image.jpg)")
        paths, labels = [], []
        for label, name in enumerate(self.identities):
            files = sorted(p for p in (self.root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            paths += files
            labels += [label] * len(files)
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        super().__init__(keypoints, max_bad_records, str(root))

    def _load(self, index: int) -> np.ndarray:
        path = self.paths[index]
        return decode_image(path.read_bytes(), "rgb", str(path))

    def _load_chw(self, index: int) -> np.ndarray:
        path = self.paths[index]
        return decode_image_chw(path.read_bytes(), "rgb", str(path))

    def raw(self, index: int) -> bytes:
        return self.paths[index].read_bytes()


class ArrayFaceDataset(FaceDataset):
    """Images already in memory (N x H x W x 3 uint8 RGB), e.g. generated synthetic faces."""

    def __init__(self, images: np.ndarray, labels, keypoints: np.ndarray | None = None, name: str = "array") -> None:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be N x H x W x 3 uint8, got {images.shape} {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise ValueError(f"{name}: {len(images)} images but {len(self.labels)} labels")
        super().__init__(None, 0, name)
        if keypoints is not None:
            self.keypoints = np.asarray(keypoints, np.float32)

    def _load(self, index: int) -> np.ndarray:
        return self.images[index]

    def raw(self, index: int) -> bytes:
        return encode_image(self.images[index])


class ConcatFaceDataset(Dataset):
    """Several face datasets as one; identities are renumbered so that dataset k's labels follow dataset k-1's."""

    def __init__(self, datasets: list[FaceDataset]) -> None:
        if not datasets:
            raise ValueError("ConcatFaceDataset needs at least one dataset")
        self.datasets = datasets
        self.starts = np.cumsum([0] + [len(d) for d in datasets])
        self.label_offsets = np.cumsum([0] + [d.num_identities for d in datasets])
        self.labels = np.concatenate([d.labels + o for d, o in zip(datasets, self.label_offsets)])
        self.name = " + ".join(d.name for d in datasets)

    @property
    def num_identities(self) -> int:
        return int(self.label_offsets[-1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        item = self.datasets[k][index - int(self.starts[k])]
        item["label"] += int(self.label_offsets[k])
        item["index"] += int(self.starts[k])
        return item
