"""The reader's JupyterLab, in a real browser: `make lab` on a copy of the repository, driven by Playwright with
Debian's Chromium. Opening and saving every notebook leaves `git status` clean; Run All in 05_serving leaves no error
and no stderr box, and the live demo answers with a chart. Screenshots of failures go to test-artifacts/."""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port
from yelp_ts import serving

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="Debian's chromium is not installed (.ci/run installs it)")
ARTIFACTS = REPO / "test-artifacts"
VENV = Path(sys.executable).parent.parent


def _git(root, *args):
    return subprocess.run(["git", "-c", "user.name=reader", "-c", "user.email=reader@example.com", *args], cwd=root,
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def reader_repo(trained_workdir, tmp_path_factory):
    "The repository as a reader has it (its files, committed in a git repository of its own), with a trained model."
    root = tmp_path_factory.mktemp("reader") / "yelp_ts"
    for name in _git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").split("\n"):
        if name and (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    _git(root, "init", "-q"); _git(root, "add", "-A"); _git(root, "commit", "-q", "-m", "as cloned")
    for f in (trained_workdir / "torch_model").iterdir():       # the trained model, where the notebooks look (..)
        if f.is_file() and f.name not in ("model-config.yaml", ".gitignore"): (root / "torch_model" / f.name).symlink_to(f)
    shutil.copytree(trained_workdir / "data", root / "data")
    assert _git(root, "status", "--porcelain", "--", "nbs") == ""
    return root


@pytest.fixture(scope="module")
def lab(reader_repo):
    "JupyterLab started as the README says (`make lab`), on a free port with a token; stopped with its kernels."
    port, token = free_port(), secrets.token_hex(12)
    log = open(reader_repo / "lab.log", "wb")
    # the test's own JupyterLab settings, not the reader's: every cell in the page (none is missed), the notebook's
    # kernel started without a Select Kernel dialog (answering one swaps the kernel under a queued Run All), no news
    settings = reader_repo.parent / "lab-settings"
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
                           "apputils-extension/notification": {"fetchNews": "false"}}.items():
        (settings / "@jupyterlab" / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    proc = subprocess.Popen(["make", "-o", str(VENV / ".installed"), "lab", f"VENV={VENV}",
                             f"LAB_ARGS=--no-browser --port={port} --IdentityProvider.token={token}"],
                            cwd=reader_repo, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (reader_repo / "lab.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/api/status", params={"token": token}, timeout=2).ok: break
            except requests.RequestException: pass
            assert time.monotonic() < deadline, "JupyterLab did not start within 120 s"
            time.sleep(0.5)
        yield url, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)                     # JupyterLab and the kernels it started
        try: proc.wait(30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)
        serving.stop(reader_repo)                               # TorchServe runs in a session of its own


@pytest.fixture
def page(lab, request):
    "A Chromium page on the lab; a screenshot of it is kept in test-artifacts/ when the test fails."
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        report = getattr(request.node, "rep_call", None)              # set by conftest.pytest_runtest_makereport
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        browser.close()


def _kernel(lab, name):
    "The kernel of the notebook `name`'s session, as Jupyter's REST API tells it (id, execution_state, connections), or None."
    url, token = lab
    sessions = requests.get(f"{url}/api/sessions", params={"token": token}, timeout=10).json()
    return next((s["kernel"] for s in sessions if s.get("path") == name and s.get("kernel")), None)


def _open(page, lab, name):
    """Open `name` alone and wait until its kernel is idle with the page connected to it: the toolbar says idle and the
    server counts the page's websocket (a Run All sent before that is lost: its first cell stays queued forever)."""
    url, token = lab
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")            # `make lab` serves nbs/; ?reset: only this one open
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    deadline = time.monotonic() + 120
    while True:
        _answer_dialogs(page)
        kernel = _kernel(lab, name)
        shown = page.evaluate("document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status')")
        if shown == "idle" and kernel and kernel["execution_state"] == "idle" and kernel.get("connections", 0) > 0:
            return kernel
        assert time.monotonic() < deadline, f"{name}: no idle, connected kernel in 120 s (toolbar {shown!r}, " \
                                            f"server {kernel}, dialogs {DIALOGS})"
        page.wait_for_timeout(500)


DIALOGS = []                                                           # what JupyterLab asked, for failure messages


def _answer_dialogs(page):
    """Accept any dialog JupyterLab put up (on a busy machine, "Select Kernel" can come when the kernel specs load
    after the notebook opened; it covers the page, so no click reaches the notebook), and remember its text."""
    dialogs = page.locator(".jp-Dialog")
    for i in range(dialogs.count()):
        if dialogs.nth(i).is_visible():
            DIALOGS.append(dialogs.nth(i).inner_text()[:300])
            dialogs.nth(i).locator(".jp-Dialog-button.jp-mod-accept").first.click(timeout=10_000)


def _menu(page, top, item):
    "Click `top` → `item` in JupyterLab's menu bar once the item is enabled (greyed out until the notebook is current)."
    label = re.compile(f"^{re.escape(item)}$")
    deadline = time.monotonic() + 60
    while True:
        _answer_dialogs(page)
        page.locator(".lm-MenuBar-itemLabel", has_text=top).first.click()
        enabled = page.locator(".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel").filter(has_text=label)
        try: return enabled.first.click(timeout=2_000)
        except playwright.TimeoutError: page.keyboard.press("Escape")
        assert time.monotonic() < deadline, f"{top} → {item} stayed disabled for 60 s (dialogs: {DIALOGS})"
        _answer_dialogs(page)
        page.locator(".jp-Notebook").first.click()                      # make the notebook the current widget


def test_opening_and_saving_every_notebook_leaves_git_status_clean(lab, page, reader_repo):
    names = sorted(p.name for p in (reader_repo / "nbs").glob("*.ipynb"))
    for name in names:
        _open(page, lab, name)                                   # its kernel starts and rewrites the metadata
        _menu(page, "File", "Save Notebook")
        page.wait_for_function("!document.querySelector('.jp-Document.jp-mod-current.jp-mod-dirty, "
                               ".lm-TabBar-tab.jp-mod-current.jp-mod-dirty')", timeout=30_000)
    assert _git(reader_repo, "status", "--porcelain", "--", "nbs") == "", _git(reader_repo, "diff")[:3000]
    log = (reader_repo / "lab.log").read_text()
    assert all(f"Saving file at /{name}" in log for name in names), "a notebook was not saved"


STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"   # a traceback or a warning
RAN = re.compile(r"\[\d+\]:?")                                       # the prompt of a cell that has run: '[12]:'
# Each code cell's prompt ('[ ]:' not run, '[*]:' queued or running, '[12]:' done), whether a cell wrote to stderr,
# and the kernel's state as the toolbar shows it ('idle', 'busy', 'restarting', 'dead', ...)
STATE = f"""() => ({{prompts: [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim()),
              failed: document.querySelector("{STDERR}") !== null,
              kernel: document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') ?? null,
              sources: [...document.querySelectorAll('.jp-CodeCell')].map(c => (c.querySelector('.cm-line')?.textContent ?? '').slice(0, 80))}})"""


def _run_all_report(reader_repo, state, why):
    "What to say when Run All did not finish: the cells not done, the kernel, the dialogs and the tail of each log."
    pending = [f"cell {i} {p} {src!r}" for i, (p, src) in enumerate(zip(state["prompts"], state["sources"]))
               if not RAN.fullmatch(p)]
    logs = [f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:])
            for f in [reader_repo / "lab.log", *sorted((reader_repo / "torch_model" / "logs").glob("*_log.log"))] if f.exists()]
    return (f"{why}: kernel {state['kernel']!r} in the toolbar, {state.get('server')!r} on the server; "
            f"{len(pending)} of {len(state['prompts'])} cells not done: {pending[:6]}; dialogs: {DIALOGS}\n" + "\n".join(logs))


