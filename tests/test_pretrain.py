"""DINO / LAFS pretraining through the shared loop: frozen landmark CNN, EMA teacher, view groups, schedules,
checkpoints that finetuning starts from, and short micro runs that lower the loss without collapsing."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lafs.checkpoint import checkpoints_in
from lafs.cli import main
from lafs.config import ConfigError, load_config
from lafs.models import build_backbone
from lafs.models.fvit import grid_landmarks, grid_positions, grid_tokens
from lafs.models.part_fvit import sample_patches
from lafs.ssl.dino import momentum_at, weight_decay_at
from lafs.train.distributed import DistEnv
from lafs.train.logging import read_metrics
from lafs.train.loop import Trainer
from lafs.train.pretrain import build_pretrain_task
from lafs.train.pretrained import load_pretrained
from lafs.train.run import build_train_set, train

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0", "model.drop_path=0.0",
    "model.token_init=trunc_normal", "data.source=synthetic", "data.num_identities=16", "data.images_per_identity=8",
    "data.val_pairs=0", "data.workers=0", "train.batch_size=32", "train.log_every=1", "train.ckpt_every=1000",
    "optim.lr=1e-3", "optim.warmup_steps=10", "optim.weight_decay=0.04", "optim.clip_grad=3.0",
    "optim.clip_mode=per_param", "ssl.out_dim=256", "ssl.hidden_dim=128", "ssl.bottleneck_dim=32",
    "ssl.num_local=4", "ssl.momentum_teacher=0.99", "ssl.warmup_teacher_temp=0.02", "ssl.teacher_temp=0.02",
    "ssl.freeze_last_layer=0",
]


@pytest.fixture(scope="module")
def landmark_ckpt(tmp_path_factory) -> Path:
    """A 'supervised Part fViT' checkpoint (random weights are enough for mechanics) in the loop's format."""
    torch.manual_seed(0)
    backbone = build_backbone("part_fvit", "micro")
    path = tmp_path_factory.mktemp("sup") / "sup.pt"
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    return path


def cfg_for(tmp_path, landmark_ckpt, method="lafs", *overrides):
    extra = [f"ssl.landmark_init={landmark_ckpt}"] if "model.name=fvit" not in overrides else []
    return load_config(None, BASE + [f"ssl.method={method}", f"out_dir={tmp_path}"] + extra + list(overrides))


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ----------------------------------------------------------------------------- fViT views


def test_grid_landmarks_read_the_grid_patches_and_grid_positions():
    img = torch.randn(2, 3, 56, 56)
    lm = grid_landmarks(56, 8).expand(2, -1, -1)
    torch.testing.assert_close(sample_patches(img, lm, 8), grid_tokens(img, 8), atol=1e-4, rtol=0)
    # a 3 x 3 local grid takes the corner, middle and far cells of the 7 x 7 grid
    assert grid_positions(3, 3, 7).tolist() == [0, 3, 6, 21, 24, 27, 42, 45, 48]
    assert grid_positions(7, 7, 7).tolist() == list(range(49))


