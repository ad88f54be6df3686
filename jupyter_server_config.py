# JupyterLab settings for this repository: `make lab` passes this file to Jupyter (--config).
# nbdev's clean-on-save hook (what `nbdev_install_hooks` would write to ~/.jupyter, kept here instead): with
# `jupyter_hooks = True` in settings.ini, every save drops what the kernel adds to a notebook's metadata and the
# execution counts, so opening and saving a notebook leaves `git status` clean. Run outputs stay until `make clean-nbs`.
import os


def nbdev_clean_on_save(model, path, contents_manager, **kwargs):
    try: from nbdev.clean import clean_jupyter
    except ModuleNotFoundError: return
    # the path Jupyter passes is relative to the folder it serves (nbs/); nbdev needs the file's own path
    clean_jupyter(path=os.path.join(contents_manager.root_dir, path.lstrip("/")), model=model, **kwargs)


if "pre_save_hook" not in c.ContentsManager:  # noqa: F821 (`c` is the config Jupyter passes in; it may read this twice)
    c.ContentsManager.pre_save_hook = nbdev_clean_on_save  # noqa: F821
