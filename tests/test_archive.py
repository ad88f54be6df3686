"""The MAR archive: model folder checks, model-config.yaml, torch-model-archiver, and loading the MAR like a worker."""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import link_model, run_notebook
from yelp_ts import archive
from yelp_ts.archive import build_archive, check_model_dir, mar_files, mar_manifest, write_model_config
from yelp_ts.core import LABEL_NAMES, MODEL_FILES, WorkDir, YelpTsError
from yelp_ts.settings import Serving

HANDLER_FILE = Path(importlib.util.find_spec("yelp_ts.handler").origin)
MODEL_FILE = Path(importlib.util.find_spec("yelp_ts.model").origin)


@pytest.fixture
def workdir(untrained_model_workdir, tmp_path):
    return link_model(untrained_model_workdir, tmp_path / "wd")


@pytest.fixture(scope="module")
def built(untrained_model_workdir, tmp_path_factory):
    "One archive for the tests that only read it or load it: fp32 on torch, cut at 32 tokens, 2 integration steps."
    wd = link_model(untrained_model_workdir, tmp_path_factory.mktemp("built") / "wd")
    return build_archive(wd, precision="fp32", runtime="torch", serving=Serving(max_length=32, explain_steps=2, explain_batch=2))


@pytest.fixture
def no_archiver(monkeypatch):
    "Fail the test if torch-model-archiver would run."
    def forbidden(*args, **kwargs): raise AssertionError(f"the archiver ran: {args}")
    monkeypatch.setattr(archive.subprocess, "run", forbidden)


def test_missing_model_dir_is_a_clear_error_before_the_archiver(tmp_path, no_archiver):
    with pytest.raises(YelpTsError) as e:
        build_archive(tmp_path)
    assert all(f in str(e.value) for f in MODEL_FILES) and "yelp-ts train" in str(e.value)
    assert not (tmp_path / "torch_model" / "model_store").exists()


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "index_to_name.json"])
def test_incomplete_model_dir_names_the_missing_file(workdir, missing, no_archiver):
    (workdir / "torch_model" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")) as e:
        build_archive(workdir)
    assert [f for f in MODEL_FILES if f in str(e.value)] == [missing] and "yelp-ts train" in str(e.value)
    assert not (workdir / "torch_model" / "model_store").exists()


def test_check_model_dir_returns_the_folder(workdir):
    assert check_model_dir(workdir) == workdir / "torch_model"


def test_model_config_defaults(workdir):
    config = yaml.safe_load(write_model_config(workdir).read_text())
    cores = os.cpu_count()
    assert config == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 2, "responseTimeout": 120,
                      "handler": {"torch_threads": cores}}     # max_length: the one saved with the tokenizer
    assert config == yaml.safe_load(write_model_config(workdir, Serving()).read_text())   # the defaults are Serving's


def test_model_config_max_length_override_and_oversubscription_warning(workdir, caplog, monkeypatch):
    assert yaml.safe_load(write_model_config(workdir, Serving(max_length=64)).read_text())["handler"]["max_length"] == 64
    monkeypatch.setattr(archive.os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.WARNING):
        write_model_config(workdir, Serving(workers=2, torch_threads=2))
    assert "oversubscribe" in caplog.text


def test_build_archive(workdir):
    mar = build_archive(workdir, precision="fp32", runtime="torch")
    assert mar == workdir / "torch_model" / "model_store" / "yelp.mar"
    files = mar_files(mar)
    assert {"MAR-INF/MANIFEST.json", "handler.py", "model.py", "model-config.yaml", *MODEL_FILES} <= set(files)
    assert "pytorch_model.bin" not in files and "vocab.txt" not in files
    model = mar_manifest(mar)["model"]
    assert model["modelName"] == "yelp" and model["modelVersion"] == "1.0"
    assert model["serializedFile"] == "model.safetensors" and model["handler"] == "handler.py"
    assert model["configFile"] == "model-config.yaml"
    with zipfile.ZipFile(mar) as z:
        assert z.read("handler.py") == HANDLER_FILE.read_bytes() and z.read("model.py") == MODEL_FILE.read_bytes()
        assert yaml.safe_load(z.read("model-config.yaml"))["batchSize"] == 8
        assert json.loads(z.read("index_to_name.json")) == {str(i): n for i, n in enumerate(LABEL_NAMES)}

    # --force: a rebuild with other settings replaces the archive
    mar = build_archive(workdir, model_name="yelp", version="2.0", precision="fp32", runtime="torch",
                        serving=Serving(batch_size=16, max_batch_delay=50, workers=1))
    assert mar_manifest(mar)["model"]["modelVersion"] == "2.0"
    with zipfile.ZipFile(mar) as z:
        assert yaml.safe_load(z.read("model-config.yaml"))["batchSize"] == 16


