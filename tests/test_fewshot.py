import json
from dataclasses import asdict

import numpy as np
import pytest

from lafs.data.fewshot import SubsetReport, fewshot_index, load_index, save_index, unlabelled_index


def varying_labels(seed: int = 0) -> np.ndarray:
    """50 identities with 1..20 images (identity i has 1 + i % 20), in shuffled dataset order."""
    labels = np.repeat(np.arange(50), 1 + np.arange(50) % 20)
    return np.random.default_rng(seed).permutation(labels)


def check_subset(labels, positions, report, shots):
    """Invariants every subset must satisfy, whatever was selected."""
    assert positions.dtype == np.int64 and positions.ndim == 1
    assert np.all(np.diff(positions) > 0), "positions must be sorted and unique"
    assert positions.min() >= 0 and positions.max() < labels.size
    chosen, per_id = np.unique(labels[positions], return_counts=True)
    assert chosen.size == report.identities_selected
    assert positions.size == report.images
    avail = {lab: int((labels == lab).sum()) for lab in chosen}
    for lab, n in zip(chosen, per_id):
        want = avail[lab] if shots is None else min(shots, avail[lab])
        assert n == want, f"identity {lab}: {n} images, expected {want}"
    hist = dict(zip(*np.unique(per_id, return_counts=True)))
    assert report.shots_histogram == {int(k): int(v) for k, v in hist.items()}
    return chosen


def test_exact_counts_and_histogram_full_fraction():
    labels = varying_labels()
    counts = 1 + np.arange(50) % 20
    pos, rep = fewshot_index(labels, 1.0, shots=5, allow_fewer=True)
    check_subset(labels, pos, rep, 5)
    assert rep.identities_total == 50 and rep.identities_selected == 50
    # Identities with c images: c = 1..4 are short (take c), c >= 5 give 5.
    expected = {}
    for c in counts:
        expected[min(c, 5)] = expected.get(min(c, 5), 0) + 1
    assert rep.shots_histogram == expected == {1: 3, 2: 3, 3: 3, 4: 3, 5: 38}
    assert rep.short_identities == 12
    assert rep.images == int(np.minimum(counts, 5).sum()) == 220
    assert (rep.fraction, rep.shots, rep.seed) == (1.0, 5, 0)


def test_fraction_of_identities_and_all_shots():
    labels = varying_labels()
    pos, rep = fewshot_index(labels, 0.2, shots=None, seed=3)
    chosen = check_subset(labels, pos, rep, None)
    assert rep.identities_selected == 10 == chosen.size
    assert rep.shots is None and rep.short_identities == 0
    # All images of exactly the chosen identities.
    np.testing.assert_array_equal(pos, np.flatnonzero(np.isin(labels, chosen)))
    assert "k=all" in rep.summary()


@pytest.mark.parametrize(
    "fraction, n_ids, expected",
    [(0.1, 50, 5), (0.01, 50, 1), (0.001, 50, 1), (0.05, 50, 2), (0.07, 50, 4), (1.0, 50, 50), (0.5, 3, 2)],
)
def test_number_of_identities_is_rounded_and_at_least_one(fraction, n_ids, expected):
    labels = np.repeat(np.arange(n_ids), 3)
    pos, rep = fewshot_index(labels, fraction, shots=2)
    assert rep.identities_selected == expected
    assert np.unique(labels[pos]).size == expected and pos.size == 2 * expected


def test_seed_determinism():
    labels = varying_labels()
    a, ra = fewshot_index(labels, 0.5, shots=3, seed=7, allow_fewer=True)
    b, rb = fewshot_index(labels.copy(), 0.5, shots=3, seed=7, allow_fewer=True)
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    c, _ = fewshot_index(labels, 0.5, shots=3, seed=8, allow_fewer=True)
    assert not np.array_equal(a, c)
    # With every identity selected, the seed still changes which images are taken.
    big = np.repeat(np.arange(20), 10)
    d0, _ = fewshot_index(big, 1.0, shots=2, seed=0)
    d1, _ = fewshot_index(big, 1.0, shots=2, seed=1)
    assert not np.array_equal(d0, d1)