def test_fvit_small_crop_uses_nearest_grid_positions():
    torch.manual_seed(0)
    model = build_backbone("fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0).eval()
    crop = torch.randn(2, 3, 24, 24)
    pos = grid_positions(3, 3, 7).expand(2, -1)
    torch.testing.assert_close(model(crop)["embedding"], model(crop, positions=pos)["embedding"])
    # ... which is not what the first 9 position embeddings give
    enc = model.encoder(grid_tokens(crop, 8))["embedding"]
    assert not torch.allclose(enc, model(crop)["embedding"])


# ----------------------------------------------------------------------------- the task


def test_view_groups_lafs_teacher_all_landmarks_student_subset(tmp_path, landmark_ckpt):
    cfg = cfg_for(tmp_path, landmark_ckpt, "lafs", "ssl.subset_size=9", "ssl.perturb_alpha=0")
    task = build_pretrain_task(cfg, log=lambda *_: None).train()
    x = torch.rand(3, 3, 56, 56) * 2 - 1
    torch.manual_seed(1)
    g = task.view_groups(x)
    assert g[0]["images"].shape == (6, 3, 56, 56) and g[0]["landmarks"].shape == (6, 49, 2)
    assert g[1]["images"].shape == (12, 3, 56, 56) and g[1]["landmarks"].shape == (12, 9, 2)
    # teacher views: canonical order, landmark i at position i (shuffle=student, the released code)
    assert torch.equal(g[0]["positions"], torch.arange(49).expand(6, -1))
    assert torch.equal(g[1]["positions"], torch.arange(9).expand(12, -1))
    # with alpha 0 every student landmark is one of the CNN's landmarks of the same clean crop
    torch.manual_seed(1)
    clean, _ = task.views(x)
    lm = task.landmarks(torch.cat(clean))[6:]
    dist = torch.cdist(g[1]["landmarks"], lm).amin(dim=-1)
    assert float(dist.max()) < 0.05  # pixels (the CNN on another batch composition)


def test_view_groups_dino_part_fvit_landmarks_scaled_to_local_crops(tmp_path, landmark_ckpt):
    task = build_pretrain_task(cfg_for(tmp_path, landmark_ckpt, "dino"), log=lambda *_: None)
    g = task.view_groups(torch.rand(2, 3, 56, 56) * 2 - 1)
    assert g[0]["images"].shape == (4, 3, 56, 56) and g[1]["images"].shape == (8, 3, 24, 24)
    assert g[1]["landmarks"].shape == (8, 49, 2)
    # the CNN min-max scales its landmarks to [0, S - 1]; on a 24 px crop they span [0, 23]
    assert float(g[1]["landmarks"].min()) > -0.6 and float(g[1]["landmarks"].max()) < 23.6


def test_landmark_cnn_frozen_bit_identical_and_teacher_is_ema(tmp_path, landmark_ckpt):
    cfg = cfg_for(tmp_path, landmark_ckpt, "lafs", "train.steps=3", "ssl.momentum_teacher=0.9")
    torch.manual_seed(0)
    task = build_pretrain_task(cfg, log=lambda *_: None)
    cnn_before = {k: v.clone() for k, v in task.landmark_cnn.state_dict().items()}
    sup = torch.load(landmark_ckpt)["model"]
    for k, v in cnn_before.items():  # loaded from the supervised checkpoint
        assert torch.equal(v, sup[f"backbone.landmark_cnn.{k}"]), k
    trainer = Trainer(cfg, task, build_train_set(cfg), DistEnv(), progress=False)
    assert not any(id(p) in {id(q) for q in task.landmark_cnn.parameters()} for p in trainer.params)
    assert not any(id(p) in {id(q) for q in task.teacher.parameters()} for p in trainer.params)

    result = trainer.run()
    assert result.step == 3
    for p in task.landmark_cnn.parameters():
        assert p.grad is None
    for k, v in task.landmark_cnn.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, cnn_before[k]), k
    assert not task.landmark_cnn.training and not task.teacher.training


def test_cnn_teacher_batchnorm_uses_batch_statistics_and_tracks_its_own(tmp_path, landmark_ckpt):
    """DINO's teacher runs in train mode: an IResNet teacher's BatchNorm must normalise with batch statistics
    and update its running statistics, or its embeddings use the initial mean 0 / variance 1 forever."""
    cnn_base = [o for o in BASE if not o.startswith("model.")]
    cfg = load_config(None, cnn_base + ["ssl.method=dino", f"out_dir={tmp_path}", "model.name=iresnet",
                                        "model.size=micro", "ssl.num_local=0", "train.steps=2", "train.batch_size=8"])
    torch.manual_seed(0)
    task = build_pretrain_task(cfg, log=lambda *_: None)
    bns = [m for m in task.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "the IResNet teacher has BatchNorm layers"
    before = [m.running_mean.clone() for m in bns]
    trainer = Trainer(cfg, task, build_train_set(cfg), DistEnv(), progress=False)
    trainer.run()
    assert not task.teacher.training  # dropout / drop-path off ...
    task.train()
    assert all(m.training for m in bns)  # ... but BatchNorm as DINO's train-mode teacher
    moved = [float((m.running_mean - b).abs().max()) for m, b in zip(bns, before)]
    assert min(moved) > 0, "every teacher BatchNorm updated its running mean from the teacher's passes"
    task.eval()
    assert not any(m.training for m in bns)


def test_ema_update_after_each_optimizer_step_equals_hand_value(tmp_path, landmark_ckpt):
    cfg = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "train.steps=2", "ssl.momentum_teacher=0.9")
    torch.manual_seed(0)
    task = build_pretrain_task(cfg, log=lambda *_: None)
    trainer = Trainer(cfg, task, build_train_set(cfg), DistEnv(), progress=False)
    seen = []
    original = task.after_step

    def spy(step, total):
        seen.append((step, total, {k: v.clone() for k, v in task.teacher.named_parameters()},
                     {k: v.detach().clone() for k, v in task.student.named_parameters()}))
        original(step, total)
        seen[-1] += ({k: v.clone() for k, v in task.teacher.named_parameters()},)

    task.after_step = spy
    trainer.run()
    assert [s[:2] for s in seen] == [(0, 2), (1, 2)]
    for step, total, t_before, s_after, t_after in seen:
        m = momentum_at(step, total, 0.9, 1.0)
        for k in t_before:
            torch.testing.assert_close(t_after[k], m * t_before[k] + (1 - m) * s_after[k], atol=1e-6, rtol=1e-5)
    assert momentum_at(1, 2, 0.9, 1.0) == pytest.approx(0.95)  # half-way on the cosine


