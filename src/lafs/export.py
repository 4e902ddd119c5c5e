"""A trained lafs checkpoint -> an ONNX embedding model, checked against onnxruntime (``lafs export``).

:func:`export_onnx` rebuilds the backbone of a training, finetuning or pretraining checkpoint
(:func:`lafs.embedder.load_backbone`, eval mode), wraps it so that it returns the embedding alone, and exports it
with ``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``; see below). Every backbone exports,
Part fViT included: its landmark CNN and the patch sampling at the predicted landmarks (one ``grid_sample``,
``GridSample`` since opset 16) are part of the graph.

The graph:

- input ``images``: float32 B x 3 x S x S in [-1, 1], S = the model's input size (56 for ``micro`` sizes, 112
  otherwise; metadata ``img_size``). It takes the model-size input directly: the resize that every lafs entry point
  applies (:func:`lafs.data.datasets.to_model_input`, antialiased bilinear) is **not** in the graph, so resize
  (and scale uint8 to [-1, 1]) before feeding it, or open the file with :func:`lafs.embedder.load_embedder`, which
  does both;
- input ``keypoints`` (KP-RPE models only, metadata ``uses_keypoints`` = ``true``): float32 B x 5 x 2, (x, y)
  pixels of the model input (pixel centres at integers; :func:`lafs.data.datasets.resize_keypoints` maps points of
  a larger image);
- output ``embedding``: float32 B x D, not normalised (as the backbone's ``embedding``);
- the batch axis B is dynamic (traced at one batch size, checked at another).

Metadata (``metadata_props``): ``lafs_model`` (name-size), ``img_size``, ``uses_keypoints``, ``embedding_size``,
``lafs_checkpoint_sha256`` (the first 16 hex digits of the checkpoint's SHA-256, :func:`lafs.io.file_hash`,
the key of ``lafs eval``'s cache), ``lafs_description``, ``lafs_input`` (the input contract above, in words) and,
when the checkpoint stores a validation, ``lafs_threshold`` / ``lafs_threshold_source`` (its cosine decision
threshold, :func:`lafs.checkpoint.stored_threshold`, which ``load_embedder`` gives back for ``lafs verify``).

The parity check (``check=True``) runs the torch backbone and onnxruntime (CPU) on the same seeded random batch
(images uniform in [-1, 1]; keypoints the ArcFace template of the input size with 1 px noise) and measures the
largest absolute difference and the smallest per-row cosine between the two embeddings. It fails (ValueError, and
no file is written) when ``max_abs_diff > 1e-3 * max(1, max |embedding|)`` or ``min_cosine < 0.9999``: float32
graphs that compute the same function differ by about 1e-6 of the embedding's scale (operator fusion and reordering
in onnxruntime), while a wrong graph (train-mode dropout or batch norm, a batch size or landmarks baked in as
constants) differs by 1e-1 to 1 of it; the bound sits three orders of magnitude above the first and far below the
second, and is relative above 1 because unnormalised embeddings (IResNet's) reach magnitudes of hundreds.

Exporter: the TorchScript-based one (``dynamo=False``). Torch's default, the ``torch.export``-based exporter,
needs ``onnxscript``, takes about 10 s instead of about 1 s for a micro Part fViT, cannot write Part fViT at opset
17 (its version converter fails and the file stays at opset 18) and fails on the KP-RPE face ViT (a ``view`` of a
transposed attention output in its decomposition, torch 2.13). The TorchScript exporter writes every backbone at
the requested opset with parity about 1e-6; its tracer warnings (input-size checks and grid constants recorded as
constants, which is right for a fixed input size) are silenced.

Needs the ``onnx`` extra: ``pip install "lafs-face[onnx]"`` (onnx, onnxruntime).

:func:`export_safetensors` (``lafs export CKPT --safetensors DIR``) writes the same backbone as a hub-style folder
for sharing: ``model.safetensors`` (the backbone's weights, nothing else: raw tensors behind a JSON header, no
pickle, so opening it cannot run code), ``config.yaml`` (the run config the backbone is rebuilt from) and
``MODEL_CARD.md`` (the run's card when it sits beside the checkpoint, with a note on what was exported; else a short
one). ``lafs eval / embed / verify``, ``load_embedder`` / ``load_backbone`` and ``finetune --init`` open the folder.
"""

from __future__ import annotations

import inspect
import io
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import read_checkpoint, stored_threshold
from .embedder import backbone_from_state, load_backbone, model_hash
from .io import file_hash

