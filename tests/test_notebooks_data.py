"""The first notebooks (core, data, sample, concepts) run top to bottom under papermill, in a temporary work directory."""
import json

import pytest

import pandas as pd

from conftest import SMALL_DATA, run_notebook
from yelp_ts.core import WorkDir


def test_data_notebook_writes_the_csvs(data_workdir):
    out = WorkDir(data_workdir).data
    train, validation = pd.read_csv(out / "train.csv"), pd.read_csv(out / "validation.csv")
    assert (len(train), len(validation)) == (SMALL_DATA["n_train"], SMALL_DATA["n_eval"])
    for df in (train, validation):
        assert list(df.columns) == ["label", "text"]
        assert df.label.dtype.kind == "i" and df.label.between(0, 4).all()
        assert df.text.str.strip().str.len().gt(0).all()
        assert set(df.label.value_counts()) <= {len(df) // 5, len(df) // 5 + 1}
    assert not set(train.text) & set(validation.text)
    assert json.loads((out / "info.json").read_text()) == dict(source="sample", **SMALL_DATA)


def test_data_notebook_shows_baseline_and_lengths(data_workdir):
    nb = json.loads((data_workdir / "executed" / "00_data.out.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the length histogram is missing"
    assert any("'accuracy'" in "".join(o.get("data", {}).get("text/plain", "")) for o in outputs), "the baseline is missing"


@pytest.mark.notebook
def test_concepts_notebook_runs(tmp_path):
    executed = run_notebook("01_concepts", tmp_path / "executed", workdir=str(tmp_path))
    nb = json.loads(executed.read_text())
    text = json.dumps(nb["cells"])
    for needle in ["DistilBertForQuestionAnswering", "start_logits", "[CLS]", "[SEP]", "5 stars"]:
        assert needle in text, needle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["executed"]   # it writes nothing


def test_core_and_settings_notebooks_run(tmp_path):
    "The two notebooks of facts and declarations run in seconds: the fast tier runs them."
    run_notebook("ref_core", tmp_path / "executed")
    run_notebook("ref_settings", tmp_path / "executed")


@pytest.mark.notebook
def test_sample_notebook_runs(tmp_path):
    executed = run_notebook("ref_sample", tmp_path / "executed", seed=7)
    nb = json.loads(executed.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the length histogram is missing"