def test_last_layer_frozen_first_epoch_and_weight_decay_schedule(tmp_path, landmark_ckpt):
    # 128 images / 32 = 4 steps per epoch; 6 steps: the prototypes move only from step 5 (epoch 1)
    cfg = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "train.steps=6", "ssl.freeze_last_layer=1",
                  "optim.weight_decay_end=0.4")
    torch.manual_seed(0)
    task = build_pretrain_task(cfg, log=lambda *_: None)
    trainer = Trainer(cfg, task, build_train_set(cfg), DistEnv(), progress=False)
    proto = task.student.head.last_layer.parametrizations.weight.original1
    history, wds = [], []
    original = task.after_step

    def spy(step, total):
        history.append(proto.detach().clone())
        wds.append({g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups})
        original(step, total)

    task.after_step = spy
    start = proto.detach().clone()
    trainer.run()
    assert all(torch.equal(h, start) for h in history[:4])
    assert not torch.equal(history[4], start)
    for step, wd in enumerate(wds):
        assert wd["decay"] == pytest.approx(weight_decay_at(step, 6, 0.04, 0.4))
        assert wd["no_decay"] == 0.0
    assert wds[-1]["decay"] > 0.3


def test_lr_scale_batch_rule(tmp_path, landmark_ckpt):
    cfg = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "optim.lr=5e-4", "optim.lr_scale_batch=256")
    trainer = Trainer(cfg, build_pretrain_task(cfg, log=lambda *_: None), build_train_set(cfg), DistEnv(),
                      progress=False)
    assert trainer.base_lr == pytest.approx(5e-4 * 32 / 256)


@pytest.mark.parametrize("method,model", [("dino", "fvit"), ("lafs", "part_fvit")])
def test_micro_run_lowers_loss_without_collapse(tmp_path, landmark_ckpt, method, model):
    cfg = cfg_for(tmp_path, landmark_ckpt, method, f"model.name={model}", "train.steps=36")
    torch.manual_seed(0)
    train(cfg, progress=False)
    loss, ent = np.array(losses(tmp_path)), np.array(losses(tmp_path, "teacher_entropy"))
    assert np.isfinite(loss).all()
    assert loss[-8:].mean() < 0.9 * loss[:4].mean(), loss
    log_k = math.log(256)
    assert (ent[-8:] > 0.05 * log_k).all() and (ent[-8:] < 0.9 * log_k).all(), ent
    # the learning monitors: both trunks' drift from initialisation, logged at the (final) validation and on the
    # model card; the EMA teacher (momentum 0.99) trails the student
    val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert 0 < val["teacher_drift"] < val["student_drift"] < 1, val
    card = (tmp_path / "checkpoints" / "MODEL_CARD.md").read_text()
    assert "Drift from initialisation" in card and f"teacher {val['teacher_drift']:.4f}" in card


