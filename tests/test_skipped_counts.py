"""What a run leaves out is reported (issue 24): bad training records skipped under ``data.max_bad_records`` and steps
undone by the step guard appear in metrics.jsonl, summary.json and the model card; ``train.step_guard`` turns the
guard off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lafs.cli import main
from lafs.config import load_config
from lafs.data.datasets import encode_image
from lafs.data.recordio import write_face_records
from lafs.data.synthetic import SyntheticFaces
from lafs.train import guard as guard_module
from lafs.train.logging import read_metrics
from lafs.train.model_card import model_card

RUN = ["model.name=fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
       "data.source=records", "augment.preset=none", "train.batch_size=8", "train.steps=3", "train.log_every=100",
       "data.val_pairs=0", "optim.warmup_steps=0"]


@pytest.fixture
def rec_with_one_bad_record(tmp_path):
    ids = [i // 4 for i in range(16)]
    images, _ = SyntheticFaces(4, seed=0).batch(ids, [i % 4 for i in range(16)])
    data = [encode_image(img) for img in images]
    data[5] = b"not a jpeg"  # image record 6
    rec = tmp_path / "faces.rec"
    write_face_records(rec, zip(ids, data))
    return rec


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_records_are_counted_in_metrics_summary_and_card(rec_with_one_bad_record, tmp_path, workers):
    out = tmp_path / f"run{workers}"
    args = ["train", *RUN, f"data.train=[{rec_with_one_bad_record}]", "data.max_bad_records=1",
            f"data.workers={workers}", "--out", str(out), "--quiet"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_records"] == 1 and summary["max_bad_records"] == 1
    assert "record 6" in summary["bad_records"][0] and "cannot decode" in summary["bad_records"][0]
    assert summary["skipped_steps"] == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert any(r.get("bad_records") == 1 for r in rows)  # counted once, though every epoch meets it
    assert rows[-1]["bad_records"] == 1 and rows[-1]["step"] == 3
    card = (out / "checkpoints" / "MODEL_CARD.md").read_text()
    assert "1 bad training record(s) (data.max_bad_records=1)" in card and "record 6" in card
    assert "0 step(s) skipped" in card


def test_one_bad_record_too_many_stops_with_one_line(rec_with_one_bad_record, tmp_path, capsys):
    args = ["train", *RUN, f"data.train=[{rec_with_one_bad_record}]", "data.workers=1", "--out",
            str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lafs: error: ") and len(err.splitlines()) == 1, err
    assert "more than max_bad_records=0" in err and "record 6" in err and str(rec_with_one_bad_record) in err


def test_model_card_names_skipped_steps():
    cfg = load_config(None, [])
    card = model_card(cfg, step=6, total_steps=6, params=1, embedding_size=8, val={}, best=None, checkpoint="x.pt",
                      has_best=False, skipped={"steps": [3], "records": [], "max_bad_records": 0})
    assert "0 bad training record(s)" in card and "1 step(s) skipped and undone" in card and "[3]" in card


def test_step_guard_switch(tmp_path, monkeypatch):
    from lafs.train.run import train

    calls = []
    real = guard_module.StepGuard.nonfinite
    monkeypatch.setattr(guard_module.StepGuard, "nonfinite", lambda self: calls.append(1) or real(self))
    base = ["model.name=fvit", "model.size=micro", "data.num_identities=4", "data.images_per_identity=4",
            "data.workers=0", "data.val_pairs=0", "augment.preset=none", "train.batch_size=8", "train.steps=2"]
    torch.manual_seed(0)
    train(load_config(None, base + [f"out_dir={tmp_path / 'on'}"]), progress=False)
    assert len(calls) == 2  # on by default: every step checked
    torch.manual_seed(0)
    result = train(load_config(None, base + ["train.step_guard=false", f"out_dir={tmp_path / 'off'}"]),
                   progress=False)
    assert len(calls) == 2 and result.step == 2 and np.isfinite(result.losses).all()
