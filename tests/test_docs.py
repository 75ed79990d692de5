"""The chapters build as nbdev's documentation site (`make docs`), checked without Quarto.

nbdev's docs pass runs on every notebook as `make docs` runs it: nbdev's processors, and the cells its `exec_show_docs`
executes (exported cells, `show_doc`s, and every other cell holding an import anywhere in it). No cell may fail, and no
executed cell may hold other code beside its imports (test code there runs without the cells before it), and every
figure cell (`#| exec_doc`: drawn when the site is built, so a page's figures are never stale) draws its figure. Then what
Quarto reads: nbdev.yml and _quarto.yml parse, no two notebooks name one page, styles.css is there, the sidebar lists
every chapter once in file order, and the images the pages show resolve inside nbs/ (the site's source).

The pass runs in two child processes at once, one per core (`python tests/test_docs.py OUT.json [NBS [SHARD SHARDS]]`),
so the notebooks' state stays out of pytest's; it writes nothing into the checkout."""
import ast, json, os, re, shutil, subprocess, sys, time
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
PASS_TIMEOUT = 600   # seconds; the whole pass takes well under a minute on 2 cores


def _first_line(source:str)->str:
    return next((l.strip() for l in source.splitlines() if l.strip() and not l.lstrip().startswith('#|')), '')


def _mixes_imports(source:str)->bool:
    "Does `source` hold an import (anywhere, as nbdev looks) and also anything that is not a top-level import?"
    try: body = ast.parse(source).body
    except SyntaxError: return False
    has_import = any(isinstance(n, (ast.Import, ast.ImportFrom)) for t in body for n in ast.walk(t))
    return has_import and not all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in body)