@pytest.mark.parametrize("method,model", [("dino", "fvit"), ("lafs", "part_fvit")])
def test_bf16_pretraining_makes_its_views_in_fp32(tmp_path, landmark_ckpt, method, model, monkeypatch):
    """Under ``train.amp=bf16`` the crops and photometric views are made outside autocast: kornia's blur inside it
    returned bf16 into an fp32 view and stopped the first step (found running the celeba64 LAFS preset in bf16)."""
    from lafs.augment import multicrop

    dtypes = []
    blur = multicrop.KF.gaussian_blur2d
    monkeypatch.setattr(multicrop.KF, "gaussian_blur2d", lambda *a, **k: dtypes.append(blur(*a, **k).dtype) or
                        blur(*a, **k))
    cfg = cfg_for(tmp_path, landmark_ckpt, method, f"model.name={model}", "train.steps=2", "train.amp=bf16")
    train(cfg, progress=False)
    assert np.isfinite(losses(tmp_path)).all() and len(losses(tmp_path)) == 2
    assert dtypes and set(dtypes) == {torch.float32}


def test_checkpoint_teacher_is_what_finetuning_loads(tmp_path, landmark_ckpt):
    cfg = cfg_for(tmp_path, landmark_ckpt, "lafs", "train.steps=2", "data.val_pairs=40", "data.val_identities=4")
    torch.manual_seed(0)
    train(cfg, progress=False)
    path = checkpoints_in(tmp_path / "checkpoints")[-1]
    state = torch.load(path, weights_only=False)
    assert state["ssl_method"] == "lafs"
    # pretraining validates its teacher on held-out pairs (the val split that picks best.pt)
    assert 0.0 <= state["val"]["sets"]["synthetic_val"]["accuracy"] <= 1.0
    assert {"teacher", "student", "model"} <= set(state)
    assert "loss_fn.center" in state["model"] and state["model"]["loss_fn.center"].shape == (1, 256)
    assert any(k.startswith("landmark_cnn.") for k in state["teacher"])

    backbone = build_backbone("part_fvit", "micro", dropout=0.0, emb_dropout=0.0, drop_path=0.0,
                              token_init="trunc_normal")
    report = load_pretrained(backbone, path)
    assert report.source == "teacher" and not report.missing and not report.unexpected
    # the finetuning backbone embeds exactly like the pretraining teacher (CNN included)
    task = build_pretrain_task(cfg, log=lambda *_: None)
    task.load_state_dict(state["model"])
    task.eval()
    backbone.eval()
    x = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x.float() / 127.5 - 1)["embedding"], task.embed(x))
        # `lafs eval` opens the same file as the teacher too
        from lafs.embedder import load_embedder

        embedder = load_embedder(path)
        assert "teacher" in embedder.description
        torch.testing.assert_close(embedder(x.float() / 127.5 - 1), task.embed(x))


