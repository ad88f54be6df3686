"""The article, runnable (nbs/article_ko.ipynb, nbs/article_en.ipynb): the two languages share every code cell; the
article's steps are there at top level, under its headings, in its order; the handler they write has TorchServe's
four methods; both run under papermill offline on the embedded default, with a real TorchServe answering the curl."""
import ast
import json
import re
import sys

import papermill as pm
import pytest

from conftest import NBS, REPO, run_notebook, run_record
from yelp_ts import serving

LANGS = ("ko", "en")
HEADINGS = ["학습 & 평가 데이터 만들기", "🤗 Transformers의 모델 구조 이해하기(개념)", "Sequenceclassification Model 학습하기(적용)",
            "torchserve 생성하기", "Handler가 필요한 이유", "🤗 Transformers를 위한 Handler", "MAR file 생성하기",
            "TorchServe 배포하기", "Debugging을 위한 Shell script 생성"]   # the article's own, in its order
STEPS = ['load_dataset("yelp_review_full")', "dataset['train'][:3]", 'dataset["train"].shuffle(seed=seed).select(range(',
         '.to_csv("data/train.csv"', 'load_dataset("csv"', "tokenizer(item[", ".map(tokenize_function)", "TrainingArguments(",
         "class myCallback(TrainerCallback)", "Trainer(", "trainer.train()", "trainer.save_model(", "tokenizer.save_pretrained(",
         "%%writefile torch_model/handler_2023.py", "%%writefile torch_model/handler.py", "!torch-model-archiver",
         "torchserve --start", "!curl", '"Received text" in line', "%%writefile debug_torch.sh", "./debug_torch.sh", "!TMPDIR={tmp} torchserve --stop"]
PARAMETERS = ["workdir", "preset", "n_train", "n_eval", "epochs", "seed"]


