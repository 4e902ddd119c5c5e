"""``lafs demo``: the whole LAFS story on the embedded synthetic faces (or, with ``--real``, on CelebA-64), on a
laptop CPU, in minutes.

1. **Stage 1** (Part fViT, BMVC 2022, §3): a supervised Part fViT-micro learns its landmark CNN from identity labels
   (synthetic identities 0..63; ``--real``: the first half of the CelebA-64 identities).
2. **Pretraining** (LAFS, CVPR 2024, §3): LAFS on the unlabelled images of identities 0..127 (``--real``: every
   training image), landmark CNN frozen; DINO on the same images when the budget allows.
3. **Few-shot finetune** (LAFS §4, Table 3): identities 64..127 (``--real``: 10 % of the second half) with ``shots``
   labelled images each, from the LAFS teacher, from the DINO teacher, and from scratch (a random ViT with the
   stage-1 landmark CNN, the paper's baseline).
4. **Evaluation**: 6,000 verification pairs of 300 identities never seen by any stage (``--real``: celeba64_val,
   985 other identities); plus LFW when ``../shared/data/lfw/lfw.bin`` or ``--lfw`` exists. Beside the arms, the
   three **floors** scored the same way (raw-pixel cosine, pixels PCA-whitened on the pretraining's unlabelled
   images, the untrained network; ``lafs.eval.floors``).

Every stage is an ordinary ``lafs train`` / ``pretrain`` / ``finetune`` run in its own folder of the demo folder
(``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` with ``MODEL_CARD.md``). The demo folder also gets
``demo.json`` (the table's numbers), ``roc.png`` (the arms and, dashed, the floors), ``landmarks.png`` (the landmark
CNN before / after stage 1 on held-out faces, rows labelled, with the landmarks' spread over the face) and
``attention.png`` (the LAFS-finetuned model's last-layer CLS attention over its landmark tokens, with a colour bar
and a caption). ``budget_minutes`` is shared out between the stages as training minutes (``BUDGET_SHARE``).
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
# 64 images per identity: with 16, the 1,024 images of stage 1 are a small pool that a micro model memorises (fViT-micro's
# CosFace loss fell to 0.03 in 900 steps while its unseen-pair accuracy fell from 83 to 80 %); 64 measured 91.92 %
# against 89.50 % for Part fViT-micro at 900 steps (docs/results.md, "Calibrating the demo")
IDS_STAGE1, IDS_ALL, IDS_VAL, IMAGES = 64, 128, 300, 64
# held-out pairs: 600 per fold, so a fold's accuracy std is 1-2 points (binomial: 1.9 at 70 %, 1.2 at 90 %); with 1,200
# pairs (120 a fold) it was 4-6 points at the few-shot arms' 70 %, wider than any difference pretraining made
HELDOUT_PAIRS = 6000
# strength of the synthetic faces' per-image nuisances (SyntheticConfig.scaled), calibrated so that the supervised
# stage separates unseen identities well while few-shot training from scratch does not (README, the demo section)
NUISANCE = 1.0
# ... with the nuisances that destroy identity information switched off (occluders, blur, low resolution, noise,
# grayscale); pose, expression, light, colour cast and background clutter stay at full strength. Measured with
# micro/supervised_synthetic (Part fViT-micro, 64 identities, 900 steps, 1,200 pairs of 96 unseen identities):
# 87.75 % against 80.58 % with every nuisance, floors 64-66 % (raw / PCA-whitened pixels); nuisance 0.5 on all of them
# gave 89.75 % but lifted the PCA floor to 77 % (README, the demo section)
SYNTHETIC = {"occluder_prob": 0.0, "blur_prob": 0.0, "lowres_prob": 0.0, "noise_prob": 0.0, "grayscale_prob": 0.0}
# default training minutes; the whole run adds data, evaluation (LFW: 12,000 images per model), floors and pictures:
# measured 11.0 min at 8 synthetic minutes on 2 CPU cores (README), so 6 keeps the demo under 10
SYNTHETIC_BUDGET = 6.0
REAL_FEWSHOT_FRACTION = 0.1  # --real: the share of the second-half identities the few-shot finetunes take
REAL_BUDGET = 22.0  # --real: the whole run stays under 30 minutes on 2 CPU cores
MODEL = ["model.name=part_fvit", "model.size=micro", "model.dropout=0.0", "model.emb_dropout=0.0",
         "model.drop_path=0.0"]
# each stage's share of --budget-minutes, as training minutes (train.budget_minutes: its first steps are timed and
# fix its step count on this machine); the rest of the budget is data, evaluation (LFW included) and pictures.
# Only the first arm of a comparison is timed; the others train its count (equal steps, not equal minutes).
BUDGET_SHARE = {"stage1": 0.4, "pretrain": 0.13, "finetune": 0.04}
# The stages' epoch schedules as fractions of their runs (lafs.train.schedules), as in configs/micro: a stage of a
# few dozen steps would otherwise keep the prototype layer frozen for its first epoch (64 steps of pretraining) and
# beta at 1000 for its first 8 epochs (32 steps at 2 shots; the reference's epochs 0/8/14/21/28 of 34). The lr
# warm-ups stay 10 steps: fixed steps are exact while a budgeted arm times its first steps (equal-step arms alike).
SSL_SCHEDULES = ["ssl.freeze_last_layer_fraction=0.1"]
# Pretraining's lr and teacher momentum: lr 2e-3 at batch 32, not DINO's 5e-4 x batch / 256 (6.25e-5 here), and
# momentum 0.99, not 0.996: a run of a few hundred steps otherwise barely moves (measured on the demo's faces, 600 steps:
# teacher 71.08 % against 69.42 % at lr 5e-4 / 0.996, teacher drift 0.142 against 0.039; docs/results.md)
PRETRAIN_OPTIM = ["optim.lr=2e-3", "ssl.momentum_teacher=0.99"]
# the few-shot finetunes start their CosFace centres at each identity's mean embedding (finetune.head_init=imprint,
# lafs.train.imprint): with random centres the first steps wash out what pretraining learned (docs/results.md)
FINETUNE_HEAD = "finetune.head_init=imprint"
BETA_SCHEDULE = "finetune.beta_fractions=[0.0, 0.235, 0.412, 0.618, 0.824]"


def _budget(stage: str, budget_minutes: float) -> str:
    return f"train.budget_minutes={BUDGET_SHARE[stage] * budget_minutes:.4g}"


def _steps(first: tuple[str, dict] | None, stage: str, budget_minutes: float) -> list[str]:
    """The step count of one arm of a comparison: the first arm (``first`` is None) times its steps within its
    budget share; every later arm trains the first arm's count, ``first = (its folder name, its stage record)``."""
    if first is None:
        return [_budget(stage, budget_minutes)]
    return [f"train.steps={first[1]['steps']}", "train.epochs=null", "train.budget_minutes=null"]


