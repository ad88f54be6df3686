"""The quick benchmark's code path on a tiny load: the report's structure and the rules it measures by, not its timings."""
import json

import pytest
from dataclasses import asdict

from conftest import link_model, run_notebook
from yelp_ts import benchmark, serving
from yelp_ts.training import training_precision


@pytest.mark.notebook
def test_quick_benchmark_report(trained_workdir, tmp_path):
    "The benchmark notebook under papermill, quick mode on tiny loads: it runs, and its report has every part."
    wd = link_model(trained_workdir, tmp_path / "wd")
    (wd / "data").symlink_to(trained_workdir / "data")
    run_notebook("beyond_3_benchmark", tmp_path / "executed", workdir=str(wd), quick=True, seconds=0.3, load_seconds=1,
                 training_steps=2)
    out = wd / "bench"
    result = json.loads((out / "results.json").read_text())
    assert result["quick"] is True and result["machine"]["torchserve"] == "0.12.0"
    assert result["machine"]["native_precision"] == training_precision("auto")
    md = (out / "results.md").read_text()
    for needle in ["| in-process |", "| served |", "| training |", "| target |", *benchmark.TARGETS]:
        assert needle in md, needle

    ceiling = result["ceiling"]                                     # every runtime and precision this machine runs
    assert [(r["precision"], r["runtime"]) for r in ceiling] == [tuple(c) for c in benchmark.bench_candidates()]
    assert ceiling[0]["agreement"] == 1.0 and all(0 <= r["agreement"] <= 1 and r["model_mb"] > 0 for r in ceiling)
    assert all([b["batch_size"] for b in r["batches"]] == [1, 8, 16] and all(b["samples_per_s"] > 0 for b in r["batches"])
               for r in ceiling)

    names = ["article", "yelp_ts"] + (["peer"] if "peer" in result else [])
    for name in names:
        loads = result[name]["loads"]
        assert [r["concurrency"] for r in loads] == [1, 4, 16]
        for r in loads:
            assert r["errors"] == 0 and r["requests"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
            assert 0 <= r["generator_cpu"] < 1
    assert result["article"]["serving"] == asdict(benchmark.ARTICLE_SERVING) and result["article"]["asked"]["precision"] == "fp32"
    chosen = json.loads((out / "yelp_ts" / "torch_model" / "parity.json").read_text())["chosen"]
    handler = result["yelp_ts"]["config"]["handler"]
    assert (handler["precision"], handler["runtime"]) == (chosen["precision"], chosen["runtime"])
    assert all(r["queue_p50_ms"] is not None and r["handler_p50_ms"] is not None for r in result["yelp_ts"]["loads"])
    if "peer" in result:                                            # the peer serves what yelp_ts serves
        assert (result["peer"]["model_config"]["precision"], result["peer"]["model_config"]["runtime"]) == \
            (chosen["precision"], chosen["runtime"])

    assert [r["precision"] for r in result["training"]] == list(dict.fromkeys(["fp32", training_precision("auto")]))
    assert set(result["ratios"]) == set(benchmark.TARGETS) | {"errors"}
    for ratio in result["ratios"].values():
        assert set(ratio) == {"value", "target", "holds"}
    assert result["ratios"]["run_auto_vs_fp32"]["value"] is None        # no `yelp-ts run` here: nothing to estimate from
    for name in names[:2]:                                          # the benchmark's servers are gone
        assert not serving.status(out / name).get("running")


@pytest.mark.notebook
def test_peer_notebook_serves_the_same_answers(trained_workdir, tmp_path):
    "beyond_4_peer under papermill: LitServe starts, answers like the handler, refuses bad input and wrong keys, and stops."
    run_notebook("beyond_4_peer", tmp_path / "executed", workdir=str(trained_workdir))


@pytest.mark.slow
def test_without_wrk_the_python_load_reports_its_own_cpu_only(tmp_path, monkeypatch):
    """Where wrk is not installed, `load` falls back to a fresh Python process: every request is counted, and the
    generator's CPU share is the load's own (not the child's imports, which once read as 335 %)."""
    import http.server, threading
    class Stars(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"                                   # keep-alive, like TorchServe
        def do_POST(self):
            assert self.headers["Authorization"] == "Bearer k" and "text" in json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = b'{"stars": 3}'
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stars)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(benchmark.shutil, "which", lambda name: None)
        row = benchmark.load(f"http://127.0.0.1:{server.server_port}/predictions/yelp", "k", ["good", "bad"], 2,
                             seconds=1.0, workdir=tmp_path)
    finally:
        server.shutdown(); server.server_close()
    assert row["requests"] > 2 and row["errors"] == 0 and row["p50_ms"] <= row["p95_ms"]
    assert 0 <= row["generator_cpu"] < 1, row
