"""Reliability and security of the served model (issue 5), against a real TorchServe 0.12 on free loopback ports.

Load (2,000 requests from 16 clients, checked by content), a killed worker, stop/restart, clear errors (library
and `yelp-ts` CLI), a concurrent burst of good and bad input, the 1 MB review, and the security settings.
What tests/test_serving.py already asserts (each bad input alone, key refusal on GET, 413, second serve, port in
use, Java missing, truncated .mar, `stop` with nothing running, restart gives a new key) is not repeated here.
The model is MiniLM with an untrained 5-star head: its answers are noise, but every text has its own
probabilities, which is all a reliability test needs. Measured numbers are printed (`pytest -s`) as
`RELIABILITY name: value` lines and collected at the end of the module.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime
from itertools import count
from pathlib import Path

import psutil
import pytest
import requests

from conftest import link_model
from yelp_ts import serving
from yelp_ts.archive import build_archive
from yelp_ts.client import Client, read_keys
from yelp_ts.core import LABEL_NAMES, YelpTsError, WorkDir
from yelp_ts.model import load_model, probabilities
from yelp_ts.settings import Serving
from yelp_ts.worker import BAD_REQUESTS

TOLERANCE = 1e-4            # server vs in-process probabilities (both rounded to 6 decimals; padding differs)
YELP_TS = Path(sys.executable).parent / "yelp-ts"
REPORT = {}                 # measured numbers, printed at the end of the module


def report(name, value):
    REPORT[name] = value
    print(f"RELIABILITY {name}: {value}")


# ---------------------------------------------------------------- texts, reference, server
FOOD = ["pizza", "ramen", "brisket", "pad thai", "croissant", "burrito", "salmon", "falafel", "dumplings", "lasagna",
        "pho", "tacos", "curry", "steak", "bagel", "gelato", "paella", "gnocchi", "kimchi stew", "fish and chips"]
ADJ = ["cold", "perfect", "bland", "amazing", "soggy", "overpriced", "fresh", "burnt", "delicious", "greasy",
       "forgettable", "outstanding", "salty", "undercooked", "lovely", "stale", "generous", "tiny", "spicy", "dry"]
STAFF = ["the waiter", "our server", "the manager", "the host", "the bartender", "the chef", "the cashier"]
MOOD = ["was rude", "was friendly", "ignored us", "made our night", "forgot the order", "was patient",
        "rushed us out", "remembered my name", "was slow but kind", "argued with us"]
END = ["Never again.", "Coming back soon!", "Meh.", "Five stars.", "Worst meal this year.", "Pretty good overall.",
       "Not worth the wait.", "Best in town, no question.", "Two stars at most.", "I would bring my parents."]


def reviews(n, seed, prefix="Visit"):
    "`n` distinguishable reviews: a unique number plus a random mix of dishes, adjectives, staff and verdicts."
    rng = random.Random(seed)
    return [f"{prefix} {i}: the {rng.choice(FOOD)} was {rng.choice(ADJ)} and the {rng.choice(FOOD)} "
            f"{rng.choice(ADJ)}; {rng.choice(STAFF)} {rng.choice(MOOD)}. Table {rng.randint(1, 99)}, "
            f"{rng.randint(1, 12)} pm. {rng.choice(END)}" for i in range(n)]


def _key(wd, api="inference"):
    return read_keys(wd)[api]["key"]


def _all_keys(wd):
    return {entry["key"] for entry in read_keys(wd).values()}


def _ports():
    return serving.free_ports()


def _workers(pid):
    "The model_service_worker processes of the TorchServe frontend `pid`."
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "model_service_worker" in " ".join(p.cmdline()): out.append(p)
        except psutil.Error: pass
    return out


def _rss_mb(pid):
    return {p.pid: round(p.memory_info().rss / 2**20, 1) for p in _workers(pid)}


def _processes_of(wd):
    "Live processes whose command line names `wd`'s torch_model (java frontend, workers)."
    needle, out = str(WorkDir(wd).model.resolve()), []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and needle in " ".join(p.info["cmdline"] or []): out.append(p.pid)
        except psutil.Error: pass
    return out


@pytest.fixture(scope="module")
def reference(untrained_model_workdir):
    "probs(texts) -> in-process probabilities (the handler's own model path), computed once per text."
    loaded = load_model(WorkDir(untrained_model_workdir).model)
    cache = {}
    def probs(texts):
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        for i in range(0, len(todo), 64):
            chunk = todo[i:i + 64]
            cache.update(zip(chunk, probabilities(loaded, chunk).tolist()))
        return [cache[t] for t in texts]
    return probs


@pytest.fixture(scope="module")
def server(untrained_model_workdir, tmp_path_factory):
    "TorchServe with 2 workers x 1 torch thread, batch 8 (a worker survives the other's kill); stopped and checked for leftovers."
    wd = link_model(untrained_model_workdir, tmp_path_factory.mktemp("wd_reliability"))
    build_archive(wd, precision="fp32", runtime="torch", serving=Serving(batch_size=8, max_batch_delay=20, workers=2, torch_threads=1))
    state = {"wd": wd, "keys": set()}
    try:
        state["info"] = serving.serve(wd, **_ports(), timeout=240, progress=False)
        state["keys"] |= _all_keys(wd)
        yield state
    finally:
        serving.stop(wd)
        if REPORT:
            print("\nRELIABILITY summary:\n" + "\n".join(f"  {k}: {v}" for k, v in REPORT.items()))
    assert _processes_of(wd) == [], "TorchServe processes left behind"


def _url(state):
    return state["info"]["urls"]["inference"]


def _post(url, body, key, content_type="text/plain; charset=utf-8", session=requests, timeout=60):
    headers = {"Content-Type": content_type} if content_type else {}
    if key is not None: headers["Authorization"] = f"Bearer {key}"
    return session.post(url, data=body, headers=headers, timeout=timeout)


def _probs(answer):
    return [answer["probabilities"][n] for n in LABEL_NAMES]


def _mismatch(answer, ref):
    "Why `answer` is not the right answer for a text whose in-process probabilities are `ref` ('' if it is)."
    if set(answer) != {"label", "stars", "probabilities"} or list(answer["probabilities"]) != LABEL_NAMES:
        return f"wrong shape: {answer}"
    got = _probs(answer)
    if answer["label"] != LABEL_NAMES[answer["stars"] - 1] or answer["stars"] - 1 != max(range(5), key=got.__getitem__):
        return f"label/stars disagree with probabilities: {answer}"
    diff = max(abs(a - b) for a, b in zip(got, ref))
    return f"probabilities differ by {diff:.2g}" if diff > TOLERANCE else ""


def _distinguishable(refs):
    "Fraction of texts whose probabilities differ from every other text's by more than TOLERANCE."
    import numpy as np
    p = np.array(refs)
    ok = 0
    for i in range(len(p)):
        d = np.abs(p - p[i]).max(axis=1); d[i] = np.inf
        ok += d.min() > TOLERANCE
    return ok / len(p)


class Load:
    "Clients that POST texts with one fixed key (a raw client: no retries); every result is kept with its text."
    def __init__(self, url, key, texts, clients):
        self.url, self.key, self.texts, self.clients = url, key, texts, clients
        self.results, self.lock, self.stop = [], threading.Lock(), threading.Event()

    def _client(self):
        session = requests.Session()
        while not self.stop.is_set():
            with self.lock:
                text = next(self.texts, None)
            if text is None: return
            sent = time.time()
            try:
                r = _post(self.url, text.encode(), self.key, session=session)
                status, body = r.status_code, r.text
            except requests.RequestException as e:
                status, body = None, repr(e)
            with self.lock: self.results.append((text, sent, time.time(), status, body))

    def start(self):
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads: t.start()
        return self

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads: t.join(max(0.1, deadline - time.monotonic()))
        self.stop.set()
        assert not any(t.is_alive() for t in self.threads), "load clients did not finish in time"
        return self.results


def _check_results(results, reference):
    "(errors, mismatches) of a load run: non-200 answers, and 200 answers that are not their own text's."
    errors = [(t, s, b[:200]) for t, _, _, s, b in results if s != 200]
    ok = [(t, b) for t, _, _, s, b in results if s == 200]
    refs = reference([t for t, _ in ok])
    mismatches = [(t, why) for (t, b), ref in zip(ok, refs) if (why := _mismatch(json.loads(b), ref))]
    return errors, mismatches


# ---------------------------------------------------------------- clear errors (library and CLI)
@pytest.mark.parametrize("contents", ["nothing", "incomplete torch_model"])
def test_serve_without_trained_model_says_train(tmp_path, contents):
    if contents != "nothing":
        (tmp_path / "torch_model").mkdir()
        (tmp_path / "torch_model" / "config.json").write_text("{}")
    with pytest.raises(YelpTsError, match=r"yelp-ts train.*yelp-ts archive") as e:
        serving.serve(tmp_path, **_ports(), progress=False)
    assert "model.safetensors" in str(e.value)
    assert serving.status(tmp_path)["running"] is False and _processes_of(tmp_path) == []


def _corrupt(mar, dst, how):
    "A damaged copy of `mar` at `dst`: bytes zeroed in the middle, a zip without manifest, or a garbage model file."
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "zeroed bytes":
        b = bytearray(mar.read_bytes()); mid = len(b) // 2
        b[mid:mid + 4096] = bytes(4096)
        dst.write_bytes(b)
        return
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            if how == "no manifest" and item.filename.startswith("MAR-INF/"): continue
            data = b"not a safetensors file" if how == "garbage model file" and item.filename == "model.safetensors" \
                else src.read(item)
            out.writestr(item.filename, data)


@pytest.mark.parametrize("how", ["zeroed bytes", "no manifest"])
def test_corrupt_mar_fails_before_java_starts(server, tmp_path, how):
    "A damaged archive is caught by its CRCs/manifest before TorchServe starts: a clear message, no process."
    _corrupt(WorkDir(server["wd"]).model / "model_store" / "yelp.mar", WorkDir(tmp_path).model / "model_store" / "yelp.mar", how)
    with pytest.raises(YelpTsError, match=r"corrupt or truncated.*yelp-ts archive"):
        serving.serve(tmp_path, **_ports(), progress=False)
    assert not (WorkDir(tmp_path).model / "server.json").exists() and _processes_of(tmp_path) == []


def test_mar_with_unloadable_model_fails_fast_and_leaves_no_server(server, tmp_path):
    "An intact zip whose model file is garbage gets past the checks: TorchServe starts, the worker fails to load it."
    _corrupt(WorkDir(server["wd"]).model / "model_store" / "yelp.mar", WorkDir(tmp_path).model / "model_store" / "yelp.mar",
             "garbage model file")
    t = time.monotonic()
    with pytest.raises(YelpTsError, match=r"did not come up: the model (did not load|'s worker keeps dying)") as e:
        serving.serve(tmp_path, **_ports(), timeout=120, progress=False)   # it reads the failure; a timeout says otherwise
    report("unloadable model: serve fails after (s)", round(time.monotonic() - t, 1))
    assert isinstance(e.value, RuntimeError) and "Log tail" in str(e.value)
    assert serving.status(tmp_path)["running"] is False and _processes_of(tmp_path) == []


def _cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(YELP_TS), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_stop_and_predict_without_a_server(tmp_path):
    r = _cli("stop", "--workdir", tmp_path)
    assert r.returncode == 0 and "no yelp-ts server is running" in r.stdout, r
    r = _cli("predict", "--workdir", tmp_path, "Great tacos!")
    assert r.returncode == 2, r
    assert "yelp-ts serve" in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr


def test_cli_serve_and_archive_without_trained_model(tmp_path):
    r = _cli("serve", "--workdir", tmp_path, *sum(([f"--{k.replace('_', '-')}", v] for k, v in _ports().items()), []))
    assert r.returncode == 2 and "yelp-ts train" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "torch_model").mkdir()
    (tmp_path / "torch_model" / "config.json").write_text("{}")
    r = _cli("archive", "--workdir", tmp_path)
    assert r.returncode == 2 and "yelp-ts train" in r.stderr and "model.safetensors" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "torch_model" / "model_store" / "yelp.mar").exists()


# ---------------------------------------------------------------- security
def _listening(pid):
    conns = []
    for p in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        try: conns += [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error: pass
    return conns


def test_every_listening_socket_is_loopback_metrics_included(server):
    wd, info = server["wd"], server["info"]
    conf = dict(line.split("=", 1) for line in (WorkDir(wd).model / "config.properties").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert conf["metrics_address"] == f"http://127.0.0.1:{info['ports']['metrics']}"
    conns = _listening(info["pid"])
    ports = {c.laddr.port for c in conns}
    assert {info["ports"][api] for api in ("inference", "management", "metrics")} <= ports
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in conns), conns
    assert requests.get(info["urls"]["metrics"], timeout=30).status_code == 200     # read-only, on loopback
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family.name == "AF_INET" and not a.address.startswith("127.")]
    for ip in others:                                                               # not reachable from outside
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{ip}:{info['ports']['metrics']}/metrics", timeout=5)


def test_every_api_route_refuses_missing_or_wrong_key(server):
    wd, info = server["wd"], server["info"]
    inf, mgmt = f"http://127.0.0.1:{info['ports']['inference']}", f"http://127.0.0.1:{info['ports']['management']}"
    routes = [("GET", f"{inf}/ping"), ("POST", f"{inf}/predictions/yelp"), ("GET", f"{mgmt}/models"),
              ("GET", f"{mgmt}/models/yelp"), ("PUT", f"{mgmt}/models/yelp?min_worker=3&max_worker=3"),
              ("DELETE", f"{mgmt}/models/yelp")]
    wrong = {"inference": _key(wd, "management"), "management": _key(wd, "inference")}
    for method, url in routes:
        api = "inference" if url.startswith(inf) else "management"
        for key in (None, "wrong-key", wrong[api]):          # the other API's key is a wrong key too
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = requests.request(method, url, data=b"Great food", headers={**headers, "Content-Type": "text/plain"},
                                 timeout=30)
            assert r.status_code == 400 and "InvalidKey" in r.text, (method, url, key and "key", r.status_code, r.text)
    described = Client.from_workdir(wd).describe()[0]         # nothing changed: still registered, still 2 workers
    assert described["minWorkers"] == 2 and len(described["workers"]) == 2


def test_model_registration_refused_even_with_management_key(server):
    wd, info = server["wd"], server["info"]
    store = WorkDir(wd).model.resolve() / "model_store"
    for url in ("yelp.mar", f"file://{store}/yelp.mar", f"http://127.0.0.1:{info['ports']['inference']}/x.mar"):
        r = requests.post(f"http://127.0.0.1:{info['ports']['management']}/models",
                          params={"url": url, "model_name": "intruder"}, headers={"Authorization": f"Bearer {_key(wd, 'management')}"}, timeout=30)
        assert r.status_code == 405, (url, r.status_code, r.text)
    models = Client.from_workdir(wd)._request("management", "GET", "/models").json()["models"]
    assert [m["modelName"] for m in models] == ["yelp"]


def test_server_logs_never_contain_request_text(server):
    "Reviews are user data: the handler logs sizes and timings, never the text (checked in the real server logs)."
    wd, url = server["wd"], _url(server)
    marker = f"Quokka{random.randrange(10**9)}Marmalade"
    key, logs = _key(wd), WorkDir(wd).model / "logs"
    requests_before, batches_before = _access_lines(logs), _batched_requests(logs)
    assert _post(url, f"The {marker} was great.".encode(), key).status_code == 200
    assert _post(url, json.dumps({"text": f"{marker} again"}), key, "application/json").status_code == 200
    assert _post(url, f'{{"text": "{marker}'.encode(), key, "application/json").status_code == 400    # bad JSON
    assert _post(url, json.dumps({"review": marker}), key, "application/json").status_code == 400
    Client.from_workdir(wd).predict([f"{marker} three", f"{marker} four"])
    _wait_for(lambda: _access_lines(logs) >= requests_before + 6 and _batched_requests(logs) >= batches_before + 6,
              "the 6 requests in the access log and the handler's batch lines")
    text = {f.name: f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file()}
    assert "Batch of" in text["model_log.log"]                             # sizes and timings are logged
    assert [name for name, t in text.items() if marker in t] == []


def _wait_for(condition, what, timeout=60):
    "Poll `condition` until it holds; fail the test naming `what` after `timeout` s."
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline: raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(0.1)


def _access_lines(logs):
    "Requests TorchServe's frontend has logged so far."
    f = logs / "access_log.log"
    return len(f.read_text(errors="replace").splitlines()) if f.exists() else 0


def _batched_requests(logs):
    "Requests the handler has logged so far (its `Batch of N` lines)."
    f = logs / "model_log.log"
    return sum(map(int, re.findall(r"Batch of (\d+)", f.read_text(errors="replace")))) if f.exists() else 0


# ---------------------------------------------------------------- bad input in one concurrent burst, 1 MB review
BAD_KINDS = {name: (body, ctype, says) for name, (ctype, body, says) in BAD_REQUESTS.items()}   # body, type, message


def test_500_mixed_good_and_bad_requests_in_one_burst(server, reference):
    wd, url = server["wd"], _url(server)
    good = reviews(250, seed=500, prefix="Burst")
    kinds = list(BAD_KINDS)
    bodies = [("good", t.encode(), "text/plain; charset=utf-8", t) for t in good]
    bodies += [(kinds[i % len(kinds)], *BAD_KINDS[kinds[i % len(kinds)]][:2], None) for i in range(250)]
    random.Random(5).shuffle(bodies)
    refs = dict(zip(good, reference(good)))
    workers_before = {p.pid for p in _workers(server["info"]["pid"])}
    key, barrier, lock, answers = _key(wd), threading.Barrier(32), threading.Lock(), []
    queue = iter(bodies)
    def client():
        session = requests.Session()
        barrier.wait()
        while True:
            with lock: item = next(queue, None)
            if item is None: return
            r = _post(url, item[1], key, item[2], session=session)
            with lock: answers.append((item, r.status_code, r.text))
    t = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(32)]
    for th in threads: th.start()
    for th in threads: th.join(180)
    took = time.monotonic() - t
    assert len(answers) == 500
    wrong = []
    for (kind, body, ctype, text), status, raw in answers:
        if kind == "good":
            why = "" if status == 200 else f"status {status}: {raw[:200]}"
            why = why or _mismatch(json.loads(raw), refs[text])
        else:
            try: message = json.loads(raw).get("error", "")
            except ValueError: message = ""
            why = "" if status == 400 and re.search(BAD_KINDS[kind][2], message) else f"status {status}: {raw[:200]}"
        if why: wrong.append((kind, why))
    report("burst: 500 mixed requests (250 bad), 32 clients", f"{took:.1f} s, {len(wrong)} wrong answers")
    assert wrong == []
    assert {p.pid for p in _workers(server["info"]["pid"])} == workers_before      # no worker died
    assert _mismatch(Client.from_workdir(wd).predict(good[0])[0], refs[good[0]]) == ""


def test_1mb_review(server, reference):
    "A 1 MB review is cut to max_length before tokenizing: answered, and right (test_serving checks 200/413)."
    url, key = _url(server), _key(server["wd"])
    texts = [(f"Review {i}: " + "The brisket was smoky, the sides were cold and the staff were kind. " * 16_000)[:1_000_000]
             for i in range(3)]
    times = []
    for text in texts:
        t = time.monotonic()
        r = _post(url, text.encode(), key)
        times.append(time.monotonic() - t)
        assert r.status_code == 200, r.text
        assert _mismatch(r.json(), reference([text])[0]) == ""
    report("1 MB review: seconds per request (3 tries)", [round(x, 3) for x in times])


# ---------------------------------------------------------------- load, worker kill (slow)
@pytest.mark.slow
def test_load_2000_requests_16_clients_every_answer_its_own(server, reference):
    wd, pid = server["wd"], server["info"]["pid"]
    texts = reviews(2000, seed=2000, prefix="Load")
    assert len(set(texts)) == 2000
    refs = reference(texts)
    distinct = _distinguishable(refs)
    report("load: texts distinguishable by their probabilities", f"{distinct:.1%}")
    assert distinct > 0.95                        # so a swapped answer would show up as a mismatch
    rss_ready = _rss_mb(pid)
    Load(_url(server), _key(wd), iter(reviews(64, seed=1, prefix="Warm-up")), 16).start().join(120)
    rss_start = _rss_mb(pid)
    t = time.monotonic()
    results = Load(_url(server), _key(wd), iter(texts), 16).start().join(600)
    took = time.monotonic() - t
    rss_end = _rss_mb(pid)
    errors, mismatches = _check_results(results, reference)
    report("load: requests / errors / mismatches", f"{len(results)} / {len(errors)} / {len(mismatches)}")
    report("load: seconds, requests per second", f"{took:.1f} s, {len(results) / took:.0f} req/s")
    report("load: worker RSS MB (ready / start / end)", f"{rss_ready} / {rss_start} / {rss_end}")
    assert len(results) == 2000 and {r[0] for r in results} == set(texts)
    assert errors == [] and mismatches == []
    assert set(rss_end) == set(rss_start), "a worker was replaced during the load"
    assert sum(rss_end.values()) < 1.3 * sum(rss_start.values())


def _log_time(line):
    return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()


def _first_answer_of(wd, port, pid, since):
    "Time of the first batch answered by the worker process `pid` on worker port `port`, from model_log.log."
    log = WorkDir(wd).model / "logs" / "model_log.log"
    lines = log.read_text(errors="replace").splitlines()
    start = next((i for i, l in enumerate(lines) if f"W-{port}-" in l and f"MODEL_LOG - [PID]{pid}" in l), None)
    if start is None: return None
    return next((_log_time(l) for l in lines[start:] if f"W-{port}-" in l and "MODEL_LOG - Batch of" in l
                 and _log_time(l) >= since), None)


def _kill_one_worker(state):
    "SIGKILL one model worker; return (pid, worker port, wall time of the kill)."
    victim = _workers(state["info"]["pid"])[0]
    port = re.search(r"\.ts\.sock\.(\d+)", " ".join(victim.cmdline())).group(1)
    t = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid, port, t


def _replacement(wd, port, old_pid, timeout=60):
    "Wait until worker `port` is READY with a new pid; return that pid."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for w in Client.from_workdir(wd).describe()[0]["workers"]:
                if w["id"] == port and w["status"] == "READY" and w["pid"] not in (old_pid, -1): return w["pid"]
        except (YelpTsError, KeyError): pass
        time.sleep(0.2)
    raise AssertionError(f"worker {port} was not replaced within {timeout} s")


@pytest.mark.slow
def test_worker_killed_during_load_recovers_and_predict_answers_every_text(own_server, reference):
    server = own_server
    wd, url = server["wd"], _url(server)
    started = time.monotonic()
    # 1. a raw load (one key, no retries) from 4 clients; kill a worker once 20 answers are in; keep the load on
    #    until the replacement worker has answered a batch and 8 more answers have come back
    pool = reviews(50, seed=7)
    load = Load(url, _key(wd), (f"Kill {i}: {pool[i % 50]}" for i in count()), 4).start()
    _wait_for(lambda: len(load.results) >= 20, "20 answers before the kill")
    old_pid, port, killed = _kill_one_worker(server)
    new_pid = _replacement(wd, port, old_pid)
    found = {}
    def replacement_answered():
        found["first"] = _first_answer_of(wd, port, new_pid, killed)
        return found["first"] is not None
    _wait_for(replacement_answered, "the replacement worker's first answer")
    first, answered = found["first"], len(load.results)
    _wait_for(lambda: len(load.results) >= answered + 8, "8 more answers after the replacement's first")
    load.stop.set()
    results = load.join(60)
    recovery = first - killed
    errors, mismatches = _check_results(results, reference)
    statuses = sorted({str(s) for _, _, _, s, _ in results if s != 200})
    ok_times = sorted(r[2] for r in results if r[3] == 200)
    gap = max((b - a for a, b in zip(ok_times, ok_times[1:]) if b > killed), default=0)
    report("worker kill: raw requests / failed (statuses) / mismatches",
           f"{len(results)} / {len(errors)} ({', '.join(statuses) or '-'}) / {len(mismatches)}")
    report("worker kill: recovery s (kill -> first batch answered by the new worker pid)", round(recovery, 2))
    report("worker kill: longest gap between 200s after the kill (s)", round(gap, 2))
    assert mismatches == []
    assert len(errors) <= 8                          # at most the killed worker's batch (4 clients, batch size 8)

    # 2. Client.predict (bounded retries with backoff) during a second kill: an answer for every text
    texts = reviews(160, seed=160, prefix="Retry")
    out, logs = {}, WorkDir(wd).model / "logs"
    sent_before = _access_lines(logs)
    thread = threading.Thread(target=lambda: out.update(answers=Client.from_workdir(wd).predict(texts)), daemon=True)
    thread.start()
    _wait_for(lambda: _access_lines(logs) >= sent_before + 16, "16 of the client's requests answered")
    _kill_one_worker(server)
    thread.join(120)
    assert "answers" in out, "Client.predict did not return (or raised) during the second kill"
    wrong = [why for a, ref in zip(out["answers"], reference(texts)) if (why := _mismatch(a, ref))]
    report("worker kill 2: Client.predict texts / answered / wrong", f"{len(texts)} / {len(out['answers'])} / {len(wrong)}")
    assert len(out["answers"]) == len(texts) and wrong == []
    _wait_for(lambda: [w["status"] for w in Client.from_workdir(wd).describe()[0]["workers"]] == ["READY", "READY"],
              "both workers READY again (for the next test)")
    report("worker kill: whole test (s)", round(time.monotonic() - started, 1))


# ---------------------------------------------------------------- restart, and the keys after all that traffic
@pytest.fixture
def own_server(server, tmp_path):
    "A server of its own (the module server's archive: 2 workers), for a test that kills or restarts it; its state dict."
    wd = tmp_path / "own"
    WorkDir(wd).model_store.mkdir(parents=True)
    os.symlink(WorkDir(server["wd"]).mar(), WorkDir(wd).mar())
    state = {"wd": wd, "keys": set()}
    try:
        state["info"] = serving.serve(wd, **_ports(), timeout=240, progress=False)
        yield state
    finally:
        serving.stop(wd)
    assert _processes_of(wd) == [], "TorchServe processes left behind"


def test_restart_same_model_fresh_key_client_follows(own_server, reference):
    "Stop and serve again in the same work directory on the same ports: a new key, the same answers."
    server = own_server
    wd, info = server["wd"], server["info"]
    texts = reviews(8, seed=8, prefix="Restart")
    client = Client.from_workdir(wd)
    before = client.predict(texts)
    old_key = _key(wd)
    assert serving.stop(wd) is True and _processes_of(wd) == []
    server["info"] = info2 = serving.serve(wd, **{f"{k}_port": info["ports"][k] for k in ("inference", "management",
                                                                                          "metrics")},
                                           timeout=240, progress=False)
    server["keys"] |= _all_keys(wd)
    assert info2["pid"] != info["pid"] and _key(wd) != old_key
    assert _post(_url(server), texts[0].encode(), old_key).status_code == 400       # the old key is dead
    after = client.predict(texts)                                     # the client built before re-reads the key
    for a, b, ref in zip(before, after, reference(texts)):
        assert _mismatch(b, _probs(a)) == "" and _mismatch(b, ref) == ""            # the same model answers


def test_key_file_private_and_no_key_in_any_log(server):
    "After a key renewal and traffic with old and new keys: key file 0600, and none of the keys issued in logs/."
    wd = server["wd"]
    d = WorkDir(wd).model
    old = _key(wd)
    r = requests.get(f"http://127.0.0.1:{server['info']['ports']['management']}/token", params={"type": "inference"},
                     headers={"Authorization": f"Bearer {_key(wd, 'API')}"}, timeout=30)
    assert r.status_code == 200, r.text
    new = _key(wd)
    assert new != old
    server["keys"] |= _all_keys(wd) | {old}
    assert _post(_url(server), b"Old key, refused.", old).status_code == 400
    assert _post(_url(server), b"New key, answered.", new).status_code == 200
    assert (d / "key_file.json").stat().st_mode & 0o777 == 0o600
    files = [f for f in (d / "logs").rglob("*") if f.is_file()] + [d / "server.json", d / "config.properties"]
    leaks = [(f.name, k) for f in files for k in server["keys"] if k in f.read_text(errors="replace")]
    assert leaks == []