def docs_pass(nbs:Path, shard:int=0, shards:int=1)->list:
    "For every notebook under `nbs` nbdev's docs pass would process (every `shards`-th from `shard`): its page, failing and mixed cells"
    from execnb.nbio import read_nb
    from fastcore.xtras import str2bool
    from nbdev.doclinks import nbglob
    import nbdev.processors as P

    class recording_exec(P.exec_show_docs):
        "nbdev's `exec_show_docs`, but a failing cell is recorded and the pass goes on to the next"
        def __call__(self, cell):
            fm = getattr(self.nb, 'frontmatter_', {})
            runs = self.nb.has_docs_ and hasattr(self, 'k') and not str2bool(fm.get('skip_showdoc', False)) and P._do_eval(cell)
            where = dict(cell=cell.get('id') or 'show_doc cell nbdev adds', line=_first_line(cell.source or ''))
            if runs and not (cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'}) and _mixes_imports(cell.source):
                rec['mixed'].append(where)
            try: super().__call__(cell)
            except Exception:
                exc = self.k.exc
                rec['failed'].append({**where, 'error': f'{type(exc).__name__}: {str(exc)[:300]}'})
                self.k.exc = None
            if runs and 'exec_doc' in cell.directives_:   # a figure cell: the page shows what it drew
                rec['figures'].append({**where, 'image': any('image/png' in o.get('data', {}) for o in cell.get('outputs') or [])})

    class docs_filter(P.FilterDefaults):
        def base_procs(self): return [recording_exec if p is P.exec_show_docs else p for p in super().base_procs()]

    os.environ['IN_TEST'] = '1'   # as nbdev's docs workers set it
    records = []
    for path in sorted(nbglob(nbs, as_path=True))[shard::shards]:
        path, t0 = Path(path), time.time()
        rec = dict(notebook=str(path.relative_to(nbs)), page=None, failed=[], mixed=[], figures=[])
        nb = read_nb(path)
        try: docs_filter()(nb)
        except Exception as e: rec['failed'].append(dict(cell=None, line=None, error=f'{type(e).__name__}: {str(e)[:300]}'))
        page = getattr(nb, 'frontmatter_', {}).get('output-file') or path.with_suffix('.html').name   # Quarto's name without one
        module = next((m.group(1) for c in nb.cells for m in [re.search(r'^#\|\s*default_exp\s+(\S+)', c.source or '', re.M)] if m), None)
        shown = sorted({m.group(1) for c in nb.cells for m in re.finditer(r'show_doc\((\w+)', c.source or '')})
        rec.update(page=str((path.parent/page).relative_to(nbs)), seconds=round(time.time() - t0, 2), module=module, shown=shown)
        records.append(rec)
    return records


def run_docs_pass(nbs:Path, out:Path, shards:int=2)->list:
    "`docs_pass(nbs)` in `shards` child processes at once (one per core), started in the project root (nbdev reads settings.ini there)"
    outs = [out.with_suffix(f'.{i}.json') for i in range(shards)]
    kids = [subprocess.Popen([sys.executable, __file__, str(o), str(nbs), str(i), str(shards)], cwd=ROOT, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i, o in enumerate(outs)]
    try:
        for kid in kids:
            _, err = kid.communicate(timeout=PASS_TIMEOUT)
            assert kid.returncode == 0, f'the docs pass itself broke:\n{err[-4000:]}'
    finally:
        for kid in kids: kid.kill()   # a no-op for those that ended; never leave a shard running after a failure
    return sorted((r for o in outs for r in json.loads(o.read_text())), key=lambda r: r['notebook'])


@pytest.fixture(scope='module')
def passed(tmp_path_factory)->list:
    t0 = time.time()
    records = run_docs_pass(NBS, tmp_path_factory.mktemp('docs')/'pass.json')
    print(f"nbdev's docs pass: {len(records)} notebooks in {time.time() - t0:.1f} s")
    return records


def test_every_notebook_passes_nbdevs_docs_pass(passed):
    bad = [f"{r['notebook']} cell {f['cell']} ({f['line']!r}): {f['error']}" for r in passed for f in r['failed']]
    assert len(passed) > 40, [r['notebook'] for r in passed]
    assert not bad, f"nbdev's docs pass fails in {len(bad)} cells:\n" + '\n'.join(bad)


def test_imports_in_cells_of_their_own(passed):
    mixed = [f"{r['notebook']} cell {m['cell']} ({m['line']!r})" for r in passed for m in r['mixed']]
    assert not mixed, (f"{len(mixed)} cells hold an import and other code, so nbdev's docs pass runs all of it without the "
                       "cells before it: move the imports into a cell of their own\n" + '\n'.join(mixed))


def test_every_exported_function_and_class_has_its_documentation(passed):
    "Each chapter's page shows the signature and docstring (`show_doc`) of every function and class its module exports"
    import importlib, inspect
    missing = []
    for r in passed:
        if not r['module']: continue
        mod = importlib.import_module(f"learn_and_search.{r['module']}")
        names = [n for n in getattr(mod, '__all__', []) if (inspect.isfunction(o := getattr(mod, n)) or inspect.isclass(o))
                 and getattr(o, '__module__', '') == mod.__name__]
        missing += [f"{r['notebook']}: {n}" for n in names if n not in r['shown']]
    assert any(r['shown'] for r in passed), 'no show_doc cell at all: the docs pass no longer adds them'
    assert not missing, f"exported but not documented on its page ({len(missing)}): " + ', '.join(missing)


FIGURE_CHAPTERS = ('1_cells/00_cells.ipynb', '3_learn/00_augment.ipynb', '3_learn/01_loss.ipynb', '6_paper/04_plots.ipynb')   # explained by a picture

def test_figure_cells_draw_their_figure(passed):
    "Every `#| exec_doc` cell draws its figure in the docs pass (so the page shows it), and the chapters a picture explains have one"
    figures = {r['notebook']: r['figures'] for r in passed}
    blank = [f"{nb} cell {f['cell']} ({f['line']!r})" for nb, fs in figures.items() for f in fs if not f['image']]
    assert not blank, "these figure cells drew nothing in the docs pass:\n" + '\n'.join(blank)
    assert all(figures.get(nb) for nb in FIGURE_CHAPTERS), {nb: figures.get(nb) for nb in FIGURE_CHAPTERS}


def test_one_page_per_notebook(passed):
    pages = Counter(r['page'] for r in passed)
    clashes = {p: [r['notebook'] for r in passed if r['page'] == p] for p, n in pages.items() if n > 1}
    assert not clashes, f'notebooks that become the same page (give one an `output-file` frontmatter cell): {clashes}'
    assert next(r['page'] for r in passed if r['notebook'] == 'index.ipynb') == 'index.html'   # the home page


def test_a_planted_failure_is_named_by_notebook_and_cell(tmp_path):
    "The pass reports a mixed cell and the failure it causes by cell id, and goes on to the cells after it"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    cells = [dict(cell_type='markdown', id='t0', metadata={}, source='# Planted\n> a chapter with one bad cell'),
             dict(cell_type='code', id='e0', metadata={}, outputs=[], execution_count=None, source='#| export\ndef f(): return 1'),
             dict(cell_type='code', id='x1', metadata={}, outputs=[], execution_count=None, source='x = f()'),
             dict(cell_type='code', id='bad1', metadata={}, outputs=[], execution_count=None, source='import math\nassert x == 1'),
             dict(cell_type='code', id='bad2', metadata={}, outputs=[], execution_count=None, source='from math import pi\npi + y')]
    (nbs/'01_planted.ipynb').write_text(json.dumps(dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)))
    [rec] = run_docs_pass(nbs, tmp_path/'pass.json')
    assert rec['page'] == 'planted.html'
    assert [(m['cell'], m['line']) for m in rec['mixed']] == [('bad1', 'import math'), ('bad2', 'from math import pi')]
    assert [f['cell'] for f in rec['failed']] == ['bad1', 'bad2'] and rec['failed'][0]['error'].startswith('NameError'), rec


def _config():
    from nbdev.config import get_config
    return get_config(path=ROOT)


def test_site_yaml_parses():
    from nbdev.quarto import _nbdev_yml
    cfg = _config()
    vals = {k: cfg[k] for k in ['title', 'description', 'branch', 'git_url', 'doc_host', 'doc_baseurl']}
    text = _nbdev_yml.format(**vals, doc_path=cfg.doc_path.name)   # what refresh_quarto_yml writes to nbs/nbdev.yml
    try: nbdev_yml = yaml.safe_load(text)
    except yaml.YAMLError as e: pytest.fail(f'nbdev.yml, made from settings.ini, is not YAML (a double quote in a value?):\n{text}\n{e}')
    assert nbdev_yml['website']['description'] == cfg.description and nbdev_yml['website']['title'] == cfg.title
    quarto = yaml.safe_load((NBS/'_quarto.yml').read_text())
    assert quarto['project']['type'] == 'website' and {'nbdev.yml', 'sidebar.yml'} <= set(quarto['metadata-files'])
    for css in [quarto['format']['html']['css']] if isinstance(quarto['format']['html']['css'], str) else quarto['format']['html']['css']:
        assert (NBS/css).is_file() and (NBS/css).stat().st_size > 0, f'_quarto.yml names {css}, which is not in nbs/'


def _sidebar_files(contents)->list:
    out = []
    for o in contents:
        if isinstance(o, str): out.append(o)
        else: out += ([o['href']] if 'href' in o else []) + _sidebar_files(o.get('contents', []))
    return out


def test_sidebar_lists_every_chapter_once_in_order():
    import contextlib, io
    from fastcore.xtras import working_directory
    from nbdev.doclinks import nbglob
    from nbdev.quarto import nbdev_sidebar
    import importlib.util
    assert _config().custom_sidebar, 'custom_sidebar = True: nbdev would overwrite the sidebar with links that drop the folder numbers'
    spec = importlib.util.spec_from_file_location('docs_script', ROOT/'scripts'/'docs.py')
    docs = importlib.util.module_from_spec(spec); spec.loader.exec_module(docs)
    with working_directory(ROOT): sidebar = yaml.safe_load(yaml.safe_dump(docs.sidebar(NBS)))   # what make docs writes
    listed = [Path(p) for p in _sidebar_files(sidebar['website']['sidebar']['contents'])]
    pages = [Path(p).relative_to(NBS) for p in nbglob(NBS, skip_folder_re=r'(?:^[_.]|^www\$)')]
    order = sorted(pages, key=lambda p: (p.parent.parts, p.stem != 'index', p.name))   # home first, then by number
    assert listed == order, f'sidebar {[str(p) for p in listed]}\nchapters {[str(p) for p in order]}'
    assert all((NBS/p).is_file() for p in listed)   # every link is a real notebook
    sections = [o['section'] for o in sidebar['website']['sidebar']['contents'] if isinstance(o, dict)]
    assert sections[:4] == ['core', 'cells', 'data', 'learn'], sections   # the layers, in pipeline order


def test_images_on_the_pages_resolve_inside_the_site():
    "Every image a notebook's markdown shows is a file under nbs/ (Quarto copies only what is inside its project)"
    from nbdev.doclinks import nbglob
    image = re.compile(r'!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\b[^>]*\bsrc\s*=\s*["\']([^"\']+)')
    missing, home = [], []
    for path in map(Path, nbglob(NBS, as_path=True)):
        for cell in json.loads(path.read_text())['cells']:
            if cell['cell_type'] != 'markdown': continue
            for m in image.finditer(''.join(cell['source'])):
                src = m.group(1) or m.group(2)
                if re.match(r'^[a-z][a-z0-9+.-]*:', src, re.I): continue   # http:, data: ...
                target = Path(os.path.normpath(path.parent/src.split('#')[0]))
                if path.name == 'index.ipynb': home.append(src)
                if not (target.is_relative_to(NBS) and target.is_file()):
                    missing.append(f"{path.relative_to(NBS)} cell {cell.get('id')}: {src}")
    assert home, 'the home page shows no image: update this test if that is meant'
    assert not missing, ('images the site cannot show (a file, or a link to one, must be at that path under nbs/, e.g. '
                         'nbs/figures/x.png -> ../../figures/x.png):\n' + '\n'.join(missing))


@pytest.mark.skipif(not shutil.which('make'), reason='make is not installed')
def test_make_docs_without_quarto_says_what_to_install_and_changes_nothing():
    status = lambda: subprocess.run(['git', 'status', '--porcelain', '--ignored'], cwd=ROOT, capture_output=True, text=True).stdout
    before = status()
    r = subprocess.run(['make', '--no-print-directory', 'docs', 'QUARTO=quarto-absent-for-this-test'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == '', r
    assert r.stdout.count('\n') == 1 and r.stdout.startswith('make docs: install Quarto'), r.stdout
    assert status() == before


if __name__ == '__main__':
    out, nbs = Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else NBS
    shard, shards = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (0, 1)
    out.write_text(json.dumps(docs_pass(nbs.resolve(), shard, shards), indent=1))
