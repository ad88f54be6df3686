"""Explanations on a real fine-tuned model: faithful, complete, word-aligned; a batch mixing predictions, explanations
and bad requests answers each in order; the notebook runs."""
import json

import pytest
import torch

from conftest import run_notebook
from yelp_ts.core import LABEL_NAMES, WorkDir
from yelp_ts.data import load_data
from yelp_ts.explain import explanation_html, faithfulness, terminal_view
from yelp_ts.handler import TransformersClassifierHandler
from yelp_ts.model import STARS, explain, load_model, probabilities
from yelp_ts.worker import local_context, run_batch


@pytest.fixture(scope="module")
def loaded(trained_workdir):
    return load_model(WorkDir(trained_workdir).model)


@pytest.fixture(scope="module")
def reviews(trained_workdir):
    return list(load_data(trained_workdir)["validation"]["text"])


def test_words_are_the_reviews_words_with_their_spans(loaded, reviews):
    text = reviews[0]
    [e] = explain(loaded, [text])
    assert e["label"] in LABEL_NAMES and e["target"] == e["stars"]           # the predicted class by default
    for w in e["words"]:
        assert text[w["start"]:w["end"]] == w["word"] and " " not in w["word"]
    kept = loaded.tokenizer(text, truncation=True, max_length=loaded.max_length)
    assert len(e["words"]) == len({i for i in kept.word_ids() if i is not None})   # cut like a prediction is
    assert [w["start"] for w in e["words"]] == sorted(w["start"] for w in e["words"])


def test_completeness_the_delta_is_small(loaded, reviews):
    for text, target in zip(reviews[:6], [None, 0, 4, STARS, None, 2]):
        [e] = explain(loaded, [text], [target])
        total = sum(w["attribution"] for w in e["words"])
        assert total - (e["score"] - e["baseline_score"]) == pytest.approx(e["delta"], abs=1e-4)
        assert abs(e["delta"]) < 0.05, e["delta"]


def test_faithfulness_top_words_matter_more_than_random_ones(loaded, reviews):
    check = faithfulness(loaded, reviews[:12], k=5)
    assert check["reviews"] == 12 and check["top_drop"] > check["random_drop"], check


def test_targets_and_views(loaded):
    text = "The service was slow and rude, but the food was excellent and the dessert amazing."
    five, one, stars = explain(loaded, [text] * 3, [4, 0, STARS])
    assert (five["target"], one["target"], stars["target"]) == (5, 1, STARS)
    assert stars["score"] == pytest.approx((probabilities(loaded, [text])[0] * torch.arange(1, 6)).sum().item(), abs=1e-4)
    by_word = {w["word"]: w["attribution"] for w in stars["words"]}
    assert by_word["excellent"] > 0 and by_word["rude"] < 0                 # toward more stars, toward fewer
    assert explanation_html(text, stars).count("rgba(0, 160, 60") >= 1 and "rude" in explanation_html(text, stars)
    assert terminal_view(text, stars, 2).count("\033[1;") == 2


def test_a_mixed_batch_answers_each_request_in_order(trained_workdir, loaded):
    "Predictions, explanations (with and without a target), bad bodies and bad targets, in one batch."
    h = TransformersClassifierHandler()
    h.initialize(local_context(WorkDir(trained_workdir).model, {"explain_steps": 16}))
    good = "Lovely staff and great coffee."
    bodies = [("text/plain", good), ("application/json", json.dumps({"text": good, "target": 2}), "explain"),
              ("text/plain", "  "), ("text/plain", good, "explain"),
              ("application/json", json.dumps({"text": good, "target": 9}), "explain"),
              ("application/json", json.dumps({"text": good, "target": "stars"}), "explain"), ("text/plain", "Awful.")]
    out, statuses, _ = run_batch(h, bodies)
    assert statuses == [200, 200, 400, 200, 400, 200, 200]
    assert set(out[0]) == {"label", "stars", "probabilities"} and set(out[6]) == {"label", "stars", "probabilities"}
    assert (out[1]["target"], out[3]["target"], out[5]["target"]) == (2, out[3]["stars"], STARS)
    assert "empty" in out[2]["error"] and "from 1 to 5" in out[4]["error"]
    alone = explain(loaded, [good], [1], steps=16)[0]                       # each answer is its own request's
    assert [w["attribution"] for w in out[1]["words"]] == pytest.approx([w["attribution"] for w in alone["words"]], abs=1e-5)


@pytest.mark.notebook
def test_notebook_runs(trained_workdir, tmp_path):
    run_notebook("beyond_2_explain", tmp_path, workdir=str(trained_workdir), n_faithful=8)


def test_a_distilbert_model_is_explained_too(tmp_path):
    """The article's model: no token type ids, its embeddings under another attribute name (found through
    `get_input_embeddings`). A small random-weight DistilBERT with the embedded WordPiece tokenizer, saved and loaded
    like a trained one; attributions complete and on the review's words."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification
    from yelp_ts.training import resolve_model
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"), model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              num_labels=5, id2label=dict(enumerate(LABEL_NAMES)))
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    text = "The soup was cold, but the bread was wonderful."
    assert "token_type_ids" not in loaded.tokenizer([text])
    [e] = explain(loaded, [text], [None])
    assert [w["word"] for w in e["words"]] == ["The", "soup", "was", "cold", ",", "but", "the", "bread", "was", "wonderful", "."]
    total = sum(w["attribution"] for w in e["words"])
    assert total - (e["score"] - e["baseline_score"]) == pytest.approx(e["delta"], abs=1e-4) and abs(e["delta"]) < 0.05
