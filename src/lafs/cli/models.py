"""``lafs models``, ``lafs presets``, ``lafs export`` and ``lafs convert``: the model zoo and model files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config, ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (keys as in lafs.config.Config)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.depth=6")



def models_table(cfg: Config | None = None) -> str:
    """One row per registered backbone and size: params, GMACs, tokens, embedding size."""
    from ..models import BACKBONES, build_backbone, complexity

    rows = []
    entries = [(n, s, {}) for n, e in BACKBONES.items() for s in e.sizes]
    if cfg is not None:
        entries = [(cfg.model.name, cfg.model.size, cfg.model.overrides())]
    for name, size, overrides in entries:
        model = build_backbone(name, size, **overrides)
        c = complexity(model, model.img_size)
        rows.append((
            name, size, f"{model.img_size}x{model.img_size}", f"{c.params / 1e6:.2f}",
            f"{c.macs / 1e9:.3f}", f"{c.total_macs / 1e9:.3f}", str(model.num_tokens or "-"),
            str(model.embedding_size),
        ))
    header = ("backbone", "size", "input", "params (M)", "GMACs", "GMACs+attn", "tokens", "embedding")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    lines.append("GMACs: convolutions + linear layers (the papers' convention); GMACs+attn adds the attention matmuls.")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
    print(models_table(cfg))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_onnx, export_safetensors, format_export, format_safetensors  # torch stays out of --help

    if not (args.onnx or args.safetensors):
        raise ConfigError("lafs export CHECKPOINT --onnx OUT.onnx and/or --safetensors OUT_DIR")
    if args.safetensors:
        print(format_safetensors(export_safetensors(args.checkpoint, args.safetensors)))
    if args.onnx:
        print(format_export(export_onnx(args.checkpoint, args.onnx, opset=args.opset, batch=args.batch,
                                        check=not args.no_check)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Released weights -> a lafs checkpoint (+ MODEL_CARD.md beside it) that eval / embed / finetune --init take."""
    from ..convert import convert_file

    conv = convert_file(args.src, args.out, args.fmt)
    print(conv.summary())
    print(f"wrote {args.out} ({conv.model}-{conv.size}) and {Path(args.out).parent / 'MODEL_CARD.md'}; "
          f"try: lafs eval {args.out} --sets ../shared/data/lfw/lfw.bin")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """The packaged configs and experiment grids: the names ``lafs train`` / ``lafs experiment`` accept."""
    from ..presets import listing

    print(listing())
    return 0



def register(sub) -> None:
    """Add ``models``, ``presets``, ``export`` and ``convert`` to the ``lafs`` subcommands."""
    p = sub.add_parser("models", help="table of registered backbones: params, GMACs at their input size")
    _add_config_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("presets", help="list the packaged configs (lafs train NAME) and experiment grids "
                       "(lafs experiment NAME)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("export", help="checkpoint -> ONNX embedding model, checked against onnxruntime (extra onnx), "
                       "and/or a safetensors folder")
    p.add_argument("checkpoint", help="lafs train / finetune / pretrain checkpoint (.pt)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="output file (written atomically)")
    p.add_argument("--safetensors", metavar="OUT_DIR", help="also or instead: a folder to share the model in, "
                   "model.safetensors (backbone weights, no pickle) + config.yaml + MODEL_CARD.md")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default 17; Part fViT needs >= 16 for GridSample)")
    p.add_argument("--batch", type=int, default=4, help="random batch size of the parity check (default 4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="released weights (official Part fViT / LAFS, insightface IResNet, CVLface "
                       "ViT / KP-RPE) -> a lafs checkpoint for eval / embed / finetune --init",
                       description="Convert a foreign state dict (.pth / .pt / .safetensors) into a lafs checkpoint "
                       "whose config rebuilds the released network, and write MODEL_CARD.md beside it. The format "
                       "is detected from the key names; an unknown layout is an error listing its first keys.")
    p.add_argument("src", help="the released weights file")
    p.add_argument("-o", "--out", required=True, help="lafs checkpoint to write (.pt)")
    p.add_argument("--from", dest="fmt", metavar="FORMAT", help="skip detection: part_fvit_official, "
                   "insightface_iresnet, cvlface_vit or cvlface_vit_kprpe (lafs.convert.FORMATS)")
    p.set_defaults(func=cmd_convert)
