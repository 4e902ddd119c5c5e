"""``lafs train``, ``lafs pretrain`` and ``lafs finetune``: one parser, three checks of what the config asks for."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from ..config import Config, ConfigError, load_config


def _train_config(args: argparse.Namespace, finetune: bool) -> Config:
    overrides = list(args.overrides)
    config = args.config
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config] + overrides  # `lafs train key=value ...` without a file
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if finetune:
        if args.init:
            overrides.append(f"finetune.init={args.init}")
        if args.landmark_init:
            overrides.append(f"finetune.landmark_init={args.landmark_init}")
    cfg = load_config(config, overrides)
    f = cfg.finetune
    if finetune and not (f.init or f.landmark_init or f.from_scratch):
        raise ConfigError("lafs finetune needs --init (a pretrained checkpoint) and/or --landmark-init "
                          "(a supervised Part fViT whose landmark CNN starts a ViT trained from scratch), or "
                          "finetune.from_scratch=true (the few-shot baseline of a model without a landmark CNN)")
    return cfg


def cmd_train(args: argparse.Namespace, finetune: bool = False, pretrain: bool = False) -> int:
    from ..checkpoint import DiskFullError
    from ..train.loop import NonFiniteLossError
    from ..train.run import train

    cfg = _train_config(args, finetune)
    if pretrain and cfg.ssl.method == "none":
        raise ConfigError("lafs pretrain needs ssl.method=dino or ssl.method=lafs (presets micro/pretrain_*)")
    if not pretrain and cfg.ssl.method != "none":
        raise ConfigError(f"ssl.method={cfg.ssl.method} is self-supervised pretraining: run `lafs pretrain`")
    try:
        result = train(cfg, resume=args.resume, progress=not args.quiet, resume_anyway=args.resume_anyway)
    except NonFiniteLossError as err:
        print(f"lafs: training stopped: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a checkpoint's DiskFullError names its file and what is intact; other writes (logs) say what the system said
        print(f"lafs: error: {err if isinstance(err, DiskFullError) else f'the disk is full: {err}'}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 says it once
    if result.val:
        for name, r in result.val.items():
            print(f"{name}: accuracy {r['accuracy'] * 100:.2f} +- {r['accuracy_std'] * 100:.2f} %, AUC {r['auc']:.4f}")
    print(f"run folder: {cfg.out_dir} (config.yaml, metrics.jsonl, tb/, checkpoints/, summary.json)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return cmd_train(args, finetune=True)


def cmd_pretrain(args: argparse.Namespace) -> int:
    return cmd_train(args, pretrain=True)



def register(sub) -> None:
    """Add ``train``, ``pretrain`` and ``finetune`` to the ``lafs`` subcommands."""
    commands = {"train": ("supervised training from scratch (margin heads, Partial FC, augmentations)", cmd_train),
                "pretrain": ("self-supervised pretraining on unlabelled faces: DINO or LAFS (ssl.method)", cmd_pretrain),
                "finetune": ("supervised finetuning of a pretrained backbone (LAFS landmark options a/b/c)",
                             cmd_finetune)}
    for name, (helptext, func) in commands.items():
        p = sub.add_parser(name, help=helptext, description=f"{helptext}. Multi-GPU / multi-node: "
                           f"torchrun --nproc_per_node N -m lafs.cli {name} ...")
        p.add_argument("config", nargs="?", default=None,
                       help="YAML config file, or a packaged preset name (micro/supervised_synthetic; lafs presets)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-3")
        p.add_argument("--out", help="run folder (= out_dir=...)")
        p.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from a checkpoint file, or (no value) the run folder's latest that reads")
        p.add_argument("--resume-anyway", action="store_true",
                       help="resume although the checkpoint's run had another model, head, data, batch size, world "
                       "size, seed or thread count (listed; not bit-exact); implies --resume")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "finetune":
            p.add_argument("--init", help="pretrained checkpoint (LAFS/DINO teacher or supervised) or safetensors folder")
            p.add_argument("--landmark-init", help="supervised Part fViT checkpoint for the landmark CNN; alone: "
                           "the few-shot 'scratch' baseline (random ViT, trained CNN)")
        p.set_defaults(func=func)
