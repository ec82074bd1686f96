"""tools/methods_figure.py: the zero-shot table's rows as points of one figure."""

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "methods_figure.py"
HEADER = "row,mean_acc,mean_acc_stderr,measured_sparsity,token_perplexity\n"


def _tool():
    spec = importlib.util.spec_from_file_location("methods_figure", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_become_points_relative_to_dense(tmp_path):
    table = tmp_path / "z.csv"
    table.write_text(
        HEADER + "dense,0.5,0.01,0.0,20.0\nnncf,0.49,0.01,0.3,21.0\nquantile@0.4,0.48,0.01,0.398,25.0\n"
        "attribution@0.3,0.4,0.01,0.3,80.0\nteal-greedy+rot32@0.42,0.47,0.01,0.392,24.0\n"
    )
    mod = _tool()
    ppl, acc, pts = mod.points(str(table))
    assert (ppl, acc) == (20.0, 0.5)
    assert [(p.method, p.target, p.measured) for p in pts] == [
        ("quantile", 0.4, 0.398),
        ("teal-greedy+rot32", 0.42, 0.392),
    ]
    assert pts[0].delta_percent == pytest.approx(25.0) and pts[1].mean_acc == 0.47
    pytest.importorskip("matplotlib")
    out = tmp_path / "f.png"
    assert mod.main([str(table), "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_a_table_without_a_dense_row_is_refused(tmp_path):
    table = tmp_path / "z.csv"
    table.write_text(HEADER + "quantile@0.4,0.48,0.01,0.398,25.0\n")
    with pytest.raises(SystemExit, match="no 'dense' row"):
        _tool().points(str(table))
