"""The TorchServe handler and the model module it runs, in-process: a real ts.context.Context, batches that mix good
and bad requests, every runtime and precision of the registry."""
import ast
import importlib.util
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_notebook
from yelp_ts.core import LABEL_NAMES, MAX_LENGTH, WorkDir
from yelp_ts.handler import TransformersClassifierHandler, request_text
from yelp_ts.model import PRECISIONS, RUNTIMES, encode, load_model, probabilities
from yelp_ts.worker import BAD_REQUESTS, local_context, run_batch

HANDLER_FILE = Path(importlib.util.find_spec("yelp_ts.handler").origin)
MODEL_FILE = Path(importlib.util.find_spec("yelp_ts.model").origin)
GOOD = ["The tacos were amazing and the staff was lovely.", "Cold food, rude waiter, never again.",
        "It was fine. Nothing special, a bit pricey.", "Best brunch in town, five stars!"]
BAD = {name: (ctype, body) for name, (ctype, body, _) in BAD_REQUESTS.items()}


@pytest.fixture(scope="module")
def model_dir(untrained_model_workdir):
    return WorkDir(untrained_model_workdir).model


@pytest.fixture(scope="module")
def handler(model_dir):
    h = TransformersClassifierHandler()
    h.initialize(local_context(model_dir))
    return h


def test_mixed_batch_answers_every_request_in_order(handler, model_dir):
    bad = list(BAD.values())
    bodies, expect_good = [], []
    for i, text in enumerate(GOOD):  # good, bad, good, bad ... with different body types
        bodies.append(("text/plain", text) if i % 2 else ("application/json", f'{{"text": "{text}"}}'))
        expect_good.append(True)
        bodies.append(bad[i]); expect_good.append(False)
    bodies += bad[len(GOOD):]; expect_good += [False] * (len(bad) - len(GOOD))
    out, statuses, context = run_batch(handler, bodies)
    assert len(out) == len(bodies)
    assert statuses == [200 if g else 400 for g in expect_good]
    singles = [run_batch(handler, [("text/plain", t)])[0][0] for t in GOOD]
    good_out = [a for a, g in zip(out, expect_good) if g]
    for got, alone in zip(good_out, singles):  # each answer belongs to its own request
        assert set(got) == {"label", "stars", "probabilities"}
        assert list(got["probabilities"]) == LABEL_NAMES
        assert got["label"] == alone["label"] == LABEL_NAMES[got["stars"] - 1]
        assert max(abs(got["probabilities"][k] - alone["probabilities"][k]) for k in LABEL_NAMES) < 1e-4
        assert sum(got["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    for a, g in zip(out, expect_good):
        if not g: assert set(a) == {"error"} and len(a["error"]) > 20
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(bodies)))


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_each_bad_input_is_a_400_and_the_next_request_works(handler, model_dir, name):
    out, statuses, context = run_batch(handler, [BAD[name]])
    assert statuses == [400] and set(out[0]) == {"error"}
    assert re.search(BAD_REQUESTS[name][2], out[0]["error"]), out[0]["error"]
    assert context.get_response_status(0)[1] == out[0]["error"]  # the reason phrase says the same
    out, statuses, _ = run_batch(handler, [("text/plain", "Great food.")])
    assert statuses == [200] and out[0]["label"] in LABEL_NAMES


def test_accepted_body_types(handler, model_dir):
    bodies = [("text/plain", "Nice."), ("text/plain; charset=utf-8", "Nice."), ("application/json", '{"text": "Nice."}'),
              ("application/json", '{"data": "Nice."}'), ("application/json", '{"body": "Nice."}'),
              ("application/json; charset=utf-8", b'{"text": "Nice."}'), ("application/octet-stream", b"Nice."),
              ("application/x-www-form-urlencoded", "text=Nice.")]
    out, statuses, _ = run_batch(handler, bodies)
    assert statuses == [200] * len(bodies)
    assert len({a["label"] for a in out}) == 1
    assert request_text({"data": bytearray("Crème brûlée".encode())}) == "Crème brûlée"  # multipart field `data`


