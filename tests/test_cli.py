"""The `yelp-ts` console script: the pipeline from the command line, on the embedded default, small sizes."""
import argparse
import inspect
import json
from dataclasses import asdict, fields
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, link_model, run_notebook
from yelp_ts import archive, benchmark, cli, core, data, deploy, quality, serving, settings, training
from yelp_ts.settings import option

YELP_TS = str(Path(sys.executable).parent / "yelp-ts")


def yelp_ts(*args, timeout=900):
    return subprocess.run([YELP_TS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.notebook
def test_cli_notebook_runs(tmp_path):
    run_notebook("beyond_5_cli", tmp_path / "executed", workdir=str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "data" / "train.csv").exists()


def test_archive_takes_serving_settings(untrained_model_workdir, tmp_path, capsys):
    wd = link_model(untrained_model_workdir, tmp_path / "wd")
    code = cli.main(["archive", "--workdir", wd, "--model-name", "cli", "--workers", "2", "--precision", "fp32", "--runtime",
                     "torch", "--torch-threads", "1", "--serve-batch-size", "16", "--max-batch-delay", "7"])
    assert code == 0 and capsys.readouterr().out.strip().endswith("cli.mar")
    config = yaml.safe_load((wd / "torch_model" / "model-config.yaml").read_text())
    assert (config["minWorkers"], config["batchSize"], config["maxBatchDelay"], config["handler"]["torch_threads"]) == (2, 16, 7, 1)
    assert (wd / "torch_model" / "model_store" / "cli.mar").exists()


def _subparser(name):
    return next(a for a in cli.build_parser(name)._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


FUNCTIONS = {settings.Data: data.make_data, settings.Train: training.train, settings.Server: serving.serve,
             settings.Quality: quality.measure_quality,
             settings.Bench: benchmark.run_benchmark, settings.Deploy: deploy.write_manifests}


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_has_its_steps_settings_as_options_with_their_defaults(command):
    "One option per setting of the command's steps, its help showing the default in force; left out, none is passed."
    parser, steps = _subparser(command), cli.COMMANDS[command][1]
    actions = {a.dest: a for a in parser._actions}
    for step in steps:
        for f in fields(step):
            action = actions[option(f)]
            shown = " ".join(action.help.split())
            assert (f"(default: {f.default})" in shown) if f.default is not None else "(unset:" in shown, (command, f.name, shown)
    expected = {option(f) for step in steps for f in fields(step)}
    assert {d for d in actions if d not in ("help", "workdir", "preset", "texts", "target")} == expected
    assert cli._options(parser.parse_args(["x"] if command in ("predict", "explain") else ["k8s"] if command == "deploy" else [])) == {}


@pytest.mark.parametrize("step", list(FUNCTIONS))
def test_each_step_takes_exactly_its_settings(step):
    "The library function of a step takes every field of its settings by name (so `**asdict(settings)` calls it)."
    inspect.signature(FUNCTIONS[step]).bind(".", **asdict(step()))
    assert set(inspect.signature(FUNCTIONS[step]).parameters) >= {f.name for f in fields(step)}
    inspect.signature(archive.build_archive).bind(".", **asdict(settings.Archive()), serving=settings.Serving())


def test_every_setting_says_what_unset_means_and_shared_options_agree():
    for step in settings.ALL_STEPS:
        for f in fields(step):
            assert f.metadata["help"], f.name
            if f.default is None: assert "(unset:" in f.metadata["help"], (step.__name__, f.name)
            if f.type is bool: assert f.default is False, "a bool option is a store_true flag: its default must be False"
    for name, owners in settings.shared_options().items():
        found = [next(f for f in fields(s) if option(f) == name) for s in owners]
        assert len({f.default for f in found}) == 1, (name, [s.__name__ for s in owners])


def test_no_default_is_read_back_from_a_signature():
    "Defaults are declared once, in yelp_ts.settings: nothing reads them back from a function's signature."
    for path in sorted((REPO / "yelp_ts").glob("*.py")):
        code = path.read_text()
        assert not re.search(r"inspect\.signature|\.parameters\[", code), path.name


def test_shared_defaults_have_one_home():
    "The facts every step shares are yelp_ts.core's, the settings' defaults yelp_ts.settings': no module repeats them."
    assert settings.Train.max_length == core.MAX_LENGTH and settings.Data.seed == settings.Train.seed == core.SEED
    assert settings.Train.model == core.DEFAULT_MODEL and settings.Server.inference_port == core.PORTS["inference"]
    assert settings.Archive.model_name == settings.Server.model_name == core.MODEL_NAME
    literals = {"max length 128": r"length\w*\W{1,6}128\b", "8080": r"\b8080\b", '"yelp"': r'"yelp"',
                "timeout=300": r"timeout=300\b", "1.5e-4": r"1\.5e-4", '"minilm"': r'"minilm"',
                '"torch_model"': r'"torch_model"', '"server.json"': r'"server\.json"', '"key_file.json"': r'"key_file\.json"',
                '"model_store"': r'"model_store"', '"run.json"': r'"run\.json"', '"/predictions/': r'"/predictions/',
                '".model_server.pid"': r'"\.model_server\.pid"', '"logs"': r'/ "logs"', '"tmp"': r'/ "tmp"'}
    homes = {"core.py": set(literals) - {"1.5e-4", "timeout=300"},
             "settings.py": {"1.5e-4", "timeout=300"}, "_modidx.py": set(literals),
             "client.py": {'"/predictions/'}}          # the client splits the URL it is given at the route
    for path in sorted((REPO / "yelp_ts").glob("*.py")):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        found = [name for name, pattern in literals.items() if re.search(pattern, code) and name not in homes.get(path.name, ())]
        assert not found, f"{path.name} repeats {found}: import it from yelp_ts.core or yelp_ts.settings"


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


def test_user_errors_are_one_line_other_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    assert cli.main(["train", "--workdir", tmp_path, "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("yelp-ts train: error:") and "--model minilm" in err
    def bug(args): raise ValueError("a shape mismatch: a bug, not the user's doing")
    monkeypatch.setattr(cli, "cmd_status", bug)
    with pytest.raises(ValueError, match="shape mismatch"):              # not turned into exit status 2
        cli.main(["status", "--workdir", str(tmp_path)])


@pytest.mark.training
@pytest.mark.torchserve
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


@pytest.mark.notebook
@pytest.mark.training
@pytest.mark.torchserve
@pytest.mark.parametrize("name", ["05c_pipeline", "index"])
def test_pipeline_and_index_notebooks_run_the_whole_article(tmp_path, name):
    "05c_pipeline (run, then the debug cycle) and the index's five calls, small, on free ports; nothing left running."
    wd = tmp_path / "wd"
    try:
        run_notebook(name, tmp_path / "executed", workdir=str(wd), n_train=48, n_eval=16, epochs=1)
        assert json.loads((wd / "torch_model" / "metrics.json").read_text())["data"]["n_train"] == 48
    finally:
        assert not serving.stop(wd), "the notebook left its server running"
