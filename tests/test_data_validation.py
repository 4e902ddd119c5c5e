"""Strict data (the "nothing silently wrong" issue): labels and issame values are validated with the file and record
named; `lafs data check` lists every bad record instead of stopping at the first; bad records skipped under
``max_bad_records`` keep the keypoint sidecar rows aligned."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lafs.cli import main
from lafs.data.check import check_file
from lafs.data.datasets import RecordDataset, encode_image
from lafs.data.pairs import read_bin
from lafs.data.recordio import IRHeader, RecordIOError, RecordWriter, pack, write_face_records


def _jpeg(seed: int) -> bytes:
    return encode_image(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _rec_with_labels(path, labels) -> None:
    """Records 0..n-1 without a header record, one per label, written as given (no validation on write)."""
    with RecordWriter(path) as w:
        for key, label in enumerate(labels):
            w.write(key, pack(IRHeader(0, float(label), key, 0), _jpeg(key)))


@pytest.mark.parametrize("bad_label, says", [(2.5, "2.5 is not a whole number"), (-1, "-1.0 is not a whole number"),
                                             (100000, "identity label 100000 but only 4 identities")])
def test_bad_labels_are_refused_with_file_and_record(tmp_path, bad_label, says):
    rec = tmp_path / "faces.rec"
    _rec_with_labels(rec, [0, 0, 1, bad_label, 2, 2])
    with pytest.raises(RecordIOError, match=says) as err:
        RecordDataset(rec)
    assert str(rec) in str(err.value) and "record 3" in str(err.value)


def _corrupt_head(rec, key: int) -> None:
    """Overwrite the magic number of record ``key`` (the .idx still points at it)."""
    idx = dict(line.split("\t") for line in rec.with_suffix(".idx").read_text().splitlines())
    data = bytearray(rec.read_bytes())
    offset = int(idx[str(key)])
    data[offset : offset + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(data))


@pytest.fixture
def rec_with_two_bad_heads(tmp_path):
    rec = tmp_path / "faces.rec"
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    write_face_records(rec, [(label, _jpeg(i)) for i, label in enumerate(labels)])
    kps = np.arange(len(labels) * 5 * 2, dtype=np.float32).reshape(len(labels), 5, 2)
    np.save(tmp_path / "faces_kps.npy", kps)
    _corrupt_head(rec, 3)  # images are keys 1..8 behind the header record 0
    _corrupt_head(rec, 6)
    return rec, kps


def test_check_lists_every_bad_head_and_counts_the_rest(rec_with_two_bad_heads, capsys):
    rec, _ = rec_with_two_bad_heads
    report = check_file(rec)
    assert len(report["bad_records"]) == 2
    assert "record 3" in report["bad_records"][0] and "record 6" in report["bad_records"][1]
    assert report["images"] == 6 and report["keypoints"].endswith("faces_kps.npy")
    assert main(["data", "check", str(rec)]) == 1
    out = capsys.readouterr().out
    assert "bad records: 2" in out and "bad magic number" in out


def test_check_names_non_finite_keypoint_rows(tmp_path):
    rec = tmp_path / "faces.rec"
    write_face_records(rec, [(label, _jpeg(i)) for i, label in enumerate([0, 0, 1, 1])])
    kps = np.zeros((4, 5, 2), np.float32)
    kps[2, 1, 0] = np.nan
    np.save(tmp_path / "faces_kps.npy", kps)
    assert check_file(rec)["bad_records"] == [f"{tmp_path / 'faces_kps.npy'}: row 2 holds non-finite keypoints"]


def test_bad_heads_skipped_under_max_bad_records_keep_keypoints_aligned(rec_with_two_bad_heads):
    rec, kps = rec_with_two_bad_heads
    with pytest.raises(RecordIOError, match="2 bad record"):
        RecordDataset(rec, max_bad_records=1)
    with pytest.raises(RecordIOError, match="bad magic number"):
        RecordDataset(rec)  # the default (0) refuses the file
    ds = RecordDataset(rec, max_bad_records=2)
    assert len(ds) == 6 and ds.keys == [1, 2, 4, 5, 7, 8] and len(ds.bad_records) == 2
    for pos, key in enumerate(ds.keys):  # image key k has sidecar row k - 1
        assert np.array_equal(ds[pos]["keypoints"].numpy(), kps[key - 1])
    assert [ds[p]["label"] for p in range(6)] == [0, 0, 1, 2, 3, 3]  # keys 3 (label 1) and 6 (label 2) left out


def test_missing_index_entry_is_a_named_error_not_a_bare_key(tmp_path, capsys):
    rec = tmp_path / "faces.rec"
    write_face_records(rec, [(label, _jpeg(i)) for i, label in enumerate([0, 0, 1, 1])])
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(line + "\n" for line in idx.read_text().splitlines() if not line.startswith("3\t")))
    with pytest.raises(RecordIOError, match="record 3 is not in the index"):
        RecordDataset(rec)
    report = check_file(rec)
    assert any("record 3 is not in the index" in b for b in report["bad_records"])


@pytest.mark.parametrize("value", ["no", 2, None, 0.5])
def test_issame_values_other_than_bools_are_refused(tmp_path, value):
    path = tmp_path / "pairs.bin"
    with open(path, "wb") as fh:
        pickle.dump(([_jpeg(i) for i in range(4)], [True, value]), fh)
    with pytest.raises(ValueError, match=r"pair 1: issame value"):
        read_bin(path)


def test_issame_as_zero_one_integers_reads(tmp_path):
    path = tmp_path / "pairs.bin"
    with open(path, "wb") as fh:
        pickle.dump(([_jpeg(i) for i in range(4)], [1, 0]), fh)
    assert read_bin(path)[1].tolist() == [True, False]


@pytest.mark.parametrize("override", ["model.depth=-1", "model.width=0"])
def test_architecture_sizes_must_be_positive(tmp_path, override, capsys):
    from lafs.models import build_backbone

    key, value = override.split("=")
    with pytest.raises(KeyError, match=f"{key} must be a whole number >= 1"):
        build_backbone("iresnet", "micro", **{key.split(".")[1]: int(value)})
    if key == "model.depth":  # the CLI says so on one line (Part fViT preset)
        assert main(["train", "micro/supervised_synthetic", override, "--out", str(tmp_path)]) == 2
        assert f"{key} must be a whole number >= 1" in capsys.readouterr().err


def test_record_writer_never_follows_a_planted_temporary_name(tmp_path):
    """The temporary names were ``.<name>.<pid>.tmp``: a symlink planted there sent the records elsewhere."""
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    rec = tmp_path / "faces.rec"
    for name in (rec.name, rec.with_suffix(".idx").name):
        (tmp_path / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    write_face_records(rec, [(0, _jpeg(0)), (0, _jpeg(1))])
    assert victim.read_text() == "keep me"
    assert len(RecordDataset(rec)) == 2
    assert oct(rec.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