def test_probabilities_match_the_model(handler, model_dir):
    "The one model path against transformers called directly (the only other model-running code in the project)."
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.inference_mode():
        direct = model(**tokenizer(GOOD, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert torch.allclose(probabilities(load_model(model_dir), GOOD), direct, atol=1e-5)
    got = run_batch(handler, [("text/plain", GOOD[0])])[0][0]
    assert [got["probabilities"][k] for k in LABEL_NAMES] == pytest.approx(direct[0].tolist(), abs=1e-5)


def test_probabilities_in_chunks_equal_one_batch(model_dir):
    loaded = load_model(model_dir)
    assert torch.allclose(probabilities(loaded, GOOD, batch_size=3), probabilities(loaded, GOOD), atol=1e-5)
    assert probabilities(loaded, []).shape == (0, len(LABEL_NAMES))


def test_dynamic_padding_and_truncation(handler, model_dir):
    loaded = handler.loaded
    assert loaded.max_length == MAX_LENGTH                     # saved with the tokenizer by training's save_model
    assert encode(loaded, ["Great!", "Bad."])["input_ids"].shape[1] < 10
    assert encode(loaded, ["The food was great but slow. " * 36_000])["input_ids"].shape[1] == MAX_LENGTH   # 1 MB
    out, statuses, _ = run_batch(handler, [("text/plain", "The food was great but slow. " * 36_000)])
    assert statuses == [200] and out[0]["label"] in LABEL_NAMES


def test_settings_come_from_model_config_and_threads_do_not_leak(model_dir):
    h = TransformersClassifierHandler()
    h.initialize(local_context(model_dir, handler_settings={"max_length": 16, "torch_threads": 1}))
    seen = []
    h.loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads())), with_kwargs=True)
    before = torch.get_num_threads()
    if before < 2: pytest.skip("needs 2+ torch threads to tell 1 thread from the default")
    run_batch(h, [("text/plain", "The food was great but slow. " * 20)])
    assert seen == [(16, 1)]                   # the model ran on 16 tokens with 1 thread ...
    assert torch.get_num_threads() == before   # ... and the caller's thread count is untouched


def test_missing_index_to_name_falls_back_to_config(model_dir, tmp_path, caplog):
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "index_to_name.json": (tmp_path / f.name).symlink_to(f)
    h = TransformersClassifierHandler()
    with caplog.at_level(logging.WARNING):
        h.initialize(local_context(tmp_path))
    assert h.loaded.labels == LABEL_NAMES and "index_to_name.json" in caplog.text
    out, statuses, _ = run_batch(h, [("text/plain", "Lovely place.")])
    assert statuses == [200] and out[0]["label"] in LABEL_NAMES


def test_logs_sizes_never_text(handler, model_dir, caplog):
    secret = "Zanzibar-unique-review-text"
    with caplog.at_level(logging.DEBUG):
        run_batch(handler, [("text/plain", secret), ("application/json", f'{{"text": "{secret}"}}'), BAD["whitespace only"]])
    assert "Batch of 3: 2 answered, 0 explained, 1 rejected" in caplog.text
    assert secret not in caplog.text


def test_unknown_setting_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown handler setting"):
        TransformersClassifierHandler().initialize(local_context(model_dir, handler_settings={"max_len": 16}))


def _imports(path):
    tree = ast.parse(Path(path).read_text())
    found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return tree, found | {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_handler_and_model_files_follow_torchserve_rules():
    "One class in the handler file, no module-level `handle`, and only imports a worker has: the MAR carries both files."
    tree, imported = _imports(HANDLER_FILE)
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert classes == ["TransformersClassifierHandler"], "TorchServe refuses a handler file with more than one class"
    assert "handle" not in [n.name for n in tree.body if isinstance(n, ast.FunctionDef)], \
        "a module-level `handle` would replace the class as TorchServe's entry point"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "no relative imports"
    worker_has = set(sys.stdlib_module_names) | {"torch", "transformers", "ts", "openvino", "captum"}
    assert imported <= worker_has | {"model", "yelp_ts"}, imported
    _, model_imports = _imports(MODEL_FILE)
    assert model_imports <= worker_has, f"model.py must import nothing a worker lacks: {model_imports - worker_has}"
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not functions & {"local_context", "local_batch", "run_batch"}, "test helpers must stay out of the MAR"
    methods = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert {"initialize", "preprocess", "inference", "postprocess"} <= methods


def test_handler_file_is_short():
    "The handler is TorchServe's four steps and the request reading they need; the model lives in model.py."
    lines = HANDLER_FILE.read_text().splitlines()
    assert len(lines) <= 180 and len([l for l in lines if l.strip() and not l.lstrip().startswith("#")]) <= 150


@pytest.mark.notebook
def test_notebook_runs(untrained_model_workdir, tmp_path):
    run_notebook("03_handler", tmp_path, workdir=str(untrained_model_workdir))


@pytest.mark.notebook
def test_worker_notebook_runs(untrained_model_workdir, tmp_path):
    run_notebook("ref_worker", tmp_path, workdir=str(untrained_model_workdir))


def test_handler_serves_the_precision_and_runtime_of_its_settings(model_dir, caplog):
    pytest.importorskip("openvino")
    h = TransformersClassifierHandler()
    with caplog.at_level(logging.INFO):
        h.initialize(local_context(model_dir, handler_settings={"precision": "bf16", "runtime": "openvino"}))
    assert (h.loaded.precision, h.loaded.runtime) == ("bf16", "openvino")
    assert "precision=bf16 runtime=openvino (in force:" in caplog.text
    out, statuses, _ = run_batch(h, [("text/plain", GOOD[0]), ("text/plain", "  ")])
    assert statuses == [200, 400] and out[0]["label"] in LABEL_NAMES
