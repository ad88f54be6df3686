"""Serving against a real TorchServe 0.12 (Java) on free loopback ports: shapes, equality with the
in-process model, batching under concurrency, token auth, bad input, clear errors, clean stop."""
import json
from pathlib import Path
import os
import re
import shutil
import socket
import threading

import psutil
import pytest
import requests

from conftest import link_model, run_notebook
from yelp_ts import serving
from yelp_ts.archive import archiver, build_archive
from yelp_ts.client import Client, read_keys
from yelp_ts.core import LABEL_NAMES, METRICS_FILE, MODEL_FILES, TOKENIZER_EXTRAS, ServerError, YelpTsError, WorkDir
from yelp_ts.demo import demo_predict
from yelp_ts.model import load_model, probabilities
from yelp_ts.settings import Serving
from yelp_ts.worker import BAD_REQUESTS
# 16 distinguishable reviews: different wording and sentiment, so each has its own probabilities
REVIEWS = [
    "Absolutely wonderful dinner, the pasta was perfect and the staff were lovely.",
    "Terrible service. We waited an hour and the food came cold.",
    "It was okay. Nothing special, but the prices are fair.",
    "Best tacos in town, I come back every week!",
    "The room smelled of smoke and the sheets were dirty. Never again.",
    "Decent coffee, slow wifi, friendly barista.",
    "The burger was overcooked and the fries were soggy, but the beer was good.",
    "Five stars for the dessert alone. The tiramisu is heavenly.",
    "Rude manager, wrong order, and they charged us twice.",
    "A solid neighborhood spot with a good brunch menu.",
    "Mediocre sushi at premium prices; the rice was mushy.",
    "Loved the atmosphere and live music, though the drinks were pricey.",
    "My car was repaired quickly and for less than the quote. Honest mechanics!",
    "The haircut was fine, the wait was long, parking is a nightmare.",
    "Stopped back by Mellow Mushroom with my mate Justin from Brew Bros.",
    "Do not go here. Food poisoning after the chicken curry.",
]


def _copy_model(src_wd, dst_wd):
    "Copy the trained model files (not the archive, not a running server's files) into a fresh work directory."
    src, dst = WorkDir(src_wd).model, WorkDir(dst_wd).model
    dst.mkdir(parents=True, exist_ok=True)
    for f in MODEL_FILES + TOKENIZER_EXTRAS + (METRICS_FILE,):
        if (src / f).is_file(): shutil.copy2(src / f, dst / f)
    return dst_wd


def _procs(pid):
    "The TorchServe frontend `pid` and its (worker) children."
    p = psutil.Process(pid)
    return [p] + p.children(recursive=True)


def _alive(procs):
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE: out.append(p.pid)
        except psutil.NoSuchProcess: pass
    return out


@pytest.fixture(scope="module")
def served(trained_workdir, tmp_path_factory):
    "A running TorchServe (batch size 4, one worker) on free ports, in its own work directory; always stopped."
    wd = _copy_model(trained_workdir, tmp_path_factory.mktemp("wd_serving"))
    build_archive(wd, precision="fp32", runtime="torch", serving=Serving(batch_size=4, max_batch_delay=100, torch_threads=1))
    try:
        info = serving.serve(wd, **serving.free_ports(), timeout=240, progress=False)
        yield wd, info
    finally:
        serving.stop(wd)


@pytest.fixture(scope="module")
def reference(served):
    "In-process probabilities (the handler's own model path, one review at a time) for every review in REVIEWS."
    loaded = load_model(WorkDir(served[0]).model)
    return {t: probabilities(loaded, [t])[0].tolist() for t in REVIEWS}


@pytest.fixture(scope="module")
def client(served):
    return Client.from_workdir(served[0])


def _post(info, body, content_type="text/plain", key=None, wd=None):
    headers = {"Content-Type": content_type} if content_type else {}
    if key is not None: headers["Authorization"] = f"Bearer {key}"
    return requests.post(info["urls"]["inference"], data=body, headers=headers, timeout=60)


