"""A stand-in for TorchServe's HTTP APIs, for the fast tier: the same key rules (a wrong or expired key answers 400
InvalidKeyException; GET /token?type=... with the API key issues a new key, invalidating the old one, and rewrites
key_file.json), the same server.json and key_file.json in a work directory, and answers shaped like the handler's.
The real TorchServe is tested against the same client in the full tier; this one starts in milliseconds and can make
a key expire at once, which the real one cannot do in under a minute."""
import json
import secrets
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from yelp_ts.core import KEY_FILE, LABEL_NAMES, SERVER_FILE, WorkDir


def _stamp(minutes):
    return (datetime.now(timezone.utc) + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


class StubTorchServe:
    "Inference and management APIs on two loopback ports, for the server of work directory `workdir`."

    def __init__(self, workdir, model_name="yelp"):
        self.w, self.model_name, self.lock = WorkDir(workdir), model_name, threading.Lock()
        self.keys = {"inference": secrets.token_hex(8), "management": secrets.token_hex(8), "API": secrets.token_hex(8)}
        self.expires = {"inference": _stamp(60), "management": _stamp(60)}
        self.renewals, self.requests = [], []
        self.inference = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("inference"))
        self.management = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("management"))

    def __enter__(self):
        for server in (self.inference, self.management):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.w.model.mkdir(parents=True, exist_ok=True)
        ports = {"inference": self.inference.server_port, "management": self.management.server_port, "metrics": 0}
        self.w.file(SERVER_FILE).write_text(json.dumps({"pid": 0, "model_name": self.model_name, "ports": ports}))
        self.write_keys()
        return self

    def __exit__(self, *exc):
        for server in (self.inference, self.management): server.shutdown(); server.server_close()

    def write_keys(self):
        entries = {api: {"key": self.keys[api], **({"expiration time": self.expires[api]} if api in self.expires else {})}
                   for api in self.keys}
        self.w.file(KEY_FILE).write_text(json.dumps(entries))

    def expire(self, api="inference"):
        "Let `api`'s key run out now (the server refuses it; the key file says it expired)."
        with self.lock: self.expires[api] = _stamp(-1); self.write_keys()

    def _handler(self, api):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)

            def _key_ok(self, kind):
                with stub.lock:
                    fresh = kind not in stub.expires or stub.expires[kind] > _stamp(0)
                    return self.headers.get("Authorization") == f"Bearer {stub.keys[kind]}" and fresh

            def do_GET(self):
                url = urlsplit(self.path)
                if api == "management" and url.path == "/token":
                    if not self._key_ok("API"): return self._send(400, {"type": "InvalidKeyException"})
                    kind = parse_qs(url.query)["type"][0]
                    with stub.lock:
                        stub.keys[kind], stub.expires[kind] = secrets.token_hex(8), _stamp(60)
                        stub.renewals.append(kind); stub.write_keys()
                    return self._send(200, {"message": f"{kind} key renewed"})
                if not self._key_ok(api): return self._send(400, {"type": "InvalidKeyException"})
                if url.path == "/ping": return self._send(200, {"status": "Healthy"})
                return self._send(200, [{"modelName": stub.model_name, "workers": [{"status": "READY"}]}])

            def do_POST(self):
                text = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                if not self._key_ok("inference"): return self._send(400, {"type": "InvalidKeyException"})
                if self.headers.get("Content-Type", "").startswith("application/json"): text = json.loads(text)["text"]
                with stub.lock: stub.requests.append(text)
                stars = len(text) % 5 + 1                             # each text its own, checkable answer
                answer = {"label": LABEL_NAMES[stars - 1], "stars": stars,
                          "probabilities": {n: float(i == stars - 1) for i, n in enumerate(LABEL_NAMES)}}
                if self.path.startswith("/explanations/"):
                    words, at = [], 0
                    for word in text.split():
                        start = text.index(word, at); at = start + len(word)
                        words.append({"word": word, "start": start, "end": at, "attribution": (-1) ** len(words) / (1 + len(words))})
                    answer = {**{k: answer[k] for k in ("label", "stars")}, "target": stars, "score": 0.9,
                              "baseline_score": 0.2, "delta": 0.0, "words": words}
                return self._send(200, answer)

            def log_message(self, *args): pass

        return Handler
