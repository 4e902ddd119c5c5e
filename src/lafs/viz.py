"""Pictures: ROC and affine-sensitivity curves (matplotlib), landmark overlays and attention maps (OpenCV).

matplotlib is the optional ``viz`` extra and runs headless (Agg). The curve functions return PNG bytes, or ``None``
without matplotlib, so callers write them atomically next to their JSON and never fail for a missing picture. The
face pictures (:func:`landmark_overlay`, :func:`attention_overlay`) need only OpenCV and return RGB arrays
(:func:`png_bytes` encodes them).
"""

from __future__ import annotations

import io

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _style(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title[:60], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def roc_png(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str = "",
            more: list[tuple[str, list]] = ()) -> bytes | None:
    """TAR vs FAR (log FAR) of ``(label, distances, issame)`` curves; a pair is accepted when its distance is small.
    Curves labelled ``floor: ...`` are drawn dashed. ``more``: further ``(title, curves)`` panels drawn side by side (the demo's held-out set and LFW)."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = [(title, curves), *more]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel_title, panel) in zip(axes[0], panels):
        # the smallest FAR a pair set can measure is one impostor pair: the axis starts there, not at 1e-6
        ax.set_xlim(min((1 / max(1, (~np.asarray(s, bool)).sum()) for _, _, s in panel), default=1e-6), 1.0)
        for label, dist, same in panel:
            same = np.asarray(same, bool)
            order = np.argsort(dist, kind="stable")
            far = np.cumsum(~same[order]) / max(1, (~same).sum())
            tar = np.cumsum(same[order]) / max(1, same.sum())
            # the floors (labels "floor: ...") dashed, so the trained arms stand out against them
            ax.plot(np.maximum(far, 1e-6), tar, label=label,
                    **({"linestyle": "--", "linewidth": 1.0} if label.startswith("floor") else {}))
        ax.set_xscale("log")
        _style(ax, "FAR", "TAR", panel_title)
    return _png(fig, plt)


def sensitivity_png(curves: list[tuple[str, dict]], title: str = "") -> bytes | None:
    """Accuracy (± fold std) against t, detector crop (0) -> aligned (1), of ``(label, affine_sensitivity result)``."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, result in curves:
        t = [p["t"] for p in result["points"]]
        acc = np.array([100 * p["accuracy"] for p in result["points"]])
        std = np.array([100 * p["accuracy_std"] for p in result["points"]])
        ax.errorbar(t, acc, yerr=std, marker="o", capsize=3, label=label)
    _style(ax, "t: detector crop (0) -> 5-point aligned (1)", "verification accuracy %", title)
    return _png(fig, plt)


# --- face pictures (OpenCV only: no matplotlib needed) ------------------------------------------------------------


def landmark_overlay(image: np.ndarray, landmarks: np.ndarray, patch_size: int | None = 8,
                     color: tuple[int, int, int] = (255, 40, 40), scale: int = 4) -> np.ndarray:
    """An RGB uint8 H x W x 3 face with its R landmarks ((R, 2) pixels of ``image``) drawn: a dot at each landmark
    and, with ``patch_size``, the square patch Part fViT samples around it (centred layout). The picture is
    enlarged ``scale`` times (nearest) first, so points and squares stay legible; coordinates scale with it."""
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be RGB uint8 H x W x 3, got {img.dtype} {img.shape}")
    pts = np.asarray(landmarks, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"landmarks must be (R, 2) pixels, got {pts.shape}")
    big = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    centres = (pts + 0.5) * scale - 0.5  # pixel centres stay pixel centres
    for x, y in centres:
        if patch_size:
            half = patch_size * scale / 2
            cv2.rectangle(big, (int(round(x - half)), int(round(y - half))), (int(round(x + half)),
                          int(round(y + half))), tuple(int(c) // 2 + 64 for c in color), 1)
    for x, y in centres:  # dots last, so squares never hide them
        cv2.circle(big, (int(round(x)), int(round(y))), max(1, scale // 2), color, -1)
    return big


def tile(images: list[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
    """Same-size RGB pictures in a grid on white."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def cls_attention(model, images) -> tuple[np.ndarray, np.ndarray | None]:
    """Last-layer attention of a ViT backbone, averaged over heads: from the CLS token to every token (B x N), or,
    without a CLS token (``pool: flatten``), the attention every token receives on average. Also the tokens' pixel
    centres (B x N x 2) when the model has landmarks (Part fViT), else None (a row-major grid). Recomputed from the
    last block's q and k (its relative-position bias, if any, is left out)."""
    import torch

    encoder = model.encoder
    attn = encoder.blocks[-1].attn
    captured = {}
    handle = attn.register_forward_hook(lambda m, inp, out: captured.__setitem__("x", inp[0]))
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        handle.remove()
    x = captured["x"]
    b, n, _ = x.shape
    with torch.no_grad():
        q, k, _ = attn.to_qkv(x).view(b, n, 3, attn.heads, attn.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1).mean(1)  # B x N x N
    if encoder.has_cls:
        w = weights[:, 0, 1:]
    else:
        w = weights.mean(1)
    lm = out.get("landmarks") if isinstance(out, dict) else None
    return w.cpu().numpy(), (None if lm is None else lm.detach().cpu().numpy())


def attention_heat(weights: np.ndarray, token_xy: np.ndarray | None, h: int, w: int,
                   patch_size: int = 8) -> np.ndarray:
    """Per-token attention as an H x W map in [0, 1] (max-normalised): grid tokens fill their cells; landmark tokens
    (``token_xy``, pixels) paint a patch-sized square each, the larger weight where squares overlap."""
    import cv2

    heat = np.zeros((h, w), np.float32)
    wts = np.asarray(weights, np.float32)
    wts = wts / max(float(wts.max()), 1e-12)
    if token_xy is None:
        side = int(round(len(wts) ** 0.5))
        return cv2.resize(wts.reshape(side, side), (w, h), interpolation=cv2.INTER_NEAREST)
    for (x, y), a in zip(np.asarray(token_xy), wts):
        x0, y0 = int(round(x - patch_size / 2 + 0.5)), int(round(y - patch_size / 2 + 0.5))
        region = heat[max(0, y0): max(0, y0 + patch_size), max(0, x0): max(0, x0 + patch_size)]
        np.maximum(region, a, out=region)
    return heat


def attention_overlay(image: np.ndarray, weights: np.ndarray, token_xy: np.ndarray | None = None,
                      patch_size: int = 8, scale: int = 4) -> np.ndarray:
    """A face with per-token attention as a heat map (:func:`attention_heat`, JET colours), blended in OpenCV."""
    import cv2

    img = np.asarray(image)
    h, w = img.shape[:2]
    heat = attention_heat(weights, token_xy, h, w, patch_size)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blend = (0.55 * img.astype(np.float32) + 0.45 * colour.astype(np.float32)).astype(np.uint8)
    return cv2.resize(blend, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)


# --- labelled figures of faces (matplotlib): what a reader understands without the README ---------------------


def _caption(fig, caption: str, plt) -> None:
    import textwrap

    if caption:
        fig.text(0.01, 0.01, textwrap.fill(caption, 130), fontsize=7, va="bottom", ha="left")


def face_rows_png(rows: list[tuple[str, list[np.ndarray]]], title: str, caption: str = "",
                  column_titles: list[str] | None = None) -> bytes | None:
    """Rows of RGB face pictures, each row labelled on its left (e.g. "before stage 1" / "after stage 1"), a title
    above and a caption below saying what is drawn. ``None`` without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    ncol = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol + 1.2, 1.9 * len(rows) + 1.1), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c])
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and column_titles and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=8)
    fig.suptitle(title, fontsize=10)
    _caption(fig, caption, plt)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return _png_tight(fig, plt)


def attention_png(faces: list[np.ndarray], heats: list[np.ndarray], title: str, caption: str = "") -> bytes | None:
    """Faces (RGB uint8) with their attention maps (:func:`attention_heat`, [0, 1]) over them, a colour bar that
    says what the colours mean, a title and a caption. ``None`` without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(faces), figsize=(2.2 * len(faces) + 1.2, 3.4), squeeze=False)
    im = None
    for ax, face, heat in zip(axes[0], faces, heats):
        ax.imshow(face)
        # pixels no token covers (exactly 0) stay the face's own colour
        im = ax.imshow(np.ma.masked_equal(np.asarray(heat, np.float32), 0.0), cmap="jet", alpha=0.5, vmin=0.0,
                       vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _caption(fig, caption, plt)
    fig.tight_layout(rect=(0, 0.14, 0.9, 0.93))
    cax = fig.add_axes((0.91, 0.2, 0.015, 0.65))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("attention / its maximum", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return _png_tight(fig, plt)


def _png_tight(fig, plt) -> bytes:
    """Like ``_png`` for figures laid out by hand (no second ``tight_layout``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
