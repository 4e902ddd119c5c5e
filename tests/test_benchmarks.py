"""The benchmark script keeps running and reports positive, consistent figures (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_models_quick_run_reports_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--quick", "--models", "part_fvit:micro",
         "--matmul-n", "256", "--sample-repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["matmul"]["peak_gflops"] > 0
    (model,) = result["models"]
    assert model["spec"] == "part_fvit:micro" and model["images_per_s"] > 0
    assert model["fraction_of_peak"] == pytest.approx(model["achieved_gflops"] / result["matmul"]["peak_gflops"])
    assert result["sampling"]["max_abs_diff_out"] <= 1e-6 and result["sampling"]["fwd_ratio"] > 0
    assert "loop / batched" in proc.stdout


@pytest.mark.slow
def test_bench_augment_runs_and_reports_every_pipeline():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_augment.py"), "--batch", "4", "--reps", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rates = [float(line.split()[-5]) for line in proc.stdout.splitlines() if "source images/s" in line]
    assert len(rates) == 4 and all(r > 0 for r in rates), proc.stdout


@pytest.mark.slow
def test_bench_eval_small_run_agrees_with_its_loops(tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_eval.py"), "--pairs", "600", "--repeats", "1",
         "--probes", "200", "--candidates", "2000", "--identities", "100", "--loop-probes", "10",
         "--ijb-scale", "0.002", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["verification"]["end_to_end"]["identical"] and r["verification"]["protocol_only"]["identical"]
    assert r["identification"]["subsample_agree"]
    assert r["ijb"]["max_abs_diff"]["pooling"] < 1e-9 and r["ijb"]["max_abs_diff"]["pairs_loop"] < 1e-9
    assert all(v > 0 for v in r["ijb"]["ratios"].values())
    assert "summary (ratios measured side by side above)" in proc.stdout


def test_lafs_bench_kprpe_micro_reports_every_arm(tmp_path):
    from lafs.cli import main

    out = tmp_path / "kprpe.json"
    assert main(["bench", "kprpe", "--size", "micro", "--batch", "2", "--rounds", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    arms = {a["name"]: a for a in r["arms"]}
    assert list(arms) == ["vit", "vit_irpe", "vit_kprpe"]
    assert arms["vit"]["train_overhead_pct"] == 0.0
    assert all(a["train_img_s"] > 0 and a["eval_img_s"] > 0 for a in arms.values())
    # parameters: iRPE adds 3 tables x 32 x 49 per layer; KP-RPE adds W_L 10 -> 49 x 3 heads x 2 layers
    assert arms["vit_irpe"]["params"] - arms["vit"]["params"] == 2 * 3 * 32 * 49
    assert arms["vit_kprpe"]["params"] - arms["vit"]["params"] == 10 * 294 + 294
    assert arms["vit_kprpe"]["gflops"] > arms["vit"]["gflops"]
