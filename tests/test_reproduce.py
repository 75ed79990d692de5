"""`las-reproduce`: skip/hash/--force logic, failure reporting and resume, the `gpu` scale's whole path on CPU, and
determinism of the smoke tables."""
import json, os, subprocess, sys, tarfile
from pathlib import Path
import nbformat, pytest, torch
from learn_and_search.paper.archive import ARCHIVE_LIMIT
from learn_and_search.paper.reproduce import GridSpec, build_grid, main
from learn_and_search.paper.runner import Step, StepFailed, run_grid
import pytest
pytestmark = pytest.mark.slow   # trains, evaluates or runs the command lines: `make test`, not `make check`

def write_notebook(path, *sources:str, parameters:str|None=None)->Path:
    "A minimal notebook at `path`: a `parameters`-tagged cell (if given), then one code cell per source"
    cells = [nbformat.v4.new_code_cell(parameters, metadata={'tags': ['parameters']})] if parameters is not None else []
    nb = nbformat.v4.new_notebook(cells=cells + [nbformat.v4.new_code_cell(s) for s in sources],
                                  metadata={'kernelspec': dict(name='python3', display_name='python3', language='python')})
    nbformat.write(nb, str(path))
    return Path(path)

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

def _write(x, out):
    "The plain-Python twin of WRITE"
    Path(out).write_text(str(1 / x))

def test_python_runner_failure_and_resume(tmp_path):
    "The plain-Python runner: same records and skip rule, a failing function leaves its log, the grid resumes"
    nb = write_notebook(tmp_path/'w.ipynb', WRITE, parameters="x = 1\nout = 'o.txt'")
    steps = lambda xs: [Step(**{**vars(s), 'function': _write}) for s in _steps(tmp_path, nb, xs)]
    runs = tmp_path/'runs'
    with pytest.raises(StepFailed) as err:
        run_grid(steps((1, 0, 3)), runs, runner='python', log=lambda m: None)
    msg = str(err.value)
    for part in ("step 'b' failed", 'ZeroDivisionError', 'b.failed.log', 'run the same command again'):
        assert part in msg, (part, msg)
    assert 'ZeroDivisionError' in (runs/'b.failed.log').read_text()   # the traceback is kept
    assert run_grid(steps((1, 2, 3)), runs, runner='python', log=lambda m: None) == dict(a='skipped', b='ran', c='ran')
    assert json.loads((runs/'c.json').read_text())['runner'] == 'python' and (runs/'c.log').exists()
    assert not list(runs.glob('*.failed.*')) and not list(runs.glob('*.running.*'))
    # a step finished by one runner is up to date for the other
    assert run_grid(steps((1, 2, 3)), runs, log=lambda m: None) == dict(a='skipped', b='skipped', c='skipped')

def _count_to(n, out):
    "Append lines to `out` until it holds `n`, noting where each call started; Ctrl-C after the second line, once"
    p = Path(out); lines = p.read_text().split() if p.exists() else []
    with open(out + '.calls', 'a') as f: f.write(f'{len(lines)} ')
    while len(lines) < n:
        lines.append(str(len(lines))); p.write_text(' '.join(lines))
        if len(lines) == 2 and not Path(out + '.cut').exists(): Path(out + '.cut').touch(); raise KeyboardInterrupt