def cells(lang, kind):
    nb = json.loads((NBS / f"article_{lang}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_both_languages_have_the_same_code_and_as_many_prose_cells():
    assert cells("ko", "code") == cells("en", "code")
    assert len(cells("ko", "markdown")) == len(cells("en", "markdown"))
    assert all(re.search("[가-힣]", text) for text in cells("ko", "markdown")), "a Korean cell without Korean"


def test_the_article_headings_in_its_order_with_the_english():
    for lang in LANGS:
        found = [line[3:] for text in cells(lang, "markdown") for line in text.splitlines() if line.startswith("## ")]
        assert [h for h in found if h.split(" — ")[0] in HEADINGS] == found, found
        assert [h.split(" — ")[0] for h in found] == HEADINGS
        if lang == "en": assert all(" — " in h for h in found), "each heading: the article's, then the English"


def test_the_article_steps_run_at_top_level_in_its_order():
    code = "\n".join(cells("en", "code"))
    where = [code.find(step) for step in STEPS]
    assert -1 not in where, [s for s, w in zip(STEPS, where) if w == -1]
    assert where == sorted(where), [s for s, _ in sorted(zip(STEPS, where), key=lambda x: x[1])]
    for step in ("trainer.train()", "trainer.save_model(", "load_dataset(\"csv\""):   # not hidden in a function
        line = next(l for l in code.splitlines() if step in l)
        assert not line.startswith((" ", "\t")), line


def test_the_parameters_are_exactly_the_documented_ones():
    nb = json.loads((NBS / "article_en.ipynb").read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    names = [statement.targets[0].id for statement in ast.parse("".join(tagged[0]["source"])).body]
    assert names == PARAMETERS


def handler_classes(src):
    tree = ast.parse(src.split("\n", 1)[1])                            # without the %%writefile line
    return {n.name: [f.name for f in n.body if isinstance(f, ast.FunctionDef)] for n in tree.body if isinstance(n, ast.ClassDef)}


def test_the_handler_written_has_torchserves_four_methods_and_one_class():
    source = next(c for c in cells("en", "code") if c.startswith("%%writefile torch_model/handler.py"))
    classes = handler_classes(source)
    assert list(classes) == ["TransformersClassifierHandler"]          # TorchServe wants one class in the file
    assert classes["TransformersClassifierHandler"] == ["initialize", "preprocess", "inference", "postprocess"]
    parts = [c.split("\n", 1)[1] for c in cells("en", "code") if re.match(r"%%writefile (-a )?torch_model/handler_2023.py", c)]
    assert len(parts) == 2                                             # written in two cells, each a screen at most
    old = handler_classes("\n" + "".join(parts))
    assert {"initialize", "preprocess", "inference", "postprocess"} <= set(old["TransformersClassifierHandler"])


def outputs(nb_path):
    "The text each code cell printed, in order."
    nb = json.loads(nb_path.read_text())
    texts = []
    for c in nb["cells"]:
        if c["cell_type"] != "code" or "injected-parameters" in c["metadata"].get("tags", []): continue
        texts.append("\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                                for o in c["outputs"] if o.get("name") != "stderr"))
    return texts


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    "Both walkthroughs run by papermill, offline, with small sizes: the folder of their executed copies."
    out = tmp_path_factory.mktemp("article")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")                               # the embedded default needs nothing online
        for lang in LANGS:
            work = out / f"walkthrough_{lang}"
            try: run_notebook(f"article_{lang}", out, workdir=str(work), n_train=120, n_eval=20, epochs=1, seed=3)
            finally: serving.stop(work)                                # if the notebook stopped before its last cell
    return out


@pytest.mark.notebook
@pytest.mark.torchserve
@pytest.mark.parametrize("lang", LANGS)
def test_the_walkthrough_runs_offline_and_torchserve_answers_the_curl(lang, executed):
    work, out = executed / f"walkthrough_{lang}", executed / f"article_{lang}.out.ipynb"
    printed = dict(zip(cells(lang, "code"), outputs(out)))
    curls = [printed[c].strip() for c in printed if "!curl" in c]
    assert len(curls) == 2 and all(re.fullmatch(r"[1-5]", a.splitlines()[-1]) for a in curls), curls
    local = next(printed[c] for c in printed if "service = handler.TransformersClassifierHandler()" in c)
    assert re.fullmatch(r"\['[1-5]', '[1-5]'\]", local.strip().splitlines()[-1]), local     # one answer per request of the batch
    log = next(printed[c] for c in printed if "Received text" in c and "print(" in c)
    assert "Mellow Mushroom" in log                                    # the server's own log line, from the handler
    assert (work / "torch_model" / "model_store" / "bert-model.mar").is_file()
    assert not serving.status(work)["running"], "the walkthrough leaves its server running"


@pytest.mark.notebook
def test_the_article_preset_offline_fails_at_once_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(pm.PapermillExecutionError) as error:
        run_notebook("article_en", tmp_path, workdir=str(tmp_path / "w"), preset="article")
    assert "OfflineError" in error.value.ename and 'preset = "embedded"' in error.value.evalue


@pytest.mark.notebook
@pytest.mark.browser
def test_the_site_shows_every_notebook_links_the_languages_and_its_plots_load(executed, tmp_path):
    import http.server, shutil, threading, functools
    from urllib.parse import urljoin, urlparse
    import requests
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if not chromium: pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sys.path.insert(0, str(REPO / "docs"))
    import base64, build_site
    for lang in LANGS:   # what `make docs` keeps beside each executed copy: its time, parameters and CPU
        (executed / f"article_{lang}.run.json").write_text(json.dumps(run_record(executed / f"article_{lang}.out.ipynb")))
    # the picture of the demo: `make docs` keeps the browser test's screenshot; here the walkthrough's own plot stands in
    plot = next(o["data"]["image/png"] for c in json.loads((executed / "article_en.out.ipynb").read_text())["cells"]
                for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    (executed / "demo.png").write_bytes(base64.b64decode(plot))
    shown = build_site.build(executed, tmp_path / "site")
    assert set(shown) == {p.stem for p in NBS.glob("*.ipynb")} and shown["article_ko"] and shown["article_en"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page, links = browser.new_page(), {}
            for name in shown:
                url = root if name == "index" else f"{root}{name}/"
                assert page.goto(url, wait_until="load").ok, url
                assert page.locator(".jp-Notebook, .jupyter-wrapper").count() > 0, f"{url} shows no notebook"
                hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
                links[name] = {urljoin(url, h).split("#")[0] for h in hrefs if not urlparse(h).scheme}
                if name.startswith("article_") or name in ("05_serving", "05b_demo"):   # plots; the demo's picture
                    images = page.eval_on_selector_all(".jp-OutputArea-output img", "els => els.map(i => i.complete && i.naturalWidth > 0)")
                    assert images and all(images), f"{url}: the plots do not load ({images})"
                if name.startswith("article_"):
                    assert page.get_by_text("executed: it ran in").count() > 0, \
                        f"{url} does not say how long its run took"
                if name in ("05_serving", "05b_demo"):
                    assert page.get_by_text("as the browser test saw it").count() == 1, f"{url}: no caption under the demo's picture"
            browser.close()
        assert f"{root}article_en/" in links["article_ko"] and f"{root}article_ko/" in links["article_en"]
        broken = sorted({(name, link) for name, found in links.items() for link in found
                         if link.startswith(root) and requests.get(link, timeout=10).status_code != 200})
        assert broken == [], broken
    finally:
        server.shutdown()
