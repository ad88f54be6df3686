"""Shared fixtures: notebooks run by papermill into temporary work directories with small parameters; the test tiers.

Tiers (markers): `training` fine-tunes a model, `torchserve` starts a real server (TorchServe, the LitServe peer,
the pod's nginx gate), `browser` drives Chromium, `notebook` runs a notebook under papermill, `slow` is a long load.
A test that uses a fixture which trains or serves gets that marker here; the others are marked where they are
defined. `make test-quick` runs what has none of them; `make test` (CI) runs everything."""
import json
import socket
import os
import shutil
from pathlib import Path

import papermill as pm
import pytest
import torch

from yelp_ts.core import MAX_LENGTH, WorkDir

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"
TIERS = ("training", "torchserve", "browser", "notebook", "slow")
FIXTURE_TIERS = {"trained_workdir": "training", "data_workdir": "notebook", "served": "torchserve", "server": "torchserve", "own_server": "torchserve",
                 "served_bf16": "torchserve", "manifests": "torchserve", "lab": "browser",
                 "executed": "notebook"}

# Small sizes for CI: big enough that the fine-tuned model beats the TF-IDF baseline.
SMALL_DATA = dict(n_train=320, n_eval=120, seed=42)
SMALL_TRAIN = dict(epochs=5, max_length=MAX_LENGTH, batch_size=8)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    "Mark each test with the tiers of the fixtures it uses (before `-m` selects), so the fast tier leaves them out."
    for item in items:
        for name in set(item.fixturenames) & set(FIXTURE_TIERS): item.add_marker(FIXTURE_TIERS[name])


def run_notebook(name, out_dir, **parameters):
    "Execute `nbs/{name}.ipynb` with papermill (cwd = nbs/, like a reader); return the executed notebook's path."
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.out.ipynb"
    pm.execute_notebook(str(NBS / f"{name}.ipynb"), str(out), parameters=parameters,
                        cwd=str(NBS), kernel_name="python3", progress_bar=False,
                        execution_timeout=900)
    if os.environ.get("YELP_TS_EXECUTED"):                   # `make docs`: the site shows the copies the tests ran
        keep = Path(os.environ["YELP_TS_EXECUTED"])
        shutil.copy(out, keep / out.name)
        (keep / f"{name}.run.json").write_text(json.dumps(run_record(out)))   # how long it took, where: the page says
    return out


def run_record(executed) -> dict:
    "What the site says of one executed notebook: papermill's duration and parameters, the CPU, cores, the date."
    from yelp_ts.benchmark import machine_info                  # the benchmark's own account of the machine
    meta, machine = json.loads(Path(executed).read_text())["metadata"]["papermill"], machine_info()
    return {"seconds": round(meta["duration"], 1), "parameters": meta["parameters"], "cpu": machine["cpu"],
            "cpu_features": machine["bf16_flags"], "cores": machine["cores"], "date": meta.get("end_time", "")[:10]}


def link_model(src_workdir, dst_workdir):
    "A work directory of its own whose torch_model/ links to the model files of `src_workdir`'s (fast, no copy, no archive)."
    d = WorkDir(dst_workdir).model
    d.mkdir(parents=True)
    for f in WorkDir(src_workdir).model.iterdir():
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
    from yelp_ts.core import embedded_model_dir
    from yelp_ts.training import load_base_model, save_model

    wd = tmp_path_factory.mktemp("wd_untrained")
    save_model(load_base_model("minilm", seed=0), AutoTokenizer.from_pretrained(embedded_model_dir()), wd, MAX_LENGTH)
    return wd


@pytest.fixture(scope="session")
def tied_model_workdir(untrained_model_workdir, tmp_path_factory):
    """The untrained model with a head that ties 1 star and 2 stars (the other classes out of the race): the two rows
    differ by a hundredth of bf16's resolution, so fp32 tells them apart — 2 stars for about half the reviews — while
    in bf16 they are the same row and the tie goes to 1 star, whatever the batch. A model on which "bf16 serves fp32's
    answers" fails, so a test of what was served can fail."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    wd, src = tmp_path_factory.mktemp("wd_tied"), WorkDir(untrained_model_workdir).model
    m = AutoModelForSequenceClassification.from_pretrained(src)
    w, b, g = m.classifier.weight, m.classifier.bias, torch.Generator().manual_seed(0)
    with torch.no_grad():
        w[0] = w[0].bfloat16().float()                               # a row bf16 holds exactly
        ulp = w[0].abs() * 2.0 ** -8                                  # about bf16's spacing at each weight
        w[1] = w[0] + 0.01 * ulp * torch.randn(w.shape[1], generator=g).sign()
        b.zero_(); b[2:] = -20
    m.save_pretrained(WorkDir(wd).model)
    AutoTokenizer.from_pretrained(src).save_pretrained(WorkDir(wd).model)
    (WorkDir(wd).model / "index_to_name.json").write_text((src / "index_to_name.json").read_text())
    return wd


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    "Keep each phase's report on the test item (`item.rep_call`), so a fixture can tell that its test failed."
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
