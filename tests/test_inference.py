"""``lafs embed`` / ``lafs verify``: aligned crops go straight in, raw photos through the detector; the decision
uses the threshold stored with the model by its validation."""

import cv2
import numpy as np
import pytest
import torch

from lafs.cli import main
from lafs.data.synthetic import SyntheticFaces
from lafs.embedder import load_embedder
from lafs.geometry import template
from lafs.inference import embed_files, load_face, verify


@pytest.fixture(scope="module")
def model_and_faces(tmp_path_factory):
    from conftest import train_tiny

    root = tmp_path_factory.mktemp("infer")
    ckpt = train_tiny(root / "run", "model.name=fvit", "data.val_pairs=40", "data.val_identities=8")
    faces = SyntheticFaces(30, seed=4)
    paths = {}
    for ident in (20, 21):
        for idx in (0, 1):
            img = faces.render(ident, idx)[0]
            paths[(ident, idx)] = root / f"id{ident}_{idx}.png"
            cv2.imwrite(str(paths[(ident, idx)]), img[:, :, ::-1])
    return ckpt, paths


def test_checkpoint_stores_its_validation_threshold(model_and_faces):
    ckpt, _ = model_and_faces
    emb = load_embedder(ckpt)
    state = torch.load(ckpt, weights_only=False)
    r = state["val"]["sets"]["synthetic_val"]
    assert emb.threshold == pytest.approx(r["cosine_threshold"]) and -1.0 <= emb.threshold <= 1.0
    assert "synthetic_val validation at step 2" in emb.threshold_source


def test_verify_self_scores_one_and_another_identity_lower(model_and_faces, capsys):
    ckpt, paths = model_and_faces
    emb = load_embedder(ckpt)
    same = verify(emb, paths[(20, 0)], paths[(20, 0)])
    other = verify(emb, paths[(20, 0)], paths[(21, 0)])
    assert same["score"] == pytest.approx(1.0, abs=1e-5) and same["same"] is True
    assert other["score"] < same["score"] - 1e-3
    assert main(["verify", str(ckpt), str(paths[(20, 0)]), str(paths[(21, 0)]), "--threshold", "2"]) == 0
    out = capsys.readouterr().out
    assert f"cosine similarity {other['score']:.4f}: different people at threshold 2.0000 (given)" in out


def test_embed_writes_unit_rows_in_file_order(model_and_faces, tmp_path, capsys):
    ckpt, paths = model_and_faces
    files = [str(paths[(20, 0)]), str(paths[(21, 1)]), str(paths[(20, 1)])]
    out = tmp_path / "e.npy"
    assert main(["embed", str(ckpt), *files, "-o", str(out)]) == 0
    e = np.load(out)
    assert e.shape == (3, 96) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "e.txt").read_text().split() == files
    np.testing.assert_allclose(e, embed_files(load_embedder(ckpt), files), atol=1e-6)


def test_raw_photo_needs_the_detector_or_is_refused(tmp_path, capsys):
    big = tmp_path / "photo.png"
    cv2.imwrite(str(big), np.full((200, 160, 3), 90, np.uint8))
    with pytest.raises(ValueError, match="photo.png: 160x200 is not an aligned 112x112 face"):
        load_face(big, detect="never")
    small = tmp_path / "crop.png"
    cv2.imwrite(str(small), np.full((112, 112, 3), 90, np.uint8))
    img, kps, detected = load_face(small)
    assert img.shape == (112, 112, 3) and not detected and np.array_equal(kps, template(112))
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_face(tmp_path / "nothere.png")


@pytest.mark.shared_data
def test_raw_photo_is_detected_and_aligned(tmp_path, shared_data):
    pytest.importorskip("dlib", reason='face detector not installed: pip install "lafs-face[detect]"')
    import pickle

    with open(shared_data / "lfw" / "lfw_unaligned.bin", "rb") as f:
        jpegs, _ = pickle.load(f)
    crop = cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)
    photo = cv2.copyMakeBorder(crop, 40, 40, 60, 60, cv2.BORDER_REFLECT)  # not 112 x 112: a "raw photo"
    cv2.imwrite(str(tmp_path / "raw.png"), photo)
    img, kps, detected = load_face(tmp_path / "raw.png")
    assert detected and img.shape == (112, 112, 3)
    assert np.linalg.norm(kps - template(112), axis=1).mean() < 4.0  # aligned onto the template (fit residual)


def test_model_card_is_written_next_to_the_checkpoints(model_and_faces):
    ckpt, _ = model_and_faces
    card = (ckpt.parent / "MODEL_CARD.md").read_text()
    state = torch.load(ckpt, weights_only=False)
    r = state["val"]["sets"]["synthetic_val"]
    params = sum(v.numel() for k, v in state["model"].items() if k.startswith("backbone.")
                 and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert card.startswith("# Model card: fvit-micro")
    assert f"`{ckpt.name}` (step 2 of 2)" in card and f"{params:,} parameters" in card
    assert f"synthetic_val: accuracy {100 * r['accuracy']:.2f}" in card
    assert f"cosine threshold {r['cosine_threshold']:.4f}" in card and "synthetic faces (8 identities x 4)" in card
