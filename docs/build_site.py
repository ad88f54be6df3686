"""Build the static site of the notebooks (mkdocs-material + mkdocs-jupyter): `python docs/build_site.py [--executed DIR]
[--out site]`. Each page is the notebook from nbs/, or, where DIR holds `NAME.out.ipynb` (the copy a test executed with
small parameters, see `make docs`), that executed copy with its outputs: tables, plots, the server's answers. Beside
it, `NAME.run.json` (tests/conftest.py) says how long that run took and on what CPU; the page and the index say it too.
`demo.png`, the browser test's screenshot of the live demo answering in JupyterLab, is shown under the demo's cell."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"
SECTIONS = {   # the reader's order: the article first, then the article as a library, then beyond it, then the reference
    "The article, runnable": ["article_ko", "article_en"],
    "The article, as a library": ["00_data", "01_concepts", "02_training", "03_handler", "04_archive", "05_serving",
                                  "05a_client", "05b_demo", "05c_pipeline"],
    "Beyond the article": ["beyond_1_model", "beyond_2_explain", "beyond_3_benchmark", "beyond_4_peer", "beyond_5_cli", "beyond_6_scale", "beyond_7_deploy", "beyond_8_quality"],
    "Reference": ["ref_core", "ref_sample", "ref_settings", "ref_worker"],
}
LINK = re.compile(r"\]\(([\w-]+)\.ipynb(#[^)]*)?\)")


def pages() -> list:
    "Every notebook of nbs/, index first; one that no section names is refused (the site must show them all)."
    names = sorted(p.stem for p in NBS.glob("*.ipynb"))
    listed = [n for section in SECTIONS.values() for n in section]
    missing = sorted(set(names) - set(listed) - {"index"})
    if missing: sys.exit(f"docs/build_site.py: add {missing} to SECTIONS")
    return ["index"] + [n for n in listed if n in names]


def page_link(name, anchor, here):
    "The site's URL of notebook `name` from page `here` (directory URLs: index is /, NAME is /NAME/)."
    up = "" if here == "index" else "../"
    return f"]({up}{'' if name == 'index' else name + '/'}{anchor or ''})"


def markdown(text) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def run_line(run) -> str:
    "One sentence of a NAME.run.json: how long the executed copy took, with what, where."
    params = ", ".join(f"{k}={v!r}" for k, v in run["parameters"].items() if k != "workdir") or "its defaults"
    cpu = run["cpu"] + (f" ({', '.join(run['cpu_features'])})" if run["cpu_features"] else "")
    return f"ran in {run['seconds']:.0f} s on {run['cores']} cores of an {cpu} on {run['date']}, with {params}"


def runs(executed) -> dict:
    "{page: its NAME.run.json} for the executed copies that have one."
    return {p.name[:-len(".run.json")]: json.loads(p.read_text()) for p in sorted(Path(executed).glob("*.run.json"))} if executed else {}


def add_demo_picture(nb, png) -> bool:
    "Under each cell that shows the live demo (`demo(workdir)`), the browser test's screenshot of it answering."
    import base64
    found = False
    for i, cell in reversed(list(enumerate(nb["cells"]))):
        if cell["cell_type"] == "code" and "".join(cell["source"]).strip().endswith("demo(workdir)"):
            found = True
            nb["cells"].insert(i + 1, markdown("*The demo above, as the browser test saw it in JupyterLab (Chromium): a "
                                               "review typed, **Predict stars** pressed, the running server's answer drawn.*"))
            cell.setdefault("outputs", []).append({"output_type": "display_data", "metadata": {},
                                                  "data": {"image/png": base64.b64encode(png.read_bytes()).decode(),
                                                           "text/plain": "<the demo, answering>"}})
    return found


def copy_notebook(name, executed, docs, run=None):
    "nbs/NAME.ipynb (or its executed copy) into docs/, with links to other notebooks pointing at their pages."
    source = executed / f"{name}.out.ipynb" if executed else None
    nb = json.loads((source if source and source.is_file() else NBS / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            cell["source"] = LINK.sub(lambda m: page_link(m[1], m[2], name), text)
    if run:   # under the title and the Needs/Writes/Takes line: this page's own run
        at = 2 if len(nb["cells"]) > 1 and "**Needs:**" in "".join(nb["cells"][1]["source"]) else 1
        nb["cells"].insert(at, markdown(f"*This page is the copy `make docs` executed: it {run_line(run)}.*"))
    if executed and (executed / "demo.png").is_file(): add_demo_picture(nb, executed / "demo.png")
    if name == "index" and (timed := runs(executed)):
        rows = "\n".join(f"| [{n}]({n}.ipynb) | {r['seconds']:.0f} s |" for n, r in timed.items())
        r = next(iter(timed.values()))
        table = (f"## How long each notebook took in this build\nEach page below is a copy the tests executed with small "
                 f"parameters (`make docs`), on {r['cores']} cores of an {r['cpu']} on {r['date']}; each page names its "
                 f"parameters.\n\n| notebook | ran in |\n|---|---|\n{rows}")
        nb["cells"].append(markdown(LINK.sub(lambda m: page_link(m[1], m[2], name), table)))
    (docs / f"{name}.ipynb").write_text(json.dumps(nb))
    return source is not None and source.is_file()


def build(executed=None, out=REPO / "site") -> dict:
    "Write the site to `out`; return {page: True if it shows executed outputs}."
    out = Path(out).resolve()   # mkdocs runs in the work folder: a relative `out` (the Makefile's `site`) must not move with it
    work = out.parent / f".{out.name}-src"
    shutil.rmtree(work, ignore_errors=True)
    docs = work / "docs"; docs.mkdir(parents=True)
    executed = Path(executed) if executed else None
    timed = runs(executed)
    shown = {name: copy_notebook(name, executed, docs, timed.get(name)) for name in pages()}
    nav = [{"Home": "index.ipynb"}] + [{title: [f"{n}.ipynb" for n in names if n in shown]} for title, names in SECTIONS.items()]
    config = {"site_name": "yelp_ts", "docs_dir": "docs", "site_dir": str(out.resolve()), "use_directory_urls": True,
              "theme": {"name": "material", "features": ["navigation.sections"]}, "nav": nav,
              "plugins": [{"mkdocs-jupyter": {"execute": False, "include_source": True, "ignore_h1_titles": False}}]}
    (work / "mkdocs.yml").write_text(json.dumps(config, indent=1))   # JSON is YAML
    subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--quiet", "-f", str(work / "mkdocs.yml")],
                   check=True, cwd=work, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})   # its .cache/ goes with work
    shutil.rmtree(work)
    return shown


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executed", help="a folder of NAME.out.ipynb executed copies (default: none, the notebooks as committed)")
    parser.add_argument("--out", default=str(REPO / "site"), help="where the site goes (default: site/)")
    args = parser.parse_args()
    shown = build(args.executed, Path(args.out))
    print(f"wrote {args.out}: {len(shown)} pages, {sum(shown.values())} with the outputs of an executed copy; "
          f"open {Path(args.out).resolve() / 'index.html'} or `python -m http.server -d {args.out}`")