def _start_run_all(page, lab, name):
    """Run → Run All Cells, until a cell is queued or has run (in a lab just started, the first click can start nothing;
    the last try is on the notebook opened again)."""
    started = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))"
    for attempt in range(3):
        if attempt == 2: _open(page, lab, name)
        _menu(page, "Run", "Run All Cells")
        try: return page.wait_for_function(started, timeout=30_000, polling=500)
        except playwright.TimeoutError:
            _answer_dialogs(page); page.locator(".jp-Notebook").first.click()
    raise AssertionError(f"Run → Run All Cells started no cell, three times (dialogs: {DIALOGS})")


def _run_all(page, lab, reader_repo, name, timeout=600, lost_after=30):
    """Run → Run All Cells and wait until every cell has run, or one wrote an error (Run All stops there). A Run All
    JupyterLab lost (cells left queued, '[*]', while the server says the kernel sits idle: a lab just started can swap
    the notebook's kernel under it) is run once more, on the kernel restarted and the page opened again."""
    _start_run_all(page, lab, name)
    deadline, idle_since, restarted = time.monotonic() + timeout, None, False
    while True:
        _answer_dialogs(page)
        state = page.evaluate(STATE)
        if state["failed"] or (state["prompts"] and all(RAN.fullmatch(p) for p in state["prompts"])):
            return state
        if state["kernel"] == "dead" or any("died" in d for d in DIALOGS):
            raise AssertionError(_run_all_report(reader_repo, state, "the kernel died during Run All"))
        kernel = _kernel(lab, name) or {}                # the server's view: is the kernel executing anything?
        state["server"] = kernel.get("execution_state")
        queued = any(p.startswith("[*]") for p in state["prompts"])
        idle_since = (idle_since or time.monotonic()) if queued and state["server"] == "idle" else None
        if idle_since and time.monotonic() - idle_since > lost_after:
            if restarted:
                raise AssertionError(_run_all_report(reader_repo, state, "Run All was lost twice"))
            queued_n = sum(p.startswith("[*]") for p in state["prompts"])
            DIALOGS.append(f"(the test) {queued_n} cells queued with the kernel idle for {lost_after} s: run again")
            serving.stop(reader_repo)                        # a server the first run may have started
            url, token = lab
            if kernel: requests.post(f"{url}/api/kernels/{kernel['id']}/restart", params={"token": token}, timeout=60)
            _open(page, lab, name)                           # a fresh page on the restarted kernel
            _start_run_all(page, lab, name)
            restarted, idle_since = True, None
        assert time.monotonic() < deadline, _run_all_report(reader_repo, state, f"Run All did not finish in {timeout} s")
        page.wait_for_timeout(1_000)