def _run(overrides: list[str], progress: bool, log) -> tuple[dict, Path]:
    from ..checkpoint import best_or_latest
    from ..train.run import train

    cfg = load_config(None, overrides)
    start = time.perf_counter()
    result = train(cfg, progress=progress)
    ckpt = best_or_latest(Path(cfg.out_dir) / "checkpoints")
    log(f"  {Path(cfg.out_dir).name}: {result.step} steps in {time.perf_counter() - start:.0f} s")
    return {"seconds": time.perf_counter() - start, "steps": result.step, "val": result.val}, ckpt


def _to_model(imgs: np.ndarray, img_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 B x H x W x 3 -> (model input in [-1, 1] at ``img_size``, the same as uint8 pictures)."""
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(img_size,) * 2, mode="bilinear", antialias=True)
    return x, ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)


class SyntheticSource:
    """The embedded synthetic faces (``lafs.data.synthetic``) at nuisance strength ``NUISANCE``: stage 1 on
    identities 0..63, pretraining on the unlabelled images of 0..127, few-shot on 64..127, tests on 128..223."""

    name = "synthetic"

    def __init__(self, out: Path, shots: int, seed: int, lfw_path: Path | None):
        from ..data.synthetic import SyntheticConfig, SyntheticFaces

        self.out, self.shots, self.seed, self.lfw_path = out, shots, seed, lfw_path
        self.faces = SyntheticFaces(IDS_ALL + IDS_VAL, seed=seed, config=SyntheticConfig.scaled(NUISANCE, **SYNTHETIC))

    def describe(self) -> str:
        return (f"synthetic faces at nuisance {NUISANCE:g}, no occluders / blur / noise (stage 1: {IDS_STAGE1} "
                f"identities; pretraining: {IDS_ALL} unlabelled; few-shot: identities {IDS_STAGE1}..{IDS_ALL - 1} "
                f"x {self.shots} shots; test: {HELDOUT_PAIRS} pairs of {IDS_VAL} unseen identities)")

    def _data(self, num_identities: int, val_pairs: int, val_identities: int = 0) -> list[str]:
        return ["data.source=synthetic", f"data.num_identities={num_identities}",
                f"data.images_per_identity={IMAGES}", f"data.val_identities={val_identities}",
                f"data.val_pairs={val_pairs}",
                f"data.nuisance={NUISANCE}", "data.synthetic={" + ", ".join(f"{k}: {v}" for k, v in SYNTHETIC.items())
                + "}", "data.workers=0", f"data.seed={self.seed}"]

    def stage_data(self, stage: str) -> list[str]:
        from ..data.fewshot import save_index

        if stage == "stage1":
            # its validation pairs (which choose its checkpoint) come from identities 64..127, never the test's
            return self._data(IDS_STAGE1, 200, IDS_ALL - IDS_STAGE1)
        if stage == "pretrain":
            return self._data(IDS_ALL, 0)
        positions = np.array([i * IMAGES + j for i in range(IDS_STAGE1, IDS_ALL) for j in range(self.shots)])
        index = save_index(self.out / f"fewshot_{self.shots}shot.npy", positions.astype(np.int64))
        return self._data(IDS_ALL, 0) + [f"data.index={index}"]

    def eval_sets(self) -> dict:
        from ..data.pairs import load_bin
        from ..data.synthetic import synthetic_pairs

        images, issame, _ = synthetic_pairs(self.faces, HELDOUT_PAIRS, seed=self.seed + 1,
                                            identities=range(IDS_ALL, IDS_ALL + IDS_VAL))
        sets = {"heldout": (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), issame)}
        if self.lfw_path is not None:
            sets["lfw"] = load_bin(self.lfw_path)
        return sets

    def fit_images(self) -> torch.Tensor:
        """The pretraining's unlabelled faces (identities 0..127, all their images)."""
        ids = np.repeat(np.arange(IDS_ALL), IMAGES).tolist()
        imgs = self.faces.batch(ids, np.tile(np.arange(IMAGES), IDS_ALL).tolist())[0]
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()

    def heldout_faces(self, img_size: int) -> tuple[torch.Tensor, np.ndarray]:
        """Four faces of identities no stage saw, as model input and as uint8 pictures."""
        return _to_model(np.stack([self.faces.render(IDS_ALL + i, 900)[0] for i in range(4)]), img_size)


# --real: CelebA-64 (../shared/data/README.md). Identities are split by label: stage 1 learns from the labels of
# the first half, the pretrainings see every training image without labels, the few-shot finetunes take `shots`
# images of each of a seeded 10 % of the identities of the second half; tests: celeba64_val (985 other identities) and LFW, both brought to
# the celeba64 geometry like the training crops.
REAL_DATA = Path("../shared/data")
REAL_TRAIN, REAL_VAL, REAL_LFW = "train/celeba64_train.rec", "celeba64/celeba64_val.bin", "lfw/lfw.bin"


class RealSource:
    """Real faces: ``celeba64_train.rec``-like records (labels, 64 px crops) and their validation ``.bin``; see
    ``REAL_*``. ``data`` is the folder that holds them (``../shared/data`` by default)."""

    name = "real"

    def __init__(self, out: Path, shots: int, seed: int, lfw_path: Path | None, data: Path,
                 fraction: float = REAL_FEWSHOT_FRACTION):
        from ..data.datasets import RecordDataset

        self.out, self.shots, self.seed, self.lfw_path = out, shots, seed, lfw_path
        self.rec, self.val = Path(data) / REAL_TRAIN, Path(data) / REAL_VAL
        for path in (self.rec, self.val):
            if not path.is_file():
                raise FileNotFoundError(f"--real: {path} not found (expected {REAL_TRAIN} and {REAL_VAL} under "
                                        f"{data}; see --data)")
        self.dataset = RecordDataset(self.rec, keypoints=False)
        labels = self.dataset.labels
        self.split = (int(labels.max()) + 1) // 2
        self.stage1_positions = np.flatnonzero(labels < self.split)
        rng = np.random.default_rng(seed)
        eligible = {i: own for i, own in self.dataset.identity_index().items() if i >= self.split and len(own) >= shots}
        # a fraction of them (LAFS Table 1's 10 %): with every second-half identity at 2 shots, the ~80 steps a
        # finetune gets see each class about once and the margin head learns nothing (loss at its uniform value)
        chosen = sorted(rng.choice(sorted(eligible), max(1, round(fraction * len(eligible))), replace=False)
                        .tolist()) if eligible else []
        self.fewshot_identities = len(chosen)
        few = [np.sort(rng.choice(eligible[i], shots, replace=False)) for i in chosen]
        self.fewshot_positions = np.concatenate(few).astype(np.int64) if few else np.zeros(0, np.int64)

    def describe(self) -> str:
        n = int(self.dataset.labels.max()) + 1
        return (f"real faces, {self.rec} (stage 1: identities 0..{self.split - 1}, {len(self.stage1_positions)} "
                f"images; pretraining: all {len(self.dataset)} images, unlabelled; few-shot: {self.fewshot_identities} "
                f"of identities {self.split}..{n - 1} x {self.shots} shots, {len(self.fewshot_positions)} images; tests: "
                f"{self.val.stem}" + (f" and {self.lfw_path.stem}" if self.lfw_path else "") + ", celeba64 geometry)")

    def _data(self, index: Path | None, val: bool = False) -> list[str]:
        return ["data.source=records", f"data.train=[{self.rec}]", "data.geometry=celeba64",
                f"data.val=[{self.val}]" if val else "data.val=[]"] + ([f"data.index={index}"] if index else [])

    def stage_data(self, stage: str) -> list[str]:
        from ..data.fewshot import save_index

        if stage == "stage1":
            return self._data(save_index(self.out / "stage1_identities.npy", self.stage1_positions), val=True)
        if stage == "pretrain":
            return self._data(None)
        return self._data(save_index(self.out / f"fewshot_{self.shots}shot.npy", self.fewshot_positions))

    def eval_sets(self) -> dict:
        """celeba64_val, then LFW as "lfw", each warped to the celeba64 geometry (``build_val_sets``); loaded once."""
        if not hasattr(self, "_sets"):
            from ..config import load_config
            from ..train.run import build_val_sets

            self._sets = {}
            for name, path in ((self.val.stem, self.val), ("lfw", self.lfw_path)):
                if path is not None:
                    cfg = load_config(None, [f"data.val=[{path}]", "data.geometry=celeba64"])
                    images, issame, _ = next(iter(build_val_sets(cfg, log=lambda *a: None).values()))
                    self._sets[name] = (images, issame)
        return self._sets

    def fit_images(self) -> torch.Tensor:
        """Up to 20,000 of the pretraining's unlabelled training faces (a seeded subsample), at the PCA's 32 px."""
        from ..eval.report import load_fit_images

        return load_fit_images([self.rec], size=32)[0]

    def heldout_faces(self, img_size: int) -> tuple[torch.Tensor, np.ndarray]:
        """The first images of four celeba64_val pairs (identities no stage saw), in the training geometry."""
        images = next(iter(self.eval_sets().values()))[0]
        return _to_model(images[0:8:2].permute(0, 2, 3, 1).numpy(), img_size)


def landmark_spread(landmarks: np.ndarray, img_size: int) -> dict:
    """How far the landmarks spread over the face: the standard deviation of their x and of their y coordinates
    within each face (B x R x 2 pixels), averaged over faces, as a share of the input side. A 7 x 7 grid over the
    face gives about 0.29 on both axes; landmarks collapsed into a vertical band give a small ``x``."""
    lm = np.asarray(landmarks, np.float64)
    std = lm.std(axis=1).mean(axis=0) / img_size
    return {"x": float(std[0]), "y": float(std[1])}


def _landmark_picture(stage1_ckpt: Path, source, steps: int) -> tuple[bytes, dict]:
    """Held-out faces with the landmarks of the CNN at initialisation (top row) and after stage 1 (bottom row), and
    the landmarks' spread (:func:`landmark_spread`) before and after."""
    from ..checkpoint import read_checkpoint, stored_config
    from ..embedder import backbone_from_state
    from ..models import build_backbone
    from ..viz import face_rows_png, landmark_overlay, png_bytes, tile

    state = read_checkpoint(stage1_ckpt, need_model=True)
    after, _ = backbone_from_state(stage1_ckpt, state, "cpu")
    cfg = stored_config(stage1_ckpt, state)
    torch.manual_seed(cfg.train.seed)  # the run's own initialisation
    before = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides()).eval()
    x, small = source.heldout_faces(before.img_size)
    rows, spread = [], {}
    with torch.no_grad():
        for key, model, colour in (("before", before, (255, 200, 0)), ("after", after, (255, 40, 40))):
            lm = model(x)["landmarks"].numpy()
            spread[key] = landmark_spread(lm, before.img_size)
            rows.append([landmark_overlay(small[i], lm[i], model.patch_size, colour) for i in range(4)])
    n = lm.shape[1]
    labels = [f"before stage 1\n(random init)\nspread x {spread['before']['x']:.2f}, y {spread['before']['y']:.2f}",
              f"after stage 1\n({steps} steps)\nspread x {spread['after']['x']:.2f}, y {spread['after']['y']:.2f}"]
    png = face_rows_png(
        list(zip(labels, rows)), f"Landmark CNN of Part fViT: {n} landmarks on 4 faces of unseen identities",
        caption=("Each dot is a landmark the CNN predicts; the square around it is the patch Part fViT samples there "
                 "as a token. Top row: the CNN at its random initialisation; bottom row: after the supervised stage 1 "
                 "(identity labels only, no landmark labels). Spread: the standard deviation of the landmarks' x and "
                 "y within a face, as a share of the face width (a 7 x 7 grid gives 0.29)."))
    if png is None:  # no matplotlib (the viz extra): the same faces, unlabelled
        png = png_bytes(tile(rows[0] + rows[1], columns=4))
    return png, spread


