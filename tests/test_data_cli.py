"""``lafs data`` commands on small generated folders and corrupt files."""

import numpy as np

from lafs.cli import main
from lafs.data.datasets import RecordDataset, encode_image
from lafs.data.pairs import read_bin


def _folder(tmp_path, counts=(("ann", 2), ("bo", 3), ("cy", 1))):
    rng = np.random.default_rng(0)
    for name, n in counts:
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(1, n + 1):
            img = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            (tmp_path / "f" / name / f"{name}_{i:04d}.jpg").write_bytes(encode_image(img))
    return tmp_path / "f"


def test_pack_then_check(tmp_path, capsys):
    folder = _folder(tmp_path)
    kps = np.arange(6 * 5 * 2, dtype=np.float32).reshape(6, 5, 2)
    np.save(tmp_path / "k.npy", kps)
    assert main(["data", "pack", str(folder), str(tmp_path / "out.rec"), "--keypoints", str(tmp_path / "k.npy")]) == 0
    ds = RecordDataset(tmp_path / "out.rec")
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert ds[5]["image"].shape == (3, 24, 24)
    np.testing.assert_array_equal(ds[4]["keypoints"].numpy(), kps[4])
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "out.rec")]) == 0
    out = capsys.readouterr().out
    assert "images: 6" in out and "identities: 3" in out and "{1: 1, 2: 1, 3: 1}" in out and "bad records: 0" in out


def test_check_reports_bad_record_and_fails(tmp_path, capsys):
    from lafs.data.recordio import write_face_records

    write_face_records(tmp_path / "b.rec", [(0, encode_image(np.zeros((8, 8, 3), np.uint8))), (1, b"garbage")])
    assert main(["data", "check", str(tmp_path / "b.rec")]) == 1
    assert "record 2 at byte" in capsys.readouterr().out


def test_bin_from_pairs(tmp_path, capsys):
    folder = _folder(tmp_path)
    (tmp_path / "pairs.txt").write_text("bo 1 2\nann 1 cy 1\n")
    assert main(["data", "bin", str(tmp_path / "pairs.txt"), str(folder), str(tmp_path / "v.bin")]) == 0
    images, issame = read_bin(tmp_path / "v.bin")
    assert issame.tolist() == [True, False] and len(images) == 4
    assert main(["data", "check", str(tmp_path / "v.bin")]) == 0
    assert "pairs: 2" in capsys.readouterr().out


def test_missing_file_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "none.rec")]) == 2
    assert "none.rec" in capsys.readouterr().err


def test_subset_writes_index_and_report(tmp_path, capsys):
    from lafs.data.fewshot import load_index

    folder = _folder(tmp_path, counts=tuple((f"id{i:02d}", 3) for i in range(10)))
    main(["data", "pack", str(folder), str(tmp_path / "d.rec")])
    assert main(["data", "subset", str(tmp_path / "d.rec"), "--fraction", "0.5", "--shots", "2",
                 "--seed", "3", "-o", str(tmp_path / "idx.npy")]) == 0
    positions, report = load_index(tmp_path / "idx.npy")
    labels = RecordDataset(tmp_path / "d.rec").labels[positions]
    assert len(positions) == 10 and len(set(labels.tolist())) == 5
    assert all((labels == lab).sum() == 2 for lab in set(labels.tolist()))
    assert report["identities_selected"] == 5
    assert main(["data", "subset", str(tmp_path / "d.rec"), "--shots", "4", "-o", str(tmp_path / "x.npy")]) == 2
    assert "fewer than shots=4" in capsys.readouterr().err


def test_align_folder_maps_keypoints_to_template(tmp_path):
    from lafs.geometry import ARCFACE_TEMPLATE

    folder = _folder(tmp_path, counts=(("p", 1),))
    kps = (ARCFACE_TEMPLATE[None] * 0.2 + 1.0).astype(np.float32)  # a small face in the 24 px image
    np.save(tmp_path / "k.npy", kps)
    assert main(["data", "align", str(folder), str(tmp_path / "k.npy"), str(tmp_path / "out")]) == 0
    out_kps = np.load(tmp_path / "out" / "keypoints.npy")
    assert np.abs(out_kps[0] - ARCFACE_TEMPLATE).max() < 0.5
    assert (tmp_path / "out" / "p" / "p_0001.jpg").is_file()


def test_synth_writes_records_and_keypoints(tmp_path):
    assert main(["data", "synth", "--identities", "3", "--images-per-id", "4", "--seed", "5",
                 "-o", str(tmp_path / "s.rec")]) == 0
    ds = RecordDataset(tmp_path / "s.rec")
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds[0]["image"].shape == (3, 112, 112) and ds.keypoints.shape == (12, 5, 2)
    from lafs.data.synthetic import SyntheticFaces

    img, kp = SyntheticFaces(3, seed=5).render(1, 2)
    np.testing.assert_allclose(ds.keypoints[6], kp, atol=1e-5)
    # JPEG at quality 95 stays close to the rendered image.
    assert np.abs(ds[6]["image"].numpy().transpose(1, 2, 0).astype(float) - img).mean() < 6
