"""`las-reproduce`: skip/hash/--force logic, failure reporting and resume, and determinism of the smoke tables."""
import importlib.util, json, os
from pathlib import Path
import pytest
from learn_and_search.reproduce import Step, StepFailed, build_grid, main, run_grid, write_notebook

def _steps(d:Path, nb:Path, x=(1, 2, 3)):
    "A chain of three steps of notebook `nb`, each writing its `x` to d/<name>.txt"
    names = ['a', 'b', 'c']
    return [Step(n, nb, {'x': v, 'out': str(d/f'{n}.txt')}, [str(d/f'{n}.txt')], after=names[:i])
            for i, (n, v) in enumerate(zip(names, x))]

WRITE = "from pathlib import Path\nPath(out).write_text(str(1 / x))"

def test_skip_hash_force(tmp_path):
    nb = write_notebook(tmp_path/'w.ipynb', WRITE, parameters="x = 1\nout = 'o.txt'")
    runs, logs = tmp_path/'runs', []
    steps = _steps(tmp_path, nb)
    assert run_grid(steps, runs, log=logs.append) == dict(a='ran', b='ran', c='ran')
    assert (tmp_path/'c.txt').read_text() == str(1/3)
    rec = json.loads((runs/'b.json').read_text())
    assert rec['parameters'] == {'x': 2, 'out': str(tmp_path/'b.txt')} and len(rec['hash']) == 64 and rec['elapsed_s'] > 0
    assert (runs/'b.ipynb').exists() and not list(runs.glob('*.running.ipynb'))
    assert any('b: running' in l and 'x=2' in l for l in logs) and any('b: done in' in l for l in logs)
    # unchanged: everything skipped
    assert run_grid(steps, runs, log=logs.append) == dict(a='skipped', b='skipped', c='skipped')
    # --force: everything runs
    assert run_grid(steps, runs, force=True, log=logs.append) == dict(a='ran', b='ran', c='ran')
    # a changed parameter re-runs that step and the ones after it
    assert run_grid(_steps(tmp_path, nb, (1, 5, 3)), runs, log=logs.append) == dict(a='skipped', b='ran', c='ran')
    # a missing output re-runs its step (and downstream, which reads it)
    (tmp_path/'a.txt').unlink()
    assert run_grid(_steps(tmp_path, nb, (1, 5, 3)), runs, log=logs.append) == dict(a='ran', b='ran', c='ran')
    # an edited notebook re-runs everything that uses it; executing it (outputs only) would not
    write_notebook(nb, WRITE + "\n# edited", parameters="x = 1\nout = 'o.txt'")
    assert run_grid(_steps(tmp_path, nb, (1, 5, 3)), runs, log=logs.append) == dict(a='ran', b='ran', c='ran')

def test_failure_stops_and_resumes(tmp_path):
    nb = write_notebook(tmp_path/'w.ipynb', "y = 2 * x", WRITE, parameters="x = 1\nout = 'o.txt'")
    runs = tmp_path/'runs'
    with pytest.raises(StepFailed) as err:
        run_grid(_steps(tmp_path, nb, (1, 0, 3)), runs, log=lambda m: None)
    msg = str(err.value)
    for part in ("step 'b' failed", str(nb), 'x=0', f"out={str(tmp_path/'b.txt')!r}", 'ZeroDivisionError',
                 'Path(out).write_text(str(1 / x))', 'In [4]', 'b.failed.ipynb', 'run the same command again'):
        assert part in msg, (part, msg)
    assert (runs/'a.json').exists() and not (runs/'b.json').exists() and not (runs/'c.json').exists()
    assert (runs/'b.failed.ipynb').exists() and not (tmp_path/'c.txt').exists()
    # fixed: the finished step is kept, the grid resumes at the failed one
    assert run_grid(_steps(tmp_path, nb, (1, 2, 3)), runs, log=lambda m: None) == dict(a='skipped', b='ran', c='ran')
    assert not (runs/'b.failed.ipynb').exists()

def test_missing_output_or_parameter_is_a_failure(tmp_path):
    nb = write_notebook(tmp_path/'w.ipynb', "pass", parameters="x = 1\nout = 'o.txt'")
    with pytest.raises(StepFailed, match='did not write'):
        run_grid(_steps(tmp_path, nb)[:1], tmp_path/'runs', log=lambda m: None)
    st = Step('a', nb, {'x': 1, 'out': 'o.txt', 'lr': 0.1})
    with pytest.raises(StepFailed, match="has no parameter lr in its cell tagged 'parameters'"):
        run_grid([st], tmp_path/'runs', log=lambda m: None)