def _attention_picture(ckpt: Path, source, arm: str) -> bytes:
    """Held-out faces with the finetuned model's last-layer CLS attention over its landmark tokens."""
    from ..embedder import load_backbone
    from ..viz import attention_heat, attention_overlay, attention_png, cls_attention, png_bytes, tile

    model, _ = load_backbone(ckpt)
    x, small = source.heldout_faces(model.img_size)
    weights, token_xy = cls_attention(model, x)
    xy = [None if token_xy is None else token_xy[i] for i in range(4)]
    heats = [attention_heat(weights[i], xy[i], *small[i].shape[:2], model.patch_size) for i in range(4)]
    png = attention_png(
        list(small), heats, f"Where the {arm.upper()}-initialised, few-shot-finetuned Part fViT looks",
        caption=("Last-layer attention from the CLS token to each landmark token, averaged over heads, on 4 faces of "
                 "unseen identities; each landmark paints the patch it samples (the larger weight where patches "
                 "overlap), scaled so the most attended token of a face is 1; pixels no patch covers stay uncoloured."))
    if png is None:
        png = png_bytes(tile([attention_overlay(small[i], weights[i], xy[i], model.patch_size) for i in range(4)],
                             columns=4))
    return png


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


FLOOR_NAMES = {"raw_pixels": "floor: raw pixels", "pca_whitened": "floor: PCA-whitened pixels",
               "untrained": "floor: untrained network"}


