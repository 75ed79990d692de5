"""Render the documentation site into _docs/ (`make docs`): nbdev's own steps, without `nbdev_docs`'s side effects.

`nbdev_docs` installs Quarto with sudo when it is missing, runs `pip install -e .[dev]` with whichever pip comes first,
rewrites README.md and learn_and_search/_modidx.py, and stops at the first failing notebook. This script does only the
site: nbs/nbdev.yml from settings.ini and nbs/sidebar.yml from the layer folders (both git-ignored), nbdev's docs pass
(`proc_nbs`: its processors, the cells it executes) from nbs/ into _proc/, then `quarto render` there, and moves the
site to _docs/. Tracked files are never written (README.md is `make readme`'s, _modidx.py `nbdev_export`'s).

    python scripts/docs.py                      # quarto from PATH
    python scripts/docs.py --quarto /opt/quarto/bin/quarto --workers 1
"""
import argparse, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'install Quarto (https://quarto.org/docs/get-started/) to render the site: it is not on PATH'

def sidebar(nbs:Path)->dict:
    "The site's sidebar: the home page, then one section per layer folder (its number dropped from the title) in order"
    from nbdev.doclinks import nbglob
    import re
    pages = sorted(Path(p).relative_to(nbs) for p in nbglob(nbs, skip_folder_re=r'(?:^[_.]|^www$)'))
    contents, sections = [str(p) for p in pages if len(p.parts) == 1 and p.stem == 'index'], {}
    contents += [str(p) for p in pages if len(p.parts) == 1 and p.stem != 'index']
    for p in pages:
        if len(p.parts) > 1: sections.setdefault(p.parts[0], []).append(str(p))   # hrefs keep the real folder names
    title = lambda folder: 'the notebooks las-reproduce runs' if folder == 'paper' else re.sub(r'^\d+_', '', folder)
    contents += [dict(section=title(folder), contents=files) for folder, files in sorted(sections.items())]
    return {'website': {'sidebar': {'contents': contents}}}

def write_sidebar(nbs:Path)->Path:
    "nbs/sidebar.yml from `sidebar` (nbdev's own generator names folders without their numbers, so its links break)"
    import yaml
    path = nbs/'sidebar.yml'
    path.write_text(yaml.safe_dump(sidebar(nbs), sort_keys=False))
    return path

def build(quarto:str, workers:int)->Path:
    "The site in _docs/ (nbdev's `_pre_docs` and `nbdev_docs` without the Quarto and pip installs or README and _modidx writes)"
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    cfg = get_config()
    refresh_quarto_yml()                                # nbs/nbdev.yml; nbs/_quarto.yml is committed, so kept
    write_sidebar(cfg.nbs_path)                         # nbs/sidebar.yml, the chapters in pipeline order
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
