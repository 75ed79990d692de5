"""Run every test: the notebooks through `nbdev_test`, then pytest on tests/; end with one `N passed, N failed` line."""
import re, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bin_dir = Path(sys.executable).parent

def run(cmd):
    "Run `cmd` in the repo root, echoing its output; return (exit code, output)"
    print('$', ' '.join(map(str, cmd)), flush=True)
    proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, flush=True)
    return proc.returncode, proc.stdout

notebooks = [p for p in sorted((root/'nbs').rglob('*.ipynb'))
             if not any(part.startswith(('_', '.')) for part in p.relative_to(root/'nbs').parts)]
code, out = run([bin_dir/'nbdev_test', '--n_workers', '2', '--timing'])
failed_nbs = re.findall(r'^\t?\s*(\S+\.ipynb)\s*$', out.split('Failed On The Following Notebooks:')[-1], re.M) if code else []
if code and not failed_nbs: failed_nbs = ['nbdev_test']
nb_passed = len(notebooks) - len(failed_nbs)

code, out = run([sys.executable, '-m', 'pytest', '-q', '-rs', 'tests'])
counts = {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|error|errors|skipped)', out.strip().splitlines()[-1])} if out.strip() else {}
py_failed = counts.get('failed', 0) + counts.get('error', 0) + counts.get('errors', 0)
if code not in (0, 5) and py_failed == 0: py_failed = 1   # pytest itself broke (collection, usage)
passed, failed = nb_passed + counts.get('passed', 0), len(failed_nbs) + py_failed
print(f"notebooks: {nb_passed} passed, {len(failed_nbs)} failed" + (f" ({', '.join(failed_nbs)})" if failed_nbs else ''))
print(f"pytest: {counts.get('passed', 0)} passed, {py_failed} failed, {counts.get('skipped', 0)} skipped")
print(f"total: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