def _floors(sets: dict, fit_images: torch.Tensor, ckpt: Path) -> dict:
    """Per set, the three floors (lafs.eval.floors) scored like the arms (10-fold, flip test): raw-pixel cosine,
    pixels PCA-whitened on ``fit_images`` (the pretraining's unlabelled faces) and the untrained architecture of
    ``ckpt`` (its run's seed); each with the pair distances for the ROC picture."""
    from ..checkpoint import read_checkpoint, stored_config
    from ..eval.embedding import embed_images
    from ..eval.floors import PCAWhitening, floor_accuracies
    from ..eval.metrics import pair_distances
    from ..eval.report import untrained_embedder

    pca = PCAWhitening().fit(fit_images, components=min(256, len(fit_images) - 1), size=32)
    untrained = untrained_embedder(stored_config(ckpt, read_checkpoint(ckpt, need_model=False)))
    out = {}
    for name, (images, issame) in sets.items():
        emb = embed_images(untrained, images).numpy()
        f = floor_accuracies(images, issame, pca, untrained_embeddings=emb, scores=True)
        out[name] = {}
        for key in FLOOR_NAMES:
            r = f[key]
            dist = pair_distances(emb[0::2], emb[1::2]) if key == "untrained" else 2.0 - 2.0 * r["cosines"]
            out[name][key] = {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"], "auc": r["auc"],
                              "tar_at_far": {str(k): v for k, v in r["tar_at_far"].items()},
                              "_dist": dist, "_issame": np.asarray(issame, bool)}
    out["fit_images"] = len(fit_images)
    return out


