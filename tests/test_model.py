"""The model module: one registry of precisions and runtimes, which the archive, the benchmark and training read;
loading in each entry; the truncation rule; explanations of what was served. In-process, on an untrained head."""
import dataclasses
import logging
import subprocess
import sys

import pytest
import torch

from yelp_ts import archive, benchmark, model
from yelp_ts.core import LABEL_NAMES, MAX_LENGTH, YelpTsError, WorkDir
from yelp_ts.model import PRECISIONS, RUNTIMES, candidates, load_model, probabilities, resolve, tokenize_reviews

GOOD = ["The tacos were amazing and the staff was lovely.", "Cold food, rude waiter, never again.",
        "It was fine. Nothing special, a bit pricey.", "Best brunch in town, five stars!"]
PAIRS = [(p, r) for r in RUNTIMES for p in PRECISIONS if RUNTIMES[r].supports(PRECISIONS[p])]


@pytest.fixture(scope="module")
def model_dir(untrained_model_workdir):
    return WorkDir(untrained_model_workdir).model


@pytest.fixture
def no_native_bf16(monkeypatch):
    "This machine, as if its CPU had no native bf16 (oneDNN says so)."
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)


@pytest.mark.parametrize("precision, runtime", [pytest.param(p, r, marks=pytest.mark.slow) if r == "torch.compile"
                                                else (p, r) for p, r in PAIRS])
def test_every_registry_entry_loads_and_answers_like_fp32(model_dir, precision, runtime):
    "Each precision × runtime the registry has (this test covers a new entry too): structure, and fp32's answers."
    reason = RUNTIMES[runtime].unavailable(PRECISIONS[precision], torch.device("cpu"))
    if reason: pytest.skip(reason)
    reference, loaded = load_model(model_dir), load_model(model_dir, precision=precision, runtime=runtime)
    assert (loaded.precision, loaded.runtime, loaded.labels, loaded.max_length) == (precision, runtime, LABEL_NAMES, MAX_LENGTH)
    assert loaded.in_force in PRECISIONS                       # what really runs (OpenVINO may decide for itself)
    assert loaded.fp32 == (precision == "fp32" or RUNTIMES[runtime].keeps_fp32)
    probs = probabilities(loaded, GOOD)
    assert probs.dtype == torch.float32 and probs.shape == (len(GOOD), 5)
    assert torch.allclose(probs.sum(-1), torch.ones(len(GOOD)), atol=1e-5)
    assert (probs - probabilities(reference, GOOD)).abs().max() < 0.05
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.forward = None                                  # nothing changes a loaded model


def test_auto_precision_is_bf16_only_where_it_is_native(no_native_bf16, caplog):
    from yelp_ts.training import training_args, training_precision
    assert not model.runs_natively("bf16") and model.native_precision() == "fp32"
    assert resolve("auto", "torch") == ("fp32", "torch") and training_precision("auto") == "fp32"
    assert training_args("/tmp/unused", precision="auto").bf16 is False
    with caplog.at_level(logging.WARNING):
        assert resolve("bf16", "torch") == ("bf16", "torch")         # asked for explicitly: honoured, with a warning
    assert "emulated" in caplog.text and "slower than fp32" in caplog.text


def test_auto_precision_with_native_bf16(monkeypatch):
    from yelp_ts.training import training_args
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert model.native_precision() == "bf16" and training_args("/tmp/unused", precision="auto").bf16 is True


@pytest.fixture
def no_openvino(monkeypatch):
    "This machine, as if OpenVINO were not installed."
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))


def test_auto_runtime_and_what_is_refused(no_openvino):
    assert resolve("fp32", "auto")[1] == "torch"
    with pytest.raises(model.SettingError, match="pip install openvino"):
        resolve("fp32", "openvino")
    with pytest.raises(model.SettingError, match="runs on cpu only"):
        resolve("fp32", "openvino", device="cuda")
    with pytest.raises(model.SettingError, match="use auto or one of"):
        candidates(["int4"])
    assert ("fp32", "openvino") not in candidates(["fp32"], ["every"])        # expanded: left out where it can't run