def test_not_the_first_identities_and_roughly_uniform():
    n_ids = 10_000
    labels = np.repeat(np.arange(n_ids), 2)  # record order = identity order, the reference code's trap
    pos, rep = fewshot_index(labels, 0.1, shots=1, seed=0)
    chosen = np.unique(labels[pos])
    assert chosen.size == 1000
    assert not np.array_equal(chosen, np.arange(1000))
    assert np.isin(chosen, np.arange(1000)).mean() < 0.2  # ~10% expected by chance, 100% for "first x%"
    # Uniform over identities: mean id near the middle (sd of the mean ~ 87), every decile represented.
    assert abs(chosen.mean() - (n_ids - 1) / 2) < 400
    per_decile = np.bincount(chosen // 1000, minlength=10)
    assert per_decile.min() > 60 and per_decile.max() < 140, per_decile


def test_image_choice_is_uniform_within_identity():
    labels = np.array([0] * 10 + [1] * 3)
    hits = np.zeros(10, dtype=int)
    for seed in range(500):
        pos, _ = fewshot_index(labels, 1.0, shots=1, seed=seed)
        hits[pos[pos < 10]] += 1
    # 50 expected per image; a fixed choice ("first image") would put all 500 on one.
    assert hits.min() > 25 and hits.max() < 80, hits


def test_nested_across_fractions_and_shots():
    labels = varying_labels(1)
    small, _ = fewshot_index(labels, 0.2, shots=3, seed=5, allow_fewer=True)
    large, _ = fewshot_index(labels, 0.6, shots=3, seed=5, allow_fewer=True)
    assert set(np.unique(labels[small])) <= set(np.unique(labels[large]))
    assert set(small) <= set(large)  # same identity -> same images, whatever else was chosen
    k2, _ = fewshot_index(labels, 0.6, shots=2, seed=5, allow_fewer=True)
    assert set(k2) <= set(large) and len(k2) < len(large)


def test_too_few_images_names_the_identity():
    labels = np.array([10] * 5 + [42] * 2 + [7] * 6)
    with pytest.raises(ValueError, match=r"identity 42 has 2 images, fewer than shots=4") as e:
        fewshot_index(labels, 1.0, shots=4)
    assert "allow_fewer=True" in str(e.value)
    pos, rep = fewshot_index(labels, 1.0, shots=4, allow_fewer=True)
    assert rep.short_identities == 1
    assert rep.shots_histogram == {2: 1, 4: 2}
    assert set(np.flatnonzero(labels == 42)) <= set(pos)  # the short identity keeps all it has
    assert "1 identities short of 4" in rep.summary()


def test_unlabelled_index_one_image_per_identity():
    labels = varying_labels(2)
    pos, rep = unlabelled_index(labels, seed=4)
    assert pos.size == 50 and rep.shots == 1 and rep.identities_selected == 50
    assert np.unique(labels[pos]).size == pos.size  # exactly one image per identity
    assert rep.shots_histogram == {1: 50} and rep.short_identities == 0
    half, rep_half = unlabelled_index(labels, seed=4, fraction=0.5)
    assert half.size == 25 == np.unique(labels[half]).size
    pos2, _ = unlabelled_index(labels, seed=4)
    np.testing.assert_array_equal(pos, pos2)


def test_arbitrary_label_values():
    labels = np.array([-3, 1000, -3, 77, 1000, 77, 77], dtype=np.int32)
    pos, rep = fewshot_index(labels, 1.0, shots=1)
    assert rep.identities_total == 3
    assert sorted(labels[pos].tolist()) == [-3, 77, 1000]


def test_summary_is_one_line():
    pos, rep = fewshot_index(varying_labels(), 0.1, shots=2, seed=9)
    s = rep.summary()
    assert "\n" not in s
    assert "5/50" in s and "k=2" in s and "seed=9" in s and f"{rep.images} images" in s


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, 10, float("nan"), float("inf"), "0.1", None, True])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        fewshot_index(np.arange(10), fraction, shots=1)


