"""The notebooks are the source: the committed library must be exactly what nbdev_export makes of them."""
import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import NBS, REPO

BIN = Path(sys.executable).parent


def test_library_matches_notebooks(tmp_path):
    for name in ["settings.ini", "nbs", "yelp_ts"]:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    subprocess.run([str(BIN / "nbdev_export")], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    fresh, committed = tmp_path / "yelp_ts", REPO / "yelp_ts"
    drift = filecmp.dircmp(committed, fresh, ignore=["__pycache__"])
    assert not (drift.diff_files or drift.left_only or drift.right_only), (
        f"yelp_ts/ differs from the notebooks: changed {drift.diff_files}, only committed {drift.left_only}, "
        f"only exported {drift.right_only}. Run `nbdev_export` and commit both.")


def test_notebooks_are_clean_and_runnable():
    notebooks = sorted(NBS.glob("*.ipynb"))
    assert len(notebooks) >= 8
    for path in notebooks:
        nb = json.loads(path.read_text())
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(c.get("execution_count") is None for c in code), f"{path.name} is not cleaned (nbdev_clean)"
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        expected = 0 if path.name in ("ref_core.ipynb", "ref_settings.ipynb") else 1   # facts and declarations: nothing to set
        assert len(tagged) == expected, f"{path.name} needs {expected} cell(s) tagged `parameters`"


def test_readers_need_nothing_outside_the_repository():
    "A notebook, the README and the library never point at notes that only the developers have."
    for path in sorted(NBS.glob("*.ipynb")) + [REPO / "README.md"] + sorted((REPO / "yelp_ts").glob("*.py")):
        text = path.read_text()
        for needle in ("PITFALLS", "DESIGN.md", "STYLE.md", "../shared"):
            assert needle not in text, f"{path.name} cites {needle}"


def test_notebooks_show_errors_with_test_fail():
    "An error demonstrated as `try: ... except E as e: print(e)` passes when nothing raises; test_fail does not."
    import re
    for path in sorted(NBS.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and not source.startswith("#| export"):
                assert not re.search(r"except[^\n]*:\s*print\(", source), f"{path.name}: {source[:200]}"


SCREEN = 40   # lines of a code cell a laptop's JupyterLab shows at once, at its default font


def long_cells(notebook, limit=SCREEN) -> list:
    "The code cells of `notebook` (a parsed .ipynb) longer than `limit` lines: [(cell index, lines)]."
    return [(i, len("".join(c["source"]).splitlines())) for i, c in enumerate(notebook["cells"])
            if c["cell_type"] == "code" and len("".join(c["source"]).splitlines()) > limit]


def test_the_screen_lint_finds_a_long_cell():
    "The lint below can fail: a cell one line over the screen is found, one at the screen is not."
    cell = lambda n: {"cell_type": "code", "source": ["x = 1\n"] * n}
    assert long_cells({"cells": [cell(SCREEN), cell(SCREEN + 1), {"cell_type": "markdown", "source": ["# x\n"] * 99}]}) == \
        [(1, SCREEN + 1)]


def test_no_cell_longer_than_a_screen():
    found = {p.name: cells for p in sorted(NBS.glob("*.ipynb")) if (cells := long_cells(json.loads(p.read_text())))}
    assert found == {}, f"code cells over {SCREEN} lines (split them): {found}"


LAYERS = ["model", "core", "settings", "sample", "data", "handler", "explain", "worker", "training", "archive", "client",
          "serving", "demo", "pipeline", "peer", "benchmark", "quality", "scale", "deploy", "cli"]


def test_modules_import_only_downwards():
    "Each module imports only modules in the layers below it; the MAR's model.py imports none, its handler.py only model."
    import ast
    modules = {p.stem for p in (REPO / "yelp_ts").glob("*.py")} - {"__init__", "_modidx"}
    assert modules == set(LAYERS), modules ^ set(LAYERS)
    for name in LAYERS:
        tree = ast.parse((REPO / "yelp_ts" / f"{name}.py").read_text())
        used = {n.module.split(".")[-1] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and (n.level or n.module.startswith("yelp_ts")) and n.module != "yelp_ts"}
        used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module == "yelp_ts" or
                 (n.level and not n.module)) for a in n.names}
        above = [m for m in used if m in LAYERS and LAYERS.index(m) > LAYERS.index(name)]
        assert not above, f"yelp_ts.{name} imports {above}, which sit above it"
        if name == "model": assert not used, f"model.py must be self-contained for the MAR: imports {used}"
        if name == "handler": assert used == {"model"}, f"handler.py may import only the model module: imports {used}"


