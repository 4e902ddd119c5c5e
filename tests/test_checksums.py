"""Per-record checksums (``lafs data pack --checksum``) and a pack that never stores an undecodable file (issue 24)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lafs.cli import main
from lafs.data.check import check_file
from lafs.data.datasets import RecordDataset, encode_image
from lafs.data.recordio import RecordIOError, RecordReader, checksum_path, read_idx, write_face_records
from lafs.data.synthetic import SyntheticFaces


def _faces(n: int = 6) -> list[np.ndarray]:
    images, _ = SyntheticFaces(3, seed=0).batch([i // 2 for i in range(n)], [i % 2 for i in range(n)])
    return list(images)


def _folder(tmp_path, n: int = 6):
    root = tmp_path / "faces"
    for i, img in enumerate(_faces(n)):
        (root / f"id{i // 2}").mkdir(parents=True, exist_ok=True)
        (root / f"id{i // 2}" / f"{i}.jpg").write_bytes(encode_image(img))
    return root


def _overwrite_64_bytes(rec, key: int) -> None:
    """The issue's case: 64 bytes in the middle of record ``key``'s JPEG scan data overwritten (no 0xFF, so no marker
    appears); the image still decodes, with about half of its pixels changed."""
    offset = read_idx(rec.with_suffix(".idx"))[key]
    data = bytearray(rec.read_bytes())
    start = offset + 8 + 24  # RecordIO part header, then the 24-byte IRHeader
    jpeg = bytes(data[start:])
    sos = jpeg.find(b"\xff\xda")
    end = jpeg.find(b"\xff\xd9")
    pos = start + sos + (end - sos) // 2
    before = cv2.imdecode(np.frombuffer(jpeg[: end + 2], np.uint8), cv2.IMREAD_COLOR)
    data[pos : pos + 64] = np.random.default_rng(key).integers(0, 255, 64, dtype=np.uint8).tobytes()
    rec.write_bytes(bytes(data))
    after = cv2.imdecode(np.frombuffer(bytes(data[start : start + end + 2]), np.uint8), cv2.IMREAD_COLOR)
    assert after is not None and (after != before).any(-1).mean() > 0.1  # decodes, visibly different


@pytest.fixture
def packed(tmp_path):
    rec = tmp_path / "faces.rec"
    assert main(["data", "pack", str(_folder(tmp_path)), str(rec), "--checksum"]) == 0
    return rec


def test_pack_checksum_sidecar_leaves_rec_and_idx_in_mxnet_format(packed, tmp_path):
    sums = checksum_path(packed)
    assert sums == tmp_path / "faces_crc32.txt" and sums.is_file()
    plain = tmp_path / "plain.rec"
    assert main(["data", "pack", str(tmp_path / "faces"), str(plain)]) == 0
    assert packed.read_bytes() == plain.read_bytes()  # the checksums change nothing in the .rec ...
    assert packed.with_suffix(".idx").read_text() == plain.with_suffix(".idx").read_text()  # ... nor the .idx
    assert all(len(line.split("\t")) == 2 for line in packed.with_suffix(".idx").read_text().splitlines())
    assert not checksum_path(plain).exists()
    assert check_file(packed)["bad_records"] == [] and "crc32" in check_file(packed)["checksums"]


def test_overwritten_bytes_that_still_decode_are_caught(packed, capsys):
    _overwrite_64_bytes(packed, 3)
    report = check_file(packed)
    assert len(report["bad_records"]) == 1 and "record 3" in report["bad_records"][0]
    assert "checksum mismatch" in report["bad_records"][0] and str(packed) in report["bad_records"][0]
    assert main(["data", "check", str(packed)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    ds = RecordDataset(packed)
    with pytest.raises(RuntimeError, match=r"record 3 .*checksum mismatch"):
        ds[2]  # image record 3 is dataset position 2; the default max_bad_records=0 refuses it
    tolerant = RecordDataset(packed, max_bad_records=1)
    item = tolerant[2]
    assert item["index"] == 3 and len(tolerant.bad_records) == 1  # skipped: the next record is served


def test_a_file_packed_without_checksums_still_reads(tmp_path):
    rec = tmp_path / "faces.rec"
    assert main(["data", "pack", str(_folder(tmp_path)), str(rec)]) == 0
    _overwrite_64_bytes(rec, 3)
    assert RecordReader(rec).checksums is None
    assert len(RecordDataset(rec)) == 6 and RecordDataset(rec)[2]["image"].shape == (3, 112, 112)
    assert "none" in check_file(rec)["checksums"]


def test_checksum_api_and_repacking_without_checksums_drops_the_old_sidecar(tmp_path):
    rec = tmp_path / "api.rec"
    jpegs = [encode_image(img) for img in _faces(4)]
    write_face_records(rec, [(i // 2, b) for i, b in enumerate(jpegs)], checksum=True)
    assert RecordReader(rec).checksums is not None and len(RecordReader(rec).checksums) == len(read_idx(
        rec.with_suffix(".idx")))
    write_face_records(rec, [(0, jpegs[0]), (0, jpegs[1])])  # other records under the same name
    assert not checksum_path(rec).exists() and len(RecordDataset(rec)) == 2


def test_a_damaged_checksum_file_is_named(packed):
    checksum_path(packed).write_text("0\tnot-hex\n")
    with pytest.raises(RecordIOError, match=r"faces_crc32.txt:1: expected 'key<TAB>crc32'"):
        RecordReader(packed)


def test_pack_refuses_an_undecodable_file_naming_it(tmp_path, capsys):
    root = _folder(tmp_path)
    bad = root / "id1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    rec = tmp_path / "faces.rec"
    assert main(["data", "pack", str(root), str(rec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lafs: error: ") and str(bad) in err and "cannot decode" in err
    assert len(err.strip().splitlines()) == 1 and not rec.exists()
    assert main(["data", "pack", str(root), str(rec), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert str(bad) in out and "1 undecodable file(s) left out" in out
    assert str(bad) in (tmp_path / "faces_skipped.txt").read_text()
    ds = RecordDataset(rec)
    assert len(ds) == 6 and ds.num_identities == 3


def test_skip_bad_drops_the_keypoint_row_and_an_emptied_identity(tmp_path):
    root = _folder(tmp_path, 6)
    for name in ("2.jpg", "3.jpg"):  # both images of id1
        (root / "id1" / name).write_bytes(b"junk")
    kps = np.arange(6 * 5 * 2, dtype=np.float32).reshape(6, 5, 2)
    np.save(tmp_path / "kps.npy", kps)
    rec = tmp_path / "faces.rec"
    assert main(["data", "pack", str(root), str(rec), "--skip-bad", "--keypoints", str(tmp_path / "kps.npy")]) == 0
    ds = RecordDataset(rec)
    assert ds.labels.tolist() == [0, 0, 1, 1]  # id2 renumbered to 1
    np.testing.assert_array_equal(ds.keypoints, kps[[0, 1, 4, 5]])