@pytest.mark.parametrize(
    "labels, kwargs, msg",
    [
        (np.arange(10), {"shots": 0}, "shots"),
        (np.arange(10), {"shots": 2.5}, "shots"),
        (np.arange(10), {"shots": 1, "seed": -1}, "seed"),
        (np.zeros((3, 2), dtype=int), {"shots": 1}, "1-D"),
        (np.array([], dtype=int), {"shots": 1}, "empty"),
        (np.array([0.0, 1.0]), {"shots": 1}, "integers"),
        (np.array([True, False]), {"shots": 1}, "integers"),
    ],
)
def test_bad_arguments(labels, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        fewshot_index(labels, 1.0, **kwargs)


# --- index files ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    labels = varying_labels()
    pos, rep = fewshot_index(labels, 0.3, shots=4, seed=2, allow_fewer=True)
    path = tmp_path / "subsets" / "x10_k4_s2.npy"
    assert save_index(path, pos, rep) == path
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["x10_k4_s2.json", "x10_k4_s2.npy"]  # no temp left
    loaded, meta = load_index(path)
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, pos)
    assert meta == asdict(rep)
    assert SubsetReport(**meta) == rep
    assert json.loads(path.with_suffix(".json").read_text())["seed"] == 2
    # Overwriting with no report drops the stale sidecar rather than pairing it with other positions.
    save_index(path, pos[:3])
    loaded, meta = load_index(path)
    assert meta is None and loaded.tolist() == pos[:3].tolist()


def test_save_rejects_mismatch_and_bad_positions(tmp_path):
    pos, rep = fewshot_index(varying_labels(), 0.3, shots=2, allow_fewer=True)
    with pytest.raises(ValueError, match="mismatched"):
        save_index(tmp_path / "a.npy", pos[:-1], rep)
    with pytest.raises(ValueError, match=r"\.npy"):
        save_index(tmp_path / "a.idx", pos, rep)
    with pytest.raises(ValueError, match="non-negative"):
        save_index(tmp_path / "a.npy", np.array([-1, 2]))
    with pytest.raises(ValueError, match="integer"):
        save_index(tmp_path / "a.npy", np.array([1.0, 2.0]))
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "content",
    [np.array([1.0, 2.0]), np.zeros((2, 2), dtype=np.int64), np.array([3, -1], dtype=np.int64)],
)
def test_load_rejects_bad_arrays(tmp_path, content):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(ValueError, match="bad.npy"):
        load_index(path)


def test_load_rejects_corrupt_files(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="junk.npy"):
        load_index(path)
    good = tmp_path / "good.npy"
    np.save(good, np.arange(4, dtype=np.int64))
    good.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="good.json"):
        load_index(good)
    good.with_suffix(".json").write_text(json.dumps({"images": 5, "shots_histogram": {}}))
    with pytest.raises(ValueError, match="5 images"):
        load_index(good)
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "missing.npy")


def test_holdout_identities_are_left_out_of_every_subset():
    from lafs.data.fewshot import holdout_identities

    labels = np.repeat(np.arange(50), 6)
    held = holdout_identities(labels, 10, seed=3)
    assert held.size == 10 and np.array_equal(held, holdout_identities(labels, 10, seed=3))
    assert not np.array_equal(held, holdout_identities(labels, 10, seed=4))
    for shots in (1, 4, None):
        pos, rep = fewshot_index(labels, 1.0, shots, seed=0, exclude=held)
        assert not np.isin(labels[pos], held).any()
        assert rep.identities_total == 40 and rep.identities_selected == 40
    half, _ = fewshot_index(labels, 0.5, 2, seed=0, exclude=held)
    assert np.unique(labels[half]).size == 20
    with pytest.raises(ValueError, match="0 < count < 50"):
        holdout_identities(labels, 50)
    with pytest.raises(ValueError, match="every one of the 50 identities is excluded"):
        fewshot_index(labels, 1.0, 1, exclude=np.arange(50))


