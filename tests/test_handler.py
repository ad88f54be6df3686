"""The TorchServe handler, in-process: a real ts.context.Context, batches that mix good and bad requests."""
import ast
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_notebook
from yelp_ts.core import LABEL_NAMES, MAX_LENGTH
from yelp_ts.handler import TransformersClassifierHandler, encode, load_model, probabilities, request_text
from yelp_ts.worker import local_context, run_batch

HANDLER_FILE = Path(importlib.util.find_spec("yelp_ts.handler").origin)
GOOD = ["The tacos were amazing and the staff was lovely.", "Cold food, rude waiter, never again.",
        "It was fine. Nothing special, a bit pricey.", "Best brunch in town, five stars!"]
BAD = {  # what a client sends that carries no usable review (content type, body)
    "empty": ("text/plain", b""),
    "whitespace": ("text/plain", " \n\t "),
    "invalid UTF-8": ("text/plain", b"caf\xe9 au lait"),
    "JSON not an object": ("application/json", '["a", "b"]'),
    "JSON without text": ("application/json", '{"review": "hello"}'),
    "number instead of text": ("application/json", '{"text": 5}'),
    "bare JSON number": ("application/json", "5"),
    "invalid JSON": ("application/json", '{"text": '),
    "form without Content-Type (curl -d)": ("application/x-www-form-urlencoded", "Stopped back by Mellow Mushroom"),
    "empty octet-stream": ("application/octet-stream", b""),
}


@pytest.fixture(scope="module")
def model_dir(untrained_model_workdir):
    return untrained_model_workdir / "torch_model"


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


@pytest.mark.parametrize("name", list(BAD))
def test_each_bad_input_is_a_400_and_the_next_request_works(handler, model_dir, name):
    out, statuses, context = run_batch(handler, [BAD[name]])
    assert statuses == [400] and set(out[0]) == {"error"}
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
        run_batch(handler, [("text/plain", secret), ("application/json", f'{{"text": "{secret}"}}'), BAD["whitespace"]])
    assert "Batch of 3: 2 answered, 0 explained, 1 rejected" in caplog.text
    assert secret not in caplog.text


def test_unknown_setting_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown handler setting"):
        TransformersClassifierHandler().initialize(local_context(model_dir, handler_settings={"max_len": 16}))


def test_handler_file_follows_torchserve_rules():
    tree = ast.parse(HANDLER_FILE.read_text())
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert classes == ["TransformersClassifierHandler"], "TorchServe refuses a handler file with more than one class"
    assert "handle" not in [n.name for n in tree.body if isinstance(n, ast.FunctionDef)], \
        "a module-level `handle` would replace the class as TorchServe's entry point"
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "no relative imports"
    assert imported <= set(sys.stdlib_module_names) | {"torch", "transformers", "ts", "openvino", "captum"}, imported
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert not functions & {"local_context", "local_batch", "run_batch"}, "test helpers must stay out of the MAR"


def test_notebook_runs(untrained_model_workdir, tmp_path):
    run_notebook("03_handler", tmp_path, workdir=str(untrained_model_workdir))


def test_worker_notebook_runs(untrained_model_workdir, tmp_path):
    run_notebook("03a_worker", tmp_path, workdir=str(untrained_model_workdir))


# ---------------------------------------------------------------- precision and runtime
@pytest.fixture
def no_native_bf16(monkeypatch):
    "This machine, as if its CPU had no native bf16 (oneDNN says so)."
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)


def test_auto_precision_is_bf16_only_where_it_is_native(no_native_bf16, caplog):
    from yelp_ts.handler import native_precision, resolve, runs_natively
    from yelp_ts.training import training_args, training_precision
    assert not runs_natively("bf16") and native_precision() == "fp32"
    assert resolve("auto", "torch") == ("fp32", "torch") and training_precision("auto") == "fp32"
    assert training_args("/tmp/unused", precision="auto").bf16 is False
    with caplog.at_level(logging.WARNING):
        assert resolve("bf16", "torch") == ("bf16", "torch")         # asked for explicitly: honoured, with a warning
    assert "emulated" in caplog.text and "slower than fp32" in caplog.text


def test_auto_precision_with_native_bf16(monkeypatch):
    from yelp_ts.handler import native_precision
    from yelp_ts.training import training_args
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert native_precision() == "bf16" and training_args("/tmp/unused", precision="auto").bf16 is True


def test_auto_runtime(monkeypatch):
    import importlib.util
    from yelp_ts.handler import resolve
    assert resolve("fp32", "auto")[1] == ("openvino" if importlib.util.find_spec("openvino") else "torch")
    with pytest.raises(ValueError, match="CPU only"):
        resolve("fp32", "openvino", device="cuda")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert resolve("fp32", "auto")[1] == "torch"
    with pytest.raises(ValueError, match="pip install openvino"):
        resolve("fp32", "openvino")


@pytest.mark.parametrize("precision, runtime", [("bf16", "torch"), ("fp32", "openvino"), ("bf16", "openvino")])
def test_load_model_in_each_precision_and_runtime(model_dir, precision, runtime):
    "Structure, and answers close to fp32 on torch (parity itself is checked on a trained model in test_archive)."
    pytest.importorskip("openvino") if runtime == "openvino" else None
    reference, loaded = load_model(model_dir), load_model(model_dir, precision=precision, runtime=runtime)
    assert (loaded.precision, loaded.runtime, loaded.labels, loaded.max_length) == (precision, runtime, LABEL_NAMES, MAX_LENGTH)
    assert loaded.in_force in ("fp32", "bf16")              # what really runs (OpenVINO may decide for itself)
    probs = probabilities(loaded, GOOD)
    assert probs.dtype == torch.float32 and probs.shape == (len(GOOD), 5)
    assert torch.allclose(probs.sum(-1), torch.ones(len(GOOD)), atol=1e-5)
    assert (probs - probabilities(reference, GOOD)).abs().max() < 0.05


def test_handler_serves_the_precision_and_runtime_of_its_settings(model_dir, caplog):
    pytest.importorskip("openvino")
    h = TransformersClassifierHandler()
    with caplog.at_level(logging.INFO):
        h.initialize(local_context(model_dir, handler_settings={"precision": "bf16", "runtime": "openvino"}))
    assert (h.loaded.precision, h.loaded.runtime) == ("bf16", "openvino")
    assert "precision=bf16 runtime=openvino (in force:" in caplog.text
    out, statuses, _ = run_batch(h, [("text/plain", GOOD[0]), ("text/plain", "  ")])
    assert statuses == [200, 400] and out[0]["label"] in LABEL_NAMES