def test_run_all_in_05_serving_then_the_demo_answers(lab, page, reader_repo):
    _open(page, lab, "05_serving.ipynb")
    _run_all(page, lab, reader_repo, "05_serving.ipynb")
    assert not [d for d in DIALOGS if "died" in d or "rror" in d], f"JupyterLab said: {DIALOGS}"
    errors = page.locator(STDERR)
    texts = [errors.nth(i).inner_text()[:500] for i in range(errors.count())]
    assert texts == [], f"cells wrote errors or warnings: {texts} (dialogs: {DIALOGS})"
    box = page.locator(".widget-textarea textarea").last
    box.fill("The ramen was rich and the staff were lovely, but we waited forty minutes.")
    page.locator(".widget-button", has_text="Predict stars").last.click()
    page.locator(".widget-output img").last.wait_for(timeout=60_000)   # the chart of the server's answer
    assert serving.status(reader_repo)["running"]                # Run All leaves the server to the demo
    # the site's picture of the demo (`make docs` keeps it beside the executed notebooks): the whole widget, answered
    widget = box.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' widget-vbox ')][1]")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = widget.screenshot(path=str(ARTIFACTS / "demo.png"), animations="disabled")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and widget.bounding_box()["height"] > 150, "the demo's picture is not the answered widget"
    if os.environ.get("YELP_TS_EXECUTED"): (Path(os.environ["YELP_TS_EXECUTED"]) / "demo.png").write_bytes(shot)
