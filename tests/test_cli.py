"""The `yelp-ts` console script: the pipeline from the command line, on the embedded default, small sizes."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import free_port, run_notebook

YELP_TS = str(Path(sys.executable).parent / "yelp-ts")


def yelp_ts(*args, timeout=900):
    return subprocess.run([YELP_TS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_notebook_runs(tmp_path):
    run_notebook("07_cli", tmp_path / "executed", workdir=str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "data" / "train.csv").exists()


def test_archive_takes_serving_settings(trained_workdir, tmp_path):
    r = yelp_ts("archive", "--workdir", trained_workdir, "--model-name", "cli", "--workers", "2",
                "--torch-threads", "1", "--serve-batch-size", "16", "--max-batch-delay", "7")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load((trained_workdir / "torch_model" / "model-config.yaml").read_text())
    assert (config["minWorkers"], config["batchSize"], config["maxBatchDelay"], config["handler"]["torch_threads"]) == (2, 16, 7, 1)
    assert (trained_workdir / "torch_model" / "model_store" / "cli.mar").exists()


def test_run_end_to_end(tmp_path):
    "`yelp-ts run` on the embedded default (small sizes): data → train → archive → serve → predict; then stop."
    wd = tmp_path / "wd"
    ports = [free_port() for _ in range(3)]
    r = yelp_ts("run", "--workdir", wd, "--n-train", 48, "--n-eval", 16, "--epochs", 1, "--max-length", 64,
                "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2])
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Stopped back by Mellow Mushroom" in r.stdout and "→" in r.stdout
        assert "yelp-ts stop" in r.stdout and "Authorization: Bearer" in r.stdout
        status = json.loads(yelp_ts("status", "--workdir", wd).stdout)
        assert status["running"]
        p = yelp_ts("predict", "--workdir", wd, "Great tacos, friendly staff.", "Cold food and a rude waiter.")
        answers = [json.loads(line) for line in p.stdout.splitlines()]
        assert len(answers) == 2 and all(a["label"].endswith(("star", "stars")) for a in answers)
        assert set(answers[0]["probabilities"]) == {"1 star", "2 stars", "3 stars", "4 stars", "5 stars"}
        bad = yelp_ts("predict", "--workdir", wd, "   ")
        assert bad.returncode == 2 and "empty" in bad.stderr.lower() and "Traceback" not in bad.stderr
    finally:
        s = yelp_ts("stop", "--workdir", wd)
    assert s.returncode == 0
    assert not json.loads(yelp_ts("status", "--workdir", wd).stdout)["running"]
