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
        if path.name != "index.ipynb":
            tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
            assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged `parameters`"
