"""Probe, not a toolkit option: `lafs train ...` with KP-RPE's W_L (the kprpe.* parameters) at SCALE times the
learning rate (its own AdamW groups: weight decay on the weight, none on the bias). Usage: probe_wl.py SCALE ARGS..."""
import sys

import lafs.train.loop as loop

orig = loop.param_groups
SCALE = float(sys.argv[1])


def is_rpe(name: str) -> bool:
    return name.startswith("kprpe.") or ".kprpe." in name


def patched(named, weight_decay, *args, **kwargs):
    named = list(named)
    groups = orig([(n, p) for n, p in named if not is_rpe(n)], weight_decay, *args, **kwargs)
    rpe = [(n, p) for n, p in named if is_rpe(n) and p.requires_grad]
    groups.append({"name": "kprpe", "params": [p for n, p in rpe if p.ndim >= 2], "weight_decay": weight_decay,
                   "lr_scale": SCALE})
    groups.append({"name": "kprpe_bias", "params": [p for n, p in rpe if p.ndim < 2], "weight_decay": 0.0,
                   "lr_scale": SCALE})
    print("kprpe groups:", [(n, tuple(p.shape)) for n, p in rpe], "lr x", SCALE, flush=True)
    return groups


loop.param_groups = patched
from lafs.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