def run_demo(out_dir: str | Path = "runs/demo", budget_minutes: float | None = None,
             lfw: str | Path | bool | None = None, dino: bool | None = None, shots: int = 2, seed: int = 0,
             progress: bool = True, log=print, real: bool = False, data: str | Path | None = None) -> dict:
    """Run the pipeline of the module docstring; returns the summary written to ``demo.json``.

    ``lfw``: a path, ``None`` (``../shared/data/lfw/lfw.bin`` when present) or ``False`` (no LFW evaluation).
    ``real``: on CelebA-64 (:class:`RealSource`, from ``data``, default ``../shared/data``) instead of the synthetic
    faces; ``budget_minutes`` defaults to SYNTHETIC_BUDGET (6) or REAL_BUDGET (22)."""
    from ..checkpoint import checkpoints_in
    from ..viz import roc_png

    if budget_minutes is None:
        budget_minutes = REAL_BUDGET if real else SYNTHETIC_BUDGET
    if budget_minutes <= 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
    if data is not None and not real:
        raise ValueError("--data needs --real (the synthetic faces are rendered, not read)")
    out = Path(out_dir)
    if lfw is False:
        lfw_path = None
    else:
        shared = [Path(data) / REAL_LFW] if data is not None else SHARED_LFW
        lfw_path = Path(lfw) if lfw else next((p for p in shared if p.is_file()), None)
    if lfw_path is not None and not lfw_path.is_file():
        raise FileNotFoundError(f"--lfw: {lfw_path} not found")
    out.mkdir(parents=True, exist_ok=True)
    # every stage starts a fresh run, and a fresh run refuses a folder holding one (lafs.train.run_folder)
    done = [d.name for d in sorted(out.iterdir()) if d.is_dir() and checkpoints_in(d / "checkpoints")]
    if done:
        raise ValueError(f"{out} already holds a demo ({', '.join(done)}); use another --out, or remove it")
    if real:
        shared = (p.parent.parent for p in SHARED_LFW if p.parent.parent.is_dir())  # ../shared/data
        root = Path(data) if data is not None else next(shared, REAL_DATA)
        source = RealSource(out, shots, seed, lfw_path, root)
    else:
        source = SyntheticSource(out, shots, seed, lfw_path)
    dino = budget_minutes >= 6 if dino is None else dino
    start = time.perf_counter()
    log(f"lafs demo: budget {budget_minutes:g} min, {source.describe()}" + (f"; LFW: {lfw_path}" if lfw_path else ""))
    stages = {}

    log("1/4 stage 1: supervised Part fViT learns its landmark CNN")
    stages["stage1"], stage1 = _run(MODEL + source.stage_data("stage1") + [
        "head.name=cosface", "optim.lr=2e-3", "optim.warmup_steps=10", "augment.preset=flip",
        "train.batch_size=64", _budget("stage1", budget_minutes), "train.log_every=10",
        f"out_dir={out / 'stage1_supervised'}"], progress, log)

    pre_common = ["model.token_init=trunc_normal", "ssl.out_dim=1024", "ssl.hidden_dim=256", "ssl.bottleneck_dim=64",
                  "ssl.warmup_teacher_temp=0.02", "ssl.teacher_temp=0.02",
                  "ssl.num_local=4", f"ssl.landmark_init={stage1}", *PRETRAIN_OPTIM,
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
            MODEL + source.stage_data("pretrain") + pre_common + extra
            + _steps(first, "pretrain", budget_minutes) + [f"out_dir={out / name}"], progress, log)
        if first:
            stages[name]["steps_of"] = first[0]
        first = first or (name, stages[name])

    fine = MODEL + source.stage_data("finetune") + [
        "model.drop_path=0.1", "model.token_init=trunc_normal", "head.name=cosface",
        "optim.lr=1e-3", "optim.warmup_steps=10", "augment.preset=flip", "finetune.landmark=c", BETA_SCHEDULE,
        FINETUNE_HEAD,
        "train.batch_size=32", "train.log_every=10"]
    arms = {"scratch": [f"finetune.landmark_init={stage1}"]}
    for method, ckpt in teachers.items():
        arms[method] = [f"finetune.init={ckpt}"]
    sets = source.eval_sets()
    primary = next(iter(sets))
    results, finetuned, first = {}, {}, None
    for arm, extra in arms.items():
        log(f"3/4 few-shot finetune ({shots} shots) from {arm}"
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

    log("4/4 evaluating the supervised stage 1 (the reference: every label of its identities)")
    supervised = _evaluate(stage1, sets)
    log("4/4 floors: raw pixels, PCA-whitened pixels (fitted on the pretraining's unlabelled faces), the untrained "
        "network")
    floors = _floors(sets, source.fit_images(), finetuned["scratch"])
    landmarks_png, spread = _landmark_picture(stage1, source, stages["stage1"]["steps"])
    written = [atomic_write_bytes(out / "landmarks.png", landmarks_png),
               atomic_write_bytes(out / "attention.png", _attention_picture(finetuned["lafs"], source, "lafs"))]

    def curves(name):
        rows = ([(a, r[name]) for a, r in results.items()] + [("supervised stage 1", supervised[name])]
                + [(FLOOR_NAMES[k], floors[name][k]) for k in FLOOR_NAMES])
        return [(f"{a} ({100 * r['accuracy']:.1f} %)", r["_dist"], r["_issame"]) for a, r in rows]

    titles = {"heldout": f"{shots}-shot finetune, {IDS_VAL} unseen synthetic identities",
              "lfw": "LFW (real faces)" if not real else f"{shots}-shot finetune, LFW"}
    png = roc_png(curves(primary), titles.get(primary, f"{shots}-shot finetune, {primary}"),
                  more=[(titles["lfw"], curves("lfw"))] if "lfw" in sets and primary != "lfw" else [])
    if png is not None:
        written.append(atomic_write_bytes(out / "roc.png", png))
    has_lfw = "lfw" in sets and primary != "lfw"

    def scores(r: dict) -> dict:
        return ({k: v for k, v in r[primary].items() if not k.startswith("_")}
                | ({"lfw_accuracy": r["lfw"]["accuracy"], "lfw_accuracy_std": r["lfw"]["accuracy_std"],
                    "lfw_auc": r["lfw"]["auc"]} if has_lfw else {}))

    summary = {
        "budget_minutes": budget_minutes, "seconds": time.perf_counter() - start, "shots": shots, "seed": seed,
        "data": source.name, "test_set": primary, "test_pairs": len(sets[primary][1]),
        "lfw": str(lfw_path) if lfw_path else None,
        "results": {a: {"pretrain_steps": stages[f"pretrain_{a}"]["steps"] if f"pretrain_{a}" in stages else None,
                        "finetune_steps": stages[f"finetune_{a}"]["steps"]} | scores(r)
                    for a, r in results.items()},
        "supervised": {"steps": stages["stage1"]["steps"]} | scores(supervised),
        "floors": {k: scores({n: floors[n][k] for n in sets}) for k in FLOOR_NAMES},
        "floors_fit_images": floors["fit_images"],
        "landmark_spread": spread,
        "stages": stages,
        "pictures": [str(p) for p in written],
    }
    atomic_write_bytes(out / "demo.json", json.dumps(summary, indent=2).encode())
    return summary


def _row(name: str, pre, fine, r: dict, lfw: bool) -> str:
    """One table row: steps, 10-fold accuracy +- fold std, AUC, TAR@FAR=1e-2 (and LFW)."""
    tar = r["tar_at_far"].get("0.01")
    row = (f"| {name} | {'-' if pre is None else pre} | {'-' if fine is None else fine} | "
           f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} % | {r['auc']:.3f} | "
           f"{'-' if tar is None else f'{100 * tar:.1f} %'} |")
    return row + (f" {100 * r['lfw_accuracy']:.2f} % |" if lfw else "")


