"""yelp_ts.data: the embedded sample, the CSV source and its errors, the offline Hub path, the baseline."""

import pytest

import datasets
import socket

from yelp_ts import core
from yelp_ts.core import LABEL_NAMES, YelpTsError, hub_reachable, WorkDir, require_hub
from yelp_ts.data import data_info, load_data, make_data, read_reviews_csv, tfidf_baseline
from yelp_ts.sample import sample_reviews

OFFLINE_VARS = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"]


def test_work_directory_layout():
    assert LABEL_NAMES == ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]
    assert str(WorkDir("w").data) == "w/data" and str(WorkDir("w").model) == "w/torch_model"
    assert str(WorkDir("w").mar("m")) == "w/torch_model/model_store/m.mar"


def test_sample_is_deterministic_and_balanced():
    a, b = sample_reviews(100, seed=3), sample_reviews(100, seed=3)
    assert a.equals(b)
    assert not a.equals(sample_reviews(100, seed=4))
    assert list(a.columns) == ["label", "text"] and set(a.label.value_counts()) == {20}


def test_sample_reads_like_reviews():
    words = sample_reviews(500, seed=42).text.str.split().str.len()
    assert 90 <= words.median() <= 150, words.median()
    assert words.min() >= 15 and words.max() <= 400


def test_make_data_sample_disjoint_and_repeatable(tmp_path):
    paths = make_data(tmp_path, "sample", n_train=60, n_eval=25, seed=7)
    first = {k: p.read_text() for k, p in paths.items()}
    make_data(tmp_path, "sample", n_train=60, n_eval=25, seed=7)
    assert {k: p.read_text() for k, p in paths.items()} == first
    import pandas as pd
    train, validation = pd.read_csv(paths["train"]), pd.read_csv(paths["validation"])
    assert (len(train), len(validation)) == (60, 25) and not set(train.text) & set(validation.text)
    assert data_info(tmp_path) == dict(source="sample", n_train=60, n_eval=25, seed=7)


def _csv(tmp_path, body, name="reviews.csv"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_stars_csv_is_accepted_and_split(tmp_path):
    rows = "\n".join(f'{1 + i % 5},"Review number {i}, with a comma."' for i in range(30))
    path = _csv(tmp_path, "stars,text\n" + rows + "\n")
    assert sorted(read_reviews_csv(path).label.unique()) == [0, 1, 2, 3, 4]
    paths = make_data(tmp_path / "w", str(path), n_train=20, n_eval=10, seed=1)
    import pandas as pd
    train, validation = pd.read_csv(paths["train"]), pd.read_csv(paths["validation"])
    assert list(train.columns) == ["label", "text"] and (len(train), len(validation)) == (20, 10)
    assert not set(train.text) & set(validation.text)
    assert set(train.text) | set(validation.text) == {f"Review number {i}, with a comma." for i in range(30)}
    # the same seed, the same split; another seed, another split
    again = make_data(tmp_path / "w2", str(path), n_train=20, n_eval=10, seed=1)
    assert again["train"].read_text() == paths["train"].read_text()
    other = make_data(tmp_path / "w3", str(path), n_train=20, n_eval=10, seed=2)
    assert other["train"].read_text() != paths["train"].read_text()


def test_label_csv_is_accepted(tmp_path):
    path = _csv(tmp_path, "label,text\n0,Awful.\n4,Perfect.\n2,Fine I guess.\n")
    df = read_reviews_csv(path)
    assert df.label.tolist() == [0, 4, 2] and df.text.tolist() == ["Awful.", "Perfect.", "Fine I guess."]


def test_yelp_review_full_escapes_are_read_back(tmp_path):
    "A CSV of yelp_review_full rows writes line breaks as `\\n` and quotes as `\\\"`: data/ holds what they stand for."
    path = _csv(tmp_path, 'label,text\n4,"Great tacos.\\n\\nThe staff said \\""hi\\"".\\nBack soon."\n0,"Cold.\\nRude."\n'
                          '2,"Two lines,\nwritten as such."\n1,Slow.\n')
    assert read_reviews_csv(path).text.tolist() == ['Great tacos.\n\nThe staff said "hi".\nBack soon.', "Cold.\nRude.",
                                                    "Two lines,\nwritten as such.", "Slow."]
    import pandas as pd
    paths = make_data(tmp_path / "w", str(path), n_train=3, n_eval=1, seed=0)
    texts = pd.concat([pd.read_csv(p) for p in paths.values()]).text.tolist()
    assert "\\" not in "".join(texts) and sum("\n" in t for t in texts) == 3


@pytest.mark.parametrize("body, needles", [
    ("rating,text\n3,Nice.\n", ["columns", "label,text", "stars,text"]),
    ("label,review\n3,Nice.\n", ["columns", "label,text"]),
    ("label,text\n1,Fine.\n5,Out of range.\n", ["row 2", "label '5'", "0 to 4"]),
    ("label,text\n1,Fine.\n2,Ok.\n-1,Negative.\n", ["row 3", "0 to 4"]),
    ("stars,text\n5,Great.\n0,Zero stars.\n", ["row 2", "stars '0'", "1 to 5"]),
    ("label,text\n1,Fine.\nfour,Words.\n", ["row 2", "'four'"]),
    ("label,text\n1,Fine.\n2.5,Half.\n", ["row 2", "'2.5'"]),
    ("label,text\n1,Fine.\n,No label.\n", ["row 2"]),
    ("label,text\n1,Fine.\n2,Ok.\n3,\n", ["row 3", "text is empty"]),
    ("label,text\n1,Fine.\n2,\"   \"\n", ["row 2", "text is empty"]),
    ("", ["empty"]),
])
def test_bad_csv_names_the_row(tmp_path, body, needles):
    path = _csv(tmp_path, body)
    with pytest.raises(YelpTsError) as e:
        make_data(tmp_path / "w", str(path), n_train=1, n_eval=1)
    assert isinstance(e.value, ValueError)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "w" / "data" / "train.csv").exists()


