"""Any trained model file -> an embedding function, for ``lafs eval`` (and embed / verify / export).

Accepted files:

- a lafs training or finetuning checkpoint (``lafs train`` / ``lafs finetune``): the backbone is rebuilt from the
  config stored in the checkpoint and loaded from its ``model`` entry (``backbone.*``);
- a lafs pretraining checkpoint (``lafs pretrain``): the *teacher* trunk (with the landmark CNN for Part fViT),
  the model finetuning starts from;
- a TorchScript module (``torch.jit.save``), called on float B x 3 x H x W in [-1, 1] and returning B x D (or a
  dict with ``embedding``);
- an ONNX model (``.onnx``, needs onnxruntime), same input and output;
- a safetensors model folder (``lafs export CKPT --safetensors DIR``: ``model.safetensors`` + ``config.yaml``), or
  its ``model.safetensors``: the backbone is rebuilt from ``config.yaml`` and loaded from the safetensors weights.

Checkpoints and folders open through :func:`lafs.checkpoint.read_checkpoint` (``weights_only=True``): a file holding
pickled objects other than tensors and plain values is refused (:class:`lafs.io_safe.UnsafeFileError`) before
anything in it runs.

The embedding function maps float images in [-1, 1] (any size; resized to the model's input) to B x D. A
content hash of the file (and the precision, see below) keys the embedding cache of ``lafs eval``.

A lafs checkpoint can run under bf16 autocast (``amp="bf16"``, fp32 embeddings out) and through ``torch.compile``
(``compile=True``): ``lafs eval --amp bf16 --compile``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import backbone_weights, read_checkpoint, stored_config, stored_threshold
from .data.datasets import resize_keypoints, to_model_input
from .io import file_hash
from .io_safe import CONFIG_FILE, SAFETENSORS_FILE, safetensors_folder
from .models.precision import AMP_DTYPES, resolve_amp


@dataclass
class Embedder:
    """``embedder(x)`` or, when ``uses_keypoints`` (KP-RPE models), ``embedder(x, keypoints=k)`` -> B x D.

    ``k``: B x K x 2 pixels of ``x``; rescaled with the image when the model's input size differs (pixel centres:
    p' = (p + 0.5) * size / W - 0.5). Keypoints given to a model that does not use them are ignored.
    """

    fn: Callable[..., torch.Tensor]
    img_size: int | None
    description: str
    file_hash: str
    uses_keypoints: bool = False
    threshold: float | None = None  # cosine decision threshold stored with the model (its latest validation)
    threshold_source: str = ""
    precision: str = "fp32"  # "bf16" under autocast: part of the embedding cache key
    # the face geometry the model was trained in (its config's data.geometry, lafs.geometry): `lafs eval`
    # brings each verification set to it first
    geometry: str | None = None
    # where the weights live, so that lafs.embed / lafs.verify move images there (set by lafs.load)
    device: str = "cpu"

    def __call__(self, x: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        width = x.shape[-1]
        x = to_model_input(x, self.img_size)
        if not self.uses_keypoints:
            return self.fn(x)
        if keypoints is None:
            raise ValueError(f"{self.description} needs keypoints (B x K x 2 pixels) with the images")
        return self.fn(x, resize_keypoints(keypoints, width, x.shape[-1]))


def backbone_from_state(path: Path, state: dict, device) -> tuple[torch.nn.Module, str]:
    """The backbone of checkpoint entries ``state`` (``lafs.checkpoint``), rebuilt from their config, in eval mode on
    ``device``, and a description."""
    from .models import build_backbone

    cfg = stored_config(path, state)
    backbone = build_backbone(cfg.model.name, cfg.model.size, **cfg.model.overrides())
    weights, source = backbone_weights(path, state)
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} [{source}]: weights do not fit {cfg.model.name}-{cfg.model.size}; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    backbone.eval().to(device)
    return backbone, f"{cfg.model.name}-{cfg.model.size} ({source} of {path.name}, step {state.get('step')})"


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, str]:
    """A lafs training, finetuning or pretraining checkpoint (or a safetensors folder) -> (its backbone in eval
    mode, a description).

    The backbone is rebuilt from the config stored in the checkpoint (see the module docstring for which weights
    are used); it returns ``{"embedding": B x D, ...}``. The description starts with ``name-size`` (e.g.
    ``part_fvit-micro (model of checkpoint.pt, step 2)``). Any file that is not such a checkpoint is a ValueError
    naming it.
    """
    path = Path(path)
    return backbone_from_state(path, read_checkpoint(path, need_model=True), device)


def model_hash(path: str | Path) -> str:
    """:func:`file_hash` of a model file; of a safetensors folder, of its weights and its config together."""
    folder = safetensors_folder(path)
    if folder is None:
        return file_hash(path)
    weights = Path(path) if Path(path).is_file() else folder / SAFETENSORS_FILE
    both = f"{file_hash(weights)}{file_hash(folder / CONFIG_FILE)}"
    return hashlib.sha256(both.encode()).hexdigest()[:16]


def _from_checkpoint(path: Path, state: dict, device) -> tuple[Callable, int, str, bool]:
    backbone, desc = backbone_from_state(path, state, device)
    if getattr(backbone, "uses_keypoints", False):
        return (lambda x, k: backbone(x, keypoints=k)["embedding"]), backbone.img_size, desc, True
    return (lambda x: backbone(x)["embedding"]), backbone.img_size, desc, False


def _fast(fn: Callable[..., torch.Tensor], device, amp: str, compile: bool) -> Callable[..., torch.Tensor]:
    """``fn`` under autocast (``amp``, already resolved by :func:`resolve_amp`) and ``torch.compile``; fp32
    embeddings out."""
    run = torch.compile(fn) if compile else fn
    dtype, kind = AMP_DTYPES.get(amp), torch.device(device).type

    def wrapped(*args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(kind, dtype or torch.float32, enabled=dtype is not None):
            return run(*args).float()

    return wrapped


def load_embedder(path: str | Path, device: str | torch.device = "cpu", amp: str = "none",
                  compile: bool = False) -> Embedder:
    """Open a model file (see the module docstring) as an :class:`Embedder`; ``amp`` / ``compile`` apply to lafs
    checkpoints (TorchScript and ONNX models run as they are)."""
    path = Path(path)
    folder = safetensors_folder(path)
    if folder is None and not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    digest = model_hash(path)
    if folder is None and path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f'{path}: ONNX models need onnxruntime (pip install "lafs-face[onnx]")') from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map  # lafs_model, img_size, ... from lafs.export
        inputs = session.get_inputs()
        inp = inputs[0]
        # a second input is the keypoints of KP-RPE models (B x 5 x 2 pixels of the model input; lafs.export)
        kp_inp = next((i for i in inputs[1:] if i.name == "keypoints"), inputs[1] if len(inputs) > 1 else None)
        size = inp.shape[-1] if isinstance(inp.shape[-1], int) else None
        if size is None and str(meta.get("img_size", "")).isdigit():
            size = int(meta["img_size"])

        def as_numpy(t: torch.Tensor):
            return t.detach().cpu().float().numpy()

        def run(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
            feed = {inp.name: as_numpy(x)}
            if kp_inp is not None:
                feed[kp_inp.name] = as_numpy(k)
            return torch.from_numpy(session.run(None, feed)[0])

        desc = f"ONNX {path.name}" + (f" ({meta['lafs_model']})" if meta.get("lafs_model") else "")
        threshold = float(meta["lafs_threshold"]) if meta.get("lafs_threshold") else None
        return Embedder(run, size, desc, digest, kp_inp is not None, threshold, meta.get("lafs_threshold_source", ""))
    module = None
    if folder is None:
        try:
            module = torch.jit.load(str(path), map_location=device)
        except RuntimeError:
            module = None
    if module is not None:
        module.eval()

        def run_script(x: torch.Tensor) -> torch.Tensor:
            out = module(x)
            return out["embedding"] if isinstance(out, dict) else out

        return Embedder(run_script, getattr(module, "img_size", None), f"TorchScript {path.name}", digest)
    state = read_checkpoint(path, "a lafs checkpoint, TorchScript or ONNX model", need_model=True)
    fn, size, desc, uses_keypoints = _from_checkpoint(path, state, device)
    threshold, source = stored_threshold(state)
    amp = resolve_amp(amp, torch.device(device).type)  # "auto": bf16 where the hardware has bf16 units, as in training
    if amp != "none" or compile:
        fn = _fast(fn, device, amp, compile)
        desc += "".join(f" [{t}]" for t in ((amp,) if amp != "none" else ()) + (("compiled",) if compile else ()))
    return Embedder(fn, size, desc, digest, uses_keypoints, threshold, source, "fp32" if amp == "none" else amp,
                    stored_config(path, state).data.geometry)
