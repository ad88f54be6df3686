"""The client against a stand-in for TorchServe's APIs (the fast tier): a session per thread, an expired key renewed
once for every thread that finds it refused, and `yelp-ts explain` on a terminal without torch. The same client
against the real TorchServe is tested in test_serving.py and test_reliability.py."""
import json
import os
import pty
import select
import subprocess
import sys
import threading

import pytest
import requests

from stub_torchserve import StubTorchServe
from yelp_ts.client import Client
from yelp_ts.core import LABEL_NAMES

TEXTS = [f"Review {i}: " + "good food " * (i % 7) for i in range(24)]


def _right(text, answer):
    "The stub answers each text with stars from its length: a swapped answer shows."
    stars = len(text) % 5 + 1
    return answer["stars"] == stars and answer["label"] == LABEL_NAMES[stars - 1]


@pytest.fixture
def stub(tmp_path):
    with StubTorchServe(tmp_path) as server: yield server


def test_each_thread_sends_with_a_session_of_its_own(stub, monkeypatch):
    "`predict` sends from several threads; a requests.Session is not safe to share between them."
    used, real = [], requests.Session.request
    def record(session, *args, **kwargs):
        used.append((threading.get_ident(), id(session)))
        return real(session, *args, **kwargs)
    monkeypatch.setattr(requests.Session, "request", record)
    client = Client.from_workdir(stub.w, max_parallel=8)
    answers = client.predict(TEXTS)
    assert [_right(t, a) for t, a in zip(TEXTS, answers)] == [True] * len(TEXTS)
    threads_of = {}
    for thread, session in used: threads_of.setdefault(session, set()).add(thread)
    assert len({t for t, _ in used}) > 1, "the texts were not sent concurrently"
    assert all(len(threads) == 1 for threads in threads_of.values()), "a session was used by two threads"


def test_an_expired_key_is_renewed_once_for_every_thread_that_finds_it_refused(stub):
    client = Client.from_workdir(stub.w, max_parallel=8)
    assert _right(TEXTS[0], client.predict(TEXTS[0])[0])
    stub.expire("inference")                                   # the server refuses it; the key file says it expired
    answers = client.predict(TEXTS)                            # 8 threads find it refused at once
    assert [_right(t, a) for t, a in zip(TEXTS, answers)] == [True] * len(TEXTS)
    assert stub.renewals == ["inference"], stub.renewals       # renewed once: a second renewal would void the first
    assert client.keys["inference"] == stub.keys["inference"]


def test_a_refused_key_that_has_not_expired_is_read_again_not_renewed(stub):
    "After a restart the key file holds new keys: the client reads them instead of asking for new ones."
    client = Client.from_workdir(stub.w)
    stub.keys["inference"] = "restarted-" + stub.keys["inference"]; stub.write_keys()
    assert _right(TEXTS[1], client.predict(TEXTS[1])[0]) and stub.renewals == []


def _pty_run(code, timeout=60):
    "Run `python -c code` with stdout on a pseudo-terminal (so `isatty()` is true); (terminal output, stderr)."
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready: proc.kill(); raise AssertionError(f"no output within {timeout} s")
        try: chunk = os.read(master, 4096)
        except OSError: break                                  # the child closed the terminal
        if not chunk: break
        out += chunk
    _, err = proc.communicate(timeout=timeout)
    os.close(master)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def test_explain_on_a_terminal_marks_the_words_and_imports_no_torch(stub):
    review = "Great tacos, rude waiter, lovely patio."
    code = (f"import json, sys; from yelp_ts.cli import main; code = main(['explain', '--workdir', {str(stub.w)!r}, "
            f"{review!r}]); print(json.dumps([code, sorted(m for m in ('torch', 'transformers', 'ts', 'openvino') "
            f"if m in sys.modules)]), file=sys.stderr)")
    out, err = _pty_run(code)
    assert json.loads(err.strip().splitlines()[-1]) == [0, []], err[-2000:]      # no torch, no transformers, no ts
    first = json.loads(out.splitlines()[0])
    assert [w["word"] for w in first["words"]] == review.split()
    assert out.count("\033[1;") >= 3 and "patio." in out                          # the review, its words marked
