"""Shared fixtures: notebooks run by papermill into temporary work directories with small parameters."""
import socket
from pathlib import Path

import papermill as pm
import pytest

from yelp_ts.core import MAX_LENGTH

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"

# Small sizes for CI: big enough that the fine-tuned model beats the TF-IDF baseline.
SMALL_DATA = dict(n_train=320, n_eval=120, seed=42)
SMALL_TRAIN = dict(epochs=5, max_length=MAX_LENGTH, batch_size=8)


def run_notebook(name, out_dir, **parameters):
    "Execute `nbs/{name}.ipynb` with papermill (cwd = nbs/, like a reader); return the executed notebook's path."
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.out.ipynb"
    pm.execute_notebook(str(NBS / f"{name}.ipynb"), str(out), parameters=parameters,
                        cwd=str(NBS), kernel_name="python3", progress_bar=False,
                        execution_timeout=900)
    return out


def link_model(src_workdir, dst_workdir):
    "A work directory of its own whose torch_model/ links to the model files of `src_workdir`'s (fast, no copy, no archive)."
    d = Path(dst_workdir) / "torch_model"
    d.mkdir(parents=True)
    for f in (Path(src_workdir) / "torch_model").iterdir():
        if f.is_file() and f.name != "model-config.yaml": (d / f.name).symlink_to(f)
    return Path(dst_workdir)


def free_port(taken=()):
    "A TCP port on 127.0.0.1 that nothing listens on right now, other than those in `taken` (free too, but spoken for)."
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in set(taken): return port


@pytest.fixture(scope="session")
def data_workdir(tmp_path_factory):
    "A work directory with data/ made by the data notebook (embedded sample, small sizes)."
    wd = tmp_path_factory.mktemp("wd_data")
    run_notebook("00_data", wd / "executed", workdir=str(wd), source="sample", **SMALL_DATA)
    return wd


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    "A work directory with data/ and a fine-tuned torch_model/, made by the data and training notebooks."
    wd = tmp_path_factory.mktemp("wd_trained")
    run_notebook("00_data", wd / "executed", workdir=str(wd), source="sample", **SMALL_DATA)
    run_notebook("02_training", wd / "executed", workdir=str(wd), model="minilm", **SMALL_TRAIN)
    return wd


@pytest.fixture(scope="session")
def untrained_model_workdir(tmp_path_factory):
    "A work directory whose torch_model/ holds MiniLM with a fresh 5-star head (saved in seconds; predictions are noise)."
    from transformers import AutoTokenizer
    from yelp_ts.core import MAX_LENGTH, embedded_model_dir
    from yelp_ts.training import load_base_model, save_model

    wd = tmp_path_factory.mktemp("wd_untrained")
    save_model(load_base_model("minilm", seed=0), AutoTokenizer.from_pretrained(embedded_model_dir()), wd, MAX_LENGTH)
    return wd


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    "Keep each phase's report on the test item (`item.rep_call`), so a fixture can tell that its test failed."
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
