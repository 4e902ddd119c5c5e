"""lafs convert: released weights (official Part fViT / LAFS, insightface IResNet, CVLface ViT / KP-RPE) -> lafs
checkpoints that give the same embeddings.

Each test writes the foreign layout FROM a lafs model with the inverse mapping spelled out here, key by key, as the
source code names them (the fixtures), converts the file back with ``lafs convert`` and compares the embeddings.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from lafs.convert import ConvertError, convert_file, convert_state, read_weights
from lafs.embedder import load_embedder
from lafs.models import build_backbone

ATOL = 1e-5


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, so that a swapped mean / variance would show in the embeddings."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine and m.weight.requires_grad:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _images(n: int = 2, size: int = 112, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------ official Part fViT (ViT_face_landmark_patch8)

def to_official_part_fvit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lafs part_fvit / fvit -> the names of Part_fViT vit_face_withlandmark.py (stn = MobileNetV3_backbone)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("landmark_cnn.trunk.features."):
            i, rest = k.removeprefix("landmark_cnn.trunk.features.").split(".", 1)
            if int(i) <= 2:  # conv_bn(3, 16): Sequential(conv, BN, Hswish) = lafs features 0, 1, 2
                out[f"stn.features.0.{i}.{rest}"] = v
            else:  # MobileBottleneck(...).conv = lafs Bottleneck.block
                out[f"stn.features.{int(i) - 2}.conv.{rest.removeprefix('block.')}"] = v
        elif k.startswith("landmark_cnn.output_layer."):
            out["output_layer.1." + k.rsplit(".", 1)[1]] = v  # Sequential(Dropout, Linear)
        elif k in ("encoder.cls_token", "encoder.pos_embedding"):
            out[k.removeprefix("encoder.")] = v
        elif k.startswith("encoder.to_embedding."):
            out["patch_to_embedding." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("encoder.norm."):
            out["mlp_head.0." + k.rsplit(".", 1)[1]] = v
        else:
            i, rest = k.removeprefix("encoder.blocks.").split(".", 1)
            name = {"norm1.weight": "0.fn.norm.weight", "norm1.bias": "0.fn.norm.bias",
                    "attn.to_qkv.weight": "0.fn.fn.to_qkv.weight",
                    "attn.to_out.weight": "0.fn.fn.to_out.0.weight", "attn.to_out.bias": "0.fn.fn.to_out.0.bias",
                    "norm2.weight": "1.fn.norm.weight", "norm2.bias": "1.fn.norm.bias",
                    "ff.net.0.weight": "1.fn.fn.net.0.weight", "ff.net.0.bias": "1.fn.fn.net.0.bias",
                    "ff.net.3.weight": "1.fn.fn.net.3.weight", "ff.net.3.bias": "1.fn.fn.net.3.bias"}[rest]
            out[f"transformer.layers.{i}.{name}"] = v
    return out


# the official Part fViT-Tiny (dim 512, depth 3, heads 11 x dim_head 64, mlp 2560, 196 landmarks): names and shapes
OFFICIAL_TINY_SHAPES = {
    "stn.features.0.0.weight": (16, 3, 3, 3),
    "stn.features.0.1.running_var": (16,),
    "stn.features.1.conv.3.weight": (16, 1, 3, 3),  # (3, 16, 16, -, RE, 1): depthwise
    "stn.features.4.conv.5.fc.0.weight": (18, 72),  # (5, 72, 40, SE, RE, 2): squeeze-excite 72 -> 18
    "stn.features.4.conv.5.fc.2.weight": (72, 18),
    "stn.features.15.conv.7.weight": (160, 960, 1, 1),
    "stn.features.15.conv.8.num_batches_tracked": (),
    "output_layer.1.weight": (392, 160),
    "output_layer.1.bias": (392,),
    "cls_token": (1, 1, 512),
    "pos_embedding": (1, 197, 512),
    "patch_to_embedding.weight": (512, 192),
    "transformer.layers.2.0.fn.norm.weight": (512,),
    "transformer.layers.2.0.fn.fn.to_qkv.weight": (3 * 11 * 64, 512),
    "transformer.layers.2.0.fn.fn.to_out.0.weight": (512, 704),
    "transformer.layers.2.1.fn.fn.net.0.weight": (2560, 512),
    "transformer.layers.2.1.fn.fn.net.3.weight": (512, 2560),
    "mlp_head.0.bias": (512,),
}


def test_official_part_fvit_tiny_converts_one_to_one_and_gives_the_same_embedding(tmp_path):
    torch.manual_seed(0)
    # the official forward is lafs's part_fvit with the released sampler (patch_layout reference)
    src = build_backbone("part_fvit", "tiny", patch_layout="reference").eval()
    _randomise_bn(src)
    official = to_official_part_fvit(src.state_dict())
    official["loss.weight"] = torch.randn(1000, 512)  # the CosFace classifier inside the released model
    assert len(official) == 334
    for key, shape in OFFICIAL_TINY_SHAPES.items():
        assert tuple(official[key].shape) == shape, key
    path = tmp_path / "Backbone_VITs_Epoch_34.pth"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)  # saved from DDP

    conv = convert_file(path, tmp_path / "out" / "part_fvit_tiny.pt")
    assert (conv.fmt, conv.model, conv.size) == ("part_fvit_official", "part_fvit", "tiny")
    assert len(conv.state) == 333 and conv.dropped == ["loss.weight"]
    o = conv.overrides
    assert (o["patch_layout"], o["attn_scale"], o["pool"], o["heads"], o["dim_head"], o["num_landmarks"]) == \
        ("reference", "dim", "cls", 11, 64, 196)

    emb = load_embedder(tmp_path / "out" / "part_fvit_tiny.pt")
    x = _images()
    with torch.no_grad():
        want = src(x)["embedding"]
        got = emb(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "part_fvit_official" in card and conv.sha256 in card and "patch_layout: reference" in card
    assert "Backbone_VITs_Epoch_34.pth" in card and "loss.weight" in card


def test_lafs_teacher_without_landmark_cnn_becomes_grid_fvit(tmp_path):
    """The LAFS pretraining checkpoint: {'teacher': MultiCropWrapper(backbone, DINO head), 'args': Namespace, ...};
    its ViT has no stn, and the official forward on an image cuts the 8 x 8 grid: lafs fvit."""
    torch.manual_seed(1)
    src = build_backbone("fvit", "tiny").eval()
    teacher = {f"backbone.{k}": v for k, v in to_official_part_fvit(src.state_dict()).items()}
    teacher["backbone.loss.weight"] = torch.randn(300, 512)  # the unused CosFace inside the SSL ViT
    teacher["head.mlp.0.weight"] = torch.randn(64, 512)  # DINOHead
    teacher["head.last_layer.weight_g"] = torch.ones(100, 1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 41,
                "args": argparse.Namespace(arch="vit", out_dim=100000, lr=5e-4)}, path)

    conv = convert_file(path, tmp_path / "lafs_teacher.pt")
    assert (conv.entry, conv.model, conv.size) == ("teacher", "fvit", "tiny")
    assert sorted(conv.dropped) == ["head.last_layer.weight_g", "head.mlp.0.weight", "loss.weight"]
    assert "patch_layout" not in conv.overrides
    x = _images(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(load_embedder(tmp_path / "lafs_teacher.pt")(x), src(x)["embedding"],
                                   atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- insightface arcface_torch IResNet

def test_insightface_iresnet_converts_and_gives_the_same_embedding(tmp_path):
    torch.manual_seed(2)
    src = build_backbone("iresnet", "r18", width=16, embedding_size=128).eval()  # small and fast; 112 px input
    _randomise_bn(src)
    path = tmp_path / "backbone.pth"
    torch.save(src.state_dict(), path)  # arcface_torch: torch.save(backbone.module.state_dict(), ...)

    conv = convert_file(path, tmp_path / "r18.pt")
    assert conv.fmt == "insightface_iresnet" and conv.dropped == []
    assert conv.overrides == {"depth": 18, "width": 16, "img_size": 112, "embedding_size": 128}
    x = _images(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_embedder(tmp_path / "r18.pt")(x), src(x)["embedding"], atol=ATOL, rtol=0)


# insightface arcface_torch iresnet50 / iresnet100 (layers 3-4-14-3 / 3-13-30-3, 512-d, fc over 512 x 7 x 7)
IRESNET_SHAPES = {
    50: {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
         "layer3.13.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.running_var": (512,),
         "bn2.weight": (512,), "fc.weight": (512, 25088), "fc.bias": (512,), "features.weight": (512,)},
    100: {"layer2.12.prelu.weight": (128,), "layer3.29.bn3.num_batches_tracked": (),
          "layer4.0.downsample.1.running_mean": (512,), "fc.weight": (512, 25088)},
}


@pytest.mark.parametrize("depth", [50, 100])
def test_iresnet_50_and_100_key_sets_are_recognised(depth):
    with torch.device("meta"):  # names and shapes only: no memory, no time
        state = build_backbone("iresnet", f"r{depth}").state_dict()
    for key, shape in IRESNET_SHAPES[depth].items():
        assert tuple(state[key].shape) == shape, key
    conv = convert_state(state)
    assert (conv.fmt, conv.model, conv.size) == ("insightface_iresnet", "iresnet", f"r{depth}")
    assert conv.overrides["depth"] == depth and conv.overrides["img_size"] == 112


# --------------------------------------------------------------------------------------- CVLface ViT / KP-RPE

def to_cvlface(sd: dict[str, torch.Tensor], patch: int) -> dict[str, torch.Tensor]:
    """lafs vit / vit_kprpe -> CVLface VisionTransformer(WithKPRPE) names (models/vit/vit.py, vit_kprpe/vit.py)."""
    out = {}
    for k, v in sd.items():
        if k == "encoder.to_embedding.weight":  # Linear on (p1, p2, c) tokens -> Conv2d(3, dim, p, stride p)
            out["patch_embed.proj.weight"] = v.view(v.shape[0], patch, patch, 3).permute(0, 3, 1, 2).contiguous()
        elif k == "encoder.to_embedding.bias":
            out["patch_embed.proj.bias"] = v
        elif k == "encoder.pos_embedding":
            out["pos_embed"] = v
        elif k.startswith("encoder.norm."):
            out[k.removeprefix("encoder.")] = v
        elif k.startswith("encoder.proj."):
            out["feature." + k.removeprefix("encoder.proj.")] = v
        elif k.startswith("encoder.kprpe.linear."):
            out["keypoint_linear." + k.rsplit(".", 1)[1]] = v
        else:
            i, rest = k.removeprefix("encoder.blocks.").split(".", 1)
            name = {"attn.to_qkv.weight": "attn.qkv.weight", "attn.to_out.weight": "attn.proj.weight",
                    "attn.to_out.bias": "attn.proj.bias", "ff.net.0.weight": "mlp.fc1.weight",
                    "ff.net.0.bias": "mlp.fc1.bias", "ff.net.3.weight": "mlp.fc2.weight",
                    "ff.net.3.bias": "mlp.fc2.bias"}.get(rest, rest)  # norm1 / norm2 keep their names
            out[f"blocks.{i}.{name}"] = v
    return out


# CVLface ViT "small" (embed_dim 512, depth 12, 8 heads, mlp_ratio 5, 196 tokens, 512-d output)
CVLFACE_SMALL_SHAPES = {
    "patch_embed.proj.weight": (512, 3, 8, 8), "patch_embed.proj.bias": (512,), "pos_embed": (1, 196, 512),
    "blocks.11.norm1.weight": (512,), "blocks.11.attn.qkv.weight": (1536, 512), "blocks.11.attn.proj.bias": (512,),
    "blocks.11.mlp.fc1.weight": (2560, 512), "blocks.11.mlp.fc2.weight": (512, 2560), "norm.weight": (512,),
    "feature.0.weight": (512, 196 * 512), "feature.1.running_var": (512,), "feature.2.weight": (512, 512),
    "feature.3.num_batches_tracked": (),
}


def test_cvlface_vit_small_from_the_hub_layout_gives_the_same_embedding(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = build_backbone("vit", "small").eval()
    _randomise_bn(src)
    foreign = to_cvlface(src.state_dict(), 8)
    for key, shape in CVLFACE_SMALL_SHAPES.items():
        assert tuple(foreign[key].shape) == shape, key
    foreign["mask_token"] = torch.zeros(1, 1, 512)  # trained with mask_ratio > 0
    # the hub wrapper: CVLFaceRecognitionModel.model = ViTModel, whose .net = VisionTransformer
    hub = tmp_path / "cvlface_adaface_vit_small"
    hub.mkdir()
    save_file({f"model.net.{k}": v for k, v in foreign.items()}, hub / "model.safetensors")
    del foreign

    conv = convert_file(hub / "model.safetensors", tmp_path / "vit_small.pt")
    assert (conv.fmt, conv.model, conv.size) == ("cvlface_vit", "vit", "small")
    assert conv.dropped == ["mask_token"]
    o = conv.overrides
    assert (o["heads"], o["dim_head"], o["attn_scale"], o["pool"], o["mlp_act"]) == (8, 64, "head_dim", "flatten",
                                                                                     "relu6")
    assert "depth 12" in conv.notes[0]  # no saved config: heads from CVLface's 'small' preset
    x = _images(seed=3)
    with torch.no_grad():
        want = src(x)["embedding"]
    del src
    got = load_embedder(tmp_path / "vit_small.pt")(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _kprpe_micro(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("vit_kprpe", "micro", embedding_size=96).eval()  # CVLface's head: embedding = width
    _randomise_bn(model)
    with torch.no_grad():  # W_L starts at zero: give it weights, or KP-RPE would not be tested at all
        model.encoder.kprpe.linear.weight.normal_(0, 0.5)
        model.encoder.kprpe.linear.bias.normal_(0, 0.5)
    return model


def test_cvlface_vit_kprpe_with_a_bgr_config_gives_the_same_embedding(tmp_path):
    src = _kprpe_micro(4)
    foreign = to_cvlface(src.state_dict(), 8)
    assert tuple(foreign["keypoint_linear.weight"].shape) == (49 * 3 * 2, 10)  # buckets x heads x depth, 2 x 5 kp
    folder = tmp_path / "pretrained_model"
    folder.mkdir()
    torch.save({f"net.{k}": v for k, v in foreign.items()}, folder / "model.pt")  # BaseModel.save_pretrained
    # the config save_pretrained writes beside it; BGR: the CVLface model flips its input channels itself
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "color_space": "BGR", "output_dim": 96, "mask_ratio": 0.0,
        "rpe_config": {"name": "KPRPE_shared", "rpe_on": "k", "shared_head": True, "mode": "ctx",
                       "method": "product", "ratio": 1.9, "ctx_type": "rel_keypoint_splithead_unshared",
                       "num_keypoints": 5}}))

    conv = convert_file(folder / "model.pt", tmp_path / "kprpe.pt")
    assert (conv.fmt, conv.model) == ("cvlface_vit_kprpe", "vit_kprpe")
    o = conv.overrides
    assert (o["rpe"], o["kprpe_variant"], o["heads"], o["num_keypoints"], o["img_size"]) == \
        ("kprpe", "multihead", 3, 5, 56)
    assert any("BGR" in n for n in conv.notes)
    emb = load_embedder(tmp_path / "kprpe.pt")
    assert emb.uses_keypoints
    x = _images(size=56, seed=4)
    kp = torch.tensor([[19.0, 26.0], [37.0, 26.0], [28.0, 36.0], [21.0, 46.0], [35.0, 46.0]]).expand(2, 5, 2)
    kp = kp + torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = src(x.flip(1), keypoints=kp)["embedding"]  # what the BGR model computes on an RGB image
    torch.testing.assert_close(emb(x, keypoints=kp), want, atol=ATOL, rtol=0)


def test_cvlface_heads_cannot_be_guessed_for_an_unknown_depth():
    src = build_backbone("vit", "micro", embedding_size=96)
    state = to_cvlface(src.state_dict(), 8)
    with pytest.raises(ConvertError, match="head count is not in the weights"):
        convert_state(state)
    with pytest.raises(ConvertError, match="names 'small'"):  # a saved config that does not fit the weights
        convert_state(state, meta={"name": "small"})


# --------------------------------------------------------------------------------------------- errors, CLI

def test_unknown_layout_lists_the_first_keys(tmp_path, capsys):
    from lafs.cli import main

    path = tmp_path / "mystery.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(2), "head.fc.bias": torch.zeros(2)}, path)
    with pytest.raises(ConvertError, match=r"unknown weight layout.*encoder\.layer\.0\.weight, head\.fc\.bias"):
        convert_file(path, tmp_path / "out.pt")
    assert main(["convert", str(path), "-o", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "mystery.pth" in err and "part_fvit_official" in err and not (tmp_path / "out.pt").exists()


def test_a_known_layout_with_foreign_keys_is_refused(tmp_path):
    src = build_backbone("iresnet", "micro")
    state = src.state_dict()
    state["layer1.0.se.fc1.weight"] = torch.zeros(4, 16)  # an SE-IResNet variant lafs does not build
    with pytest.raises(ConvertError, match=r"insightface_iresnet: 1 keys this layout does not have: layer1\.0\.se"):
        convert_state(state)


def test_pickled_objects_and_lafs_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(2), "extra": ConvertError("not a tensor")}, path)
    with pytest.raises(ConvertError, match="weights_only"):
        read_weights(path)
    ckpt = tmp_path / "lafs.pt"
    torch.save({"config": "model: {}", "model": {"backbone.x": torch.zeros(1)}}, ckpt)
    with pytest.raises(ConvertError, match="already a lafs checkpoint"):
        read_weights(ckpt)


def test_cli_convert_then_finetune_init_loads_every_tensor(tmp_path, capsys):
    from lafs.cli import main

    torch.manual_seed(6)
    src = build_backbone("iresnet", "r18", width=16, embedding_size=128)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "backbone.pth")
    out = tmp_path / "converted" / "r18w16.pt"
    assert main(["convert", str(tmp_path / "backbone.pth"), "-o", str(out), "--from", "insightface_iresnet"]) == 0
    printed = capsys.readouterr().out
    assert "insightface_iresnet" in printed and str(out) in printed
    assert (out.parent / "MODEL_CARD.md").is_file()

    n = len(src.state_dict())
    assert main(["finetune", "model.name=iresnet", "model.size=r18", "model.width=16", "model.embedding_size=128",
                 "data.source=synthetic", "data.num_identities=4", "data.images_per_identity=2", "data.val_pairs=0",
                 "data.workers=0", "augment.preset=none", "train.batch_size=4", "train.steps=1",
                 "train.floors=false", "train.monitors=false", "--init", str(out), "--out", str(tmp_path / "ft"),
                 "--quiet"]) == 0
    log = capsys.readouterr().out
    assert f"[model]: loaded {n} tensors" in log
    assert "skipped" not in log and "left at initialisation" not in log


def test_cli_help_names_every_format(capsys):
    from lafs.cli import main
    from lafs.convert import FORMATS

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in FORMATS)


def test_the_card_of_another_model_is_never_overwritten(tmp_path):
    src = build_backbone("iresnet", "micro")
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    run = tmp_path / "runs" / "checkpoints"
    run.mkdir(parents=True)
    (run / "MODEL_CARD.md").write_text("# Model card: a training run\n")
    with pytest.raises(ConvertError, match="already describes another model"):
        convert_file(tmp_path / "backbone.pth", run / "converted.pt")
    assert (run / "MODEL_CARD.md").read_text() == "# Model card: a training run\n"
    assert not (run / "converted.pt").exists()
    convert_file(tmp_path / "backbone.pth", tmp_path / "zoo" / "r.pt")
    convert_file(tmp_path / "backbone.pth", tmp_path / "zoo" / "r.pt")  # the same output again: its own card
    with pytest.raises(ConvertError, match="already describes another model"):
        convert_file(tmp_path / "backbone.pth", tmp_path / "zoo" / "other.pt")
    with pytest.raises(ConvertError, match="overwrite the weights"):
        convert_file(tmp_path / "backbone.pth", tmp_path / "backbone.pth")
