"""The benchmark script keeps running and reports positive, consistent figures (no timing assertions)."""

import json
import shutil
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
         "--settings", "fp32-stock,fp32,bf16", "--matmul-n", "256", "--sample-repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    peaks = result["matmul"]["peak_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    rows = {m["setting"]: m for m in result["models"]}
    assert list(rows) == ["fp32-stock", "fp32", "bf16"]
    for setting, m in rows.items():
        assert m["spec"] == "part_fvit:micro" and m["images_per_s"] > 0 and m["peak_dtype"] in peaks
        # each setting is measured against the matmul peak of its own dtype
        assert m["fraction_of_peak"] == pytest.approx(m["achieved_gflops"] / peaks[m["peak_dtype"]])
        assert m["speedup_vs_fp32"] == pytest.approx(rows["fp32"]["median_step_s"] / m["median_step_s"])
    assert rows["bf16"]["peak_dtype"] == "bf16" and rows["fp32"]["speedup_vs_fp32"] == 1.0
    assert "avx512_bf16=" in proc.stdout and "amx_bf16=" in proc.stdout  # the CPU flags are printed
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
    # pooling: insightface's float32 template features against lafs's float64 ones; pairs: float64 both ways
    assert r["ijb"]["max_abs_diff"]["pooling"] < 1e-6 and r["ijb"]["max_abs_diff"]["pairs_loop"] < 1e-9
    assert r["ijb"]["tar_identical"]
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


def test_lafs_bench_kprpe_times_bf16_autocast_when_asked(tmp_path, capsys):
    from lafs.cli import main

    out = tmp_path / "kprpe.json"
    assert main(["bench", "kprpe", "--size", "micro", "--batch", "2", "--rounds", "1", "--warmup", "0", "--amp",
                 "bf16", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["amp"] == "bf16" and "precision bf16 autocast" in capsys.readouterr().out
    assert [a["name"] for a in r["arms"]] == ["vit", "vit_irpe", "vit_kprpe"]
    assert all(a["train_img_s"] > 0 for a in r["arms"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_lafs_bench_kprpe_times_compiled_arms_when_asked(tmp_path, capsys):
    from lafs.cli import main

    out = tmp_path / "kprpe.json"
    assert main(["bench", "kprpe", "--size", "micro", "--batch", "2", "--rounds", "1", "--warmup", "1",
                 "--compile", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["settings"]["compile"] is True and "precision fp32, compiled" in capsys.readouterr().out
    assert all(a["train_img_s"] > 0 and len(a["train_s"]) == 1 for a in r["arms"])  # the warm-up round untimed


def test_bench_data_reports_loader_and_step_input_per_core(tmp_path):
    import numpy as np

    from lafs.data.datasets import encode_image
    from lafs.data.recordio import write_face_records

    rng = np.random.default_rng(0)
    rec = tmp_path / "tiny.rec"
    write_face_records(rec, [(i // 4, encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
                             for i in range(16)])
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--rec", str(rec), "--images", "16",
         "--repeats", "1", "--presets", "flip,webface4m", "--img-sizes", "native,40", "--workers", "0",
         "--synthetic", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r["cpu"]["flags"]) >= {"avx512f", "avx512_bf16", "amx_bf16"} and r["versions"]["cv2"]
    (entry,) = r["recs"]
    load = entry["loader"]
    assert load["size"] == [32, 32] and load["identical_to_before"] and load["images_per_s_per_core"] > 0
    assert [(s["img_size"], s["preset"]) for s in entry["step_input"]] == [
        (32, "flip"), (32, "webface4m"), (40, "flip"), (40, "webface4m")]
    for s in entry["step_input"]:
        expected = 1e6 / (load["us_per_image"] + s["us_per_image"])
        assert s["decode_plus_augment_images_per_s_per_core"] == pytest.approx(expected)
        assert s["goal_met"] == (expected >= 1500)
    assert r["dataloader"]["workers"] == 0 and r["dataloader"]["images"] == 16
    assert "goal >= 1,500 images/s per core" in proc.stdout and "avx512_bf16" in proc.stdout


@pytest.mark.slow
def test_bench_step_guard_reports_both_settings_side_by_side(tmp_path):
    out = tmp_path / "guard.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step_guard.py"), "--models", "fvit:micro", "--optimizers",
         "sgd", "--batch", "4", "--steps", "1", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["step_ms_guard"] > 0 and row["step_ms_no_guard"] > 0 and row["snapshot_ms"] > 0
    assert "avx512_bf16=" in proc.stdout and "guard ms/step" in proc.stdout