def test_index_and_readme_link_every_notebook():
    "A reader finds every notebook from the index notebook and from the README's table."
    names = sorted(p.stem for p in NBS.glob("*.ipynb") if p.stem != "index")
    index = "".join("".join(c["source"]) for c in json.loads((NBS / "index.ipynb").read_text())["cells"])
    readme = (REPO / "README.md").read_text()
    assert [n for n in names if f"]({n}.ipynb)" not in index] == [], "not linked from nbs/index.ipynb"
    assert [n for n in names if f"](nbs/{n}.ipynb)" not in readme] == [], "not linked from README.md"


def test_nbdev_readme_cannot_overwrite_the_hand_written_readme():
    "settings.ini's readme_nb names no notebook, so `nbdev_readme` (quarto) has nothing to render over README.md."
    import configparser
    config = configparser.ConfigParser(); config.read(REPO / "settings.ini")
    assert not (NBS / config["DEFAULT"]["readme_nb"]).exists()


def export_cells():
    "(notebook, cell id, the code under `#| export`) for every export cell."
    for path in sorted(NBS.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and source.startswith("#| export"):
                yield path.name, cell["id"], source.split("\n", 1)[1] if "\n" in source else ""


ONE_CELL_CLASSES = set()   # none: even the handler class (TorchServe loads one class from one file) fits a screen


def test_notebooks_at_nbdevs_grain():
    "One definition per export cell, a median of 10 lines or fewer, none over 30, prose in short cells."
    import ast, statistics
    cells = list(export_cells())
    sizes = [len(code.splitlines()) for _, _, code in cells]
    assert statistics.median(sizes) <= 10, statistics.median(sizes)
    defs = lambda code: sum(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) for n in ast.parse(code).body)
    assert [(nb, cid) for nb, cid, code in cells if defs(code) > 1] == [], "one definition per export cell"
    over = [(nb, cid, n) for (nb, cid, code), n in zip(cells, sizes) if n > 30 and nb not in ONE_CELL_CLASSES]
    assert over == [], f"export cells over 30 lines: {over}"
    wordy = [(p.name, c["id"], len("".join(c["source"]).split())) for p in sorted(NBS.glob("*.ipynb"))
             for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown" and len("".join(c["source"]).split()) > 150]
    assert wordy == [], f"markdown cells over 150 words (split them): {wordy}"


MIRRORS = {"00_data": "학습 & 평가 데이터 만들기", "01_concepts": "🤗 Transformers의 모델 구조 이해하기(개념)",
           "02_training": "Sequenceclassification Model 학습하기(적용)", "03_handler": "🤗 Transformers를 위한 Handler",
           "04_archive": "MAR file 생성하기", "05_serving": "TorchServe 배포하기", "05c_pipeline": "Debugging을 위한 Shell script 생성"}


def test_each_notebook_says_what_it_needs_writes_and_takes_and_mirrors_carry_the_articles_heading():
    for path in sorted(NBS.glob("*.ipynb")):
        if path.stem in ("index",) or path.stem.startswith("article_"): continue
        cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"]]
        head = "\n".join(cells[:3])
        assert all(k in head for k in ("**Needs:**", "**Writes:**", "**Takes:**")), path.name
        if path.stem in MIRRORS: assert cells[0].startswith(f"# {MIRRORS[path.stem]} — "), (path.name, cells[0][:80])
