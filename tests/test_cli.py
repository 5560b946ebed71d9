"""The command line: demo and list on the shipped models."""

from __future__ import annotations

from tvlens.cli import main


def test_demo_prints_accuracy_and_td_with_the_step_zero_control(capsys, tmp_path):
    assert main(["demo", "--n-per-task", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean accuracy (non-null tasks): 1.000" in out
    assert "untrained (step 0)" in out and "best layer" in out
    # then patching, head attribution and the report, with its summary and where it is
    (report,) = list(tmp_path.iterdir())
    assert report.suffix == ".html" and str(report) in out
    assert "patching at the query (swap)" in out and "grid means" in out and "top heads (dla)" in out
    assert "patching at answers (replace)" in out


def test_list_shows_families_and_shipped_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("codes", "bitwise", "categories", "sparse_regression"):
        assert name in out
    assert "alias: default" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
