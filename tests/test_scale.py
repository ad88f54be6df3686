"""Beyond one machine: a training process that dies, and the scale notebook under papermill (every step at two
sizes; training in two processes with torchrun, gloo, one thread each, compared with one process)."""
import json

import pytest
import threading
import time

import psutil

from conftest import run_notebook
from yelp_ts import data, training
from yelp_ts.core import TrainingError, WorkDir


def _training_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "yelp_ts.training" in " ".join(p.info["cmdline"] or [])
            and "torch.distributed.run" not in " ".join(p.info["cmdline"] or [])]


@pytest.mark.training
def test_a_process_that_dies_takes_the_run_down_with_a_clear_error(tmp_path):
    data.make_data(tmp_path, "sample", n_train=400, n_eval=20)
    outcome = {}
    def run():
        try: training.train(tmp_path, model="minilm", epochs=20, batch_size=8, nproc=2)
        except TrainingError as e: outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True); thread.start()
    deadline = time.monotonic() + 180
    while len([p for p in _training_workers() if p.cpu_percent(0.2) > 20]) < 2:   # both started and computing
        assert time.monotonic() < deadline, "the two training processes did not start"
    victim = next(p for p in _training_workers() if p.environ().get("LOCAL_RANK") == "1")
    victim.kill()
    thread.join(240)                                   # torchrun stops the other process; a peer waits 2 min at most
    assert not thread.is_alive(), "the run hung after a process died"
    assert "training process failed" in str(outcome.get("error")), outcome
    assert _training_workers() == []


@pytest.mark.notebook
def test_scale_notebook_runs(trained_workdir, tmp_path):
    """Every step at two sizes; training in one process, in two (torchrun: accuracy within the noise, the same loss,
    the model serves) and from the notebook (Accelerate); only the first process wrote the model and its records."""
    run_notebook("beyond_6_scale", tmp_path / "executed", workdir=str(tmp_path / "wd"), model_workdir=str(trained_workdir),
                 sizes=[200, 600], n_train=128, n_eval=60, epochs=1)
    for run in ("two", "launcher"):
        wd = tmp_path / "wd" / "processes" / run
        two = json.loads((WorkDir(wd).model / "metrics.json").read_text())
        assert (two["world_size"], two["batch_size"], two["per_device_batch_size"]) == (2, 8, 4)
        assert {"model.safetensors", "metrics.json", "log_history.json", "index_to_name.json"} <= {p.name for p in WorkDir(wd).model.iterdir()}
        assert not [p for p in wd.iterdir() if p.name.startswith(".trainer-")]
