"""The ``lafs`` console script: models table, config errors (``lafs demo`` end to end: test_demo.py)."""

from lafs.cli import main
from lafs.cli.models import models_table


def test_models_table_lists_every_backbone_and_size():
    table = models_table()
    for needle in ("part_fvit  tiny", "fvit       base", "iresnet    r50", "15.28", "2.477", "66.96", "64.08", "43.59"):
        assert needle in table, needle


def test_models_with_override_shows_the_configured_model(capsys):
    assert main(["models", "model.name=fvit", "model.size=tiny", "model.depth=6"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("fvit")]
    assert len(rows) == 1
    # Three more blocks of 2 LN + qkv + out + FFN = 4,068,864 params each on top of 12,407,808.
    per_block = 2 * 1024 + 512 * 3 * 704 + (704 * 512 + 512) + (512 * 2560 + 2560 + 2560 * 512 + 512)
    assert per_block == 4_068_864
    assert f"{(12_407_808 + 3 * per_block) / 1e6:.2f}" in rows[0]


def test_config_error_exit_code_and_message(capsys):
    assert main(["models", "model.detph=6"]) == 2
    err = capsys.readouterr().err
    assert "model.detph" in err and "model.depth" in err


def test_option_not_taken_by_backbone(capsys):
    assert main(["models", "model.name=iresnet", "model.size=r18", "model.num_landmarks=9"]) == 2
    assert "num_landmarks" in capsys.readouterr().err
