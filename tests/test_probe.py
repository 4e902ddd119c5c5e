"""k-NN and linear probes of frozen features on held-out identities (lafs.eval.probe)."""

from __future__ import annotations

import numpy as np
import pytest

from lafs.eval.probe import knn_accuracy, linear_probe_accuracy, probe_features, split_probe_gallery


def test_split_gives_one_probe_per_identity_with_two_or_more_images():
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])  # identity 1 has one image: never probed
    gal, pro = split_probe_gallery(labels, seed=0)
    assert sorted(labels[pro]) == [0, 2, 3]
    assert len(np.intersect1d(gal, pro)) == 0 and 3 not in gal and 3 not in pro  # index 3 = identity 1
    assert len(gal) + len(pro) == 9
    again = split_probe_gallery(labels, seed=0)
    assert np.array_equal(again[0], gal) and np.array_equal(again[1], pro)
    gal2, pro2 = split_probe_gallery(labels, identities=2, seed=1)
    assert len(pro2) == 2 and set(labels[gal2]) == set(labels[pro2])
    with pytest.raises(ValueError, match="the labels have 1"):
        split_probe_gallery(np.array([0, 0, 1]))


def test_knn_nearest_and_dino_weighted_vote_by_hand():
    # probe along x; gallery: identity A at cosine 0.9, identity B twice at cosine 0.8
    def at(c):
        return [c, np.sqrt(1 - c * c)]

    gallery = np.array([at(0.9), at(0.8), [0.8, -0.6]])
    glabels = np.array([7, 5, 5])
    probe = np.array([[1.0, 0.0]])
    assert knn_accuracy(gallery, glabels, probe, [7], k=1) == 1.0
    # k=3, T=0.07: A weighs e^(0.9/0.07) = 3.9e5 > B's 2 e^(0.8/0.07) = 1.8e5 -> A; with T=1: 2.46 < 4.45 -> B
    assert knn_accuracy(gallery, glabels, probe, [7], k=3) == 1.0
    assert knn_accuracy(gallery, glabels, probe, [7], k=3, temperature=1.0) == 0.0
    with pytest.raises(ValueError, match="k must be in 1..3"):
        knn_accuracy(gallery, glabels, probe, [7], k=4)
    with pytest.raises(ValueError, match="non-finite"):
        knn_accuracy(np.full((3, 2), np.nan), glabels, probe, [7])


def test_linear_probe_separates_clusters_and_cannot_name_unseen_identities():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    y = np.repeat(np.arange(4), 20)
    x = centres[y] + 0.05 * rng.normal(size=(80, 16))
    yt = np.array([0, 1, 2, 3, 9])  # identity 9 never trained: an error by definition
    xt = np.concatenate([centres, rng.normal(size=(1, 16))])
    assert linear_probe_accuracy(x, y, xt, yt) == pytest.approx(0.8)


def test_probe_features_reports_every_probe_and_chance():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(30), 4)
    feats = rng.normal(size=(30, 8))[labels] + 0.01 * rng.normal(size=(120, 8))
    r = probe_features(feats, labels, ks=(1, 5))
    assert r["identities"] == 30 and r["gallery"] == 90 and r["chance"] == pytest.approx(1 / 30)
    assert r["knn1"] == 1.0 and r["knn5"] == 1.0 and r["linear"] == 1.0
    noise = probe_features(rng.normal(size=(120, 8)), labels, ks=(1,), linear=False)
    assert noise["knn1"] < 0.3 and "linear" not in noise


def test_cli_probe_a_checkpoint_beside_its_pixel_floors(tmp_path, capsys):
    import json

    from conftest import train_tiny

    from lafs.cli import main

    ckpt = train_tiny(tmp_path / "run")
    rec = tmp_path / "faces.rec"
    assert main(["data", "synth", "--identities", "12", "--images-per-id", "3", "--seed", "5", "-o", str(rec)]) == 0
    capsys.readouterr()
    code = main(["probe", str(ckpt), "--data", str(rec), "--identities", "10", "--k", "1,3", "--floors",
                 "--floor-components", "8", "--out", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0
    assert "10 identities of faces.rec, 20 gallery / training images, one probe each (chance 10.00 %)" in out
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    rows = doc["results"]
    assert len(rows) == 3 and "raw pixels" in rows
    for r in rows.values():
        assert r["probes"] == 10 and set(r) >= {"knn1", "knn3", "linear"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("knn1", "knn3", "linear"))
    with pytest.raises(SystemExit):
        main(["probe", str(ckpt)])  # --data is required