@pytest.mark.parametrize('resumable', [True, False])
def test_an_interrupted_resumable_step_continues_and_others_start_over(tmp_path, resumable):
    """Ctrl-C (or SIGTERM, raised as a KeyboardInterrupt) in a step: a training step continues from its outputs on the rerun
    of the same parameters, any other step (or a changed one) starts over"""
    nb = write_notebook(tmp_path/'w.ipynb', "pass", parameters="n = 1\nout = 'o.txt'")
    out = str(tmp_path/'t.txt')
    step = lambda n: [Step('t', nb, {'n': n, 'out': out}, [out], function=_count_to, resumable=resumable)]
    runs = tmp_path/'runs'
    with pytest.raises(KeyboardInterrupt): run_grid(step(4), runs, runner='python', log=lambda m: None)
    assert Path(out).read_text() == '0 1' and not (runs/'t.json').exists() and (runs/'t.started').exists()
    assert run_grid(step(4), runs, runner='python', log=lambda m: None) == dict(t='ran')
    assert Path(out).read_text() == '0 1 2 3' and not (runs/'t.started').exists()
    assert Path(out + '.calls').read_text().split() == (['0', '2'] if resumable else ['0', '0'])
    assert run_grid(step(5), runs, runner='python', log=lambda m: None) == dict(t='ran')   # changed: from scratch
    assert Path(out + '.calls').read_text().split()[-1] == '0' and Path(out).read_text() == '0 1 2 3 4'