def test_a_missing_runtime_is_a_one_line_user_error(untrained_model_workdir, tmp_path, no_openvino, capsys):
    "`yelp-ts archive --runtime openvino` without OpenVINO: exit status 2 and one line saying what to do."
    from conftest import link_model
    from yelp_ts.cli import main
    wd = link_model(untrained_model_workdir, tmp_path / "wd")
    assert main(["archive", "--workdir", wd, "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("yelp-ts archive: error: runtime=openvino needs `pip install openvino`"), err
    assert not WorkDir(wd).mar().exists()


def test_one_new_registry_entry_reaches_the_archive_and_the_benchmark(model_dir, monkeypatch):
    "A runtime added to the registry is a candidate of `auto` for the parity check and the benchmark, with nothing else."
    monkeypatch.setitem(RUNTIMES, "torch-again", dataclasses.replace(RUNTIMES["torch"], name="torch-again"))
    assert ("fp32", "torch-again") in candidates(["fp32"]) and ("fp32", "torch-again") in benchmark.bench_candidates()
    rows = archive._candidates(model_dir, GOOD, candidates(["fp32"], ["auto"]), 2, 1)
    assert {r["runtime"] for r in rows} >= {"torch", "torch-again"} and all(r["texts_per_s"] for r in rows)
    assert next(r for r in rows if r["runtime"] == "torch-again")["agreement"] == 1.0


def test_training_refuses_a_serving_only_precision():
    from yelp_ts.training import train, training_precision
    assert not PRECISIONS["int8"].trains
    with pytest.raises(YelpTsError, match="int8 is for serving only.*yelp-ts archive --precision int8"):
        training_precision("int8")
    with pytest.raises(YelpTsError, match="for serving only"):
        train("/nonexistent", precision="int8")               # refused before it reads any data


def test_importing_training_the_benchmark_or_the_peer_loads_no_torchserve(model_dir):
    "Only the handler imports TorchServe's `ts`; the model path runs without it (and without its sys.modules edits)."
    code = ("import sys; import yelp_ts.training, yelp_ts.benchmark, yelp_ts.archive; from yelp_ts.model import load_model, "
            f"probabilities; probabilities(load_model({str(model_dir)!r}), ['Good.']); "
            "import importlib.util; importlib.util.find_spec('litserve') and __import__('yelp_ts.peer'); "
            "print(sorted(m for m in sys.modules if m == 'ts' or m.startswith('ts.')), sys.modules.get('openvino.torch', 'unset'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "[] unset", (r.stdout, r.stderr[-2000:])


def test_the_truncation_rule_is_the_same_for_training_and_serving(model_dir):
    "Training's tokenized dataset and a served batch cut a review at the same tokens, by the rule saved with the model."
    import datasets
    from yelp_ts.training import tokenize
    loaded = load_model(model_dir, max_length=32)
    assert loaded.truncation == model.TRUNCATION == "tail"               # saved in config.json by training's save_model
    long_review = "The brisket was smoky and the sides were cold, but the staff were kind. " * 40 + "We will not be back."
    data = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"label": [0], "text": [long_review]})})
    trained = tokenize(data, loaded.tokenizer, max_length=32)["train"]["input_ids"][0]
    served = model.encode(loaded, [long_review])["input_ids"][0].tolist()
    assert trained == served and len(served) == 32
    assert loaded.tokenizer.decode(served, skip_special_tokens=True).endswith("we will not be back.")   # the verdict kept
    head = tokenize_reviews(loaded.tokenizer, [long_review], 32, "head")["input_ids"][0]
    both = tokenize_reviews(loaded.tokenizer, [long_review], 32, "head+tail")["input_ids"][0]
    assert head != served and both not in (head, served)           # head alone loses the end, tail alone the start
    assert both[:8] == head[:8] and both[-20:] == served[-20:]     # head+tail: a quarter from the start, the rest from the end
    assert tokenize_reviews(loaded.tokenizer, ["x" * 10_000_000], 32)["input_ids"][0][-1] == loaded.tokenizer.sep_token_id


def test_a_model_saved_without_a_rule_is_cut_at_the_head(model_dir, tmp_path):
    "Models saved before head+tail (no `truncation` in config.json) are served as they were trained: head only."
    import json, shutil
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    config = json.loads((old / "config.json").read_text()); config.pop("truncation")
    (old / "config.json").write_text(json.dumps(config))
    assert load_model(old).truncation == model.LEGACY_TRUNCATION == "head"
    with pytest.raises(model.SettingError, match="truncation=.middle."):
        tokenize_reviews(load_model(old).tokenizer, ["x"], 32, "middle")




def test_explanations_explain_the_stars_that_were_served(tied_model_workdir):
    """Served in bf16, an explanation's stars are bf16's (the gradients fp32's). The tied head gives every class about
    the same probability, so bf16 and fp32 often disagree: that makes the test able to fail."""
    d = WorkDir(tied_model_workdir).model
    half, full = load_model(d, precision="bf16"), load_model(d)
    from yelp_ts.sample import sample_reviews
    texts = sample_reviews(20, split="validation").text.tolist()
    served = (probabilities(half, texts).argmax(-1) + 1).tolist()
    assert served != (probabilities(full, texts).argmax(-1) + 1).tolist(), "bf16 and fp32 agree here: no teeth"
    explained = model.explain(half, texts, steps=2, internal_batch_size=2, gradients=model.fp32_torch(half))
    assert [e["stars"] for e in explained] == served and [e["target"] for e in explained] == served


@pytest.mark.notebook
def test_notebook_runs(untrained_model_workdir, tmp_path):
    from conftest import run_notebook
    run_notebook("beyond_1_model", tmp_path, workdir=str(untrained_model_workdir))