def _check_answer(a):
    assert set(a) >= {"label", "stars", "probabilities"}, a
    assert list(a["probabilities"]) == LABEL_NAMES
    assert abs(sum(a["probabilities"].values()) - 1) < 1e-3
    assert a["label"] == LABEL_NAMES[a["stars"] - 1] == max(a["probabilities"], key=a["probabilities"].get)


def test_text_plain_and_json_answer_shape(served, client):
    wd, info = served
    key = client.keys["inference"]
    r1 = _post(info, REVIEWS[0].encode(), "text/plain", key)
    r2 = _post(info, json.dumps({"text": REVIEWS[0]}), "application/json", key)
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    _check_answer(r1.json()); _check_answer(r2.json())
    assert r1.json()["label"] == r2.json()["label"]


def test_predictions_equal_in_process_model(client, reference):
    answers = client.predict(REVIEWS)
    assert len(answers) == len(REVIEWS)
    for text, a in zip(REVIEWS, answers):
        _check_answer(a)
        ref = reference[text]
        assert a["stars"] - 1 == max(range(5), key=ref.__getitem__), text
        assert max(abs(a["probabilities"][n] - p) for n, p in zip(LABEL_NAMES, ref)) < 1e-4, text


def test_16_concurrent_requests_batch_4_each_get_their_own_answer(served, client, reference):
    wd, info = served
    assert client.describe()[0]["batchSize"] == 4
    # the texts must be distinguishable by their probabilities, or a swap would go unnoticed
    refs = list(reference.values())
    assert min(max(abs(a - b) for a, b in zip(refs[i], refs[j]))
               for i in range(16) for j in range(i + 1, 16)) > 1e-3
    key, barrier, results = client.keys["inference"], threading.Barrier(16), {}
    def ask(text):
        barrier.wait()
        results[text] = _post(info, text.encode(), "text/plain", key)
    threads = [threading.Thread(target=ask, args=(t,)) for t in REVIEWS]
    for t in threads: t.start()
    for t in threads: t.join(120)
    assert len(results) == 16
    for text, r in results.items():
        assert r.status_code == 200, r.text
        got = [r.json()["probabilities"][n] for n in LABEL_NAMES]
        assert max(abs(a - b) for a, b in zip(got, reference[text])) < 1e-4, text


