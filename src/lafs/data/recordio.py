"""MXNet-compatible RecordIO (``.rec`` + ``.idx``) reader and writer, without mxnet.

Byte layout (dmlc-core ``RecordIOWriter``, as MXNet's C++ documentation gives it): every record part is
``uint32 magic 0xced7230a | uint32 lrec | payload | zero padding to 4 bytes``, where ``lrec`` holds a
3-bit continuation flag (bits 29-31: 0 whole, 1 first, 2 middle, 3 last part) and a 29-bit length. The
writer splits a payload wherever the magic number occurs at a 4-byte-aligned offset, dropping those four
bytes; the reader puts them back. The ``.idx`` is text, ``key<TAB>byte offset`` per line.

A payload starts with ``IRHeader(flag: uint32, label: float32, id: uint64, id2: uint64)``; when
``flag > 0``, ``flag`` float32 labels follow and ``label`` is unused (``mx.recordio.pack``).

insightface layout (``MXFaceDataset``): record 0 is a header whose labels are
``[first identity record, end]``; records 1..N are images with ``IRHeader(0, identity, key, 0)``
grouped by identity; records N+1..N+K hold each identity's ``[start, end)`` image-record range.

Per-record checksums (optional: ``RecordWriter(checksum=True)``, ``lafs data pack --checksum``) live in a sidecar
``<stem>_crc32.txt`` beside the ``.rec`` (text, ``key<TAB>crc32`` of the whole payload, IRHeader included, as 8 hex
digits), not in a third ``.idx`` column: MXNet's Python ``MXIndexedRecordIO`` would ignore one (it splits each line
at tabs and takes fields 0 and 1), but dmlc-core's ``IndexedRecordIOSplitter`` (``ImageRecordIter`` with
``path_imgidx``) and DALI's MXNet reader read the ``.idx`` as a stream of whitespace-separated number pairs
(``index_file >> index >> offset``), so a third number would be read as the next key and shift every offset. With the
sidecar, the ``.rec`` and ``.idx`` stay byte-for-byte what MXNet writes. When the sidecar is present,
:meth:`RecordReader.read` verifies every record it reads: a mismatch is a :class:`RecordIOError` naming the file, the
record and its byte offset (a bad record to ``lafs data check`` and ``data.max_bad_records``). Files without one read
as before.

File handles are opened lazily and re-opened after a fork, so a reader can be shared with DataLoader
workers. Every error names the file, the record key and the byte offset.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import _umask

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


class RecordIOError(ValueError):
    """A malformed ``.rec`` / ``.idx``; the message names the file, record key and byte offset."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """``mx.recordio.pack``: a scalar label goes in the header; an array label (flag = its length) follows it."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(_IR_FORMAT, 0, float(label), header.id, header.id2) + payload
    arr = np.asarray(label, dtype=np.float32).ravel()
    return struct.pack(_IR_FORMAT, arr.size, 0.0, header.id, header.id2) + arr.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: (header, remaining payload)."""
    if len(record) < _IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack(_IR_FORMAT, record[:_IR_SIZE])
    rest = record[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError(f"IRHeader announces {flag} labels but only {len(rest)} bytes follow")
        return IRHeader(flag, np.frombuffer(rest[: 4 * flag], np.float32).copy(), id_, id2), rest[4 * flag :]
    return IRHeader(flag, label, id_, id2), rest


def encode_record(payload: bytes) -> bytes:
    """One logical record as it appears on disk (split at aligned magic numbers, padded to 4 bytes)."""
    if len(payload) >= 1 << 29:
        raise ValueError(f"record of {len(payload)} bytes exceeds the RecordIO limit of 2^29 - 1")
    parts = []
    start = 0
    n = len(payload)
    for i in range(0, n - n % 4, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            parts.append((1 if start == 0 else 2, payload[start:i]))
            start = i + 4
    parts.append((3 if start else 0, payload[start:]))
    out = bytearray()
    for cflag, chunk in parts:
        out += _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(chunk)) + chunk
        out += b"\0" * (-len(chunk) % 4)
    return bytes(out)


CHECKSUM_SUFFIX = "_crc32.txt"


def checksum_path(rec_path: str | Path) -> Path:
    """The checksum sidecar of a ``.rec``: ``<stem>_crc32.txt`` beside it (as ``<stem>_kps.npy`` for keypoints)."""
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + CHECKSUM_SUFFIX)


def read_checksums(path: str | Path) -> dict[int, int]:
    """``key -> crc32`` from a checksum sidecar; a malformed line is a :class:`RecordIOError` naming file and line."""
    sums: dict[int, int] = {}
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            try:
                key, crc = int(fields[0]), int(fields[1], 16)
            except (ValueError, IndexError):
                raise RecordIOError(f"{path}:{lineno}: expected 'key<TAB>crc32', got {line.rstrip()!r}") from None
            sums[key] = crc
    return sums


def read_idx(idx_path: str | Path) -> dict[int, int]:
    """``key -> byte offset`` from a text ``.idx``; malformed lines are errors naming file and line."""
    idx: dict[int, int] = {}
    with open(idx_path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}") from None
            idx[key] = offset
    return idx


class RecordReader:
    """Random access to a ``.rec`` through its ``.idx`` (``MXIndexedRecordIO`` in read mode)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, verify: bool = True) -> None:
        """``verify``: check each record read against the checksum sidecar when there is one."""
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"record file not found: {self.rec_path}")
        if not self.idx_path.is_file():
            raise FileNotFoundError(f"index file not found: {self.idx_path} (needed for random access)")
        self.idx = read_idx(self.idx_path)
        self.keys = sorted(self.idx)
        self.size = self.rec_path.stat().st_size
        for key, offset in self.idx.items():
            if not 0 <= offset < self.size:
                raise RecordIOError(
                    f"{self.idx_path}: record {key} points to byte {offset}, past the end of "
                    f"{self.rec_path} ({self.size} bytes)"
                )
        sums = checksum_path(self.rec_path)
        self.checksum_path = sums if sums.is_file() else None
        self.checksums = read_checksums(sums) if verify and self.checksum_path is not None else None
        self._fh = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return key in self.idx

    def _handle(self):
        # Re-open after fork: a file offset shared between DataLoader workers would interleave reads.
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._fh

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records joined, padding removed)."""
        if key not in self.idx:
            raise RecordIOError(f"{self.idx_path}: record {key} is not in the index (the header record of "
                                f"{self.rec_path.name} announces it)")
        offset = self.idx[key]
        fh = self._handle()
        fh.seek(offset)
        out = bytearray()
        pos = offset
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path}: record {key} truncated at byte {pos} (header cut short)")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: record {key} at byte {pos}: bad magic number 0x{magic:08x} "
                    f"(expected 0x{MAGIC:08x}; is the .idx from another file?)"
                )
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            padded = length + (-length % 4)
            chunk = fh.read(padded)
            if len(chunk) < padded:
                raise RecordIOError(
                    f"{self.rec_path}: record {key} at byte {pos} truncated: {length} bytes announced, "
                    f"{len(chunk)} present"
                )
            out += chunk[:length]
            pos += 8 + padded
            if cflag in (0, 3):
                return self._verified(key, bytes(out))
            out += _MAGIC_BYTES

    def _verified(self, key: int, payload: bytes) -> bytes:
        if self.checksums is not None and key in self.checksums:
            crc = zlib.crc32(payload)
            if crc != self.checksums[key]:
                raise RecordIOError(
                    f"{self.rec_path}: record {key} at byte {self.idx[key]}: checksum mismatch (crc32 {crc:08x}, "
                    f"{self.checksum_path.name} holds {self.checksums[key]:08x}): the record changed after packing")
        return payload

    def read_label(self, key: int) -> int:
        """Identity label of record ``key``, reading only its 32 leading bytes when the label is a scalar;
        validated as a whole number >= 0 (:class:`RecordIOError` naming the file and record otherwise)."""
        return _label_of(self, key)

    def read_header(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack(self.read(key))
        except ValueError as err:
            if isinstance(err, RecordIOError):
                raise
            raise RecordIOError(f"{self.rec_path}: record {key} at byte {self.idx[key]}: {err}") from None


def _exclusive_temp(target: Path):
    """(path, binary file) of a new temporary file beside ``target``, created with O_EXCL."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    return Path(tmp), os.fdopen(fd, "wb")