def test_bad_archive_is_a_clear_error(tmp_path):
    broken = tmp_path / "yelp.mar"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(YelpTsError, match="yelp-ts archive"):
        mar_manifest(broken)
    with pytest.raises(YelpTsError, match="yelp-ts archive"):
        mar_files(tmp_path / "missing.mar")


def test_mar_loads_and_answers_with_torchserve_own_loader(built, tmp_path, monkeypatch):
    "Unpack the MAR and load it the way a TorchServe worker does (one-class rule, model-config.yaml), no Java needed."
    from ts.model_loader import TsModelLoader

    from yelp_ts.worker import local_batch

    mar, unpacked = built, tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z: z.extractall(unpacked)
    monkeypatch.syspath_prepend(str(unpacked))
    monkeypatch.delitem(sys.modules, "handler", raising=False)
    monkeypatch.delitem(sys.modules, "model", raising=False)
    try:
        service = TsModelLoader().load("yelp", str(unpacked), "handler.py", None, 8)
        context = service.context
        assert context.model_yaml_config["handler"] == {"max_length": 32, "torch_threads": os.cpu_count(), "explain_steps": 2,
                                                        "explain_batch": 2}
        data = local_batch(context, [("text/plain", "Great tacos!"), ("text/plain", "  "),
                                     ("application/json", '{"text": "Awful."}')])
        out = service._entry_point(data, context)
        assert service._entry_point.__self__.loaded.max_length == 32
        assert [context.get_response_status(i)[0] for i in range(3)] == [200, 400, 200]
        assert out[0]["label"] in LABEL_NAMES and "error" in out[1] and out[2]["label"] in LABEL_NAMES
    finally:
        for name in ("handler", "model"): sys.modules.pop(name, None)


