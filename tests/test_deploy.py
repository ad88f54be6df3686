"""`yelp-ts deploy k8s`: manifests valid against the Kubernetes schemas, and the pod they describe — TorchServe's
exact command and config.properties, nginx's gate from its template — started here on loopback, answering only
with the cluster's key, and passing its own readiness and liveness probes."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from string import Template

import pytest
import requests
import yaml

from conftest import free_port, link_model
from yelp_ts import archive, deploy
from yelp_ts.core import MODEL_NAME, WorkDir
from yelp_ts.serving import free_ports

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
YELP_TS = str(Path(sys.executable).parent / "yelp-ts")


@pytest.fixture(scope="module")
def manifests(trained_workdir, tmp_path_factory):
    wd = link_model(trained_workdir, tmp_path_factory.mktemp("deploy") / "wd")
    archive.build_archive(wd, precision="fp32", runtime="torch")
    out = wd / "k8s"
    r = subprocess.run([YELP_TS, "deploy", "k8s", "--workdir", str(wd), "--replicas", "3", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "valid for Kubernetes" in r.stdout
    docs = list(yaml.safe_load_all((out / "kubernetes.yaml").read_text()))
    secret = next(yaml.safe_load_all((out / "secret.yaml").read_text()))
    return wd, docs, secret


def test_manifests_are_valid_and_complete(manifests):
    wd, docs, secret = manifests
    assert deploy.validate(docs + [secret]) == ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                                                "HorizontalPodAutoscaler", "NetworkPolicy", "Secret"]
    kinds = {d["kind"]: d for d in docs}
    assert kinds["Deployment"]["spec"]["replicas"] == 3 and kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 3
    torchserve = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    packed = archive.mar_model_config(WorkDir(wd).mar())
    assert torchserve["resources"]["requests"]["cpu"] == str(packed["minWorkers"] * packed["handler"]["torch_threads"])
    assert [p["targetPort"] for p in kinds["Service"]["spec"]["ports"]] == ["http"]      # management, metrics: off it
    ingress = kinds["NetworkPolicy"]["spec"]["ingress"][0]
    assert ingress["from"][0]["podSelector"]["matchLabels"] == {"yelp-ts-client": "true"}
    assert len(secret["stringData"]["key"]) >= 24
    kserve = list(yaml.safe_load_all((wd / "k8s" / "kserve.yaml").read_text()))[0]
    assert kserve["kind"] == "InferenceService" and kserve["spec"]["predictor"]["model"]["runtime"] == "kserve-torchserve"


@pytest.mark.skipif(not NGINX, reason="nginx is not installed (.ci/run installs it)")
def test_the_pod_command_serves_behind_its_gate(manifests, tmp_path):
    "TorchServe started with the Deployment's command and config (paths and ports moved here), nginx from the template."
    wd, docs, secret = manifests
    pod, key = deploy.pod_command(docs), secret["stringData"]["key"]
    ports = free_ports(3)
    taken = list(ports.values())                     # none is bound before TorchServe starts: each must differ
    for _ in range(3): taken.append(free_port(taken))
    grpc_inference, grpc_management, gate_port = taken[3:]
    config_dir, store = tmp_path / "config", tmp_path / "model-store"
    config_dir.mkdir(); store.mkdir()
    shutil.copy(WorkDir(wd).mar(), store / f"{MODEL_NAME}.mar")
    config = pod["config"]
    for old, new in [(deploy.POD_MODEL_STORE, str(store)), (":8085", f":{ports['inference_port']}"),
                     (":8081", f":{ports['management_port']}"), (":8082", f":{ports['metrics_port']}"),
                     ("=7070", f"={grpc_inference}"), ("=7071", f"={grpc_management}")]:
        config = config.replace(old, new)
    (config_dir / "config.properties").write_text(config)
    command = [str(store) if a == deploy.POD_MODEL_STORE else a.replace(deploy.POD_CONFIG_DIR, str(config_dir)) for a in pod["command"]]
    command[0] = str(Path(sys.executable).parent / "torchserve")
    env = {**os.environ, "TMPDIR": str(tmp_path), "TEMP": str(tmp_path), "LOG_LOCATION": str(tmp_path / "logs"),
           "METRICS_LOCATION": str(tmp_path / "logs")}
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    gate = {"YELP_TS_KEY": key, "GATE_LISTEN": f"127.0.0.1:{gate_port}", "GATE_PORT": str(gate_port),
            "INFERENCE_PORT": str(ports["inference_port"])}
    site = Template(pod["gate_template"]).safe_substitute(gate)        # what the nginx image's envsubst does
    for d in ("client", "proxy", "fastcgi", "uwsgi", "scgi"): (tmp_path / d).mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/nginx.log; events {{}}\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}/client; proxy_temp_path {tmp_path}/proxy; "
        f"fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;\n{site}}}\n")
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{gate_port}/predictions/{MODEL_NAME}"
    try:
        deadline, answer = time.monotonic() + 180, None
        while answer is None:
            assert server.poll() is None and nginx.poll() is None, "TorchServe or nginx exited"
            assert time.monotonic() < deadline, "the pod did not answer within 180 s"
            try:
                r = requests.post(url, data=b"Good food.", headers={"Authorization": f"Bearer {key}",
                                                                      "Content-Type": "text/plain"}, timeout=10)
                if r.status_code == 200: answer = r.json()
            except requests.RequestException: pass
            time.sleep(0.5)
        assert answer["label"].endswith(("star", "stars"))
        assert requests.post(url, data=b"Good food.", timeout=10).status_code == 401                   # no key
        assert requests.post(url, data=b"Good food.", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        for probe in ("readiness", "liveness"):                            # the probes' own commands, in the gate's env
            r = subprocess.run(pod[probe], env={**os.environ, **gate}, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, (probe, r.stdout, r.stderr)
        assert requests.get(f"http://127.0.0.1:{ports['management_port']}/models", timeout=10).status_code == 200  # loopback only
    finally:
        for proc in (nginx, server):
            try: os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError: pass
            try: proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.notebook
def test_deploy_notebook_runs(manifests, tmp_path):
    from conftest import run_notebook
    run_notebook("beyond_7_deploy", tmp_path / "executed", workdir=str(manifests[0]))