def _grpc_inference(out_dir):
    "TorchServe's own inference.proto (from its jar), compiled with grpcio-tools: the messages and the stub modules."
    grpc_tools = pytest.importorskip("grpc_tools")
    import importlib, sys, zipfile
    import ts
    from grpc_tools import protoc
    protos, out = out_dir / "proto", out_dir / "stubs"
    out.mkdir(parents=True)
    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as z:
        for name in ("inference.proto", "google/rpc/status.proto"): z.extract(name, protos)
    include = Path(grpc_tools.__file__).parent / "_proto"           # google/protobuf/empty.proto
    assert protoc.main(["protoc", f"-I{protos}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "inference.proto", "google/rpc/status.proto"]) == 0
    sys.path.insert(0, str(out))
    try: return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally: sys.path.remove(str(out))


def test_grpc_and_http_give_the_same_answers(served, client, reference, tmp_path):
    "TorchServe's gRPC inference API (its own port, the same key in the metadata) answers what HTTP answers."
    import grpc
    wd, info = served
    messages, stubs = _grpc_inference(tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{info['ports']['grpc_inference']}") as channel:
        stub = stubs.InferenceAPIsServiceStub(channel)
        ask = lambda text, key: json.loads(stub.Predictions(messages.PredictionsRequest(model_name="yelp", input={
            "data": text.encode()}), metadata=[("authorization", f"Bearer {key}")], timeout=60).prediction)
        over_grpc = [ask(text, client.keys["inference"]) for text in REVIEWS[:6]]
        with pytest.raises(grpc.RpcError) as refused:
            ask(REVIEWS[0], "wrong-key")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for text, g, h in zip(REVIEWS, over_grpc, client.predict(REVIEWS[:6])):
        _check_answer(g)
        assert g["label"] == h["label"] and max(abs(g["probabilities"][n] - h["probabilities"][n]) for n in LABEL_NAMES) < 1e-4


def test_requests_without_or_with_wrong_key_are_refused(served, client):
    wd, info = served
    for key in (None, "wrong-key"):
        r = _post(info, b"Great food", "text/plain", key)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = requests.get(info["urls"]["management"], headers=headers, timeout=30)
        assert r.status_code == 400 and "InvalidKey" in r.text
    # the inference key does not open the management API
    r = requests.get(info["urls"]["management"], headers={"Authorization": f"Bearer {client.keys['inference']}"}, timeout=30)
    assert r.status_code == 400
    assert client.ping() == {"status": "Healthy"}


def test_key_file_private_and_never_logged(served):
    wd, _ = served
    d = WorkDir(wd).model
    assert (d / "key_file.json").stat().st_mode & 0o777 == 0o600
    keys = [entry["key"] for entry in read_keys(wd).values()]
    for f in list((d / "logs").glob("*")) + [d / "server.json", d / "config.properties"]:
        text = f.read_text(errors="replace")
        assert not any(k in text for k in keys), f"a key leaked into {f}"


def test_config_is_loopback_only_with_model_api_off(served):
    wd, info = served
    conf = (WorkDir(wd).model / "config.properties").read_text()
    for line in conf.splitlines():
        if "_address=" in line: assert "127.0.0.1" in line, line
    assert "enable_model_api=false" in conf and "disable_token_authorization=false" in conf
    assert "allowed_urls=file://" in conf and "default_workers_per_model" not in conf
    r = requests.post(f"http://127.0.0.1:{info['ports']['management']}/models", params={"url": "http://example.com/x.mar"},
                      headers={"Authorization": f"Bearer {read_keys(wd)['management']['key']}"}, timeout=30)
    assert r.status_code == 405          # registering models over HTTP is disabled


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_400_json_and_next_good_request_works(served, client, name):
    wd, info = served
    ctype, body, says = BAD_REQUESTS[name]
    r = _post(info, body, ctype, client.keys["inference"])
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert re.search(says, r.json().get("error", "")), r.text
    _check_answer(client.predict("The soup was great.")[0])


def test_1mb_review_is_answered_and_7mb_body_gets_413(served, client):
    wd, info = served
    key = client.keys["inference"]
    r = _post(info, ("The food was great. " * 52_500).encode(), "text/plain", key)      # ~1 MB, cut before tokenizing
    assert r.status_code == 200, r.text
    _check_answer(r.json())
    r = _post(info, b"x" * 7_000_000, "text/plain", key)                               # over max_request_size
    assert r.status_code == 413
    with pytest.raises(ValueError, match="413"):
        client.predict("y" * 7_000_000)
    _check_answer(client.predict("Still fine.")[0])


def test_predict_raises_on_bad_input_without_retrying(served, client, monkeypatch):
    sent = []
    request = client._request
    monkeypatch.setattr(client, "_request", lambda *a, **k: sent.append(a) or request(*a, **k))
    with pytest.raises(YelpTsError, match="400") as e:
        client.predict("   ")
    assert isinstance(e.value, ValueError) and "empty" in str(e.value)
    assert len(sent) == 1                    # a bad input is not retried


def test_status_and_demo_predict(served, client):
    wd, info = served
    s = serving.status(wd)
    assert s["running"] and s["pid"] == info["pid"] and s["health"] == "Healthy" and s["workers"] == ["READY"]
    answer, fig = demo_predict(client, REVIEWS[3])
    _check_answer(answer)
    assert len(fig.axes[0].patches) == 5


@pytest.mark.notebook
def test_client_and_demo_notebooks_against_the_running_server(served, tmp_path):
    wd, info = served
    run_notebook("05a_client", tmp_path, workdir=str(wd))    # its last cell checks a prediction of this server
    demo = json.loads(run_notebook("05b_demo", tmp_path, workdir=str(wd)).read_text())
    widgets = [o for c in demo["cells"] for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the demo widget was not displayed"


def test_client_with_a_wrong_key_and_no_work_directory_says_where_keys_come_from(served):
    remote = Client(served[1]["urls"]["inference"].rsplit("/predictions", 1)[0], "not-the-key", retries=0)
    with pytest.raises(YelpTsError, match="key_file.json") as e:
        remote.predict("Great tacos!")
    assert isinstance(e.value, PermissionError)


def test_serve_twice_in_same_workdir_is_a_clear_error(served):
    wd, info = served
    with pytest.raises(YelpTsError, match="already running.*yelp-ts stop"):
        serving.serve(wd, **serving.free_ports())
    assert serving.status(wd)["pid"] == info["pid"]


@pytest.fixture
def own_server(served, tmp_path):
    "A server of its own, for a test that kills or restarts it: the module's archive, in a work directory of its own."
    w = WorkDir(tmp_path / "own")
    w.model_store.mkdir(parents=True)
    os.symlink(WorkDir(served[0]).mar(), w.mar())
    try: yield w, serving.serve(w, **serving.free_ports(), timeout=240, progress=False)
    finally: serving.stop(w)


def test_predict_survives_a_killed_worker(own_server, reference):
    "Kill the model worker: TorchServe restarts it and the client's retries turn that into the right answers."
    wd, info = own_server
    [worker] = psutil.Process(info["pid"]).children()
    worker.kill()
    answers = Client.from_workdir(wd).predict(REVIEWS[:4])
    for text, a in zip(REVIEWS[:4], answers):
        assert max(abs(a["probabilities"][n] - p) for n, p in zip(LABEL_NAMES, reference[text])) < 1e-4


@pytest.fixture
def empty_workdir(tmp_path):
    return tmp_path


def test_stop_when_nothing_runs_returns_false(empty_workdir):
    assert serving.stop(empty_workdir) is False
    assert serving.status(empty_workdir)["running"] is False


def test_missing_archive_says_run_archive(empty_workdir):
    with pytest.raises(YelpTsError, match="yelp-ts archive"):
        serving.serve(empty_workdir, **serving.free_ports())


def test_corrupt_or_truncated_archive_is_a_clear_error(served, empty_workdir):
    mar = WorkDir(served[0]).model / "model_store" / "yelp.mar"
    store = WorkDir(empty_workdir).model / "model_store"; store.mkdir(parents=True)
    (store / "yelp.mar").write_bytes(mar.read_bytes()[: 1 << 20])      # the first MB of a real archive
    with pytest.raises(YelpTsError, match="corrupt or truncated.*yelp-ts archive"):
        serving.serve(empty_workdir, **serving.free_ports())
    assert not (WorkDir(empty_workdir).model / "server.json").exists()


def test_port_in_use_names_port_and_flag(served, empty_workdir):
    store = WorkDir(empty_workdir).model / "model_store"; store.mkdir(parents=True)
    os.symlink(WorkDir(served[0]).model / "model_store" / "yelp.mar", store / "yelp.mar")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen(); taken = s.getsockname()[1]
        with pytest.raises(YelpTsError, match=f"port {taken} .*--management-port"):
            serving.serve(empty_workdir, **{**serving.free_ports(), "management_port": taken})
    assert serving.status(empty_workdir)["running"] is False


def test_java_missing_says_how_to_install(served, empty_workdir, monkeypatch):
    monkeypatch.setenv("PATH", str(empty_workdir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert serving.java_version() is None
    with pytest.raises(YelpTsError, match="Java 11\\+.*apt-get install openjdk-17-jre-headless"):
        serving.serve(empty_workdir, **serving.free_ports())


def test_served_explanations_equal_in_process_ones(served, client):
    "POST /explanations/yelp (JSON with a target, and plain text) answers what `explain` computes in-process."
    from yelp_ts.model import explain
    served_why = client.explain(REVIEWS[:2], target=2) + client.explain([REVIEWS[2]])
    loaded = load_model(WorkDir(served[0]).model)
    local = explain(loaded, REVIEWS[:2], [1, 1]) + explain(loaded, [REVIEWS[2]])
    for s, l in zip(served_why, local):
        assert (s["target"], s["label"], [w["word"] for w in s["words"]]) == (l["target"], l["label"], [w["word"] for w in l["words"]])
        assert [w["attribution"] for w in s["words"]] == pytest.approx([w["attribution"] for w in l["words"]], abs=1e-4)
    with pytest.raises(YelpTsError, match="from 1 to 5"):
        client.explain(REVIEWS[0], target=0)


def test_restart_gives_new_key_client_follows_and_stop_leaves_no_process(own_server):
    "Stop (no process left), restart in the same work directory on the same ports, stop again."
    wd, info = own_server
    old_key, procs = read_keys(wd)["inference"]["key"], _procs(info["pid"])
    assert len(procs) >= 2                                   # java + its worker
    assert serving.stop(wd) is True
    assert _alive(procs) == []
    assert not (WorkDir(wd).model / "server.json").exists() and not (WorkDir(wd).model / "key_file.json").exists()
    assert serving.stop(wd) is False

    info2 = serving.serve(wd, **{f"{k}_port": info["ports"][k] for k in ("inference", "management", "metrics")},
                          timeout=240, progress=False)
    assert read_keys(wd)["inference"]["key"] != old_key
    assert _post(info2, b"good", "text/plain", old_key).status_code == 400
    stale = Client.from_workdir(wd)
    stale.keys["inference"] = old_key                        # a client built before the restart ...
    _check_answer(stale.predict("Back again, still great.")[0])   # ... re-reads the key when refused
    assert stale.keys["inference"] == read_keys(wd)["inference"]["key"]
    procs = _procs(info2["pid"])
    assert serving.stop(wd) is True
    assert _alive(procs) == []


@pytest.mark.notebook
def test_serving_notebook_runs(trained_workdir, tmp_path):
    "The serving notebook under papermill on free ports: it starts, predicts and stops."
    wd = _copy_model(trained_workdir, tmp_path / "wd")
    out = run_notebook("05_serving", tmp_path / "executed", workdir=str(wd), **serving.free_ports(), timeout=240, stop_at_end=True)
    assert serving.status(wd)["running"] is False
    assert not (WorkDir(wd).model / "server.json").exists()
    text = out.read_text()
    assert "Bearer $KEY" in text                          # the article's curl, shown with the header
    assert not re.findall(r"Bearer\s+(?!\$KEY)[A-Za-z0-9_\-]{6,}", text)   # and no real key in the outputs


# ---------------------------------------------------------------- what `serve` and `stop` must cope with
BROKEN_HANDLER = """from ts.torch_handler.base_handler import BaseHandler

class Broken(BaseHandler):
    def initialize(self, context): self.initialized = True
    def handle(self, data, context): raise RuntimeError("this handler fails every request, on purpose")
"""


@pytest.mark.torchserve
def test_serve_fails_within_a_minute_with_the_workers_error_when_every_answer_is_an_error(tmp_path):
    "A handler that loads but answers every request with an error: `serve` says so, quoting the worker, and stops it."
    import subprocess, time
    w = WorkDir(tmp_path / "wd")
    w.model_store.mkdir(parents=True)
    (tmp_path / "broken.py").write_text(BROKEN_HANDLER)
    subprocess.run([archiver(), "--model-name", "yelp", "--version", "1.0", "--handler", str(tmp_path / "broken.py"),
                    "--export-path", str(w.model_store)], check=True, capture_output=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    start = time.monotonic()
    with pytest.raises(ServerError, match="answers with an error.*this handler fails every request, on purpose"):
        serving.serve(w, **serving.free_ports(), timeout=300, progress=False)
    assert time.monotonic() - start < 60
    assert serving.status(w)["running"] is False and not w.file("server.json").exists()


def test_stop_copes_with_a_server_that_exits_between_its_two_looks(tmp_path, monkeypatch):
    "The record says a server runs, but by the time `stop` looks at its process it is gone: nothing to stop, no error."
    import subprocess
    w = WorkDir(tmp_path)
    w.tmp.mkdir(parents=True)
    gone = subprocess.Popen(["true"]); gone.wait()                         # a pid that has exited
    for f in ("server.json", "key_file.json"): w.file(f).write_text("{}")
    w.pid_file.write_text(str(gone.pid))
    monkeypatch.setattr(serving, "server_info", lambda workdir: {"pid": gone.pid, "ports": {}})   # alive at the first look
    assert serving.stop(w) is False
    assert not w.file("server.json").exists() and not w.file("key_file.json").exists() and not w.pid_file.exists()


# ---------------------------------------------------------------- explanations explain what was served
@pytest.fixture(scope="module")
def served_bf16(tied_model_workdir, tmp_path_factory):
    "The tied model (1 and 2 stars within bf16's rounding) served in bf16 on torch, with its validation reviews."
    from yelp_ts.data import make_data
    wd = link_model(tied_model_workdir, tmp_path_factory.mktemp("wd_bf16"))
    make_data(wd, "sample", n_train=10, n_eval=40)
    build_archive(wd, precision="bf16", runtime="torch", serving=Serving(explain_steps=2, explain_batch=2))
    try: yield wd, serving.serve(wd, **serving.free_ports(), timeout=240, progress=False)
    finally: serving.stop(wd)


@pytest.mark.torchserve
def test_explanations_give_the_stars_predictions_give_when_serving_bf16(served_bf16):
    "/explanations explains the class /predictions answers, for every validation review, though fp32 would differ."
    import pandas as pd
    wd, _ = served_bf16
    texts = pd.read_csv(WorkDir(wd).split("validation"))["text"].tolist()
    client = Client.from_workdir(wd)
    predicted = [a["stars"] for a in client.predict(texts)]
    explained = client.explain(texts)
    assert [e["stars"] for e in explained] == predicted and [e["target"] for e in explained] == predicted
    fp32 = (probabilities(load_model(WorkDir(wd).model), texts).argmax(-1) + 1).tolist()
    assert fp32 != predicted, "fp32 serves the same stars here: the test could not tell"


@pytest.mark.torchserve
def test_an_expired_key_is_renewed_by_the_client(served, tmp_path):
    "Keys that last one minute: once the inference key has expired, the server refuses it and the client renews it."
    import time
    from datetime import datetime, timezone
    w = WorkDir(tmp_path / "keys")
    w.model_store.mkdir(parents=True)
    os.symlink(WorkDir(served[0]).mar(), w.mar())
    try:
        serving.serve(w, **serving.free_ports(), key_minutes=1, timeout=240, progress=False)
        client = Client.from_workdir(w)
        _check_answer(client.predict(REVIEWS[0])[0])
        expires = datetime.fromisoformat(read_keys(w)["inference"]["expiration time"].replace("Z", "+00:00"))
        assert (expires - datetime.now(timezone.utc)).total_seconds() < 61          # the setting reached TorchServe
        old = client.keys["inference"]
        while datetime.now(timezone.utc) <= expires: time.sleep(min(1.0, (expires - datetime.now(timezone.utc)).total_seconds() + 0.05))
        info = serving.server_info(w)
        assert _post({"urls": {"inference": f"http://127.0.0.1:{info['ports']['inference']}/predictions/yelp"}},
                     b"Expired.", "text/plain", old).status_code == 400                # the old key is refused now
        _check_answer(client.predict(REVIEWS[1])[0])                                   # ... and renewed by the client
        assert client.keys["inference"] != old
    finally:
        serving.stop(w)