def test_grid_training_steps_are_resumable(tmp_path):
    "Every train step of a grid resumes; TrainNotebook continues an out folder's last.pt (resume_if_exists)"
    steps = build_grid(GridSpec('smoke', tiny=True, runs=tmp_path/'runs', figures=tmp_path/'fig'))
    assert {s.name: s.resumable for s in steps} == {s.name: s.name.startswith('train-') for s in steps}
    assert steps[-1].parameters['command'] == 'las-reproduce --scale smoke'           # what the README names
    assert build_grid(GridSpec('mini', ['model4'], data='synthetic', train_data='synthetic', pairs=5000, runs=tmp_path/'r',
                               figures=tmp_path/'f'))[-1].parameters['command'] \
        == 'las-reproduce --scale mini --models model4 --pairs 5000'
    from learn_and_search.paper.notebooks import TrainNotebook
    out = tmp_path/'tr'
    first = TrainNotebook(dim=32, steps=2, out=str(out)).run()
    again = TrainNotebook(dim=32, steps=3, out=str(out)).run()    # resumed: one more step, not three
    assert (first['step'], again['step']) == (2, 3)
    assert [json.loads(l)['step'] for l in (out/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3]

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
    params = {st.notebook.name: st.parameters for st in build_grid(GridSpec('smoke', models=['model1'], tiny=True))}
    cell = lambda name: '\n'.join(f'{k} = {v!r}' for k, v in params[name].items())
    mk = "from pathlib import Path\nout = Path(out); out.mkdir(parents=True, exist_ok=True)"
    write_notebook(d/'train.ipynb', mk, "(out/'checkpoints').mkdir(exist_ok=True); (out/'checkpoints'/'last.pt').write_text(preset)",
                   "(out/'metrics.jsonl').write_text('{}'); (out/'config.json').write_text('{}')", parameters=cell('train.ipynb'))
    write_notebook(d/'evaluate.ipynb', mk, "raise ValueError('boom: checkpoint unusable')" if fail_in == 'evaluate' else "pass",
                   "(out/'metrics.json').write_text(Path(checkpoint).read_text()); (out/'heatmaps.npz').write_text('')",
                   parameters=cell('evaluate.ipynb'))
    write_notebook(d/'figures.ipynb', mk, "(out/'README.md').write_text(' '.join(models))", parameters=cell('figures.ipynb'))
    return d

def test_cli_grid_failure_and_resume(tmp_path, capsys):
    args = ['--scale', 'smoke', '--tiny', '--models', 'model1', '--runs', str(tmp_path/'runs'),
            '--figures', str(tmp_path/'figures'), '--runner', 'papermill']
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
    index = (tmp_path/'figures'/'README.md').read_text()   # smoke is git-ignored: the index does not link it
    assert '(smoke/README.md)' not in index and '--preset' not in index
    assert main(args + ['--notebooks', str(good)]) == 0
    out = capsys.readouterr().out
    assert out.count('up to date, skipped') == 3 and 'figures: up to date' in out, out
    assert (tmp_path/'figures'/'README.md').read_text() == index   # regenerated identically

def test_bad_arguments(capsys):
    with pytest.raises(SystemExit): main(['--scale', 'smoke', '--models', 'model9', '--dry-run'])
    assert 'model9' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown scale'): build_grid(GridSpec('large'))
    with pytest.raises(SystemExit): main(['--scale', 'gpu', '--pairs', '0', '--dry-run'])
    assert '--pairs must be >= 1' in capsys.readouterr().err

def test_preset_is_refused(capsys):
    "`--preset`, the old name of `--scale`, is gone: a usage error (las-train --preset names a model preset)"
    with pytest.raises(SystemExit) as e: main(['--preset', 'smoke', '--dry-run', '--tiny', '--models', 'model1'])
    assert e.value.code == 2 and 'unrecognized arguments: --preset smoke' in capsys.readouterr().err
    assert main(['--scale', 'smoke', '--dry-run', '--tiny', '--models', 'model1']) == 0
    assert 'train-model1' in capsys.readouterr().out

def test_errors_are_one_line(tmp_path, capsys):
    "Expected errors (a missing archive, a bad one) end as one `las-reproduce: error:` line, status 2"
    assert main(['--scale', 'smoke', '--from-archive', str(tmp_path/'none.tar.gz'), '--runs', str(tmp_path/'r')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('las-reproduce: error: archive not found') and err.count('\n') == 1, err
    (tmp_path/'bad.tar.gz').write_bytes(b'not a tar')
    assert main(['--scale', 'smoke', '--from-archive', str(tmp_path/'bad.tar.gz'), '--runs', str(tmp_path/'r')]) == 2
    assert 'cannot read archive' in capsys.readouterr().err

def test_bad_arguments_are_refused_before_any_step(tmp_path, capsys):
    "A missing data folder, an unusable device or a file given as --runs stop las-reproduce before its first step"
    runs = tmp_path/'r'
    for argv, says in [(['--data', str(tmp_path/'nonexist')], 'does not exist'),
                       (['--runs', str(tmp_path/'afile')], "--runs"),
                       *([(['--device', 'cuda'], '--device')] if not torch.cuda.is_available() else [])]:
        (tmp_path/'afile').write_text('x')
        with pytest.raises(SystemExit) as e: main(['--scale', 'smoke', '--tiny', '--models', 'model1', '--runs', str(runs), *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err, argv
        assert not (runs/'smoke').exists()   # nothing ran

def _tables(root:Path)->dict:
    "Relative path -> text of every CSV and Markdown table under `root`"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob('*')) if p.suffix in ('.csv', '.md')
            and p.name != 'README.md'}

def _shared(name:str):
    "A folder of ../shared/data, or None"
    p = Path(__file__).resolve().parent.parent.parent/'shared'/'data'/name
    return str(p) if p.exists() else None

GPU_MISSING = ('papermill', 'nbformat', 'nbclient', 'jupyter_client', 'ipykernel', 'IPython', 'pycocotools', 'faiss',
               'fastcore', 'nbdev', 'execnb')   # not on the GPU machine: imports of these fail in the script's Python

def _staged_wheels()->set:
    "Packages scripts/gpu_stage.sh carries as wheels (its rule: pycocotools while the package imports it at module level)"
    src = (Path(__file__).resolve().parent.parent/'learn_and_search').rglob('*.py')
    return {'pycocotools'} if any(l.startswith(('from pycocotools', 'import pycocotools'))
                                  for p in src for l in p.read_text().splitlines()) else set()

def test_gpu_scale_end_to_end_on_cpu(tmp_path, monkeypatch, capsys):
    """scripts/gpu_run.sh with a tiny override on CPU, as the GPU machine runs it: a Python where papermill, Jupyter,
    pycocotools, faiss and fastcore cannot be imported; split across two calls (resumed by parameter hash); one archive.
    Then, on 'another machine', the figures are redrawn from the archive alone, through the figures notebook."""
    repo = Path(__file__).resolve().parent.parent
    block, bin_dir = tmp_path/'block', tmp_path/'bin'
    block.mkdir(); bin_dir.mkdir()
    (block/'sitecustomize.py').write_text(
        "import sys\nclass _Missing:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(set(GPU_MISSING) - _staged_wheels())!r}: raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n")
    (bin_dir/'python3').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n'); (bin_dir/'python3').chmod(0o755)
    env = {**os.environ, 'PATH': f"{bin_dir}:{os.environ['PATH']}", 'PYTHONPATH': str(block), 'OMP_NUM_THREADS': '1',
           'LAS_RUNS': str(tmp_path/'gpu'/'runs'), 'LAS_FIGURES': str(tmp_path/'gpu'/'figures')}
    data = _shared('coco-mini-320') or 'synthetic'
    train = (_shared('coco-unlabeled-256') and _shared('coco-unlabeled-256') + '/images') or 'synthetic'
    common = ['--tiny', '--data', data, '--train-data', train]
    script = lambda *args: subprocess.run(['bash', str(repo/'scripts'/'gpu_run.sh'), str(tmp_path/'out'), *common,
                                           '--device', 'cpu', *args], env=env, capture_output=True, text=True)
    first = script('--models', 'model1')                                   # a lease that ended after one model
    assert first.returncode == 0, first.stdout + first.stderr
    second = script('--models', 'model1,robust')
    assert second.returncode == 0, second.stdout + second.stderr
    log = (tmp_path/'out'/'gpu_run.log').read_text()
    assert 'train-model1: up to date, skipped' in log and 'evaluate-model1: up to date, skipped' in log, log
    assert 'train-robust: done in' in log and 'las-reproduce exit 0' in log and 'archive ' in log, log
    runs = tmp_path/'gpu'/'runs'/'gpu'
    for m in ('model1', 'robust'):
        rec = json.loads((runs/f'evaluate-{m}.json').read_text())
        assert rec['runner'] == 'python' and (runs/f'evaluate-{m}.log').exists()
        for f in ('metrics.json', 'heatmaps.npz', 'sga_standard.csv'): assert (runs/'eval'/m/f).is_file(), f
    archive = tmp_path/'out'/'gpu.tar.gz'
    assert archive.stat().st_size <= ARCHIVE_LIMIT
    with tarfile.open(archive) as t: names = t.getnames()
    assert not any(n.endswith('.pt') for n in names) and 'runs/gpu/eval/robust/heatmaps.npz' in names
    # another machine: no checkpoints, the figures step only (papermill where installed)
    monkeypatch.chdir(tmp_path)
    assert main(['--scale', 'gpu', *common, '--models', 'model1,robust', '--from-archive', str(archive),
                 '--runs', 'cpu/runs', '--figures', 'cpu/figures']) == 0
    assert not list((tmp_path/'cpu'/'runs').rglob('*.pt'))
    fig = tmp_path/'cpu'/'figures'/'gpu'
    for f in ('README.md', 'sga_standard.csv', 'loss_dynamics.png', 'heatmaps_robust.png'): assert (fig/f).is_file(), f
    if data != 'synthetic': assert (fig/'top5_robust.png').is_file()
    assert _tables(fig) == _tables(tmp_path/'gpu'/'figures'/'gpu')   # the same tables as drawn on the GPU machine
    assert 'las-reproduce --scale gpu' in (fig/'README.md').read_text()

def test_smoke_tables_are_deterministic(tmp_path, monkeypatch):
    "The (reduced) smoke grid run twice with the same seed on CPU writes identical tables"
    monkeypatch.setenv('OMP_NUM_THREADS', '1')   # the kernels inherit it: fast on a busy machine, same order of sums
    tables = []
    for run in ('one', 'two'):
        d = tmp_path/run
        assert main(['--scale', 'smoke', '--tiny', '--models', 'model1', '--device', 'cpu', '--seed', '0',
                     '--runs', str(d/'runs'), '--figures', str(d/'figures')]) == 0
        tables.append(_tables(d/'figures') | {f'eval/{k}': v for k, v in _tables(d/'runs'/'smoke'/'eval').items()})
    assert tables[0] and any(k.endswith('.csv') for k in tables[0])
    assert tables[0] == tables[1]
