"""The goal table of `scripts/bench_torch.py` (issue 19's ratios per round and their
medians), on synthetic rows: no torch needed, nothing is timed."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_torch.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of_round(rnd, torch_hvp, torch_grad, hvp, grad, ggn):
    n = 1000
    return [
        {"tool": "torch", "method": "chunked", "n": n, "round": rnd, "seconds": torch_hvp, "peak_rss_bytes": 2e9},
        {"tool": "torch", "method": "grad", "n": n, "round": rnd, "seconds": torch_grad, "peak_rss_bytes": 1e9},
        {"tool": "hvp", "method": "hvp", "n": n, "round": rnd, "seconds": hvp, "peak_rss_bytes": 1e8,
         "of_gemm_peak": 0.8},
        {"tool": "hvp", "method": "grad", "n": n, "round": rnd, "seconds": grad, "peak_rss_bytes": 9e7,
         "of_gemm_peak": 0.6},
        {"tool": "hvp", "method": "ggn", "n": n, "round": rnd, "seconds": ggn, "peak_rss_bytes": 1e8,
         "of_gemm_peak": 0.7},
    ]


def goal_lines(capsys, rows):
    load_script().print_goals(rows)
    out = capsys.readouterr().out
    return {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ") and " N " not in line}


def test_goal_medians_over_rounds(capsys):
    rows = (rows_of_round(0, 7.0, 2.0, 3.0, 1.2, 2.0)      # HVP 2.33x, grad 1.67x, 2.5 grads, GGN 1.5x
            + rows_of_round(1, 5.0, 1.2, 3.0, 1.25, 2.2)   # 1.67x, 0.96x, 2.4 grads, GGN 1.36x
            + rows_of_round(2, 6.3, 1.6, 3.0, 1.5, 1.9))   # 2.10x, 1.07x, 2.0 grads, GGN 1.58x
    lines = goal_lines(capsys, rows)
    hvp = lines["HVP speed-up over torch's best (≥ 2.0)"]
    assert "| 2.33 | 1.67 | 2.10 | 2.10 | yes |" in hvp, hvp
    grad = lines["gradient speed-up over torch's (≥ 1.25)"]
    assert "| 1.67 | 0.96 | 1.07 | 1.07 | NO |" in grad, grad
    ratio = lines["HVP time / hvp gradient time (≤ 2.2)"]
    assert "| 2.50 | 2.40 | 2.00 | 2.40 | NO |" in ratio, ratio
    ggn = lines["HVP time / GGN time (≥ 1.5)"]
    assert "| 1.50 | 1.36 | 1.58 | 1.50 | yes |" in ggn, ggn
    assert lines["peak RSS / torch's (HVP) (≤ 0.4)"].endswith("| 0.05 | yes |")
    assert lines["HVP share of the GEMM peak (≥ 0.65)"].endswith("| 0.80 | yes |")


def test_a_missing_cell_is_shown_and_left_out_of_the_median(capsys):
    rows = rows_of_round(0, 7.0, 2.0, 3.0, 1.2, 2.0) + rows_of_round(1, 5.0, 1.2, 3.0, 1.25, 2.2)
    rows = [r for r in rows if not (r["round"] == 1 and r["method"] == "ggn")]
    ggn = goal_lines(capsys, rows)["HVP time / GGN time (≥ 1.5)"]
    assert "| 1.50 | – | 1.50 | yes |" in ggn, ggn


def write_rows(path, rows):
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")


def test_summarize_pools_the_rounds_of_several_runs(tmp_path, capsys):
    # Two runs of two rounds each, both numbered from 0 in their own file.
    speedups = [2.4, 1.6, 2.2, 1.9]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_rows(first, rows_of_round(0, 3.0 * speedups[0], 2.0, 3.0, 1.2, 2.0)
               + rows_of_round(1, 3.0 * speedups[1], 2.0, 3.0, 1.2, 2.0))
    write_rows(second, rows_of_round(0, 3.0 * speedups[2], 2.0, 3.0, 1.2, 2.0)
               + rows_of_round(1, 3.0 * speedups[3], 2.0, 3.0, 1.2, 2.0))
    script = load_script()
    rows = script.load_rows([first, second])
    assert sorted({r["round"] for r in rows}) == [0, 1, 2, 3]
    hvp = goal_lines(capsys, rows)["HVP speed-up over torch's best (≥ 2.0)"]
    # Four rounds keep their columns; the median is over both runs.
    assert "| 2.40 | 1.60 | 2.20 | 1.90 | 2.05 | yes |" in hvp, hvp


def test_many_rounds_show_their_range_and_median(capsys):
    speedups = [1.5, 2.5, 2.2, 1.8, 2.3, 1.7, 2.05]
    rows = [r for i, s in enumerate(speedups) for r in rows_of_round(i, 3.0 * s, 2.0, 3.0, 1.2, 2.0)]
    hvp = goal_lines(capsys, rows)["HVP speed-up over torch's best (≥ 2.0)"]
    assert hvp.endswith("| 1000 | 7 | 1.50 | 2.50 | 2.05 | yes |"), hvp


def test_summarize_names_the_line_that_is_not_a_row(tmp_path):
    import pytest
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tool": "hvp", "method": "hvp", "n": 1000, "seconds": 3.0, "round": 0}\n{"tool": "hvp"}\n')
    with pytest.raises(SystemExit) as e:
        load_script().load_rows([bad])
    assert str(e.value).startswith(f"{bad}:2: not a row written by --json"), e.value
    with pytest.raises(SystemExit) as e:
        load_script().load_rows([tmp_path / "missing.jsonl"])
    assert "cannot read" in str(e.value) and "missing.jsonl" in str(e.value), e.value
