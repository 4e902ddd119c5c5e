"""``lafs demo``: the whole LAFS story on the embedded synthetic faces, on a laptop CPU, in minutes.

1. **Stage 1** (Part fViT, BMVC 2022, §3): a supervised Part fViT-micro learns its landmark CNN from identity labels
   (identities 0..63).
2. **Pretraining** (LAFS, CVPR 2024, §3): LAFS on the unlabelled images of identities 0..127, landmark CNN frozen; DINO
   on the same images when the budget allows.
3. **Few-shot finetune** (LAFS §4, Table 3): identities 64..127 with ``shots`` labelled images each, from the LAFS
   teacher, from the DINO teacher, and from scratch (a random ViT with the stage-1 landmark CNN, the paper's baseline).
4. **Evaluation**: verification pairs of identities 128..175, never seen by any stage; plus LFW when
   ``../shared/data/lfw/lfw.bin`` or ``--lfw`` exists.

Every stage is an ordinary ``lafs train`` / ``pretrain`` / ``finetune`` run in its own folder of the demo folder
(``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` with ``MODEL_CARD.md``). The demo folder also gets
``demo.json`` (the table's numbers), ``roc.png``, ``landmarks.png`` (the landmark CNN before / after stage 1
on held-out faces) and ``attention.png`` (the LAFS-finetuned model's last-layer CLS attention over its landmark
tokens on the same faces). ``budget_minutes`` is shared out between the stages as training minutes (``BUDGET_SHARE``).
Compared arms train **equal steps**, as in the experiment runner's ``steps_shared_by``: the first arm of a comparison
(LAFS among the pretrainings, scratch among the finetunes) times its first steps and fixes its count from its share;
the other arms train exactly that count (``train.steps``), so load on the machine cannot hand one arm fewer steps.
The table and ``demo.json`` give the steps every arm trained. Every number printed is measured in the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..io import atomic_write_bytes

# ../shared/data beside the checkout (the README's layout), seen from the working folder or from the source tree
SHARED_LFW = [Path("../shared/data/lfw/lfw.bin"),
              Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lfw" / "lfw.bin"]
IDS_STAGE1, IDS_ALL, IDS_VAL, IMAGES = 64, 128, 48, 16
MODEL = ["model.name=part_fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0",
         "model.drop_path=0.0"]
# each stage's share of --budget-minutes, as training minutes (train.budget_minutes: its first steps are timed and
# fix its step count on this machine); the rest of the budget is data, evaluation (LFW included) and pictures.
# Only the first arm of a comparison is timed; the others train its count (equal steps, not equal minutes).
BUDGET_SHARE = {"stage1": 0.32, "pretrain": 0.14, "finetune": 0.05}
# The stages' epoch schedules as fractions of their runs (lafs.train.schedules), as in configs/micro: a stage of a
# few dozen steps would otherwise keep the prototype layer frozen for its first epoch (64 steps of pretraining) and
# beta at 1000 for its first 8 epochs (32 steps at 2 shots; the reference's epochs 0/8/14/21/28 of 34). The lr
# warm-ups stay 10 steps: fixed steps are exact while a budgeted arm times its first steps (equal-step arms alike).
SSL_SCHEDULES = ["ssl.freeze_last_layer_fraction=0.1"]
BETA_SCHEDULE = "finetune.beta_fractions=[0.0, 0.235, 0.412, 0.618, 0.824]"


def _budget(stage: str, budget_minutes: float) -> str:
    return f"train.budget_minutes={BUDGET_SHARE[stage] * budget_minutes:.4g}"


def _steps(first: tuple[str, dict] | None, stage: str, budget_minutes: float) -> list[str]:
    """The step count of one arm of a comparison: the first arm (``first`` is None) times its steps within its
    budget share; every later arm trains the first arm's count, ``first = (its folder name, its stage record)``."""
    if first is None:
        return [_budget(stage, budget_minutes)]
    return [f"train.steps={first[1]['steps']}", "train.epochs=null", "train.budget_minutes=null"]


