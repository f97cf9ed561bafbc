"""scripts/behaviour_share.py: the error budget's sampler part (part 5) at other behaviour and sampler step counts.
Its cell at the run's own settings must be part 5 itself, computed by the library for a trained run."""
from __future__ import annotations

import pytest

from aepo_lite.toy import pipeline as TT
from aepo_lite.toy import trained_budget as TB
from conftest import load_script

SMALL = dict(n_data=2000, eval=dict(n_samples=400, n_ref_data=2000, pool_size=2000, grid_size=12))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished QGPO run (true reward) and its cache: its behaviour model is the one a bc config shares."""
    tmp = tmp_path_factory.mktemp("share")
    cfg = TT.make_config("8gaussians", "qgpo", "smoke", behaviour=dict(steps=150), energy=dict(steps=20),
                         support={"k": 8}, **SMALL)
    TT.run_toy(cfg, tmp / "run", cache_dir=tmp / "cache", progress=False, figure=False, budget=False)
    return cfg, tmp


def test_the_run_s_own_cell_is_part_5_and_other_steps_move_it(run):
    script = load_script("behaviour_share")
    cfg, tmp = run
    rows = script.share_rows("8gaussians", [150], [cfg.sampling.steps, 3], draws=2, seed=cfg.seed, preset="smoke",
                             beta=cfg.energy.beta, cache_dir=tmp / "cache", overrides=SMALL)
    models = TT.train_toy(cfg, cache_dir=tmp / "cache", progress=False, trained_only=True)
    part5 = TB.sampler_part(models, [TT.draw_target(cfg, d) for d in range(2)])
    own, fewer = rows
    assert float(own["distance"]) == pytest.approx(part5, rel=1e-5)
    dists = [float(v) for v in own["distances"].split()]
    assert len(dists) == 2 and float(own["distance"]) == pytest.approx(sum(dists) / 2, abs=2e-6)
    assert float(own["floor"]) == pytest.approx(TT.run_floor(cfg), rel=1e-5)
    assert float(own["ratio"]) == pytest.approx(float(own["distance"]) / float(own["floor"]), abs=2e-3)
    assert int(fewer["sampler_steps"]) == 3 and fewer["distances"] != own["distances"]


def test_the_script_merges_rows_renders_the_table_and_names_bad_input(run, tmp_path, capsys, monkeypatch):
    script = load_script("behaviour_share")
    cfg, tmp = run
    full = script.share_rows  # main() at the smoke preset and the small sizes the run fixture trained with
    monkeypatch.setattr(script, "share_rows", lambda *a, **k: full(*a, **{**k, "preset": "smoke", "overrides": SMALL}))
    csv = tmp_path / "share.csv"
    args = ["--tasks", "8gaussians", "--behaviour-steps", "150", "--draws", "1", "--cache-dir", str(tmp / "cache"),
            "--csv", str(csv), "--quiet"]
    assert script.main([*args, "--sampler-steps", "3"]) == 0
    assert script.main([*args, "--sampler-steps", "4"]) == 0  # merged beside the first row, not over it
    assert "8gaussians B=150 S=4: distance" in capsys.readouterr().out
    rows = script.read_csv_rows(csv, script.COLUMNS, made_by="x")
    assert [int(r["sampler_steps"]) for r in rows] == [3, 4]
    table = (tmp_path / "share.md").read_text()
    assert "| B = 150, S = 3 | B = 150, S = 4 |" in table and "| 8gaussians | 10 | 0 |" in table
    (tmp_path / "share.md").unlink()
    assert script.render(csv, tmp_path)[0].read_text() == table  # `aepo-lite figures` redraws it from the CSV
    for bad, name in ((["--behaviour-steps", "0"], "--behaviour-steps"), (["--sampler-steps", "0"], "--sampler-steps"),
                      (["--tasks", "nope"], "--tasks"), (["--draws", "0"], "--draws")):
        with pytest.raises(SystemExit):
            script.main([*args, *bad])
        assert name in capsys.readouterr().err