def test_pretrain_resumes_exactly(tmp_path, landmark_ckpt):
    """Resume from the step-2 checkpoint of a 4-step run: steps 3-4 repeat (EMA teacher, centre, RNG, data)."""
    cfg = cfg_for(tmp_path, landmark_ckpt, "lafs", "train.steps=4", "train.ckpt_every=2")
    torch.manual_seed(0)
    train(cfg, progress=False)
    first = losses(tmp_path)
    ckpts = checkpoints_in(tmp_path / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000002.pt", "step_0000004.pt"]
    final = torch.load(ckpts[-1], weights_only=False)["model"]
    torch.manual_seed(123)  # the resumed run must not depend on the global state it starts in
    train(cfg, resume=str(ckpts[0]), progress=False)
    # steps 3-4 repeat to fp32 rounding: after other tests ran, the last bit of the step-4 loss has been
    # seen to differ (the supervised loop's resume test is bitwise)
    assert len(first) == 4 and losses(tmp_path) == pytest.approx(first, rel=1e-6, abs=0)
    again = torch.load(checkpoints_in(tmp_path / "checkpoints")[-1], weights_only=False)["model"]
    # the losses repeat exactly; the weights to the last bit of fp32 (CPU kernels may round a last ulp differently)
    for k in ("teacher.head.mlp.0.weight", "loss_fn.center", "student.backbone.encoder.pos_embedding"):
        torch.testing.assert_close(final[k], again[k], atol=1e-7, rtol=1e-6, msg=k)


# ----------------------------------------------------------------------------- configuration and CLI


IRESNET = [a for a in BASE if not a.startswith(("model.emb", "model.drop_path", "model.token"))] + ["model.name=iresnet"]


def test_config_errors_name_the_key(tmp_path, landmark_ckpt):
    with pytest.raises(ConfigError, match="ssl.landmark_init"):
        build_pretrain_task(load_config(None, BASE + ["ssl.method=lafs"]))
    with pytest.raises(ConfigError, match="token model"):
        build_pretrain_task(load_config(None, IRESNET + ["ssl.method=lafs"]))
    with pytest.raises(ConfigError, match="ssl.local_size"):
        build_pretrain_task(load_config(None, IRESNET + ["ssl.method=dino"]))
    with pytest.raises(ConfigError, match="ssl.shuffle"):
        load_config(None, ["ssl.shuffle=sometimes"])


def test_cli_pretrain_requires_a_method_train_refuses_one_finetune_needs_weights(tmp_path, capsys):
    assert main(["pretrain", f"out_dir={tmp_path}"]) == 2
    assert "ssl.method" in capsys.readouterr().err
    assert main(["train", "ssl.method=dino", f"out_dir={tmp_path}"]) == 2
    assert "lafs pretrain" in capsys.readouterr().err
    assert main(["finetune", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "finetune.from_scratch=true" in err


@pytest.mark.slow
def test_two_process_lafs_pretraining(tmp_path, landmark_ckpt):
    args = [a for a in BASE if not a.startswith("train.batch_size")] + [
        "train.batch_size=16", "ssl.method=lafs", f"ssl.landmark_init={landmark_ckpt}", "train.steps=3",
        f"out_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lafs.cli",
         "pretrain", "--quiet", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(losses(tmp_path)) == 3 and np.isfinite(losses(tmp_path)).all()
    state = torch.load(checkpoints_in(tmp_path / "checkpoints")[-1], weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 3
    assert not torch.equal(state["teacher"]["encoder.pos_embedding"], state["student"]["encoder.pos_embedding"])


def test_blur_scaled_to_the_input_and_koleo_added_to_the_loss(tmp_path, landmark_ckpt):
    """``ssl.blur_sigma`` is in pixels of a 112 px face and scales with the input, like perturb_alpha; with
    ``ssl.koleo_weight`` the loss is the DINO loss + weight x KoLeo of the student's global-view embeddings, both logged."""
    cfg = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "ssl.koleo_weight=0.5", "ssl.centering=sinkhorn")
    task = build_pretrain_task(cfg, log=lambda *_: None)
    scale = task.img_size / 112
    assert task.img_size != 112
    for view in (task.views.global_1, task.views.global_2, task.views.local):
        assert view.blur_sigma == pytest.approx((0.1 * scale, 2.0 * scale))
    assert task.loss_fn.centering == "sinkhorn"
    torch.manual_seed(0)
    out = task(torch.randint(0, 256, (6, 3, task.img_size, task.img_size), dtype=torch.uint8))
    assert out["loss"].item() == pytest.approx(out["dino_loss"].item() + 0.5 * out["koleo"].item(), rel=1e-5)
    assert out["loss"].requires_grad and math.isfinite(out["koleo"].item())
    bad = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "ssl.blur_sigma=[1.0]")
    with pytest.raises(ValueError, match="ssl.blur_sigma"):
        build_pretrain_task(bad, log=lambda *_: None)
    bad = cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit", "ssl.color_jitter=[0.4,0.4]")
    with pytest.raises(ValueError, match="ssl.color_jitter.*4 non-negative"):
        build_pretrain_task(bad, log=lambda *_: None)
    mild = build_pretrain_task(cfg_for(tmp_path, landmark_ckpt, "dino", "model.name=fvit",
                                       "ssl.color_jitter=[0.4,0.4,0.0,0.0]", "ssl.grayscale_prob=0"), log=lambda *_: None)
    assert mild.views.global_1.jitter == (0.4, 0.4, 0.0, 0.0) and mild.views.local.grayscale_prob == 0
