"""Render the documentation site into _docs/ (`make docs`): nbdev's own steps, without `nbdev_docs`'s side effects.

`nbdev_docs` installs Quarto with sudo when it is missing, runs `pip install -e .[dev]` with whichever pip comes first,
rewrites README.md and learn_and_search/_modidx.py, and stops at the first failing notebook. This script does only the
site: nbs/nbdev.yml from settings.ini and nbs/sidebar.yml from the notebook list (both git-ignored), nbdev's docs pass
(`proc_nbs`: its processors, the cells it executes) from nbs/ into _proc/, then `quarto render` there, and moves the
site to _docs/. Tracked files are never written (README.md is `make readme`'s, _modidx.py `nbdev_export`'s).

    python scripts/docs.py                      # quarto from PATH
    python scripts/docs.py --quarto /opt/quarto/bin/quarto --workers 1
"""
import argparse, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'install Quarto (https://quarto.org/docs/get-started/) to render the site: it is not on PATH'

def build(quarto:str, workers:int)->Path:
    "The site in _docs/ (nbdev's `_pre_docs` and `nbdev_docs` without the Quarto and pip installs or README and _modidx writes)"
    from nbdev.config import get_config
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    cfg = get_config()
    refresh_quarto_yml()                                # nbs/nbdev.yml; nbs/_quarto.yml is committed, so kept
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)        # nbs/sidebar.yml, the chapters in file order
    cache = proc_nbs(cfg.nbs_path, n_workers=workers)  # _proc/: the notebooks as nbdev's docs pass leaves them
    subprocess.run([quarto, 'render', '--no-cache'], cwd=cache, check=True)
    shutil.rmtree(cfg.doc_path, ignore_errors=True)
    shutil.move(cache/cfg.doc_path.name, cfg.config_path)
    return cfg.doc_path

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quarto', default='quarto', help='the quarto command (default: quarto from PATH)')
    ap.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1), help="processes for nbdev's docs pass")
    args = ap.parse_args()
    quarto = shutil.which(args.quarto)
    if not quarto: sys.exit(print(f'docs: {INSTALL}'))
    print(f'docs: the site is in {build(quarto, args.workers)}/index.html')
