"""``lafs <command>``: the one entry point.

Commands so far: ``models`` (the model zoo table), ``demo`` (the smallest end-to-end step), ``train``,
``pretrain`` (DINO / LAFS), ``finetune``, ``eval`` and ``data`` (pack / bin / subset / align / synth / check). Every
command that runs something takes ``--config FILE`` and dotted ``key=value`` overrides, validated against
``lafs.config``; a bad key or value stops with a message naming it (exit code 2).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (keys as in lafs.config.Config)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.depth=6")


def models_table(cfg: Config | None = None) -> str:
    """One row per registered backbone and size: params, GMACs, tokens, embedding size."""
    from .models import BACKBONES, build_backbone, complexity

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


def cmd_probe(args: argparse.Namespace) -> int:
    """k-NN and linear identification of held-out images of labelled records with a frozen model (eval/probe.py),
    beside the same probes of raw and PCA-whitened pixels."""
    import json

    import numpy as np
    import torch

    from .data.datasets import RecordDataset
    from .eval.embedding import embed_images
    from .eval.floors import PCAWhitening, raw_pixel_embeddings
    from .eval.probe import probe_features, split_probe_gallery
    from .io import atomic_write_bytes

    rec = Path(args.data)
    if not rec.is_file():
        raise ConfigError(f"--data: {rec} not found (a labelled .rec with its .idx)")
    kps_path = rec.with_name(rec.stem + "_kps.npy")
    ds = RecordDataset(rec, keypoints=str(kps_path) if kps_path.is_file() else False)
    gal, pro = split_probe_gallery(ds.labels, args.identities, args.seed)
    idx = np.sort(np.concatenate([gal, pro]))
    images = torch.from_numpy(np.stack([ds._load_chw(int(i)) for i in idx]))
    labels = ds.labels[idx]
    ks = tuple(int(k) for k in args.k.split(","))
    rows = {}
    if args.model:
        from .embedder import load_embedder

        embedder = load_embedder(args.model, args.device)
        kps = ds.keypoints[idx] if ds.keypoints is not None else None
        seen = _probe_geometry(images, kps, embedder.geometry, rec)
        feats = embed_images(embedder, seen, batch_size=args.batch_size, device=args.device).numpy()
        rows[embedder.description] = probe_features(feats, labels, identities=None, seed=args.seed, ks=ks,
                                                    linear=not args.no_linear)
    if args.floors or not args.model:
        rows["raw pixels"] = probe_features(raw_pixel_embeddings(images, args.floor_size), labels, seed=args.seed,
                                            ks=ks, linear=not args.no_linear)
        pca = PCAWhitening().fit(images, components=min(args.floor_components, len(images) - 1), size=args.floor_size)
        rows["PCA-whitened pixels (fitted on these images)"] = probe_features(
            pca.transform(images), labels, seed=args.seed, ks=ks, linear=not args.no_linear)
    first = next(iter(rows.values()))
    print(f"probe: {first['identities']} identities of {rec.name}, {first['gallery']} gallery / training images, "
          f"one probe each (chance {100 * first['chance']:.2f} %)")
    cols = [f"knn{k}" for k in ks] + ([] if args.no_linear else ["linear"])
    width = max(len(n) for n in rows)
    print(f"{'features':<{width}}  " + "  ".join(f"{c + ' %':>9}" for c in cols))
    for name, r in rows.items():
        print(f"{name:<{width}}  " + "  ".join(f"{100 * r[c]:9.2f}" if c in r else f"{'-':>9}" for c in cols))
    if args.out:
        out = Path(args.out) / "probe.json"
        atomic_write_bytes(out, json.dumps({"data": str(rec), "seed": args.seed, "results": rows}, indent=2).encode())
        print(f"wrote {out}")
    return 0


def _probe_geometry(images, kps, geometry: str | None, rec: Path):
    """The records brought to the model's training geometry (from their keypoints; else taken as ArcFace)."""
    from .data.align import to_geometry
    from .geometry import get_geometry

    if geometry is None:
        return images
    out, _, note = to_geometry(images, get_geometry(geometry), kps, name=rec.stem)
    print(note)
    return out


