"""Image operations shared by the supervised and the multi-crop pipelines, batched: every random draw is per image,
each op runs once on the batch (or on the group of images that drew it), on the batch's device, with torch's global
RNG for that device (so a resumed run repeats the draws). Images are floats in [0, 1] unless a function says otherwise.

- :func:`sample_boxes`: torchvision ``RandomResizedCrop``'s boxes. The supervised "w/ Aug" crop warps its box back
  to the input size (bilinear, keypoints carried along); the DINO / LAFS views resample it bicubically to the view
  size (:func:`lafs.augment.multicrop.crop_resize`).
- :func:`color_jitter`: torchvision ``ColorJitter``, its four ops in a random order per image.
- :func:`uniform`, :func:`groups`, :func:`brightness` and :func:`shift_hue`: the draws, the grouping and the two
  jitter ops the other modules also use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import kornia.enhance as KE
import torch
from torch import Tensor

__all__ = ["brightness", "color_jitter", "groups", "sample_boxes", "shift_hue", "uniform"]


def uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device | str | None) -> Tensor:
    return low + (high - low) * torch.rand(shape, device=device)


def groups(choice: Tensor, n: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (k, indices of the images that chose k) for k < n; entries outside [0, n) choose nothing.

    One host sync per call (the group sizes), not one per group.
    """
    choice = torch.where((choice >= 0) & (choice < n), choice, n)
    order = torch.argsort(choice, stable=True)
    sizes = torch.bincount(choice, minlength=n + 1).tolist()
    for k, idx in enumerate(torch.split(order, sizes)[:n]):
        if len(idx):
            yield k, idx


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance.Brightness: a blend with black, ``factor`` per image."""
    return x * factor.view(-1, 1, 1, 1)


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue: rotate the HSV hue by ``shift`` (N, fraction of the circle), V and S kept.

    Written out in RGB because the round trip through HSV (kornia.enhance.adjust_hue) is ~3x slower on CPU.
    The arithmetic is that of ``h = where(v == r, (g - b) / d, where(v == g, (b - r) / d + 2, (r - g) / d + 4))``,
    ``h = remainder(h / 6 + shift, 1) * 6``, ``k = remainder(h + (5, 3, 1), 6)``,
    ``v - c * minimum(k, 4 - k).clamp(0, 1)`` with the same float results, in fewer passes (2.5x faster on CPU):
    one division instead of three, ``a - floor(a)`` for ``remainder(a, 1)`` (the same single rounding of the same
    exact value), ``k - 6`` where ``k >= 6`` for ``remainder(k, 6)`` (exact, as 0 <= k < 12), in-place steps.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = x.amax(1, keepdim=True)
    c = v - x.amin(1, keepdim=True)
    d = torch.where(c > 0, c, 1)  # a grey pixel has no hue; its output is v whatever h is
    is_r, is_g = v == r, v == g
    h = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).div_(d)
    h = h.add_(torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0)))
    h = h.div_(6).add_(shift.view(-1, 1, 1, 1))
    h = h.sub_(torch.floor(h)).mul_(6)
    k = h + x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = k.sub_((k >= 6) * 6.0)
    return torch.minimum(k, 4 - k).clamp_(0, 1).mul_(c).neg_().add_(v)


_JITTER_OPS = (brightness, KE.adjust_contrast_with_mean_subtraction, KE.adjust_saturation_with_gray_subtraction,
               shift_hue)  # fmt: skip


def color_jitter(x: Tensor, strengths: tuple[float, float, float, float]) -> Tensor:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` = ``strengths`` on every image of ``x``
    (N x 3 x H x W in [0, 1], changed in place and returned).

    Factors ~ U(max(0, 1 - s), 1 + s) for the first three, a hue shift ~ U(-s, s) of the colour circle; the four ops
    in a random order drawn per image; an op of strength 0 is skipped (its draws are still made).
    """
    b, dev = len(x), x.device
    params = [uniform(max(0.0, 1 - s), 1 + s, (b,), dev) for s in strengths[:3]]
    params.append(uniform(-strengths[3], strengths[3], (b,), dev))
    order = torch.rand(b, 4, device=dev).argsort(1)
    for step in range(4):
        for k, idx in groups(order[:, step], 4):
            if strengths[k] > 0:
                # index_select: the same gather as x[idx], 3x faster on CPU
                x[idx] = _JITTER_OPS[k](x.index_select(0, idx), params[k][idx]).clamp_(0, 1)
    return x


def sample_boxes(
    n: int,
    h: int,
    w: int,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
) -> Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for n images of h x w: returns n x 4 (left, top, width, height).

    10 tries at a box of area fraction ~ U(scale) and log-uniform aspect ratio w/h in ``ratio``; the first that fits
    the image is placed uniformly at integer offsets. Where none fits, the whole image clipped to the ratio range,
    centred. Values are whole numbers stored as floats.
    """
    area = h * w * uniform(scale[0], scale[1], (n, 10), device)
    r = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10), device))
    cw, ch = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    fw = w if w / h <= ratio[1] else round(h * ratio[1])
    fh = h if w / h >= ratio[0] else round(w / ratio[0])
    cw = torch.where(found, cw.gather(1, first).squeeze(1), float(fw))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), float(fh))
    u = torch.rand(2, n, device=device)
    top = torch.where(found, torch.floor(u[0] * (h - ch + 1)), (h - ch) // 2)
    left = torch.where(found, torch.floor(u[1] * (w - cw + 1)), (w - cw) // 2)
    return torch.stack([left, top, cw, ch], 1)