def test_the_mar_loads_and_answers_without_the_yelp_ts_package(built, tmp_path):
    "TorchServe's own loader in a process where `yelp_ts` cannot be imported: the MAR's handler.py and model.py suffice."
    mar, unpacked = built, tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z: z.extractall(unpacked)
    code = f"""
import json, sys
sys.modules["yelp_ts"] = None                                   # import yelp_ts fails from here on
sys.path.insert(0, {str(unpacked)!r})                           # as TorchServe's PYTHONPATH puts the unpacked MAR first
from ts.context import RequestProcessor
from ts.model_loader import TsModelLoader
service = TsModelLoader().load("yelp", {str(unpacked)!r}, "handler.py", None, 8)
context = service.context
context.request_processor = [RequestProcessor({{"Content-Type": "text/plain"}}), RequestProcessor({{"Content-Type": "text/plain"}}),
                             RequestProcessor({{"Content-Type": "application/json", "explain": "True"}})]
out = service._entry_point([{{"body": "Great tacos!"}}, {{"body": "  "}}, {{"body": {{"text": "Awful.", "target": 1}}}}], context)
print(json.dumps([[context.get_response_status(i)[0] for i in range(3)], out[0]["label"], out[2]["target"],
                  sys.modules["model"].__file__, sys.modules["handler"].__file__]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    statuses, label, target, model_file, handler_file = json.loads(r.stdout.strip().splitlines()[-1])
    assert (statuses, label in LABEL_NAMES, target) == ([200, 400, 200], True, 1), r.stderr[-2000:]
    assert Path(model_file).parent == Path(handler_file).parent == unpacked          # both from the archive


def test_archive_from_trained_model(trained_workdir, tmp_path):
    "The MAR carries the trained max length in its tokenizer, so the handler cuts reviews where training did."
    wd = link_model(trained_workdir, tmp_path / "wd")
    mar = build_archive(wd, precision="fp32", runtime="torch")
    metrics = json.loads((wd / "torch_model" / "metrics.json").read_text())
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("tokenizer_config.json"))["model_max_length"] == metrics["max_length"]
        assert "max_length" not in yaml.safe_load(z.read("model-config.yaml"))["handler"]
    assert mar_manifest(mar)["model"]["serializedFile"] == "model.safetensors"


@pytest.mark.notebook
def test_notebook_runs(workdir, tmp_path):
    run_notebook("04_archive", tmp_path / "executed", workdir=str(workdir))
    assert (workdir / "torch_model" / "model_store" / "yelp.mar").is_file()


# ---------------------------------------------------------------- precision and runtime, checked against fp32
@pytest.fixture
def trained_copy(trained_workdir, tmp_path):
    wd = link_model(trained_workdir, tmp_path / "wd")
    (wd / "data").symlink_to(trained_workdir / "data")
    return wd


def test_auto_is_the_fastest_choice_that_keeps_fp32s_answers(trained_copy):
    from yelp_ts.model import native_precision
    choice = archive.choose_serving(trained_copy, batch_size=8)         # the serving batch size build_archive uses
    chosen, rows = choice["chosen"], choice["candidates"]
    assert json.loads((trained_copy / "torch_model" / "parity.json").read_text()) == choice
    assert choice["texts"] == 100 and {r["precision"] for r in rows} == {native_precision()}   # 100 of the 120 validation reviews
    assert chosen["agreement"] >= archive.PARITY_MIN and chosen["in_force"] in ("fp32", "bf16")
    if len(rows) > 1:                                                      # OpenVINO installed: both runtimes measured
        assert {r["runtime"] for r in rows} == {"torch", "openvino"} and all(r["texts_per_s"] > 0 for r in rows)
        passing = [r for r in rows if r["agreement"] >= archive.PARITY_MIN]
        assert chosen["texts_per_s"] == max(r["texts_per_s"] for r in passing)
    mar = build_archive(trained_copy)
    handler = archive.mar_model_config(mar)["handler"]
    assert (handler["precision"], handler["runtime"]) == (chosen["precision"], chosen["runtime"])
    assert json.loads((trained_copy / "torch_model" / "parity.json").read_text()) == choice   # the same check, reused


def test_parity_is_measured_again_only_when_what_it_depends_on_changed(trained_copy, monkeypatch, tmp_path):
    first = archive.choose_serving(trained_copy, "fp32", "torch")
    def measured(*args, **kwargs): raise AssertionError("measured again")
    monkeypatch.setattr(archive, "_candidates", measured)
    assert archive.choose_serving(trained_copy, "fp32", "torch") == first          # nothing changed: reused
    with pytest.raises(AssertionError, match="measured again"):
        archive.choose_serving(trained_copy, "fp32", "torch", batch_size=2)        # another request
    d = tmp_path / "m"; d.mkdir(); (d / "model.safetensors").write_bytes(b"weights")
    key = archive._parity_key(d, ["A review."], {})
    assert archive._parity_key(d, ["Another review."], {})["texts"] != key["texts"]
    (d / "model.safetensors").write_bytes(b"retrained weights")
    assert archive._parity_key(d, ["A review."], {})["model"] != key["model"]
    assert key["machine"]["cpu"] and key["code"]


def test_disagreement_warns_loudly_and_auto_falls_back_to_fp32(trained_copy, monkeypatch, caplog):
    monkeypatch.setattr(archive, "parity", lambda reference, candidate: {"agreement": 0.9, "max_prob_diff": 0.3})
    with caplog.at_level(logging.WARNING):
        asked = archive.choose_serving(trained_copy, "bf16", "torch")["chosen"]
    assert (asked["precision"], asked["agreement"]) == ("bf16", 0.9)          # as asked, but loudly
    assert "answers WILL change" in caplog.text and "--precision fp32 --runtime torch" in caplog.text
    auto = archive.choose_serving(trained_copy)["chosen"]
    assert (auto["precision"], auto["runtime"]) == ("fp32", "torch")         # auto never serves changed answers


def test_fp32_on_torch_is_served_as_trained_without_a_check(trained_copy, monkeypatch):
    def forbidden(*a, **k): raise AssertionError("no parity check is needed for the model as trained")
    monkeypatch.setattr(archive, "choose_serving", forbidden)
    handler = archive.mar_model_config(build_archive(trained_copy, precision="fp32", runtime="torch"))["handler"]
    assert "precision" not in handler and "runtime" not in handler           # the handler's default: fp32 on torch


def test_archive_says_in_one_line_what_it_chose_and_why_on_a_cpu_without_bf16(trained_copy, monkeypatch, caplog):
    "Without native bf16, auto is fp32 on the faster runtime: one log line names each candidate's agreement and speed."
    import torch
    from yelp_ts.model import candidates
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger="yelp_ts.archive"):
        build_archive(trained_copy)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    chosen = archive.mar_model_config(WorkDir(trained_copy).mar())["handler"]
    assert line.startswith(f"serving fp32 on {chosen['runtime']} (asked: precision auto, runtime auto; "), line
    for precision, runtime in candidates():                  # fp32 on each runtime auto tries, here
        assert precision == "fp32" and f"fp32 on {runtime}: agreement 1.000, " in line, line
    assert "texts/s" in line and "batch 8, 100 validation reviews" in line
