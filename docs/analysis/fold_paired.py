"""Fold-paired differences between two arms' eval.json (one seed): per set, arm A - arm B over the 10 folds of the
same pairs, mean and Student-t 95 % interval (9 df): how much the test pairs move a difference, not training."""
import json, sys
import numpy as np
T975_9 = 2.2621571627409915
root = sys.argv[1]  # the grid root holding the c64_kprpe_eval_*_s0 run folders
def folds(run, name):
    d = json.load(open(f"{root}/{run}/eval.json"))
    for r in d["results"]:
        if r.get("name") == name and "fold_accuracies" in r:
            return np.array(r["fold_accuracies"]) * 100
    raise KeyError(name)
def ci(x):
    m, s = x.mean(), x.std(ddof=1)
    h = T975_9 * s / np.sqrt(len(x))
    return f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]"
sets = ["lfw", "celeba64_val", "lfw_unaligned", "lfw_misaligned"]
pairs = [(f"c64_kprpe_eval_vit_kprpe_{a}_s0", f"c64_kprpe_eval_vit_{a}_s0") for a in ("plain", "misalign")] + \
        [(f"c64_kprpe_eval_vit_irpe_{a}_s0", f"c64_kprpe_eval_vit_{a}_s0") for a in ("plain", "misalign")]
for a, b in pairs:
    try:
        row = [ci(folds(a, s) - folds(b, s)) for s in sets]
        # drop from aligned to beyond the range, A's minus B's
        drop = (folds(a, "lfw") - folds(a, "lfw_misaligned")) - (folds(b, "lfw") - folds(b, "lfw_misaligned"))
        print(f"{a} - {b}: " + " | ".join(f"{s} {r}" for s, r in zip(sets, row)) + f" | drop diff {ci(drop)}")
    except (FileNotFoundError, KeyError) as e:
        print(a, b, "missing", e)