def test_holdout_pairs_alternate_and_stay_in_the_split(tmp_path):
    from lafs.cli import main
    from lafs.data.pairs import pairs_from_labels, read_bin

    labels = np.array([0, 0, 0, 1, 2, 2, 3, 3, 4])
    pairs, same = pairs_from_labels(labels, [0, 1, 2], 30, seed=1)
    assert same.tolist() == [k % 2 == 0 for k in range(30)]
    assert np.isin(labels[pairs], [0, 1, 2]).all()
    assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).tolist() == same.tolist()
    assert (pairs[same, 0] != pairs[same, 1]).all()  # two distinct images of one identity
    with pytest.raises(ValueError, match="one with >= 2 images"):
        pairs_from_labels(labels, [1, 4], 4)
    # the CLI on a record file: subset without the held-out identities + their pairs with keypoints beside them
    rec = tmp_path / "f.rec"
    assert main(["data", "synth", "--identities", "10", "--images-per-id", "3", "-o", str(rec)]) == 0
    assert main(["data", "subset", str(rec), "--shots", "2", "--holdout", "3", "--holdout-pairs",
                 str(tmp_path / "val.bin"), "--pairs", "20", "-o", str(tmp_path / "i.npy")]) == 0
    images, issame = read_bin(tmp_path / "val.bin")
    assert len(images) == 40 and issame.sum() == 10
    assert np.load(tmp_path / "val_kps.npy").shape == (40, 5, 2)
    assert np.load(tmp_path / "i.npy").size == 2 * 7


def test_an_indexed_run_counts_the_identities_it_holds_and_keeps_the_head_of_the_full_set(tmp_path, capsys):
    """A few-shot index of 3 of 8 synthetic identities (one image each): the run says "3 images of 3 identities",
    names the 8 classes its head keeps (labels are not renumbered), and trains."""
    from conftest import lafs_cli

    index = save_index(tmp_path / "three.npy", np.array([4 * 1, 4 * 5, 4 * 6 + 2], dtype=np.int64))
    code, out, _ = lafs_cli(capsys, "train", "train.steps=1", f"data.index={index}", "train.batch_size=3",
                            "--out", str(tmp_path / "run"))
    assert code == 0
    assert "on 3 images of 3 identities (the head has the full set's 8 classes)" in out


def test_an_indexed_synthetic_set_renders_only_its_images_and_they_equal_the_full_sets(tmp_path, monkeypatch):
    """With data.index the synthetic source renders only the indexed faces: the same pixels, labels and keypoints as
    the full set at those positions, the full set's class count; positions past the set are a named error."""
    from lafs.config import ConfigError, load_config
    from lafs.data.synthetic import SyntheticFaces
    from lafs.train.run import build_train_set

    # a KP-RPE model, so that the items carry their keypoints too
    base = ["data.source=synthetic", "data.num_identities=6", "data.images_per_identity=3", "model.name=vit",
            "model.size=micro", "model.rpe=kprpe"]
    full = build_train_set(load_config(None, base))
    positions = np.array([1, 5, 6, 16], dtype=np.int64)
    index = save_index(tmp_path / "i.npy", positions)
    rendered = []
    batch = SyntheticFaces.batch
    monkeypatch.setattr(SyntheticFaces, "batch", lambda self, ids, idx: rendered.append(len(ids)) or batch(self, ids, idx))
    sub = build_train_set(load_config(None, [*base, f"data.index={index}"]))
    assert rendered == [4]
    assert len(sub) == 4 and sub.num_identities == 6 and sub.present_identities == 4
    for k, p in enumerate(positions):
        a, b = sub[k], full[int(p)]
        assert set(a) == set(b) and {"image", "label", "keypoints"} <= set(a)
        for key in set(a) - {"index"}:  # "index": the item's position in its own dataset
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
        assert int(a["label"]) == p // 3
    bad = save_index(tmp_path / "bad.npy", np.array([0, 18], dtype=np.int64))
    with pytest.raises(ConfigError, match=r"bad.npy: positions outside the dataset's 0..17"):
        build_train_set(load_config(None, [*base, f"data.index={bad}"]))