RELATIVE_TOLERANCE = 1e-3  # of max(1, largest |embedding| value); see the module docstring
MIN_COSINE = 0.9999
SEED = 0
INPUT_CONTRACT = ("images: float32 B x 3 x S x S in [-1, 1], S = img_size (resize first: "
                  "lafs.data.datasets.to_model_input); keypoints (when uses_keypoints): float32 B x 5 x 2 "
                  "(x, y) pixels of the model input; embedding: float32 B x D, not normalised")


class _EmbeddingOnly(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)["embedding"]


class _EmbeddingWithKeypoints(_EmbeddingOnly):
    def forward(self, images: Tensor, keypoints: Tensor) -> Tensor:  # type: ignore[override]
        return self.backbone(images, keypoints=keypoints)["embedding"]


def _require(check: bool):
    try:
        import onnx
    except ImportError:
        raise ImportError('ONNX export needs the onnx package: pip install "lafs-face[onnx]"') from None
    if not check:
        return onnx, None
    try:
        import onnxruntime
    except ImportError:
        raise ImportError('the ONNX parity check needs onnxruntime: pip install "lafs-face[onnx]" '
                          "(or export with check=False / --no-check)") from None
    return onnx, onnxruntime


def random_inputs(img_size: int, batch: int, keypoints: bool, seed: int = SEED) -> tuple[Tensor, ...]:
    """The seeded check batch: images uniform in [-1, 1] (+ ArcFace-template keypoints with 1 px noise)."""
    from .geometry import template

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, img_size, img_size, generator=g) * 2 - 1
    if not keypoints:
        return (images,)
    kps = torch.from_numpy(template(img_size)).float()[None] + torch.randn(batch, 5, 2, generator=g)
    return images, kps


def _checkpoint_threshold(path: Path) -> tuple[float | None, str]:
    """The stored cosine threshold, without reading the weights again (memory-mapped; None when unreadable)."""
    try:
        state = read_checkpoint(path, mmap=True)
    except (ValueError, OSError):
        return None, ""
    return stored_threshold(state)


def _torch_export(wrapper: nn.Module, args: tuple[Tensor, ...], names: list[str], opset: int) -> bytes:
    buf = io.BytesIO()
    kwargs = dict(
        input_names=names, output_names=["embedding"], opset_version=opset, do_constant_folding=True,
        dynamic_axes={**{n: {0: "batch"} for n in names}, "embedding": {0: "batch"}},
    )
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; default True from 2.9
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(wrapper, args, buf, **kwargs)
    return buf.getvalue()


def parity(wrapper: nn.Module, session, inputs: tuple[Tensor, ...], names: list[str]) -> dict:
    """Torch vs onnxruntime embeddings of the same inputs: max_abs_diff, min_cosine, the tolerance, the scale."""
    import numpy as np

    with torch.no_grad():
        ref = wrapper(*inputs).float().numpy()
    got = session.run(["embedding"], {n: t.numpy() for n, t in zip(names, inputs)})[0]
    if got.shape != ref.shape:
        raise ValueError(f"ONNX embedding of shape {got.shape}, torch {ref.shape}")
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(got64, axis=1)
    cos = (ref64 * got64).sum(1) / np.maximum(norms, 1e-30)
    scale = float(np.abs(ref64).max())
    return {
        "check_batch": int(ref.shape[0]),
        "max_abs_diff": float(np.abs(ref64 - got64).max()),
        "min_cosine": float(cos.min()),
        "embedding_scale": scale,
        "tolerance": RELATIVE_TOLERANCE * max(1.0, scale),
    }