def _data(num_identities: int, val_pairs: int, seed: int) -> list[str]:
    return ["data.source=synthetic", f"data.num_identities={num_identities}", f"data.images_per_identity={IMAGES}",
            f"data.val_identities={IDS_VAL}", f"data.val_pairs={val_pairs}", "data.workers=0", f"data.seed={seed}"]


def _run(overrides: list[str], progress: bool, log) -> tuple[dict, Path]:
    from ..checkpoint import best_or_latest
    from ..train.run import train

    cfg = load_config(None, overrides)
    start = time.perf_counter()
    result = train(cfg, progress=progress)
    ckpt = best_or_latest(Path(cfg.out_dir) / "checkpoints")
    log(f"  {Path(cfg.out_dir).name}: {result.step} steps in {time.perf_counter() - start:.0f} s")
    return {"seconds": time.perf_counter() - start, "steps": result.step, "val": result.val}, ckpt


def _heldout_faces(img_size: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Four faces of identities no stage saw, as model input ([-1, 1], model size) and as uint8 pictures."""
    from ..data.synthetic import SyntheticFaces

    faces = SyntheticFaces(IDS_ALL + IDS_VAL, seed=seed)
    imgs = np.stack([faces.render(IDS_ALL + i, 900)[0] for i in range(4)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(img_size,) * 2, mode="bilinear", antialias=True)
    return x, ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _landmark_picture(stage1_ckpt: Path, seed: int) -> bytes:
    """Held-out faces with the landmarks of the CNN at initialisation (top) and after stage 1 (bottom)."""
    from ..checkpoint import read_checkpoint, stored_config
    from ..embedder import backbone_from_state
    from ..models import build_backbone
    from ..viz import landmark_overlay, png_bytes, tile

    state = read_checkpoint(stage1_ckpt, need_model=True)
    after, _ = backbone_from_state(stage1_ckpt, state, "cpu")
    cfg = stored_config(stage1_ckpt, state)
    torch.manual_seed(cfg.train.seed)  # the run's own initialisation
    before = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides()).eval()
    x, small = _heldout_faces(before.img_size, seed)
    rows = []
    with torch.no_grad():
        for model, colour in ((before, (255, 200, 0)), (after, (255, 40, 40))):
            lm = model(x)["landmarks"].numpy()
            rows += [landmark_overlay(small[i], lm[i], model.patch_size, colour) for i in range(4)]
    return png_bytes(tile(rows, columns=4))


def _attention_picture(ckpt: Path, seed: int) -> bytes:
    """Held-out faces with the finetuned model's last-layer CLS attention over its landmark tokens."""
    from ..embedder import load_backbone
    from ..viz import attention_overlay, cls_attention, png_bytes, tile

    model, _ = load_backbone(ckpt)
    x, small = _heldout_faces(model.img_size, seed)
    weights, token_xy = cls_attention(model, x)
    return png_bytes(tile([attention_overlay(small[i], weights[i], None if token_xy is None else token_xy[i],
                                             model.patch_size) for i in range(4)], columns=4))


def _evaluate(ckpt: Path, sets: dict) -> dict:
    """Per set ``name -> (images, issame)``: 10-fold accuracy, AUC, TAR@FAR, and the distances for the ROC picture."""
    from ..embedder import load_embedder
    from ..eval.embedding import embed_images
    from ..eval.metrics import pair_distances, ten_fold_accuracy

    emb = load_embedder(ckpt)
    out = {}
    for name, (images, issame) in sets.items():
        e = embed_images(emb, images).numpy()  # once, for the protocol and the ROC picture
        r = ten_fold_accuracy(e[0::2], e[1::2], issame)
        out[name] = {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "auc": r["auc"],
                     "tar_at_far": {str(k): v for k, v in r["tar_at_far"].items()},
                     "_dist": pair_distances(e[0::2], e[1::2]), "_issame": np.asarray(issame, bool)}
    return out


def run_demo(out_dir: str | Path = "runs/demo", budget_minutes: float = 8.0, lfw: str | Path | bool | None = None,
             dino: bool | None = None, shots: int = 2, seed: int = 0, progress: bool = True, log=print) -> dict:
    """Run the pipeline of the module docstring; returns the summary written to ``demo.json``.

    ``lfw``: a path, ``None`` (``../shared/data/lfw/lfw.bin`` when present) or ``False`` (no LFW evaluation)."""
    from ..checkpoint import checkpoints_in
    from ..data.fewshot import save_index
    from ..data.pairs import load_bin
    from ..data.synthetic import SyntheticFaces, synthetic_pairs
    from ..viz import roc_png

    if budget_minutes <= 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every stage starts a fresh run, and a fresh run refuses a folder holding one (lafs.train.run_folder)
    done = [d.name for d in sorted(out.iterdir()) if d.is_dir() and checkpoints_in(d / "checkpoints")]
    if done:
        raise ValueError(f"{out} already holds a demo ({', '.join(done)}); use another --out, or remove it")
    if lfw is False:
        lfw_path = None
    else:
        lfw_path = Path(lfw) if lfw else next((p for p in SHARED_LFW if p.is_file()), None)
    if lfw_path is not None and not lfw_path.is_file():
        raise FileNotFoundError(f"--lfw: {lfw_path} not found")
    dino = budget_minutes >= 6 if dino is None else dino
    start = time.perf_counter()
    log(f"lafs demo: budget {budget_minutes:g} min, synthetic faces (stage 1: {IDS_STAGE1} identities; pretraining: "
        f"{IDS_ALL} unlabelled; few-shot: identities {IDS_STAGE1}..{IDS_ALL - 1} x {shots} shots; test: "
        f"{IDS_VAL} unseen identities)" + (f"; LFW: {lfw_path}" if lfw_path else ""))
    stages = {}

    log("1/4 stage 1: supervised Part fViT learns its landmark CNN")
    stages["stage1"], stage1 = _run(MODEL + _data(IDS_STAGE1, 200, seed) + [
        "head.name=cosface", "optim.lr=2e-3", "optim.warmup_steps=10", "augment.preset=flip",
        "train.batch_size=64", _budget("stage1", budget_minutes), "train.log_every=10",
        f"out_dir={out / 'stage1_supervised'}"], progress, log)

    pre_common = ["model.token_init=trunc_normal", "ssl.out_dim=1024", "ssl.hidden_dim=256", "ssl.bottleneck_dim=64",
                  "ssl.warmup_teacher_temp=0.02", "ssl.teacher_temp=0.02", "ssl.momentum_teacher=0.996",
                  "ssl.num_local=4", f"ssl.landmark_init={stage1}", "optim.lr=5e-4", "optim.lr_scale_batch=256",
                  "optim.warmup_steps=10", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
                  "optim.clip_grad=3.0", "optim.clip_mode=per_param", "train.batch_size=32",
                  "train.log_every=10", *SSL_SCHEDULES]
    teachers, first = {}, None
    methods = ["lafs"] + (["dino"] if dino else [])
    for method in methods:
        log(f"2/4 pretraining: {method.upper()} on unlabelled faces (the stage-1 landmark CNN frozen)"
            + (f", {first[1]['steps']} steps like {first[0]}" if first else ""))
        extra = ["ssl.method=lafs", "ssl.subset_size=9", "ssl.perturb_alpha=2.0", "ssl.shuffle=student"] \
            if method == "lafs" else ["ssl.method=dino"]
        name = f"pretrain_{method}"
        stages[name], teachers[method] = _run(
            MODEL + _data(IDS_ALL, 0, seed) + pre_common + extra + _steps(first, "pretrain", budget_minutes)
            + [f"out_dir={out / name}"], progress, log)
        if first:
            stages[name]["steps_of"] = first[0]
        first = first or (name, stages[name])

    positions = np.array([i * IMAGES + j for i in range(IDS_STAGE1, IDS_ALL) for j in range(shots)], np.int64)
    index = save_index(out / f"fewshot_{shots}shot.npy", positions)
    fine = MODEL + _data(IDS_ALL, 0, seed) + [
        f"data.index={index}", "model.drop_path=0.1", "model.token_init=trunc_normal", "head.name=cosface",
        "optim.lr=1e-3", "optim.warmup_steps=10", "augment.preset=flip", "finetune.landmark=c", BETA_SCHEDULE,
        "train.batch_size=32", "train.log_every=10"]
    arms = {"scratch": [f"finetune.landmark_init={stage1}"]}
    for method, ckpt in teachers.items():
        arms[method] = [f"finetune.init={ckpt}"]
    faces = SyntheticFaces(IDS_ALL + IDS_VAL, seed=seed)
    images, issame, _ = synthetic_pairs(faces, 400, seed=seed + 1, identities=range(IDS_ALL, IDS_ALL + IDS_VAL))
    sets = {"heldout": (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), issame)}
    if lfw_path is not None:
        sets["lfw"] = load_bin(lfw_path)
    results, finetuned, first = {}, {}, None
    for arm, extra in arms.items():
        log(f"3/4 few-shot finetune ({shots} shots x {IDS_ALL - IDS_STAGE1} identities) from {arm}"
            + (f", {first[1]['steps']} steps like {first[0]}" if first else ""))
        name = f"finetune_{arm}"
        stages[name], ckpt = _run(fine + extra + _steps(first, "finetune", budget_minutes)
                                  + [f"out_dir={out / name}"], progress, log)
        if first:
            stages[name]["steps_of"] = first[0]
        first = first or (name, stages[name])
        finetuned[arm] = ckpt
        log(f"4/4 evaluating {arm}")
        results[arm] = _evaluate(ckpt, sets)

    written = [atomic_write_bytes(out / "landmarks.png", _landmark_picture(stage1, seed)),
               atomic_write_bytes(out / "attention.png", _attention_picture(finetuned["lafs"], seed))]
    def curves(name):
        return [(f"{a} ({100 * r[name]['accuracy']:.1f} %)", r[name]["_dist"], r[name]["_issame"])
                for a, r in results.items()]

    png = roc_png(curves("heldout"), f"{shots}-shot finetune, held-out synthetic identities",
                  more=[("LFW (real faces)", curves("lfw"))] if lfw_path else [])
    if png is not None:
        written.append(atomic_write_bytes(out / "roc.png", png))
    summary = {
        "budget_minutes": budget_minutes, "seconds": time.perf_counter() - start, "shots": shots, "seed": seed,
        "lfw": str(lfw_path) if lfw_path else None,
        "results": {a: {"pretrain_steps": stages[f"pretrain_{a}"]["steps"] if f"pretrain_{a}" in stages else None,
                        "finetune_steps": stages[f"finetune_{a}"]["steps"]}
                    | {k: v for k, v in r["heldout"].items() if not k.startswith("_")}
                    | ({"lfw_accuracy": r["lfw"]["accuracy"], "lfw_auc": r["lfw"]["auc"]} if lfw_path else {})
                    for a, r in results.items()},
        "stages": stages,
        "pictures": [str(p) for p in written],
    }
    atomic_write_bytes(out / "demo.json", json.dumps(summary, indent=2).encode())
    return summary


def format_summary(s: dict) -> str:
    lfw = s["lfw"] is not None
    head = ("| pretraining | pretraining steps | finetune steps | held-out accuracy | AUC | TAR@FAR=1e-2 |"
            + (" LFW accuracy |" if lfw else ""))
    lines = [f"few-shot finetune ({s['shots']} shots) on synthetic identities, tested on {IDS_VAL} unseen ones "
             f"(400 pairs, 10-fold); {s['seconds'] / 60:.1f} min in all; compared arms train equal steps", "", head,
             "|---|---|---|---|---|---|" + ("---|" if lfw else "")]
    for arm, r in s["results"].items():
        tar = r["tar_at_far"].get("0.01")
        pre = r.get("pretrain_steps")
        row = (f"| {arm} | {'-' if pre is None else pre} | {r.get('finetune_steps', '?')} | "
               f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} % | {r['auc']:.3f} | "
               f"{'-' if tar is None else f'{100 * tar:.1f} %'} |")
        if lfw:
            row += f" {100 * r['lfw_accuracy']:.2f} % |"
        lines.append(row)
    lines.append("")
    lines.append("pictures: " + ", ".join(s["pictures"]))
    return "\n".join(lines)
