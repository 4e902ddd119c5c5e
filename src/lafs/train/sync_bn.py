"""Synchronised batch norm on every backend (gloo on CPU as well as NCCL on GPU).

Under DDP each process normalises with its own batch's statistics, so two processes of 32 images train another
model than one process of 64: the landmark CNN of Part fViT, all batch norm, drifted 0.39 % from the one-process run
in a two-process test. ``torch.nn.SyncBatchNorm`` fixes this on CUDA only. :class:`SyncBatchNorm2d` all-reduces the
per-channel sum and count, then the sum of squared deviations, in the forward, and the two gradient sums in the
backward (Ioffe & Szegedy 2015, the batch-norm gradient with the statistics of the *global* batch), so a DDP run
normalises as one process with the global batch does, to float rounding, on any backend (a two-process Part fViT
run follows the one-process losses to 5e-4 over 4 steps; per-rank statistics gave 3.9e-3).

The parameters' own gradients stay local sums; DDP averages them like every other gradient, which is what makes the
whole step equal the one-process step (the loss of each rank is the mean over its part of the batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims = [0, 2, 3]
        xf = x.float()
        c = x.shape[1]
        stats = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() / c])])
        dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:c] / count
        # two passes (the global mean first, then squared deviations from it): E[x^2] - mean^2 loses digits when
        # the mean is large against the spread, and the landmark CNN's grid sampling amplifies such differences
        centred = xf - mean.view(1, c, 1, 1)
        sq = centred.square().sum(dims)
        dist.all_reduce(sq)
        var = sq / count  # biased, as batch norm normalises
        invstd = (var + eps).rsqrt()
        xhat = centred * invstd.view(1, c, 1, 1)
        out = xhat
        if weight is not None:
            out = out * weight.float().view(1, c, 1, 1) + bias.float().view(1, c, 1, 1)
        ctx.save_for_backward(xhat, weight, invstd, count)
        ctx.has_affine = weight is not None
        unbiased = var * (count / (count - 1).clamp_min(1.0))
        ctx.mark_non_differentiable(mean, unbiased)  # for the running statistics only
        return out.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, grad_out: Tensor, _gm: Tensor, _gv: Tensor):
        xhat, weight, invstd, count = ctx.saved_tensors
        c = xhat.shape[1]
        dims = [0, 2, 3]
        dy = grad_out.float()
        local = torch.cat([dy.sum(dims), (dy * xhat).sum(dims)])
        grad_bias, grad_weight = local[:c].clone(), local[c:].clone()  # local: DDP averages them
        dist.all_reduce(local)
        mean_dy = (local[:c] / count).view(1, c, 1, 1)
        mean_dy_xhat = (local[c:] / count).view(1, c, 1, 1)
        scale = invstd if weight is None else invstd * weight.float()
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * scale.view(1, c, 1, 1)
        if not ctx.has_affine:
            return dx.to(grad_out.dtype), None, None, None
        return dx.to(grad_out.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the batch over every process of the default group
    (any backend); outside training, or in a single process, exactly ``nn.BatchNorm2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.ndim != 4:
            raise ValueError(f"SyncBatchNorm2d expects B x C x H x W input, got {tuple(x.shape)}")
        out, mean, var = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm2d`` in ``module`` replaced by a :class:`SyncBatchNorm2d` sharing its parameters and
    buffers (so an optimizer built before keeps working); the module itself is returned (or its replacement, if it
    is a batch norm)."""
    if type(module) is nn.BatchNorm2d:
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child))
    return module