def export_onnx(checkpoint: str | Path, out_path: str | Path, opset: int = 17, batch: int = 4,
                check: bool = True) -> dict:
    """Export the backbone of a lafs ``checkpoint`` to ``out_path`` (``.onnx``); see the module docstring.

    ``batch``: the size of the seeded random batch of the parity check (the graph is traced at another size, so
    the check also covers the dynamic batch axis). With ``check`` a mismatch beyond the tolerance is a ValueError
    naming the numbers, and nothing is written. The file is written atomically (a temporary name in its folder,
    then ``os.replace``).

    Returns ``path``, ``model`` (name-size), ``description``, ``img_size``, ``uses_keypoints``, ``inputs``,
    ``embedding_size``, ``opset``, ``bytes``, ``checkpoint_sha256``, ``threshold`` (stored cosine threshold or
    None), ``exporter``, ``export_seconds``, and for the check ``check_batch``, ``max_abs_diff``, ``min_cosine``,
    ``tolerance``, ``embedding_scale`` (all None without it).
    """
    from .io import atomic_write_bytes

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the ONNX file name must end in .onnx (how lafs recognises ONNX models)")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    onnx, ort = _require(check)
    backbone, description = load_backbone(checkpoint, "cpu")
    uses_keypoints = bool(getattr(backbone, "uses_keypoints", False))
    img_size = int(backbone.img_size)
    name = description.split(" ", 1)[0]
    wrapper = (_EmbeddingWithKeypoints if uses_keypoints else _EmbeddingOnly)(backbone).eval()
    names = ["images", "keypoints"] if uses_keypoints else ["images"]

    start = time.perf_counter()
    trace_batch = 3 if batch == 2 else 2  # never the check's size: the check then proves the batch axis dynamic
    data = _torch_export(wrapper, random_inputs(img_size, trace_batch, uses_keypoints, seed=SEED + 1), names, opset)
    wrapper.eval()  # the exporter restores the wrapper's mode; keep the reference in eval mode whatever it did
    model = onnx.load_from_string(data)
    embedding_size = getattr(backbone, "embedding_size", None)
    meta = {
        "lafs_model": name,
        "img_size": str(img_size),
        "uses_keypoints": "true" if uses_keypoints else "false",
        "lafs_checkpoint_sha256": model_hash(checkpoint),
        "lafs_description": description,
        "lafs_input": INPUT_CONTRACT,
    }
    if embedding_size is not None:
        meta["embedding_size"] = str(int(embedding_size))
    threshold, threshold_source = _checkpoint_threshold(checkpoint)
    if threshold is not None:
        meta["lafs_threshold"], meta["lafs_threshold_source"] = repr(threshold), threshold_source
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"lafs {name} embedding model exported from {checkpoint.name}. {INPUT_CONTRACT}"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    result = {
        "path": str(out_path),
        "model": name,
        "description": description,
        "img_size": img_size,
        "uses_keypoints": uses_keypoints,
        "inputs": names,
        "embedding_size": None if embedding_size is None else int(embedding_size),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset),
        "bytes": len(data),
        "checkpoint_sha256": meta["lafs_checkpoint_sha256"],
        "threshold": threshold,
        "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)",
        "export_seconds": time.perf_counter() - start,
        "check_batch": None, "max_abs_diff": None, "min_cosine": None, "tolerance": None, "embedding_scale": None,
    }
    if check:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        result.update(parity(wrapper, session, random_inputs(img_size, batch, uses_keypoints), names))
        if not (result["max_abs_diff"] <= result["tolerance"] and result["min_cosine"] >= MIN_COSINE):
            raise ValueError(
                f"{checkpoint} -> ONNX parity check failed on {batch} random inputs: max |torch - onnxruntime| = "
                f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g}), min cosine "
                f"{result['min_cosine']:.6f} (needs >= {MIN_COSINE}); {out_path} not written")
    atomic_write_bytes(out_path, data)
    return result


def format_export(result: dict) -> str:
    """The one-paragraph summary ``lafs export`` prints."""
    inputs = " + ".join(result["inputs"])
    line = (f"wrote {result['path']}: {result['description']}, opset {result['opset']}, "
            f"{result['bytes'] / 1e6:.2f} MB, inputs {inputs} (B x 3 x {result['img_size']} x {result['img_size']}"
            f"{', B x 5 x 2 px' if result['uses_keypoints'] else ''}), exported in {result['export_seconds']:.1f} s")
    if result.get("threshold") is not None:
        line += f"; stored verification threshold {result['threshold']:.4f} (cosine) kept in the metadata"
    if result["max_abs_diff"] is None:
        return line + "\nparity: not checked (--no-check)"
    return line + (f"\nparity vs torch on {result['check_batch']} random inputs (onnxruntime CPU): max abs diff "
                   f"{result['max_abs_diff']:.2e} (tolerance {result['tolerance']:.1e}), min cosine "
                   f"{result['min_cosine']:.8f}")


def _short_card(name: str, checkpoint: Path, meta: dict[str, str]) -> str:
    """The card of a run without one beside its checkpoint: what the weights are and how to open them."""
    lines = [
        f"# {name} (lafs face embedding model)", "",
        (f"Backbone weights exported from `{checkpoint.name}` (step {meta.get('lafs_step', '?')}, checkpoint "
         f"sha256 {meta['lafs_checkpoint_sha256']}...): {meta['lafs_description']}."), "",
        f"- input: {INPUT_CONTRACT}",
        (f"- input size: {meta['img_size']} px; embedding size: {meta.get('embedding_size', '?')}; uses keypoints: "
         f"{meta['uses_keypoints']}"),
    ]
    if meta.get("lafs_threshold"):
        lines.append(f"- cosine verification threshold: {float(meta['lafs_threshold']):.4f} "
                     f"({meta.get('lafs_threshold_source', '')})")
    lines += ["", ("Open with `lafs eval / embed / verify FOLDER`, `lafs.embedder.load_embedder(FOLDER)` or "
                   "`lafs finetune --init FOLDER`; `config.yaml` is the run config the backbone is rebuilt from."), ""]
    return "\n".join(lines)