def format_summary(s: dict) -> str:
    lfw = s["lfw"] is not None
    head = ("| pretraining | pretraining steps | finetune steps | test accuracy | AUC | TAR@FAR=1e-2 |"
            + (" LFW accuracy |" if lfw else ""))
    where = (f"synthetic identities, tested on {IDS_VAL} unseen ones" if s.get("data", "synthetic") == "synthetic"
             else f"CelebA-64 identities, tested on {s['test_set']}")
    lines = [f"few-shot finetune ({s['shots']} shots) on {where} ({s.get('test_pairs', 400)} pairs, 10-fold); "
             f"{s['seconds'] / 60:.1f} min in all; compared arms train equal steps; the reference and the floors "
             "below are scored the same way", "", head,
             "|---|---|---|---|---|---|" + ("---|" if lfw else "")]
    for arm, r in s["results"].items():
        lines.append(_row(arm, r.get("pretrain_steps"), r.get("finetune_steps"), r, lfw))
    if "supervised" in s:
        lines.append(_row("supervised stage 1 (reference; its steps)", None, s["supervised"]["steps"],
                          s["supervised"], lfw))
    for key, r in s.get("floors", {}).items():
        lines.append(_row(FLOOR_NAMES[key], None, None, r, lfw))
    if "floors_fit_images" in s:
        lines.append(f"(PCA fitted on the {s['floors_fit_images']} unlabelled pretraining faces; the untrained network "
                     "is the arms' architecture at its random initialisation)")
    if "landmark_spread" in s:
        b, a = s["landmark_spread"]["before"], s["landmark_spread"]["after"]
        lines.append(f"landmark spread (std of x / y over a face, share of its width; a 7 x 7 grid: 0.29): before "
                     f"stage 1 {b['x']:.2f} / {b['y']:.2f}, after {a['x']:.2f} / {a['y']:.2f}")
    lines.append("")
    lines.append("pictures: " + ", ".join(s["pictures"]))
    return "\n".join(lines)
