"""nbs/02_training.ipynb: the model it saves, the metrics it writes, and yelp_ts.training's error cases."""
import json

import pytest
from conftest import SMALL_DATA, SMALL_TRAIN
from transformers import AutoTokenizer

from yelp_ts import training
from yelp_ts.core import LABEL_NAMES, YelpTsError, embedded_model_dir, WorkDir

METRIC_KEYS = {"eval_accuracy", "eval_macro_f1", "train_samples_per_second", "baseline_accuracy",
               "baseline_macro_f1", "model", "data", "epochs", "max_length", "padding", "learning_rate"}


def test_saved_model_files(trained_workdir):
    out = WorkDir(trained_workdir).model
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "index_to_name.json", "metrics.json", "log_history.json"]:
        assert (out / name).is_file(), f"{name} missing from {out}"
    assert json.loads((out / "index_to_name.json").read_text()) == {str(i): n for i, n in enumerate(LABEL_NAMES)}
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(LABEL_NAMES)}
    assert not [p.name for p in trained_workdir.iterdir() if p.name.startswith(".trainer-")], "temporary trainer dir left"
    assert not list(out.glob("checkpoint-*")), "checkpoints left in torch_model/"


def test_metrics(trained_workdir):
    metrics = json.loads((WorkDir(trained_workdir).model / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert 0 <= metrics["eval_accuracy"] <= 1 and 0 <= metrics["eval_macro_f1"] <= 1
    assert metrics["train_samples_per_second"] > 0
    assert metrics["eval_accuracy"] > metrics["baseline_accuracy"], metrics
    assert metrics["model"] == "minilm" and metrics["padding"] == "dynamic"
    for key in ("epochs", "max_length", "batch_size"):
        assert metrics[key] == SMALL_TRAIN[key]
    assert metrics["data"]["source"] == "sample"
    assert (metrics["data"]["n_train"], metrics["data"]["n_eval"]) == (SMALL_DATA["n_train"], SMALL_DATA["n_eval"])
    history = json.loads((WorkDir(trained_workdir).model / "log_history.json").read_text())
    assert [h for h in history if "loss" in h]
    assert len([h for h in history if "eval_accuracy" in h]) == int(SMALL_TRAIN["epochs"])  # one evaluation per epoch


def test_saved_tokenizer_cuts_where_training_did(trained_workdir):
    tokenizer = AutoTokenizer.from_pretrained(WorkDir(trained_workdir).model)
    assert tokenizer.model_max_length == SMALL_TRAIN["max_length"]
    assert len(tokenizer("word " * 1000, truncation=True)["input_ids"]) == SMALL_TRAIN["max_length"]


def test_evaluate_the_saved_model_through_the_serving_path(trained_workdir):
    "The saved model, loaded by the handler's load_model, scores what the trainer measured on the same split."
    metrics = json.loads((WorkDir(trained_workdir).model / "metrics.json").read_text())
    scores = training.evaluate(trained_workdir)
    assert abs(scores["accuracy"] - metrics["eval_accuracy"]) < 0.02, (scores["accuracy"], metrics["eval_accuracy"])
    assert len(scores["predicted"]) == len(scores["labels"]) == SMALL_DATA["n_eval"]
    assert set(scores["predicted"]) <= set(range(len(LABEL_NAMES)))


def test_evaluate_without_model_says_train(tmp_path):
    with pytest.raises(YelpTsError, match="yelp-ts train"):
        training.evaluate(tmp_path)


def test_resolve_model_alias_and_dir(tmp_path):
    path = training.resolve_model("minilm")
    assert path == str(embedded_model_dir()) == training.resolve_model()
    assert (training.Path(path) / "config.json").is_file()
    assert training.resolve_model(path) == str(training.Path(path).resolve())
    with pytest.raises(FileNotFoundError, match="config.json"):
        training.resolve_model(str(tmp_path))            # a directory, but no model in it
    with pytest.raises(FileNotFoundError, match="minilm"):
        training.resolve_model(str(tmp_path / "nope"))


def test_resolve_model_hub_offline_fails_without_downloading(monkeypatch):
    import huggingface_hub
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # as if never downloaded
    def forbidden(*args, **kwargs): raise AssertionError("from_pretrained was called")
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", forbidden)
    with pytest.raises(ConnectionError, match="--model minilm") as e:
        training.train(model="distilbert-base-uncased")
    assert isinstance(e.value, YelpTsError)


def test_bad_padding(tmp_path):
    with pytest.raises(YelpTsError, match="padding"):
        training.train(tmp_path, padding="longest")
    with pytest.raises(ValueError, match="padding"):
        training.tokenize(None, None, padding="pad")