def export_safetensors(checkpoint: str | Path, out_dir: str | Path) -> dict:
    """The backbone of a lafs ``checkpoint`` -> ``out_dir/{model.safetensors, config.yaml, MODEL_CARD.md}``.

    The backbone is rebuilt and loaded exactly as ``lafs eval`` would (the teacher of a pretraining checkpoint),
    and its own state dict is written: the folder embeds like the checkpoint. Metadata of the safetensors file:
    ``lafs_format``, ``lafs_model``, ``lafs_description``, ``lafs_step``, ``img_size``, ``embedding_size``,
    ``uses_keypoints``, ``lafs_checkpoint`` and ``lafs_checkpoint_sha256``, and with a stored validation
    ``lafs_val`` (JSON; ``lafs verify``'s threshold) and ``lafs_threshold`` / ``lafs_threshold_source``. Each file
    is written atomically. Returns ``path``, ``files``, ``tensors``, ``bytes``, ``model``, ``description``,
    ``threshold``, ``card`` ("copied" or "written").
    """
    import json

    from .io import atomic_write_bytes
    from .io_safe import CARD_FILE, CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_FORMAT

    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        raise ImportError("safetensors export needs the safetensors package: pip install safetensors") from None
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --safetensors needs a folder (model.safetensors, config.yaml, MODEL_CARD.md "
                         "are written into it)")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    state = read_checkpoint(checkpoint, need_model=True)
    backbone, description = backbone_from_state(checkpoint, state, "cpu")
    name = description.split(" ", 1)[0]
    # fresh contiguous copies: safetensors refuses tensors that share memory
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.state_dict().items()}
    embedding_size = getattr(backbone, "embedding_size", None)
    meta = {
        "lafs_format": SAFETENSORS_FORMAT, "lafs_model": name, "lafs_description": description,
        "lafs_step": str(state.get("step")), "img_size": str(int(backbone.img_size)),
        "uses_keypoints": "true" if getattr(backbone, "uses_keypoints", False) else "false",
        "lafs_checkpoint": checkpoint.name, "lafs_checkpoint_sha256": file_hash(checkpoint),
    }
    if embedding_size is not None:
        meta["embedding_size"] = str(int(embedding_size))
    threshold, source = stored_threshold(state)
    if state.get("val"):
        try:
            meta["lafs_val"] = json.dumps(state["val"])
        except (TypeError, ValueError):
            pass  # not plain JSON: the threshold below still travels
    if threshold is not None:
        meta["lafs_threshold"], meta["lafs_threshold_source"] = repr(threshold), source
    data = safetensors_bytes(weights, metadata=meta)

    card_path = checkpoint.parent / CARD_FILE
    if card_path.is_file():
        card = card_path.read_text().rstrip() + (
            f"\n\n## Export\n\n`{SAFETENSORS_FILE}` holds the backbone of `{checkpoint.name}` (step "
            f"{meta['lafs_step']}): {description}; `{CONFIG_FILE}` is its run config. The card above was written by "
            "the run for its latest checkpoint.\n")
        card_how = "copied"
    else:
        card, card_how = _short_card(name, checkpoint, meta), "written"
    files = [atomic_write_bytes(out / SAFETENSORS_FILE, data),
             atomic_write_bytes(out / CONFIG_FILE, state["config"].encode()),
             atomic_write_bytes(out / CARD_FILE, card.encode())]
    return {"path": str(out), "files": [str(f) for f in files], "tensors": len(weights), "bytes": len(data),
            "model": name, "description": description, "threshold": threshold, "card": card_how}


def format_safetensors(result: dict) -> str:
    """The line ``lafs export --safetensors`` prints."""
    line = (f"wrote {result['path']}/: model.safetensors ({result['tensors']} tensors, {result['bytes'] / 1e6:.2f} "
            f"MB, {result['description']}), config.yaml, MODEL_CARD.md ({result['card']})")
    if result["threshold"] is not None:
        line += f"; stored verification threshold {result['threshold']:.4f} (cosine) kept in the metadata"
    return line