class RecordWriter:
    """Writes ``.rec`` + ``.idx`` under temporary names and renames both into place on success.

    Use as a context manager; on an exception nothing is left at the target paths (nor half-written). With
    ``checksum=True`` the crc32 of every payload goes to the sidecar ``<stem>_crc32.txt`` (module docstring); without,
    a sidecar left at that name by an earlier pack is removed (it would not match the new records).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, checksum: bool = False) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        # unpredictable names created exclusively (mkstemp, O_EXCL): a planted file or symlink is never followed
        self._tmp_rec, self._rec = _exclusive_temp(self.rec_path)
        self._tmp_idx, self._idx = _exclusive_temp(self.idx_path)
        self._idx_lines: list[str] = []
        self._crc_lines: list[str] | None = [] if checksum else None
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        if key in self._keys:
            raise ValueError(f"duplicate record key {key} while writing {self.rec_path}")
        self._keys.add(key)
        self._idx_lines.append(f"{key}\t{self._rec.tell()}\n")
        if self._crc_lines is not None:
            self._crc_lines.append(f"{key}\t{zlib.crc32(payload):08x}\n")
        self._rec.write(encode_record(payload))

    def close(self) -> None:
        self._rec.close()
        with self._idx:
            self._idx.write("".join(self._idx_lines).encode())
        sums = checksum_path(self.rec_path)
        moves = [(self._tmp_rec, self.rec_path), (self._tmp_idx, self.idx_path)]
        if self._crc_lines is not None:
            tmp_sums, fh = _exclusive_temp(sums)
            with fh:
                fh.write((f"# crc32 of each record payload of {self.rec_path.name} (lafs): key<TAB>crc32\n"
                          + "".join(self._crc_lines)).encode())
            moves.append((tmp_sums, sums))
        for tmp, _ in moves:  # mkstemp gives 0600; the final files get open()'s mode
            os.chmod(tmp, 0o666 & ~_umask())
        if self._crc_lines is None:
            sums.unlink(missing_ok=True)  # an earlier pack's checksums would not match these records
        for tmp, target in moves:
            os.replace(tmp, target)

    def abort(self) -> None:
        self._rec.close()
        self._idx.close()
        for tmp in (self._tmp_rec, self._tmp_idx):
            if tmp.exists():
                tmp.unlink()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_face_records(
    rec_path: str | Path, samples: Iterable[tuple[int, bytes]], idx_path: str | Path | None = None,
    checksum: bool = False,
) -> tuple[int, int]:
    """Write (identity label, encoded image) pairs in insightface layout; returns (images, identities). ``checksum``:
    also the per-record crc32 sidecar (:class:`RecordWriter`).

    Labels must be 0..K-1 and the samples grouped by identity in ascending order, as insightface expects.
    """
    images: list[tuple[int, bytes]] = list(samples)
    labels = [label for label, _ in images]
    if any(b < a for a, b in zip(labels, labels[1:])):
        raise ValueError("samples must be grouped by identity in ascending label order")
    num_ids = labels[-1] + 1 if labels else 0
    if sorted(set(labels)) != list(range(num_ids)):
        raise ValueError(f"identity labels must be 0..K-1 without gaps, got {sorted(set(labels))[:10]}...")
    n = len(images)
    ranges = np.zeros((num_ids, 2), dtype=np.int64)
    with RecordWriter(rec_path, idx_path, checksum=checksum) as writer:
        writer.write(0, pack(IRHeader(2, np.array([n + 1, n + num_ids + 1], np.float32), 0, 0), b""))
        for key, (label, data) in enumerate(images, start=1):
            if ranges[label, 0] == 0:
                ranges[label, 0] = key
            ranges[label, 1] = key + 1
            writer.write(key, pack(IRHeader(0, float(label), key, 0), data))
        for label in range(num_ids):
            key = n + 1 + label
            writer.write(key, pack(IRHeader(2, ranges[label].astype(np.float32), key, 0), b""))
    return n, num_ids


def _label_of(reader: RecordReader, key: int) -> int:
    """The identity label of record ``key``, validated: a whole, non-negative number (else RecordIOError)."""
    if key not in reader.idx:
        reader.read(key)  # raises the RecordIOError that names the index file and the key
    offset = reader.idx[key]
    fh = reader._handle()
    fh.seek(offset)
    head = fh.read(8 + _IR_SIZE)
    value: float | None = None
    if len(head) == 8 + _IR_SIZE:
        magic, lrec = struct.unpack("<II", head[:8])
        flag, label, _, _ = struct.unpack(_IR_FORMAT, head[8:])
        # Only a whole first part that holds the full IRHeader can be decoded from these bytes.
        if magic == MAGIC and (lrec & ((1 << 29) - 1)) >= _IR_SIZE and flag == 0:
            value = label
    if value is None:
        header, _ = reader.read_header(key)  # array labels, split or malformed records: the full path
        value = float(np.asarray(header.label).ravel()[0]) if header.flag > 0 else float(header.label)
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise RecordIOError(f"{reader.rec_path}: record {key} at byte {offset}: identity label {value!r} is not a "
                            "whole number >= 0")
    return int(value)


def image_keys(reader: RecordReader) -> list[int]:
    """The image record keys of an insightface ``.rec``, in file order: with a header record 0 (flag > 0), keys
    1..first_identity_record-1; without one, every key. Row i of a keypoint sidecar belongs to key ``[i]``."""
    if 0 in reader:
        header, _ = reader.read_header(0)
        if header.flag > 0:
            return list(range(1, int(np.asarray(header.label).ravel()[0])))
    return list(reader.keys)


def face_record_index(reader: RecordReader, bad: list[str] | None = None) -> tuple[list[int], np.ndarray]:
    """(image record keys, their identity labels) of an insightface ``.rec``.

    With a header record 0 (flag > 0), images are keys 1..first_identity_record-1; without one, every key.
    Labels must be whole numbers >= 0, and no label may exceed twice the number of identities (one stray
    100000 among 7,705 identities would otherwise make a 100,001-way classifier): a violation raises a
    :class:`RecordIOError` naming the file and record. Given a list ``bad``, records whose head or label is bad
    are appended to it (one message each) and left out of the index instead (``lafs data check``,
    ``data.max_bad_records``).
    """
    keys = image_keys(reader)
    # Labels come from the 32-byte record heads: building the index never reads the image bytes.
    good_keys: list[int] = []
    labels: list[int] = []
    for key in keys:
        try:
            labels.append(reader.read_label(key))
        except RecordIOError as err:
            if bad is None:
                raise
            bad.append(str(err))
            continue
        good_keys.append(key)
    label_arr = np.asarray(labels, dtype=np.int64)
    if len(label_arr):
        distinct = len(np.unique(label_arr))
        if int(label_arr.max()) + 1 > 2 * distinct:
            where = int(np.argmax(label_arr))
            key = good_keys[where]
            raise RecordIOError(
                f"{reader.rec_path}: record {key} at byte {reader.idx[key]}: identity label {int(label_arr.max())} "
                f"but only {distinct} identities in the file: labels must run 0..K-1 (a stray label would make a "
                f"{int(label_arr.max()) + 1}-way classifier)")
    return good_keys, label_arr
