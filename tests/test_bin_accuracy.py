"""A fixed ``.bin`` scored by a fixed seeded checkpoint gives the numbers it gave before the house refactor.

The set (synthetic faces, PNG-encoded, written with the project's own ``.bin`` writer) and the checkpoint
(``torch.manual_seed(SEED)``, a micro IResNet or Part fViT saved in the lafs checkpoint format) are rebuilt here; the
expected values were recorded from the unmodified code (main at fa5c368) before checkpoint reading, face
geometry and the evaluation pipe were moved, so any change to the numerics shows up here.
"""

import sys

import cv2
import numpy as np
import pytest
import torch

from lafs.checkpoint import write_checkpoint
from lafs.config import load_config, to_yaml
from lafs.data.pairs import write_bin
from lafs.data.synthetic import SyntheticFaces
from lafs.embedder import load_embedder
from lafs.eval.embedding import evaluate_bin
from lafs.models import build_backbone

SEED = 1234
PAIRS = 100  # 10 per fold; genuine and impostor alternate

# Recorded before the refactor (fa5c368, CPU, OMP_NUM_THREADS=1), per (model, threshold grid). Accuracy, AUC, EER,
# TAR@FAR and best accuracy are counts over pairs, and the reference grid's threshold is a point of a fixed grid, so
# they are compared exactly; a threshold of the exact grid is a distance (float sums) and is compared to rounding.
COUNTED = ("accuracy", "accuracy_std", "fold_accuracies", "auc", "eer", "best_accuracy", "tar_at_far")
EXPECTED = {
    ("iresnet", "reference"): {
        "accuracy": 0.61, "accuracy_std": 0.1445683229480096,
        "fold_accuracies": [0.7, 0.5, 0.6, 0.7, 0.5, 0.7, 0.4, 0.4, 0.8, 0.8],
        "auc": 0.6644, "eer": 0.36, "best_accuracy": 0.65, "tar_at_far": {0.0001: 0.12, 0.001: 0.12, 0.01: 0.12},
        "threshold": 0.36, "best_threshold": 0.38,
    },
    ("part_fvit", "exact"): {
        "accuracy": 0.6, "accuracy_std": 0.15491933384829668,
        "fold_accuracies": [0.7, 0.7, 0.6, 0.8, 0.4, 0.8, 0.3, 0.6, 0.6, 0.5],
        "auc": 0.5664, "eer": 0.43999999999999995, "best_accuracy": 0.6,
        "tar_at_far": {0.0001: 0.04, 0.001: 0.04, 0.01: 0.04},
        "threshold": 0.0011358425722214794, "best_threshold": 0.0011374343080204907,
    },
}

def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _fixed_bin(path):
    faces = SyntheticFaces(2 * PAIRS, seed=7)
    images, issame = [], []
    for k in range(PAIRS):
        same = k % 2 == 0
        a, b = (k, 0), ((k, 1) if same else (k + PAIRS, 0))
        images += [_png(faces.render(*a)[0]), _png(faces.render(*b)[0])]
        issame.append(same)
    return write_bin(path, images, issame)


def _fixed_checkpoint(path, model):
    cfg = load_config(None, [f"model.name={model}", "model.size=micro"])
    torch.manual_seed(SEED)
    backbone = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    state = {"config": to_yaml(cfg), "model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             "step": 0}
    return write_checkpoint(state, path)


@pytest.mark.parametrize(("model", "thresholds"), sorted(EXPECTED))
def test_fixed_bin_accuracy_is_unchanged(tmp_path, model, thresholds):
    embedder = load_embedder(_fixed_checkpoint(tmp_path / "fixed.pt", model))
    result = evaluate_bin(embedder, _fixed_bin(tmp_path / "fixed.bin"), thresholds=thresholds)
    got = {key: result[key] for key in COUNTED} | {"threshold": result["threshold"],
                                                    "best_threshold": result["best_threshold"]}
    expected = EXPECTED[(model, thresholds)]
    assert result["pairs"] == PAIRS
    assert {key: got[key] for key in COUNTED} == {key: expected[key] for key in COUNTED}
    for key in ("threshold", "best_threshold"):
        if thresholds == "reference" and key == "threshold":
            assert got[key] == expected[key]
        else:
            # a threshold between two float32 cosines: CPU kernels differ in their last bits (AVX-512 vs AMX, seen
            # 1.3e-9 apart on a threshold of 0.0011), so near zero only an absolute tolerance means anything; the
            # counted results above stay exact
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7)


# the rooms of the layout a .bin passes through; lafs.io_safe (the safe unpickler) and lafs.geometry are shared
# low-level helpers, not rooms
ROOMS = {"lafs.data": "data", "lafs.eval.embedding": "embedding", "lafs.eval.metrics": "metrics"}
LOW_LEVEL = ("lafs.io", "lafs.io_safe", "lafs.geometry")


def test_a_bin_reaches_its_accuracy_through_three_rooms(tmp_path):
    path = _fixed_bin(tmp_path / "fixed.bin")
    entered: set[str] = set()

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("lafs"):
            entered.add(module)

    sys.setprofile(profile)
    try:  # any embedding function will do: the pipe, not the model, is under test
        result = evaluate_bin(lambda x: x.mean(dim=(2, 3)), path)
    finally:
        sys.setprofile(None)
    rooms = {room for module in entered for prefix, room in ROOMS.items() if module.startswith(prefix)}
    others = {m for m in entered if not m.startswith(tuple(ROOMS)) and m not in LOW_LEVEL}
    assert rooms == {"data", "embedding", "metrics"} and others == set(), (rooms, others)
    assert result["pairs"] == PAIRS
