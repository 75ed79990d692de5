"""Run the tests in one of two tiers and end with one `N passed, N failed` line.

- `python tests/run_all.py` (`make test`, what CI runs): every notebook as `nbdev_test --flags slow` runs it, then
  `pytest tests/`; 19.9 minutes on 2 idle cores of an AMD EPYC with AVX2 only (with the shared data).
- `python tests/run_all.py --fast` (`make check`): the notebooks without their `#| slow` cells (training, evaluation,
  subprocess and papermill runs) and without the README's (it trains for 3 minutes), then
  `pytest -m "not slow and not browser"`; 1.9 minutes on 2 cores of an AMD EPYC with AVX2 only.

Both print every notebook's time, its slowest cells and pytest's slowest tests, so a cell that grew slow is seen and
flagged. Everything the tests write to the temp folder goes to one scratch folder of this run (the checkpoints of the
training tests are hundreds of MB each): its size is reported, and it is removed when every test passed."""
import argparse, os, shutil, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_runner import run_notebook   # importable by the worker processes
FULL_FLAGS = ('slow',)   # the flags `make test` runs that `make check` (and a plain `nbdev_test`) skips
FULL_ONLY = ('index.ipynb',)   # the README: it trains a model for 3 minutes (its cells carry no flags: they are the README's code)

def notebook_results(n_workers:int=2, files=None, fast:bool=False)->list:
    "(notebook, passed, seconds, slowest cells) for every notebook nbdev_test would test"
    from fastcore.parallel import parallel
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    cfg = get_config(path=root)
    skip = set(cfg.tst_flags.split()) - (set() if fast else set(FULL_FLAGS))
    files = [Path(f).absolute() for f in sorted(files or nbglob(cfg.nbs_path, as_path=True))
             if _keep_file(Path(f).absolute(), '.notest')]   # the selection nbdev_test makes (folders with .notest are skipped)
    if fast: files = [f for f in files if f.name not in FULL_ONLY]
    sys.path.insert(0, str(cfg.config_path))
    results = parallel(run_notebook, files, skip_flags=skip, n_workers=n_workers, pause=0.01)
    return [(f.relative_to(cfg.nbs_path) if f.is_relative_to(cfg.nbs_path) else f, *r) for f, r in zip(files, results)]

def pytest_counts(args=('tests',))->dict:
    "passed / failed / skipped counts of `pytest args`, from its JUnit XML report"
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d)/'pytest.xml'
        print('$ pytest -q -rs --durations=10', *args, flush=True)
        code = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '--durations=10', f'--junitxml={xml}', *args], cwd=root).returncode
        if not xml.exists(): return dict(passed=0, failed=1, skipped=0)   # pytest itself broke (usage, collection)
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == 'testsuite' else list(suites)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    failed = n['failures'] + n['errors'] + (1 if code not in (0, 5) and not (n['failures'] + n['errors']) else 0)
    return dict(passed=n['tests'] - n['failures'] - n['errors'] - n['skipped'], failed=failed, skipped=n['skipped'])

def folder_bytes(folder:Path)->int:
    "Bytes of the regular files under `folder` (links not followed)"
    return sum(f.lstat().st_size for f in folder.rglob('*') if f.is_file() and not f.is_symlink())

def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--fast', action='store_true', help='the fast tier (make check): no slow cells, no slow or browser tests')
    a = p.parse_args(argv)
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix='las-tests-'))   # TMPDIR of every test: notebooks, pytest and their children
    os.environ['TMPDIR'] = tempfile.tempdir = str(scratch)
    print(f"$ nbdev_test{'' if a.fast else ' --flags ' + ' '.join(FULL_FLAGS)} (every notebook, 2 workers, each cell timed)", flush=True)
    nbs = notebook_results(fast=a.fast)
    for nb, ok, t, cells in sorted(nbs, key=lambda r: -r[2]):
        print(f"  {'ok  ' if ok else 'FAIL'} {t:6.1f} s  {nb}" + ''.join(f"\n{'':16}cell {i}: {s:5.1f} s  {line}" for i, s, line in cells))
    failed_nbs = [str(nb) for nb, ok, *_ in nbs if not ok]
    py = pytest_counts(('-m', 'not slow and not browser', 'tests') if a.fast else ('tests',))
    passed, failed = len(nbs) - len(failed_nbs) + py['passed'], len(failed_nbs) + py['failed']
    print(f"notebooks: {len(nbs) - len(failed_nbs)} passed, {len(failed_nbs)} failed" + (f" ({', '.join(failed_nbs)})" if failed_nbs else ''))
    print(f"pytest: {py['passed']} passed, {py['failed']} failed, {py['skipped']} skipped")
    left = folder_bytes(scratch)
    if not failed: shutil.rmtree(scratch, ignore_errors=True)
    print(f"temp: the tests left {left / 2**20:,.0f} MiB in {scratch} ({'removed' if not failed else 'kept for inspection'})")
    print(f"total: {passed} passed, {failed} failed ({(time.time() - t0) / 60:.1f} min, {'fast tier' if a.fast else 'full suite'})")
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
