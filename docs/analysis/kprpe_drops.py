"""Usage: kprpe_drops.py ROOT

KP-RPE Table 1's question on the kprpe-celeba64 grid: does an arm lose less than the plain ViT beyond the training
range? Per seed, each arm's drop from LFW aligned (``lfw``) to the seeded misalignment of LFW (``lfw_misaligned``),
in accuracy points, read from ROOT/c64_kprpe_eval_ARM_AUG_sS/eval.json; then the arm's drop minus the ViT's of the
same seed and augmentation, mean and Student-t 95 % interval over the seeds both have
(``lafs.cli.experiment_tables.paired_difference``)."""
import json
import re
import sys
from pathlib import Path

from lafs.cli.experiment_tables import paired_difference

root = Path(sys.argv[1])
acc: dict = {}  # (arm, aug) -> seed -> {set: accuracy %}
for run in sorted(root.glob("c64_kprpe_eval_*_s*")):
    m = re.fullmatch(r"c64_kprpe_eval_(vit\w*?)_(plain|misalign)_s(\d+)", run.name)
    if not m or not (run / "eval.json").is_file():
        continue
    results = json.loads((run / "eval.json").read_text())["results"]
    acc.setdefault((m[1], m[2]), {})[int(m[3])] = {r["name"]: 100 * r["accuracy"] for r in results
                                                    if "name" in r and "accuracy" in r}
drops = {k: {s: v["lfw"] - v["lfw_misaligned"] for s, v in seeds.items()} for k, seeds in acc.items()}
for aug in ("plain", "misalign"):
    for arm in ("vit", "vit_kprpe", "vit_irpe"):
        d = drops.get((arm, aug), {})
        print(f"{aug} {arm}: drop per seed " + ", ".join(f"s{s} {v:.2f}" for s, v in sorted(d.items())))
    for arm in ("vit_kprpe", "vit_irpe"):
        p = paired_difference(drops.get((arm, aug), {}), drops.get(("vit", aug), {}))
        ci = f"[{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}]" if p["ci"] else "(one seed)"
        mean = f"{p['mean']:+.2f}" if p["mean"] is not None else "-"
        print(f"  {aug}: {arm} drop - vit drop over seeds {p['seeds']}: "
              + ", ".join(f"{x:+.2f}" for x in p["differences"]) + f"; mean {mean} {ci}")