def test_too_few_rows(tmp_path):
    path = _csv(tmp_path, "label,text\n0,a\n1,b\n2,c\n")
    with pytest.raises(ValueError, match=r"too few.*n_train=3.*n-train"):
        make_data(tmp_path / "w", str(path), n_train=3, n_eval=1)


def test_missing_csv_and_unknown_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="sample"):
        make_data(tmp_path, str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="Unknown source"):
        make_data(tmp_path, "imdb")


@pytest.fixture
def no_download(monkeypatch):
    "Fail the test if anything tries to load a dataset from the Hub (which retries for ~23 s offline)."
    def forbidden(*args, **kwargs): raise AssertionError(f"load_dataset was called: {args}")
    monkeypatch.setattr(datasets, "load_dataset", forbidden)


def _assert_hub_error_before_any_download(tmp_path):
    with pytest.raises(ConnectionError) as e:
        make_data(tmp_path, "yelp_review_full", n_train=10, n_eval=10)
    assert isinstance(e.value, YelpTsError)
    message = str(e.value)
    assert "--source sample" in message and "CSV" in message and "yelp_review_full" in message
    assert not (tmp_path / "data").exists()
    return message


def test_offline_hub_fails_without_trying_the_network(tmp_path, monkeypatch, no_download):
    for var in OFFLINE_VARS: monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    def no_network(*args, **kwargs): raise AssertionError("the offline switch must answer without a connection")
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert hub_reachable() is False
    assert "HF_HUB_OFFLINE" in _assert_hub_error_before_any_download(tmp_path)


def test_unreachable_hub_fails_before_any_download(tmp_path, monkeypatch, no_download):
    "The real network path: a host whose DNS lookup fails (.invalid never resolves), no offline switch set."
    for var in OFFLINE_VARS: monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    assert hub_reachable(timeout=2) is False
    assert "hub.invalid" in _assert_hub_error_before_any_download(tmp_path)
    with pytest.raises(ConnectionError, match="--model minilm"):
        require_hub("The model distilbert-base-uncased", "`--model minilm`")


def test_load_data_casts_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="yelp-ts data"):
        load_data(tmp_path)
    make_data(tmp_path, "sample", n_train=25, n_eval=10)
    data = load_data(tmp_path)
    assert data["train"].num_rows == 25 and data["validation"].num_rows == 10
    assert data["train"].features["label"].names == LABEL_NAMES
    assert data["train"].column_names == ["label", "text"]


@pytest.mark.parametrize("n_train, n_eval, seed", [(320, 120, 42), (1000, 100, 42), (320, 120, 1)])
def test_baseline_is_informative_but_not_solved(tmp_path, n_train, n_eval, seed):
    "The sample is badly made if TF-IDF + logistic regression scores above 90 % or below 40 %."
    make_data(tmp_path, "sample", n_train=n_train, n_eval=n_eval, seed=seed)
    scores = tfidf_baseline(load_data(tmp_path))
    assert 0.40 <= scores["accuracy"] <= 0.90, scores
    assert 0.0 < scores["macro_f1"] <= 1.0
