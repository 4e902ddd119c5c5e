"""Data-tool gaps met packing 56k real faces (issue 24): detect's upsampling and its list of template fallbacks, the
keypoint sidecar of `data bin`, flat folders and `path,label` lists for detect / align / pack, pack's JPEG quality,
and `--allow-fewer` named where it is the fix.

The detector is an optional extra: these tests replace it with a stand-in (they test the tools, not dlib); the one that
runs the real detector skips cleanly without it."""

from __future__ import annotations

import importlib.util
import pickle

import cv2
import numpy as np
import pytest

from lafs.cli import main
from lafs.data import detect
from lafs.data.datasets import RecordDataset, encode_image
from lafs.data.pairs import read_bin, sidecar_keypoints
from lafs.data.synthetic import SyntheticFaces
from lafs.geometry import template


def _faces(n: int) -> np.ndarray:
    images, _ = SyntheticFaces(4, seed=1).batch([i // 2 for i in range(n)], [i % 2 for i in range(n)])
    return images


def _grey() -> np.ndarray:
    return np.full((112, 112, 3), 128, np.uint8)


@pytest.fixture
def fake_detector(monkeypatch):
    """A stand-in detector: grey images have no face; other images get points offset by their mean brightness, so a
    row can be traced to its image. Records the ``upsample`` each call got."""
    calls = []

    def fake(image, name="image", **kwargs):
        calls.append(kwargs.get("upsample"))
        if image.std() < 1:
            raise ValueError(f"no face found in {name}")
        return (template(112) + float(image.mean())).astype(np.float32)

    monkeypatch.setattr(detect, "detect_keypoints", fake)
    return calls


def _points(img: np.ndarray) -> np.ndarray:
    return template(112) + float(img.mean())


def test_detect_upsample_and_the_list_of_template_fallbacks(tmp_path, fake_detector, capsys):
    faces = _faces(3)
    from lafs.data.pairs import write_bin

    bin_path = write_bin(tmp_path / "few.bin", [encode_image(f) for f in faces] + [encode_image(_grey())],
                         [True, False])
    assert main(["data", "detect", str(bin_path), "--on-miss", "template", "--upsample", "2"]) == 0
    assert fake_detector == [2, 2, 2, 2]  # the upsampling reaches the detector
    kps = np.load(tmp_path / "few_kps.npy")
    np.testing.assert_allclose(kps[3], template(112))
    listed = (tmp_path / "few_kps_template.txt").read_text().splitlines()
    assert [line for line in listed if not line.startswith("#")] == [f"3\t{bin_path}: image 3"]
    assert "few_kps_template.txt" in capsys.readouterr().out
    assert main(["data", "detect", str(bin_path), "--upsample", "9"]) == 2
    assert "--upsample must be 0..4" in capsys.readouterr().err


def test_detect_and_align_take_a_flat_folder_and_a_list(tmp_path, fake_detector):
    faces = _faces(3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(faces):
        (flat / f"img{i}.jpg").write_bytes(encode_image(f))
    assert main(["data", "detect", str(flat)]) == 0
    kps = np.load(flat / "keypoints.npy")
    decoded = [cv2.cvtColor(cv2.imread(str(flat / f"img{i}.jpg")), cv2.COLOR_BGR2RGB) for i in range(3)]
    np.testing.assert_allclose(kps, np.stack([_points(d) for d in decoded]), rtol=1e-6)
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\nimg2.jpg,bob\nimg0.jpg,alice\n")
    assert main(["data", "detect", str(flat), "--list", str(listing), "-o", str(tmp_path / "listed.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "listed.npy"), kps[[2, 0]])  # list order
    assert main(["data", "align", str(flat), str(flat / "keypoints.npy"), str(tmp_path / "aligned")]) == 0
    assert sorted(p.name for p in (tmp_path / "aligned").iterdir()) == ["img0.jpg", "img1.jpg", "img2.jpg",
                                                                         "keypoints.npy"]
    assert main(["data", "align", str(flat), str(tmp_path / "listed.npy"), str(tmp_path / "al2"), "--list",
                 str(listing)]) == 0
    assert sorted(p.name for p in (tmp_path / "al2").iterdir()) == ["img0.jpg", "img2.jpg", "keypoints.npy"]


def test_pack_a_flat_folder_with_a_label_list(tmp_path, capsys):
    faces = _faces(4)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(faces):
        (flat / f"{i}.png").write_bytes(cv2.imencode(".png", f[..., ::-1])[1].tobytes())
    rec = tmp_path / "faces.rec"
    assert main(["data", "pack", str(flat), str(rec)]) == 2
    assert "needs an identity per image" in capsys.readouterr().err
    listing = tmp_path / "list.csv"
    listing.write_text("0.png,10\n3.png,2\n1.png,10\n2.png,2\n")
    np.save(tmp_path / "kps.npy", np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2))
    assert main(["data", "pack", str(flat), str(rec), "--list", str(listing), "--keypoints",
                 str(tmp_path / "kps.npy")]) == 0
    ds = RecordDataset(rec)
    assert ds.labels.tolist() == [0, 0, 1, 1]  # identity "2" before "10" (numeric names sort as numbers)
    kps = np.load(tmp_path / "kps.npy")
    np.testing.assert_array_equal(ds.keypoints, kps[[1, 3, 0, 2]])  # rows follow their images
    assert ds.raw(0) == (flat / "3.png").read_bytes()  # stored as they are without --quality
    bad = tmp_path / "bad.csv"
    bad.write_text("0.png,1\nmissing.png,1\n")
    assert main(["data", "pack", str(flat), str(rec), "--list", str(bad)]) == 2
    assert "bad.csv:2: image" in capsys.readouterr().err


def test_pack_jpeg_quality(tmp_path, capsys):
    root = tmp_path / "faces"
    for i, f in enumerate(_faces(4)):
        f = (f * np.array([1.0, 0.6, 0.3])).astype(np.uint8)  # warm tones: a channel swap shows
        (root / f"id{i // 2}").mkdir(parents=True, exist_ok=True)
        (root / f"id{i // 2}" / f"{i}.png").write_bytes(cv2.imencode(".png", f[..., ::-1])[1].tobytes())
    sizes, errors = {}, {}
    for q in (30, 95):
        rec = tmp_path / f"q{q}.rec"
        assert main(["data", "pack", str(root), str(rec), "--quality", str(q)]) == 0
        ds = RecordDataset(rec)
        assert all(ds.raw(i)[:2] == b"\xff\xd8" for i in range(4))  # JPEG now
        sizes[q] = sum(len(ds.raw(i)) for i in range(4))
        original = cv2.imread(str(root / "id0" / "0.png"))[..., ::-1]
        got = ds[0]["image"].numpy().transpose(1, 2, 0).astype(int)
        errors[q] = np.abs(got - original).mean()
        assert errors[q] < np.abs(got[..., ::-1] - original).mean() / 2  # true colours kept, not swapped
    assert sizes[30] < sizes[95] and errors[95] < errors[30]
    assert main(["data", "pack", str(root), str(tmp_path / "x.rec"), "--quality", "0"]) == 2
    assert "--quality must be 1..100" in capsys.readouterr().err


def _lfw_folder(tmp_path):
    root = tmp_path / "lfw"
    faces = _faces(4)
    names = [("Ann", 1), ("Ann", 2), ("Bob", 1), ("Bob", 2)]
    for (name, n), f in zip(names, faces):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{name}_{n:04d}.jpg").write_bytes(encode_image(f))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 2\nAnn 1 2\nAnn 1 Bob 2\n")
    return root, pairs


def test_bin_writes_the_keypoint_sidecar_from_given_points(tmp_path, capsys):
    root, pairs = _lfw_folder(tmp_path)
    kps = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)  # rows: Ann_1, Ann_2, Bob_1, Bob_2 (folder order)
    np.save(tmp_path / "kps.npy", kps)
    out = tmp_path / "set.bin"
    assert main(["data", "bin", str(pairs), str(root), str(out), "--keypoints", str(tmp_path / "kps.npy")]) == 0
    assert "set_kps.npy" in capsys.readouterr().out
    side = np.load(sidecar_keypoints(out))
    np.testing.assert_array_equal(side, kps[[0, 1, 0, 3]])  # pair images in .bin order
    assert len(read_bin(out)[0]) == 4
    np.save(tmp_path / "short.npy", kps[:3])
    assert main(["data", "bin", str(pairs), str(root), str(tmp_path / "s.bin"), "--keypoints",
                 str(tmp_path / "short.npy")]) == 2
    assert "expected (4, K, 2)" in capsys.readouterr().err and not (tmp_path / "s.bin").exists()


def test_bin_detects_the_keypoint_sidecar(tmp_path, fake_detector):
    root, pairs = _lfw_folder(tmp_path)
    out = tmp_path / "set.bin"
    assert main(["data", "bin", str(pairs), str(root), str(out), "--detect"]) == 0
    images, _ = read_bin(out)
    side = np.load(sidecar_keypoints(out))
    expected = [_points(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]) for b in images]
    np.testing.assert_allclose(side, np.stack(expected), rtol=1e-6)


def test_subset_error_names_the_cli_flag(tmp_path, capsys):
    from lafs.data.recordio import write_face_records

    rec = tmp_path / "faces.rec"
    write_face_records(rec, [(i // 2 if i < 4 else 2, encode_image(f)) for i, f in enumerate(_faces(5))])
    assert main(["data", "subset", str(rec), "--shots", "2", "-o", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert "--allow-fewer" in err and err.index("--allow-fewer") < err.index("allow_fewer=True")


@pytest.mark.shared_data
def test_real_detector_with_upsampling_on_a_flat_folder(shared_data, tmp_path):
    pytest.importorskip("dlib", reason='face detector not installed: pip install "lafs-face[detect]"')
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip('face_recognition_models not installed: pip install "lafs-face[detect]"')
    with open(shared_data / "lfw" / "lfw_unaligned.bin", "rb") as f:
        jpegs, _ = pickle.load(f)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in (0, 24):
        (flat / f"{i}.jpg").write_bytes(jpegs[i])
    assert main(["data", "detect", str(flat), "--upsample", "1", "--on-miss", "template"]) == 0
    kps = np.load(flat / "keypoints.npy")
    ref = np.load(shared_data / "lfw" / "lfw_unaligned_kps.npy")[[0, 24]]
    rows = [line for line in (flat / "keypoints_template.txt").read_text().splitlines() if not line.startswith("#")]
    assert rows == []  # both faces found: nothing fell back to the template
    assert np.linalg.norm(kps - ref, axis=-1).mean() < 4.0
