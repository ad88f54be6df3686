"""The quick benchmark's code path on a tiny load: the report's structure, not its timings."""
import json


from conftest import link_model, run_notebook
from yelp_ts import benchmark, serving
from yelp_ts.core import MAX_LENGTH


def test_quick_benchmark_report(trained_workdir, tmp_path):
    "The benchmark notebook under papermill, quick mode on a tiny load: it runs and its report has every part."
    wd = link_model(trained_workdir, tmp_path / "wd")
    (wd / "data").symlink_to(trained_workdir / "data")
    run_notebook("06_benchmark", tmp_path / "executed", workdir=str(wd), quick=True, n_requests=24, seconds=0.5,
                 training_steps=2)
    out = wd / "bench"
    result = json.loads((out / "results.json").read_text())
    assert result["quick"] is True
    md = (out / "results.md").read_text()
    for needle in ["| deployment |", "ceiling", "article", "yelp_ts", "served_vs_ceiling_c16",
                   "yelp_ts_vs_article_c16", "c1_p50_overhead_ms", "dynamic_vs_max_length_training"]:
        assert needle in md
    assert result["machine"]["cores"] >= 1 and result["machine"]["torchserve"] == "0.12.0"
    for name in ("article", "yelp_ts"):
        loads = result[name]["loads"]
        assert [r["concurrency"] for r in loads] == [1, 4, 16]
        for r in loads:
            assert r["errors"] == 0, r["first_errors"]
            assert r["requests"] > 0 and r["requests_per_s"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert result["article"]["model_config"] == benchmark.ARTICLE_CONFIG
    assert result["yelp_ts"]["model_config"] == benchmark.tuned_config()
    assert {r["batch_size"] for r in result["ceiling"]} == {1, benchmark.tuned_config()["batch_size"]}
    assert [r["max_length"] for r in result["training"]] == [MAX_LENGTH, 256]
    assert all(r["best_vs_article"] > 0 for r in result["training"])
    assert [o["option"] for o in result["options"]] == ["fp32", "int8 dynamic"]
    assert all(0 <= o["accuracy"] <= 1 for o in result["options"])
    for ratio in result["ratios"].values():
        assert set(ratio) == {"value", "target", "holds"}
    # the benchmark's servers are gone
    for name in ("article", "yelp_ts"):
        assert not serving.status(out / name).get("running")