def cmd_embed(args: argparse.Namespace) -> int:
    """Unit-norm embeddings of image files -> .npy (one row per file, in order) + a .txt list of the files."""
    import numpy as np

    from .embedder import load_embedder
    from .inference import embed_files
    from .io import atomic_write, atomic_write_bytes

    embedder = load_embedder(args.model, args.device)
    emb = embed_files(embedder, args.images, args.detect, args.batch_size, not args.no_flip, args.device)
    out = Path(args.out)
    atomic_write(out, lambda fh: np.save(fh, emb))
    atomic_write_bytes(out.with_suffix(".txt"), "".join(f"{p}\n" for p in args.images).encode())
    print(f"{embedder.description}: {emb.shape[0]} images -> {emb.shape[1]}-d unit embeddings, wrote {out} "
          f"(+ {out.with_suffix('.txt').name}: the files, in row order)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .embedder import load_embedder
    from .inference import verify

    embedder = load_embedder(args.model, args.device)
    r = verify(embedder, args.image_a, args.image_b, args.threshold, args.detect)
    line = f"cosine similarity {r['score']:.4f}"
    if r["threshold"] is None:
        line += "; no threshold stored with this model (train with data.val, or pass --threshold)"
    else:
        verdict = "same person" if r["same"] else "different people"
        line += f": {verdict} at threshold {r['threshold']:.4f} ({r['threshold_source']})"
    print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, export_safetensors, format_export, format_safetensors  # torch stays out of --help

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
    from .convert import convert_file

    conv = convert_file(args.src, args.out, args.fmt)
    print(conv.summary())
    print(f"wrote {args.out} ({conv.model}-{conv.size}) and {Path(args.out).parent / 'MODEL_CARD.md'}; "
          f"try: lafs eval {args.out} --sets ../shared/data/lfw/lfw.bin")
    return 0


def cmd_toy_affine(args: argparse.Namespace) -> int:
    from .toy_affine import main as toy_main  # imported here: torch and OpenCV stay out of `lafs --help`

    return toy_main(args.toy_args)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import bench_kprpe, format_kprpe

    result = bench_kprpe(args.size, args.batch, args.rounds, args.warmup, args.threads, args.device)
    print(format_kprpe(result))
    if args.json:
        from .io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(result, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run a grid (a packaged experiments/NAME.yaml or a grid file; what is not done yet), then write its tables."""
    from . import experiment as ex

    grid = ex.load_grid(ex.find_grid(args.name))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    budget = args.budget if args.budget is not None else float(grid["budget"])
    root = Path(args.out or f"runs/experiments/budget-{budget:g}min")
    runs = ex.expand(grid, root, seeds, budget)
    if args.list:
        for r in runs:
            done = (root / r.name / "done.json").is_file()
            print(f"{'done' if done else 'todo'}  {r.name}: lafs {' '.join(r.argv)}"
                  + (f"  [{r.budget:g} min]" if r.budget is not None else "")
                  + (f"  [{r.steps} steps]" if r.steps is not None else ""))
        return 0
    status = {"failed": {}}
    if not args.aggregate:
        print(f"lafs experiment {grid['name']}: {len(runs)} runs in {root}, training budget {budget:g} min per run "
              f"(x the stage's factor)")
        status = ex.run_grid(runs, root, only=args.only)
        print(f"{len(status['ran'])} ran, {len(status['done'])} already done, {len(status['failed'])} failed, "
              f"{len(status['skipped'])} skipped")
    command = (f"lafs experiment {grid['name']} --budget {budget:g}" + (f" --seeds {args.seeds}" if args.seeds else "")
               + (f" --out {args.out}" if args.out else ""))
    _, md = ex.report(grid, runs, root, command)
    print(md)
    name = grid["name"]
    print(f"wrote {root / f'results_{name}.md'} (+ .json)")
    if args.results:
        print(f"updated {ex.update_section(args.results, grid['name'], md)}")
    return 1 if status["failed"] else 0


def cmd_presets(args: argparse.Namespace) -> int:
    """The packaged configs and experiment grids: the names ``lafs train`` / ``lafs experiment`` accept."""
    from .presets import listing

    print(listing())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    lfw = False if args.no_lfw else args.lfw
    summary = run_demo(args.out, args.budget_minutes, lfw, args.dino, args.shots, args.seed, progress=not args.quiet)
    print(format_summary(summary))
    print(f"run folder: {args.out} (one folder per stage with config.yaml, metrics.jsonl, tb/, checkpoints/ and "
          "MODEL_CARD.md; demo.json, roc.png, landmarks.png, attention.png)")
    return 0


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
    from .checkpoint import DiskFullError
    from .train.loop import NonFiniteLossError
    from .train.run import train

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
    if result.val:
        for name, r in result.val.items():
            print(f"{name}: accuracy {r['accuracy'] * 100:.2f} +- {r['accuracy_std'] * 100:.2f} %, AUC {r['auc']:.4f}")
    print(f"run folder: {cfg.out_dir} (config.yaml, metrics.jsonl, tb/, checkpoints/, summary.json)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return cmd_train(args, finetune=True)


def cmd_pretrain(args: argparse.Namespace) -> int:
    return cmd_train(args, pretrain=True)


def _prepare_floors(args: argparse.Namespace, set_paths: list[str], model_path, model_hash: str) -> dict | None:
    """``lafs eval --floors``: fit the PCA floor and build the untrained network before any set is embedded, so a bad
    ``--floor-fit`` fails fast; prints why a floor cannot be computed. None without ``--floors``."""
    if not args.floors:
        return None
    if not set_paths:
        raise ConfigError("--floors scores .bin pair sets: give --sets (or --pairs with --embeddings)")
    from .eval import report

    ctx = report.floor_context(model_path, model_hash, args.floor_fit, color=args.color, size=args.floor_size,
                               components=args.floor_components, max_images=args.floor_max_images,
                               device=args.device)
    for note in ctx["notes"]:
        print(note)
    return ctx


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model file, or precomputed embeddings, on verification sets, the affine-sensitivity curve, IJB-B/C and
    rank-k identification; tables + eval.json + roc.png / sensitivity.png."""
    import time

    from .eval import report

    thresholds = None if args.thresholds == "reference" else args.thresholds
    flip = not args.no_flip
    results, extra, meta = [], [], {"thresholds": args.thresholds, "flip": flip, "flip_mode": args.flip_mode}
    floor_ctx, floor_sets, cache = None, [], None
    if args.embeddings:
        if args.model or not args.pairs:
            raise ConfigError("--embeddings EMB.npy goes with --pairs SET.bin (one embedding row per image, in order), "
                              "without a model file")
        from .data.pairs import read_bin

        floor_sets = [args.pairs]
        floor_ctx = _prepare_floors(args, floor_sets, None, "")
        from .io_safe import load_array

        emb = load_array(args.embeddings, "an N x D embedding array")
        _, issame = read_bin(args.pairs)
        results.append(report.score_pairs(emb, issame, Path(args.pairs).stem, thresholds))
        meta.update(model=f"embeddings {args.embeddings}", flip="as given", flip_mode="as given")
    else:
        if not args.model or not (args.sets or args.affine_curve or args.ijb or args.identification):
            raise ConfigError("lafs eval MODEL --sets a.bin,b.bin [--affine-curve crops.bin] [--ijb ROOT] "
                              "[--identification DIR] (or --embeddings EMB.npy --pairs SET.bin)")
        from .embedder import load_embedder

        embedder = load_embedder(args.model, args.device, amp=args.amp, compile=args.compile)
        meta.update(model=embedder.description, model_hash=embedder.file_hash, precision=embedder.precision)
        cache = None if args.no_cache else (args.cache or str(Path.home() / ".cache" / "lafs" / "embeddings"))
        common = {"batch_size": args.batch_size, "device": args.device, "flip": flip, "flip_mode": args.flip_mode}
        floor_sets = args.sets.split(",") if args.sets else []
        for path in floor_sets:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--sets: {path} not found")
        floor_ctx = _prepare_floors(args, floor_sets, args.model, embedder.file_hash)
        for path in floor_sets:
            start = time.perf_counter()
            emb, issame, cached = report.set_embeddings(embedder, path, embedder.file_hash, color=args.color,
                                                        cache_dir=cache, keypoints_path=args.keypoints, **common)
            r = report.score_pairs(emb, issame, Path(path).stem, thresholds)
            r["seconds"], r["cached"] = time.perf_counter() - start, cached
            results.append(r)
        if args.affine_curve:
            if not Path(args.affine_curve).is_file():
                raise FileNotFoundError(f"--affine-curve: {args.affine_curve} not found")
            r = report.sensitivity_report(embedder, args.affine_curve, args.keypoints, steps=args.steps,
                                          interpolation=args.interpolation, border=args.border, color=args.color,
                                          thresholds=thresholds,
                                          **common)
            from .eval.robustness import format_sensitivity

            extra.append(format_sensitivity(r))
            results.append(r)
        for root in args.ijb.split(",") if args.ijb else []:
            from .eval.ijb import format_ijb_result

            r = report.ijb_report(embedder, root, args.ijb_name, mode=args.ijb_mode, model_hash=embedder.file_hash,
                                  cache_dir=cache, batch_size=args.batch_size, device=args.device)
            extra.append(format_ijb_result(r))
            results.append(r)
        if args.identification:
            r = report.identification_report(embedder, args.identification, **common)
            extra.append(f"{r['name']}: {r['probes']} probes, {r['gallery']} gallery, {r['distractors']} distractors: "
                         + ", ".join(f"rank-{k} {100 * v:.2f} %" for k, v in r["rank"].items()))
            results.append(r)
    floors = None
    if floor_ctx is not None:
        floors = report.floors_report(floor_ctx, floor_sets, color=args.color, flip=flip, flip_mode=args.flip_mode,
                                      thresholds=thresholds, batch_size=args.batch_size, device=args.device,
                                      cache_dir=cache, keypoints_path=args.keypoints)
    print(f"model: {meta['model']}; flip test: {meta['flip']} ({meta['flip_mode']}); thresholds: {args.thresholds}")
    pair_results = [r for r in results if "_dist" in r]
    if pair_results:
        print(report.format_table(pair_results, floors["sets"] if floors else None))
    if floors:
        s = floors["settings"]
        print("floors (same protocol and flip test): raw pixels at each set's own size; "
              + (f"PCA-whitened: {s['components']} components of {s['size']} px pixels, fitted on {floors['fit']}; "
                 if floors["fit"] else "")
              + (f"untrained net: {floors['untrained']}" if floors["untrained"] else "")
              + ". A model is only as good as its margin over these rows.")
    for text in extra:
        print(text)
    if args.out:
        for path in report.write_report(results, args.out, meta, floors):
            print(f"wrote {path}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from .data.pack import pack_images

    print(pack_images(args.folder, args.out, list_file=args.list, keypoints=args.keypoints, checksum=args.checksum,
                      quality=args.quality, skip_bad=args.skip_bad).summary())
    return 0


def cmd_data_detect(args: argparse.Namespace) -> int:
    """5-point keypoints of every image of a .bin (or an image folder, folder order) with the detector."""
    from .data.tools import detect_set

    print(detect_set(args.input, args.out, color=args.color, threshold=args.threshold, upsample=args.upsample,
                     on_miss=args.on_miss, list_file=args.list).summary())
    return 0


def cmd_data_bin(args: argparse.Namespace) -> int:
    from .data.pairs import build_bin, read_bin

    out, sidecar = build_bin(args.pairs, args.images, args.out, keypoints=args.keypoints, detect=args.detect)
    _, issame = read_bin(out)
    print(f"wrote {out}: {len(issame)} pairs ({int(issame.sum())} same, {int((~issame).sum())} different)"
          + (f" and {sidecar}" if sidecar else ""))
    return 0


def cmd_data_subset(args: argparse.Namespace) -> int:
    from .data.datasets import RecordDataset
    from .data.fewshot import fewshot_index, holdout_identities, save_index, unlabelled_index
    from .data.pairs import bin_from_dataset, pairs_from_labels

    dataset = RecordDataset(args.rec, keypoints=bool(args.holdout_pairs))
    labels = dataset.labels
    held = None
    if args.holdout:
        held = holdout_identities(labels, args.holdout, args.holdout_seed)
    elif args.holdout_pairs:
        raise ConfigError("--holdout-pairs needs --holdout K (the identities the pairs are drawn from)")
    if args.unlabelled:
        positions, report = unlabelled_index(labels, args.seed, args.fraction, exclude=held)
    else:
        shots = None if args.shots == "all" else int(args.shots)
        positions, report = fewshot_index(labels, args.fraction, shots, args.seed, allow_fewer=args.allow_fewer,
                                          exclude=held)
    out = save_index(args.out, positions, report)
    print(report.summary() + (f" (excluding {len(held)} held-out identities)" if held is not None else ""))
    print(f"wrote {out} (+ {Path(out).with_suffix('.json').name})")
    if args.holdout_pairs:
        pairs, issame = pairs_from_labels(labels, held, args.pairs, args.holdout_seed)
        written = bin_from_dataset(dataset, pairs, issame, args.holdout_pairs)
        print(f"wrote {written}: {len(issame)} pairs of the {len(held)} held-out identities (validation split)")
    return 0


def cmd_data_align(args: argparse.Namespace) -> int:
    from .data.tools import align_folder

    n = align_folder(args.images, args.keypoints, args.out, args.size, list_file=args.list)
    print(f"aligned {n} images to {args.size}x{args.size} in {args.out} (+ keypoints.npy)")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .data.datasets import encode_image
    from .data.recordio import write_face_records
    from .data.synthetic import generate
    from .io import atomic_write

    total = args.identities * args.images_per_id
    kps = np.empty((total, 5, 2), np.float32)

    def samples():
        stream = generate(args.identities, args.images_per_id, seed=args.seed)
        for i, (img, label, kp) in enumerate(tqdm(stream, total=total, desc="synth", unit="img", disable=not sys.stderr.isatty())):
            kps[i] = kp
            yield label, encode_image(img, quality=args.quality)

    out = Path(args.out)
    n, k = write_face_records(out, samples())
    kps_path = atomic_write(out.with_name(out.stem + "_kps.npy"), lambda fh: np.save(fh, kps))
    print(f"wrote {out} (+ .idx, {kps_path.name}): {n} images of {k} synthetic identities, seed {args.seed}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_file, format_report

    report = check_file(args.file, decode=not args.no_decode)
    print(format_report(report))
    return 1 if report["bad_records"] else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="lafs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lafs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="table of registered backbones: params, GMACs at their input size")
    _add_config_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("experiment", help="run a declarative grid (experiments/NAME.yaml: fewshot, lafs-ablation, "
                       "kprpe-robustness) of ordinary runs over seeds, skipping finished runs, and tabulate it")
    p.add_argument("name", help="grid name (a packaged preset, or experiments/NAME.yaml of the working folder) or "
                   "a grid .yaml file")
    p.add_argument("--budget", type=float, help="training minutes per run, the same for every arm (default: the grid's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the grid's, 0,1,2)")
    p.add_argument("--out", help="root folder of the runs (default: runs/experiments/budget-<budget>min, shared by "
                   "the grids: identical runs are made once)")
    p.add_argument("--only", action="append", metavar="GLOB", help="run only matching run names (+ what they need)")
    p.add_argument("--list", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--aggregate", action="store_true", help="only write the tables from the run folders")
    p.add_argument("--results", metavar="FILE.md", help="also replace this grid's section of FILE.md (docs/results.md)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("presets", help="list the packaged configs (lafs train NAME) and experiment grids "
                       "(lafs experiment NAME)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="the LAFS story on synthetic faces: stage 1, LAFS (+ DINO) pretraining, "
                       "few-shot finetune vs scratch, a table and pictures")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--budget-minutes", type=float, default=8.0,
                   help="scales every stage's steps together (8: about that long on 2 CPU cores)")
    p.add_argument("--lfw", help="also evaluate on this lfw.bin (default: ../shared/data/lfw/lfw.bin if present)")
    p.add_argument("--no-lfw", action="store_true", help="no LFW evaluation")
    p.add_argument("--dino", action=argparse.BooleanOptionalAction, default=None,
                   help="include the DINO arm (default: when the budget is at least 6 minutes)")
    p.add_argument("--shots", type=int, default=2, help="labelled images per identity in the finetune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

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

    p = sub.add_parser("eval", help="verification accuracy, AUC, EER, TAR@FAR of a model file on .bin sets",
                       description="Score a lafs checkpoint (train/finetune/pretrain), a TorchScript or an ONNX "
                       "embedding model on .bin pair sets, or precomputed embeddings of another framework.")
    p.add_argument("model", nargs="?", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("--sets", help="comma-separated .bin files (LFW, CFP-FP, AgeDB-30, ...)")
    p.add_argument("--embeddings", help="N x D .npy, one row per image of --pairs, in its order")
    p.add_argument("--pairs", help="the .bin whose pairs --embeddings belong to")
    p.add_argument("--out", help="folder for eval.json, roc.png and sensitivity.png")
    p.add_argument("--affine-curve", metavar="CROPS.bin",
                   help="detector crops (.bin) + keypoints: accuracy from the crop (t=0) to the aligned face (t=1), "
                   "the KP-RPE paper's affine-sensitivity curve")
    p.add_argument("--keypoints", help="(images, 5, 2) .npy for --affine-curve or keypoint models "
                   "(default: <set>_kps.npy beside the .bin)")
    p.add_argument("--steps", type=int, default=6, help="evenly spaced t in [0, 1] for --affine-curve")
    p.add_argument("--interpolation", choices=("similarity", "linear"), default="similarity",
                   help="similarity: scale^t, t*angle, centre on a line (every step a similarity); "
                   "linear: (1-t) I + t M entry-wise")
    p.add_argument("--border", choices=("constant", "replicate", "reflect"), default="constant",
                   help="fill where a warped crop has no pixels (constant = black, as align_face / insightface)")
    p.add_argument("--ijb", metavar="ROOT", help="IJB-B/C folder(s) with loose_crop/ and meta/ (comma-separated)")
    p.add_argument("--ijb-name", help="ijbb or ijbc (default: the folder name)")
    p.add_argument("--ijb-mode", default="N1D1F1",
                   help="N1/N0 keep/normalise image feature norms, D1/D0 detector-score weighting, F1/F0 flip test")
    p.add_argument("--identification", metavar="DIR",
                   help="rank-1/5/20 from DIR/probe/<id>/*, DIR/gallery/<id>/*, optional DIR/distractors/")
    p.add_argument("--thresholds", choices=("reference", "exact"), default="reference",
                   help="reference: insightface arange(0, 4, 0.01) (comparable with papers); exact: every midpoint")
    p.add_argument("--flip-mode", choices=("sum", "concat"), default="sum")
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.add_argument("--color", choices=("rgb", "bgr"), default="rgb", help="channel order the .bin stores")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="lafs checkpoints under autocast (bf16: CPU or GPU; fp16: GPU); fp32 embeddings out")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (lafs checkpoints; compiles first)")
    p.add_argument("--cache", help="embedding cache folder (default ~/.cache/lafs/embeddings)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--floors", action="store_true",
                   help="also score each set's floors (raw pixels, PCA-whitened pixels, the untrained network): "
                   "rows beside the model's accuracy and a floors block in eval.json")
    p.add_argument("--floor-fit", metavar="PATH",
                   help="unlabelled training images for the PCA floor: .rec, image folder, .bin or uint8 "
                   "N x 3 x H x W .npy, crops in the geometry the model sees (default: the checkpoint run's data.train)")
    p.add_argument("--floor-size", type=int, default=32, help="PCA floor: area-downsampled to this size (default 32)")
    p.add_argument("--floor-components", type=int, default=256, help="PCA floor: principal directions (default 256)")
    p.add_argument("--floor-max-images", type=int, default=20000,
                   help="PCA floor: at most this many fit images, a seeded subsample (default 20000)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("probe", help="k-NN / linear identification of held-out images with a frozen model",
                       description="From labelled records, each identity with >= 2 images gives one probe image "
                       "(seeded); the rest are its gallery (k-NN) or training images (linear). Without a model, "
                       "or with --floors, raw and PCA-whitened pixels are probed the same way.")
    p.add_argument("model", nargs="?", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("--data", required=True, help="labelled .rec (identities the model did not train on)")
    p.add_argument("--identities", type=int, default=1000, help="identities probed, drawn with --seed")
    p.add_argument("--k", default="1,20", help="comma-separated k of the k-NN (1 = nearest; >1 DINO's vote)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--floors", action="store_true", help="also probe raw and PCA-whitened pixels")
    p.add_argument("--floor-size", type=int, default=32)
    p.add_argument("--floor-components", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for probe.json")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("embed", help="unit-norm face embeddings of image files -> .npy",
                       description="Aligned 112x112 crops are embedded as they are; other photos go through the "
                       "optional 5-point detector and alignment (extra detect).")
    p.add_argument("model", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--out", default="embeddings.npy", help="N x D .npy (+ the file list as .txt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.set_defaults(func=cmd_embed)
    verify_p = sub.add_parser("verify", help="cosine score of two face images and the same/different decision")
    verify_p.add_argument("model", help="checkpoint (.pt), TorchScript, .onnx file or safetensors folder")
    verify_p.add_argument("image_a")
    verify_p.add_argument("image_b")
    verify_p.add_argument("--threshold", type=float, help="cosine threshold (default: stored with the model)")
    verify_p.set_defaults(func=cmd_verify)
    for q in (p, verify_p):
        q.add_argument("--detect", choices=("auto", "always", "never"), default="auto",
                       help="auto: detect + align anything that is not a 112x112 crop")
        q.add_argument("--device", default="cpu")

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

    # its options belong to lafs.toy_affine (see `lafs toy-affine --help`); main() hands them over unparsed
    p = sub.add_parser("toy-affine", add_help=False, help="KP-RPE Fig. 1 toy: digits -> affine digits, Abs-PE / RPE "
                       "/ iRPE / KP-RPE (extra toy; options: lafs toy-affine --help)")
    p.set_defaults(func=cmd_toy_affine, toy_args=[])

    bench = sub.add_parser("bench", help="measured cost tables (kprpe: ViT vs iRPE vs KP-RPE, the paper's Table 3)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("kprpe", help="params, GFLOPs, eval and train throughput, measured side by side")
    p.add_argument("--size", default="small", choices=("micro", "small", "base"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each times every model once, interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the measurements here")
    p.set_defaults(func=cmd_bench)

    data = sub.add_parser("data", help="pack, build, subset, align, synthesise and check face data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("pack", help="image folder (identity/image.jpg, or any folder with --list) -> insightface "
                        ".rec/.idx")
    p.add_argument("folder")
    p.add_argument("out", help="output .rec (the .idx is written beside it)")
    p.add_argument("--list", metavar="LIST.csv", help="images to pack: lines 'path,label', paths relative to folder")
    p.add_argument("--keypoints", help="(N, 5, 2) .npy in folder (or --list) order, written to <out>_kps.npy")
    p.add_argument("--checksum", action="store_true", help="store a crc32 per record in <out>_crc32.txt, verified "
                   "on every read and by lafs data check (the .rec/.idx stay MXNet's format)")
    p.add_argument("--quality", type=int, metavar="Q", help="re-encode every image as JPEG at quality Q (1-100); "
                   "default: store the files as they are")
    p.add_argument("--skip-bad", action="store_true", help="leave out files that do not decode, listed in "
                   "<out>_skipped.txt (default: stop naming the file)")
    p.set_defaults(func=cmd_data_pack)
    p = data.add_parser("detect", help="5-point keypoints of a .bin or image folder with the optional detector "
                        '(pip install "lafs-face[detect]") -> <set>_kps.npy')
    p.add_argument("input", help=".bin pair file, or an image folder (identity/image, flat, or with --list)")
    p.add_argument("--list", metavar="LIST.csv", help="the folder's images: lines 'path' or 'path,label'")
    p.add_argument("--upsample", type=int, metavar="N", help="times the detector doubles the image before its scan "
                   "(0-4; default 1 up to 640 px, else 0; each doubling finds 2x smaller faces at ~4x the time)")
    p.add_argument("-o", "--out", help="default: <set>_kps.npy beside the .bin (the sidecar lafs eval reads)")
    p.add_argument("--color", choices=("rgb", "bgr"), default="rgb", help="channel order the .bin stores")
    p.add_argument("--threshold", type=float, default=0.0, help="added to the detector threshold; < 0 finds more")
    p.add_argument("--on-miss", choices=("error", "template"), default="error",
                   help="no face found: stop naming the image, or use the ArcFace template (an aligned crop) and "
                   "list the image in <out>_template.txt")
    p.set_defaults(func=cmd_data_detect)

    p = data.add_parser("bin", help="LFW pairs.txt (or CSV path1,path2,issame) + image folder -> .bin")
    p.add_argument("pairs")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--keypoints", metavar="KPS.npy", help="also write <out>_kps.npy from these (N, 5, 2) keypoints, "
                   "one row per image of the images folder in folder order (what lafs data detect IMAGES writes)")
    p.add_argument("--detect", action="store_true", help="also write <out>_kps.npy with the optional detector")
    p.set_defaults(func=cmd_data_bin)
    p = data.add_parser("subset", help="few-shot index file: fraction of identities x k shots (seeded)")
    p.add_argument("rec")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of identities, chosen at random")
    p.add_argument("--shots", default="all", help="images per identity: an integer or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabelled", action="store_true", help="1-shot unlabelled pretraining set")
    p.add_argument("--allow-fewer", action="store_true", help="take all images of identities with < shots")
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="leave K random identities out of the subset: a validation split of the training identities")
    p.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out identities and their pairs "
                   "(keep it fixed across --shots and --seed so every subset leaves out the same identities)")
    p.add_argument("--holdout-pairs", metavar="VAL.bin", help="write verification pairs of the held-out identities")
    p.add_argument("--pairs", type=int, default=600, help="pairs in --holdout-pairs (half genuine)")
    p.add_argument("-o", "--out", required=True, help="output .npy of dataset positions (+ .json report)")
    p.set_defaults(func=cmd_data_subset)
    p = data.add_parser("align", help="images (identity/image.jpg, flat, or --list) + (N,5,2) keypoints -> aligned "
                        "folder")
    p.add_argument("images")
    p.add_argument("keypoints")
    p.add_argument("out")
    p.add_argument("--list", metavar="LIST.csv", help="the folder's images: lines 'path' or 'path,label'")
    p.add_argument("--size", type=int, default=112)
    p.set_defaults(func=cmd_data_align)
    p = data.add_parser("synth", help="procedural synthetic identities -> .rec/.idx + keypoints")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--images-per-id", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("-o", "--out", required=True, help="output .rec")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("check", help="validate a .rec/.idx/.bin: counts, identities, shots, bad records")
    p.add_argument("file")
    p.add_argument("--no-decode", action="store_true", help="do not decode the images (faster)")
    p.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting KEY=VALUE positionals at the first option (`--out x a=b`): take the rest too
    if args.command == "toy-affine":
        args.toy_args, extra = extra, []
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"lafs: config error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # unknown backbone, size or option
        print(f"lafs: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # bad input files: the message names file and record
        print(f"lafs: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an optional extra is missing: the message names the pip command
        print(f"lafs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
