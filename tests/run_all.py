"""Run every test: the notebooks as `nbdev_test` runs them (its own `test_nb`, one result per notebook), then pytest on
tests/ (counts read from its JUnit XML report); end with one `N passed, N failed` line. About 20 minutes on 2 idle cores (19.4 min on an AMD EPYC with AVX2 only).
Everything the tests write to the temp folder goes to one scratch folder of this run (the checkpoints of the training tests
are hundreds of MB each): its size is reported, and it is removed when every test passed (kept for inspection otherwise)."""
import os, shutil, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def notebook_results(n_workers:int=2, files=None)->list:
    "(notebook, passed, seconds) for every notebook nbdev_test would test, through nbdev's own `test_nb`"
    from fastcore.parallel import parallel
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file, test_nb
    cfg = get_config(path=root)
    files = [Path(f).absolute() for f in sorted(files or nbglob(cfg.nbs_path, as_path=True))
             if _keep_file(Path(f).absolute(), '.notest')]   # the selection nbdev_test makes (folders with .notest are skipped)
    with working_directory(cfg.nbs_path):
        results = parallel(test_nb, files, skip_flags=cfg.tst_flags.split(), force_flags=[], n_workers=n_workers,
                           basepath=cfg.config_path, pause=0.01)
    return [(f.relative_to(cfg.nbs_path) if f.is_relative_to(cfg.nbs_path) else f, ok, t) for f, (ok, t) in zip(files, results)]

def pytest_counts(args=('tests',))->dict:
    "passed / failed / skipped counts of `pytest args`, from its JUnit XML report"
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d)/'pytest.xml'
        print('$ pytest -q -rs', *args, flush=True)
        code = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', f'--junitxml={xml}', *args], cwd=root).returncode
        if not xml.exists(): return dict(passed=0, failed=1, skipped=0)   # pytest itself broke (usage, collection)
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == 'testsuite' else list(suites)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
    failed = n['failures'] + n['errors'] + (1 if code not in (0, 5) and not (n['failures'] + n['errors']) else 0)
    return dict(passed=n['tests'] - n['failures'] - n['errors'] - n['skipped'], failed=failed, skipped=n['skipped'])

def folder_bytes(folder:Path)->int:
    "Bytes of the regular files under `folder` (links not followed)"
    return sum(f.lstat().st_size for f in folder.rglob('*') if f.is_file() and not f.is_symlink())

if __name__ == '__main__':
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix='las-tests-'))   # TMPDIR of every test: notebooks, pytest and their children
    os.environ['TMPDIR'] = tempfile.tempdir = str(scratch)
    print('$ nbdev_test (nbdev.test.test_nb on every notebook, 2 workers)', flush=True)
    nbs = notebook_results()
    for nb, ok, t in sorted(nbs, key=lambda r: -r[2]): print(f"  {'ok  ' if ok else 'FAIL'} {t:6.0f} s  {nb}")
    failed_nbs = [str(nb) for nb, ok, _ in nbs if not ok]
    py = pytest_counts()
    passed, failed = len(nbs) - len(failed_nbs) + py['passed'], len(failed_nbs) + py['failed']
    print(f"notebooks: {len(nbs) - len(failed_nbs)} passed, {len(failed_nbs)} failed" + (f" ({', '.join(failed_nbs)})" if failed_nbs else ''))
    print(f"pytest: {py['passed']} passed, {py['failed']} failed, {py['skipped']} skipped")
    left = folder_bytes(scratch)
    if not failed: shutil.rmtree(scratch, ignore_errors=True)
    print(f"temp: the tests left {left / 2**20:,.0f} MiB in {scratch} ({'removed' if not failed else 'kept for inspection'})")
    print(f"total: {passed} passed, {failed} failed ({(time.time() - t0) / 60:.1f} min)")
    sys.exit(1 if failed else 0)
