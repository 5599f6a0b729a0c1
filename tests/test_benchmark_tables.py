"""lvae.report.benchmark_tables reads benchmarks/results.json as the reproduce chapter shows it."""

import pytest


def test_benchmark_table_reads_bench_results(tmp_path, monkeypatch):
    """The reproduce chapter and benchmarks/table.py show bench.py's JSON; a missing file names the fix."""
    import json

    from lvae.report.benchmark_tables import benchmark_table
    res = {"machine": {"cpu": "X", "cores": 2, "threads": 1, "torch": "2", "date": "d", "load_start": [0.1, 0, 0],
                       "load_end": [0.2, 0, 0]},
           "peak": {"float32": 100.0, "bfloat16": 200.0},
           "rows": [{"what": "step", "impl": "reference", "ms": 50.0, "wall_ms": 60.0, "ratio": 1.0, "gflops": 40.0,
                     "peak_frac": 0.4},
                    {"what": "step", "impl": "library fp32 compiled", "ms": 2500.0, "ratio": 0.5, "compile_s": 44.0}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    machine, rows = benchmark_table(tmp_path / "r.json")
    assert "1 torch thread(s) (CPU time of one thread)" in machine and "fp32 100 GFLOP/s" in machine
    assert rows[0]["time"] == "50.0 ms" and rows[0]["% of fp32 peak"] == "40%" and rows[0]["notes"] == "wall 60.0 ms"
    assert rows[1]["time"] == "2.5 s" and rows[1]["x reference"] == "0.50" and "compilation 44 s" in rows[1]["notes"]
    # the book's narrow form: one row per benchmark, a (time, ratio, % peak) cell per implementation
    from lvae.book.chapter import table
    from lvae.report.benchmark_tables import benchmark_summary
    speed, other = benchmark_summary(rows + [{"benchmark": "grid", "implementation": "lvae.training.grid (vmap)", "time": "6.8 s",
                                              "x reference": "", "GFLOP/s": "", "% of fp32 peak": "", "notes": ""}])
    assert speed == [{"benchmark": "step", "reference": ("50.0 ms", "1.00x", "40%"),
                      "library fp32 compiled": ("2.5 s", "0.50x")}]
    assert other == ["step, reference: wall 60.0 ms", "step, library fp32 compiled: first steps incl. compilation 44 s",
                     "grid, lvae.training.grid (vmap): 6.8 s"]
    assert "<td>50.0 ms<br>1.00x<br>40%</td>" in table(speed, ["benchmark", "reference"])._repr_html_()
    assert "step | 50.0 ms 1.00x 40%" in repr(table(speed, ["benchmark", "reference"]))
    res["machine"].update(git_commit="0123456789abcdef", git_dirty=False)
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert ", commit 0123456;" in benchmark_table(tmp_path / "r.json")[0]
    monkeypatch.setattr("lvae.report.benchmark_tables.benchmark_results_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="benchmarks/bench.py"):
        benchmark_table()
