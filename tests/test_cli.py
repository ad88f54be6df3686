"""The `yelp-ts` console script: the pipeline from the command line, on the embedded default, small sizes."""
import argparse
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, link_model, run_notebook
from yelp_ts import archive, cli, core, data, serving, training

YELP_TS = str(Path(sys.executable).parent / "yelp-ts")


def yelp_ts(*args, timeout=900):
    return subprocess.run([YELP_TS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_notebook_runs(tmp_path):
    run_notebook("07_cli", tmp_path / "executed", workdir=str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "data" / "train.csv").exists()


def test_archive_takes_serving_settings(untrained_model_workdir, tmp_path):
    wd = link_model(untrained_model_workdir, tmp_path / "wd")
    r = yelp_ts("archive", "--workdir", wd, "--model-name", "cli", "--workers", "2", "--precision", "fp32", "--runtime",
                "torch", "--torch-threads", "1", "--serve-batch-size", "16", "--max-batch-delay", "7")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load((wd / "torch_model" / "model-config.yaml").read_text())
    assert (config["minWorkers"], config["batchSize"], config["maxBatchDelay"], config["handler"]["torch_threads"]) == (2, 16, 7, 1)
    assert (wd / "torch_model" / "model_store" / "cli.mar").exists()


def _subparser(name):
    return next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("command, func", [("data", data.make_data), ("train", training.train),
                                           ("archive", archive.write_model_config), ("serve", serving.serve),
                                           ("debug", archive.build_archive), ("debug", serving.serve),
                                           ("run", training.train), ("run", serving.serve)])
def test_options_and_their_defaults_come_from_the_function(command, func):
    "Every parameter is an option whose help shows the function's default; an option left out is not passed."
    help_text = " ".join(_subparser(command).format_help().split())
    for name, p in inspect.signature(func).parameters.items():
        if name in cli.SKIP | cli.SKIP_FOR.get(func.__name__, set()) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL): continue
        flag = "--" + cli.RENAME.get(func.__name__, {}).get(name, name).replace("_", "-")
        assert flag in help_text, (command, flag)
        shown = " ".join(next(a for a in _subparser(command)._actions if flag in a.option_strings).help.split())
        described = p.default is None and ("(default:" in shown or "(unset:" in shown)   # None: the help says what applies
        assert f"(default: {p.default})" in shown or described, (command, name, p.default, shown)
    assert cli.given(_subparser(command).parse_args([]), func) == {}


def test_shared_defaults_have_one_home():
    "The defaults every step shares are yelp_ts.core's: the signatures read them, no module repeats the values."
    sig = lambda f, p: inspect.signature(f).parameters[p].default
    assert sig(training.train, "max_length") is sig(training.tokenize, "max_length") is core.MAX_LENGTH
    assert sig(training.train, "model") == sig(training.resolve_model, "model") == core.DEFAULT_MODEL
    assert sig(data.make_data, "n_train") == core.N_TRAIN and sig(data.make_data, "seed") == core.SEED
    assert sig(serving.serve, "inference_port") == core.PORTS["inference"]
    assert sig(archive.build_archive, "model_name") == sig(serving.serve, "model_name") == core.MODEL_NAME
    literals = {"max length 128": r"length\w*\W{1,6}128\b", "8080": r"\b8080\b", '"yelp"': r'"yelp"',
                "timeout=300": r"timeout=300\b", "1.5e-4": r"1\.5e-4", '"minilm"': r'"minilm"',
                '"torch_model"': r'"torch_model"', '"server.json"': r'"server\.json"', '"key_file.json"': r'"key_file\.json"'}
    for path in sorted((REPO / "yelp_ts").glob("*.py")):
        if path.name in ("core.py", "_modidx.py"): continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        found = [name for name, pattern in literals.items() if re.search(pattern, code)]
        assert not found, f"{path.name} repeats {found}: import it from yelp_ts.core"


def test_readme_command_line_shows_the_defaults_in_force():
    "Each `[--option VALUE]` in the README's command-line block is the default the command would use."
    block = re.search(r"## The command line\n+```\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    checked = 0
    for line in block.splitlines():
        command = line.split()[1]
        if line.split()[2] == "|": continue                      # `status | stop`
        for flag, value in re.findall(r"\[(--[a-z-]+) ([^\]\s|]+)\]", line):
            action = next((a for a in _subparser(command)._actions if flag in a.option_strings), None)
            assert action is not None, f"README: `yelp-ts {command} {flag}` is not an option"
            if value.isupper() or value.startswith("{"): continue   # a placeholder (W, N, DIR) or the choices
            assert f"(default: {value})" in " ".join(action.help.split()), (command, flag, value, action.help)
            checked += 1
    assert checked >= 10


def test_commands_that_talk_to_a_server_start_without_torch(tmp_path):
    "`status`, `stop`, `predict` and `explain` import neither torch, transformers nor OpenVINO: they answer at once."
    calls = [["status"], ["stop"], ["predict", "Great tacos!"], ["explain", "Great tacos!"]]
    code = (f"import sys; from yelp_ts.cli import main; codes = [main([c[0], '--workdir', {str(tmp_path)!r}, *c[1:]]) "
            f"for c in {calls!r}]; print(codes, sorted(m for m in ('torch', 'transformers', 'openvino') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2] []", (r.stdout, r.stderr[-2000:])   # no server: exit 2


def test_user_errors_are_one_line_other_errors_keep_their_traceback(tmp_path, monkeypatch):
    r = yelp_ts("train", "--workdir", tmp_path, "--model", "/no/such/model")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("yelp-ts train: error:")
    assert "Traceback" not in r.stderr and "--model minilm" in r.stderr
    def bug(args): raise ValueError("a shape mismatch: a bug, not the user's doing")
    monkeypatch.setitem(cli.COMMANDS, "status", bug)
    with pytest.raises(ValueError, match="shape mismatch"):              # not turned into exit status 2
        cli.main(["status", "--workdir", str(tmp_path)])


def test_run_end_to_end(tmp_path):
    "`yelp-ts run` on the embedded default (small sizes): data → train → archive → serve → predict; then stop."
    wd = tmp_path / "wd"
    ports = list(serving.free_ports().values())
    r = yelp_ts("run", "--workdir", wd, "--n-train", 48, "--n-eval", 16, "--epochs", 1, "--max-length", 64,
                "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2])
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Stopped back by Mellow Mushroom" in r.stdout and "→" in r.stdout
        assert "yelp-ts stop" in r.stdout and "Authorization: Bearer" in r.stdout
        status = json.loads(yelp_ts("status", "--workdir", wd).stdout)
        assert status["running"]
        parity = json.loads((wd / "torch_model" / "parity.json").read_text())["chosen"]     # auto, checked against fp32
        assert status["serving"]["runtime"] == parity["runtime"] and status["serving"]["precision"] == parity["precision"]
        assert f"precision={parity['precision']} runtime={parity['runtime']}" in status["in_force"]
        record = json.loads((wd / "torch_model" / "run.json").read_text())
        assert set(record["steps"]) == {"data", "train", "archive", "serve", "predict"} and record["n_train"] == 48
        p = yelp_ts("predict", "--workdir", wd, "Great tacos, friendly staff.", "Cold food and a rude waiter.")
        answers = [json.loads(line) for line in p.stdout.splitlines()]
        assert len(answers) == 2 and all(a["label"].endswith(("star", "stars")) for a in answers)
        assert set(answers[0]["probabilities"]) == {"1 star", "2 stars", "3 stars", "4 stars", "5 stars"}
        bad = yelp_ts("predict", "--workdir", wd, "   ")
        assert bad.returncode == 2 and "empty" in bad.stderr.lower() and "Traceback" not in bad.stderr
        why = yelp_ts("explain", "--workdir", wd, "--target", "stars", "Great tacos, rude waiter.")
        assert why.returncode == 0, why.stderr[-2000:]
        explanation = json.loads(why.stdout.splitlines()[0])
        assert explanation["target"] == "stars" and [w["word"] for w in explanation["words"]][:2] == ["Great", "tacos"]
        refused = yelp_ts("explain", "--workdir", wd, "--target", "9", "Great tacos.")
        assert refused.returncode == 2 and "from 1 to 5" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        s = yelp_ts("stop", "--workdir", wd)
    assert s.returncode == 0
    assert not json.loads(yelp_ts("status", "--workdir", wd).stdout)["running"]


@pytest.mark.parametrize("name", ["05c_pipeline", "index"])
def test_pipeline_and_index_notebooks_run_the_whole_article(tmp_path, name):
    "05c_pipeline (run, then the debug cycle) and the index's five calls, small, on free ports; nothing left running."
    wd = tmp_path / "wd"
    try:
        run_notebook(name, tmp_path / "executed", workdir=str(wd), n_train=48, n_eval=16, epochs=1)
        assert json.loads((wd / "torch_model" / "metrics.json").read_text())["data"]["n_train"] == 48
    finally:
        assert not serving.stop(wd), "the notebook left its server running"