def _fake_paper(d:Path, fail_in:str|None=None)->Path:
    "Stand-ins for nbs/paper with the grid's parameter names, which only write the outputs the driver expects"
    d.mkdir(parents=True, exist_ok=True)
    params = {st.notebook.name: st.parameters for st in build_grid('smoke', models=['model1'], tiny=True)}
    cell = lambda name: '\n'.join(f'{k} = {v!r}' for k, v in params[name].items())
    mk = "from pathlib import Path\nout = Path(out); out.mkdir(parents=True, exist_ok=True)"
    write_notebook(d/'train.ipynb', mk, "(out/'checkpoints').mkdir(exist_ok=True); (out/'checkpoints'/'last.pt').write_text(preset)",
                   "(out/'metrics.jsonl').write_text('{}')", parameters=cell('train.ipynb'))
    write_notebook(d/'evaluate.ipynb', mk, "raise ValueError('boom: checkpoint unusable')" if fail_in == 'evaluate' else "pass",
                   "(out/'metrics.json').write_text(Path(checkpoint).read_text())", parameters=cell('evaluate.ipynb'))
    write_notebook(d/'figures.ipynb', mk, "(out/'README.md').write_text(' '.join(models))", parameters=cell('figures.ipynb'))
    return d

def test_cli_grid_failure_and_resume(tmp_path, capsys):
    args = ['--preset', 'smoke', '--tiny', '--models', 'model1', '--runs', str(tmp_path/'runs'),
            '--figures', str(tmp_path/'figures')]
    assert main(args + ['--notebooks', str(_fake_paper(tmp_path/'bad', 'evaluate'))]) == 1
    err = capsys.readouterr().err
    assert "step 'evaluate-model1' failed" in err and 'evaluate.ipynb' in err and 'ValueError: boom' in err
    assert "checkpoint='" in err and "raise ValueError('boom" in err
    assert (tmp_path/'runs'/'smoke'/'train-model1.json').exists()
    good = _fake_paper(tmp_path/'good')
    assert main(args + ['--notebooks', str(good)]) == 0
    out = capsys.readouterr().out
    assert 'train-model1: up to date, skipped' in out   # resumes after the finished step
    assert 'evaluate-model1: done in' in out
    assert (tmp_path/'figures'/'smoke'/'README.md').read_text() == 'model1'
    assert '[smoke](smoke/README.md)' in (tmp_path/'figures'/'README.md').read_text()
    assert main(args + ['--notebooks', str(good)]) == 0
    out = capsys.readouterr().out
    assert out.count('up to date, skipped') == 3 and 'figures: up to date' in out, out

def test_bad_arguments(capsys):
    with pytest.raises(SystemExit): main(['--preset', 'smoke', '--models', 'model9', '--dry-run'])
    assert 'model9' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown preset'): build_grid('large')

def _tables(root:Path)->dict:
    "Relative path -> text of every CSV and Markdown table under `root`"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob('*')) if p.suffix in ('.csv', '.md')
            and p.name != 'README.md'}

@pytest.mark.skipif(any(importlib.util.find_spec(f'learn_and_search.{m}') is None for m in ('train', 'evaluate', 'search')),
                    reason='learn_and_search.train/evaluate/search not built yet')
def test_smoke_tables_are_deterministic(tmp_path, monkeypatch):
    "The (reduced) smoke grid run twice with the same seed on CPU writes identical tables"
    monkeypatch.setenv('OMP_NUM_THREADS', '1')   # the kernels inherit it: fast on a busy machine, same order of sums
    tables = []
    for run in ('one', 'two'):
        d = tmp_path/run
        assert main(['--preset', 'smoke', '--tiny', '--models', 'model1', '--device', 'cpu', '--seed', '0',
                     '--runs', str(d/'runs'), '--figures', str(d/'figures')]) == 0
        tables.append(_tables(d/'figures') | {f'eval/{k}': v for k, v in _tables(d/'runs'/'smoke'/'eval').items()})
    assert tables[0] and any(k.endswith('.csv') for k in tables[0])
    assert tables[0] == tables[1]
