"""Tests of `las-train` that need real processes or real photos: kill -9 and resume, the run-folder lock, one-line
errors, 2-process DDP, learning on COCO."""
import contextlib, io, json, os, signal, stat, subprocess, sys, time
from pathlib import Path

import pytest, torch
pytestmark = pytest.mark.slow   # trains, evaluates or runs the command lines: `make test`, not `make check`

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--data', 'synthetic', '--image-size', '64', '--query-size', '32', '--batch-size', '4', '--dim', '32',
        '--levels', 'P3', 'P4', '--limit-images', '48', '--seed', '3']

def env(**extra):
    "Environment of a child: the repo importable, one thread each (the machine is shared)"
    e = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1'}
    return {**e, **extra}

def las_train(*args):
    "Command line of `las-train` (the console script when installed, else `python -m learn_and_search.learn.train`)"
    return [sys.executable, '-m', 'learn_and_search.learn.train', *map(str, args)]

def weights(run:Path)->dict:
    from learn_and_search.learn.checkpoint import load_checkpoint
    return load_checkpoint(run/'checkpoints'/'last.pt')

def metric_lines(run:Path)->list:
    return [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]


def test_bad_config_fails_before_training(tmp_path):
    p = subprocess.run(las_train('--lr', '-0.01', '--out', tmp_path/'r'), env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and 'TrainConfig.lr=-0.01' in p.stderr, p.stderr
    p = subprocess.run(las_train('--data', tmp_path/'missing', '--out', tmp_path/'r'), env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and str(tmp_path/'missing') in p.stderr, p.stderr
    assert not (tmp_path/'r').exists()


def test_kill_9_and_resume_with_the_cache_is_bit_identical_to_the_dataloader_run(tmp_path):
    """A run on the image cache killed with SIGKILL after its first checkpoint and resumed ends with the weights of an
    uninterrupted run that decoded its images in DataLoader workers (`--no-cache`)"""
    common = [*TINY, '--steps', '8', '--checkpoint-every', '2', '--cache-dir', tmp_path/'cache']
    full, cut = tmp_path/'full', tmp_path/'cut'
    subprocess.run(las_train(*common, '--no-cache', '--workers', '1', '--out', full), env=env(), cwd=ROOT, check=True,
                   capture_output=True)

    proc = subprocess.Popen(las_train(*common, '--out', cut), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut/'checkpoints'/'step_0000002.pt').exists():
        assert proc.poll() is None, 'training ended before its first checkpoint'
        assert time.time() < deadline, 'no checkpoint within 5 minutes'
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = weights(cut)['step']
    assert proc.returncode == -signal.SIGKILL and 2 <= killed_at < 8, (proc.returncode, killed_at)

    subprocess.run(las_train(*common, '--out', cut, '--resume'), env=env(), cwd=ROOT, check=True, capture_output=True)
    a, b = weights(full), weights(cut)
    assert a['step'] == b['step'] == 8
    for part in ('model', 'optimizer'):
        fa, fb = _flat(a[part]), _flat(b[part])
        assert fa.keys() == fb.keys()
        bad = [k for k in fa if not (torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k])]
        assert not bad, f'{part} differs after resume: {bad[:5]}'
    la, lb = metric_lines(full), metric_lines(cut)
    assert [l['step'] for l in lb] == list(range(1, 9)), 'metrics.jsonl must hold each step exactly once'
    assert [l['loss'] for l in la] == [l['loss'] for l in lb]

def test_sigterm_stops_cleanly_and_leaves_nothing_partial(tmp_path):
    """`kill PID` (SIGTERM) is handled like Ctrl-C: one line, exit status 143, and before the first checkpoint nothing of
    the run is left (no config.json, metrics.jsonl, checkpoints/ or stale lock), so the same command starts afresh"""
    run = tmp_path/'r'
    proc = subprocess.Popen(las_train(*TINY, '--steps', '50', '--log-every', '1', '--checkpoint-every', '1000', '--cache-dir', tmp_path/'cache',
                                      '--out', run), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run/'metrics.jsonl').is_file() and (run/'metrics.jsonl').read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, 'no training step within 5 minutes'
        time.sleep(0.02)
    t0 = time.time(); proc.send_signal(signal.SIGTERM); err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and 'las-train: terminated' in err, (proc.returncode, err[-500:])
    assert time.time() - t0 < 30
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())

def _flat(d, prefix=''):
    "Nested dicts/lists -> {path: leaf}"
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        if isinstance(v, (dict, list, tuple)): out.update(_flat(v, f'{prefix}{k}.'))
        else: out[f'{prefix}{k}'] = v
    return out


# ---- the run folder and one-line errors (issue 12) --------------------------------------------------------------------
def cli(*args)->tuple:
    "(status, stderr) of `las-train args` run in this process"
    from learn_and_search.learn.train import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main([str(a) for a in args])
    return code, err.getvalue()

def tiny(tmp_path, *extra):
    return [*TINY, '--steps', '2', '--checkpoint-every', '1', '--cache-dir', tmp_path/'cache', *extra]

def assert_one_line_error(code, err, *words):
    lines = [l for l in err.splitlines() if l.startswith('las-train: error: ')]
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err and 'weights_only' not in err, (code, err)
    for w in words: assert str(w) in lines[0], (w, lines[0])

def test_second_las_train_on_the_same_out_is_refused_naming_the_holder(tmp_path):
    "Two real processes on one --out: the second stops at once with an error naming the first (pid), the first finishes"
    out = tmp_path/'run'
    first = subprocess.Popen(las_train(*tiny(tmp_path, '--steps', '6', '--out', out)), env=env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out/'.lock').exists() and (out/'.lock').read_text()):
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline; time.sleep(0.02)
    second = subprocess.run(las_train(*tiny(tmp_path, '--seed', '1', '--out', out)), env=env(), cwd=ROOT,
                            capture_output=True, text=True)
    assert second.returncode == 2 and f'in use by process {first.pid}' in second.stderr, second.stderr
    assert second.stderr.count('\n') == 1, second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert json.loads((out/'config.json').read_text())['seed'] == 3 and weights(out)['step'] == 6

def _coco_with_a_bad_image(tmp_path)->Path:
    "A copy of the synthetic COCO set with its 5th image replaced by garbage"
    import shutil
    from learn_and_search.data.synthetic import synthetic_coco
    root = tmp_path/'coco'; shutil.copytree(synthetic_coco(), root)
    bad = sorted((root/'train2017').iterdir())[4]; bad.write_bytes(b'not a jpeg')
    return root

def test_unreadable_image_is_a_one_line_error_naming_it_and_the_skip_flag(tmp_path):
    root = _coco_with_a_bad_image(tmp_path)
    bad = sorted((root/'train2017').iterdir())[4]
    for extra in ([], ['--no-cache', '--workers', '0']):
        code, err = cli(*tiny(tmp_path, '--data', root, '--out', tmp_path/'r', *extra))
        assert_one_line_error(code, err, bad.name, '--skip-unreadable')
        assert not (tmp_path/'r').exists()

def test_skip_unreadable_decides_before_step_1_and_names_the_skipped(tmp_path):
    "With --skip-unreadable the bad image is left out before step 1 (count and name logged), on both inputs alike"
    root = _coco_with_a_bad_image(tmp_path)
    bad = sorted((root/'train2017').iterdir())[4]
    for name, extra in (('cached', []), ('loader', ['--no-cache', '--workers', '0'])):
        code, err = cli(*tiny(tmp_path, '--data', root, '--skip-unreadable', '--out', tmp_path/name, *extra))
        assert code == 0, err
        assert 'skipped 1 unreadable image' in err and bad.name in err, err
    a, b = weights(tmp_path/'cached'), weights(tmp_path/'loader')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])

def test_expected_errors_are_one_line(tmp_path):
    "Bad COCO file, batch larger than the data, --out a file, changed settings, corrupt/hostile checkpoints, bad --weights, bad YAML"
    good = tmp_path/'good'
    assert cli(*tiny(tmp_path, '--out', good))[0] == 0
    coco = tmp_path/'badcoco'; (coco/'annotations').mkdir(parents=True); (coco/'train2017').mkdir()
    (coco/'annotations'/'instances_train2017.json').write_text('{"images": [')
    (tmp_path/'afile').write_text('x')
    (tmp_path/'bad.yaml').write_text('lr: [0.1\n')
    class Evil:
        def __reduce__(self): return (os.system, ('echo pwned',))
    torch.save({'x': Evil()}, tmp_path/'evil.pt')
    cases = [(['--data', coco], ['instances_train2017.json']),
             (['--batch-size', '64'], ['48 images', 'batch_size=64']),
             (['--out', tmp_path/'afile'], ['afile', 'is a file']),
             (['--out', good, '--resume', '--lr', '0.5'], ['settings changed', 'lr']),
             (['--weights', tmp_path/'evil.pt'], ['evil.pt', 'pickled']),
             (['--weights', tmp_path/'missing.pt'], ['missing.pt']),
             (['--config', tmp_path/'bad.yaml'], ['bad.yaml', 'does not parse'])]
    for extra, words in cases:
        out = [] if '--out' in extra else ['--out', tmp_path/'fresh']
        code, err = cli(*tiny(tmp_path, *out, *extra))
        assert_one_line_error(code, err, *words)
        assert not (tmp_path/'fresh').exists(), extra
    (good/'checkpoints'/'last.pt').write_bytes((good/'checkpoints'/'last.pt').read_bytes()[:1000])
    assert_one_line_error(*cli(*tiny(tmp_path, '--out', good, '--resume')), 'last.pt', 'truncated')
    os.replace(tmp_path/'evil.pt', good/'checkpoints'/'last.pt')
    assert_one_line_error(*cli(*tiny(tmp_path, '--out', good, '--resume')), 'last.pt', 'pickled')

def test_resume_without_a_checkpoint_is_an_error_unless_resume_if_exists(tmp_path):
    assert_one_line_error(*cli(*tiny(tmp_path, '--out', tmp_path/'r', '--resume')), 'nothing to resume', '--resume-if-exists')
    assert not (tmp_path/'r').exists()
    assert cli(*tiny(tmp_path, '--out', tmp_path/'r', '--resume-if-exists'))[0] == 0
    assert weights(tmp_path/'r')['step'] == 2
    assert cli(*tiny(tmp_path, '--out', tmp_path/'r', '--resume-if-exists', '--steps', '3'))[0] == 0
    assert weights(tmp_path/'r')['step'] == 3

def test_resume_compares_data_folders_after_resolving_them(tmp_path, monkeypatch):
    import shutil
    from learn_and_search.data.synthetic import synthetic_coco
    shutil.copytree(synthetic_coco(), tmp_path/'clean')
    monkeypatch.chdir(tmp_path)
    assert cli(*tiny(tmp_path, '--data', 'clean', '--out', tmp_path/'r'))[0] == 0
    code, err = cli(*tiny(tmp_path, '--data', tmp_path/'clean', '--out', tmp_path/'r', '--resume', '--steps', '3'))
    assert code == 0, err

def test_resume_with_fewer_steps_leaves_config_json_agreeing_with_the_checkpoint(tmp_path):
    run = tmp_path/'r'
    assert cli(*tiny(tmp_path, '--out', run, '--steps', '3'))[0] == 0
    code, err = cli(*tiny(tmp_path, '--out', run, '--resume', '--steps', '2'))
    assert code == 0 and 'nothing to do' in err, err
    assert json.loads((run/'config.json').read_text())['steps'] == weights(run)['config']['steps'] == 3
    assert cli(*tiny(tmp_path, '--out', run, '--resume', '--steps', '4'))[0] == 0   # more steps: both say 4
    assert json.loads((run/'config.json').read_text())['steps'] == weights(run)['config']['steps'] == 4

def test_a_failed_run_leaves_nothing_it_created(tmp_path):
    "A run that fails before its first checkpoint removes its config.json, metrics.jsonl, checkpoints/ (and a new --out)"
    existing = tmp_path/'existing'; existing.mkdir(); (existing/'notes.txt').write_text('mine')
    for out in (tmp_path/'new'/'run', existing):
        code, err = cli(*tiny(tmp_path, '--out', out, '--batch-size', '64'))
        assert code == 2, err
    assert not (tmp_path/'new').exists()
    assert sorted(p.name for p in existing.iterdir()) == ['notes.txt']

def test_outputs_follow_the_umask_and_old_periodic_checkpoints_are_pruned(tmp_path):
    old = os.umask(0o027)
    try: code, err = cli(*tiny(tmp_path, '--out', tmp_path/'r', '--steps', '5', '--keep-checkpoints', '2'))
    finally: os.umask(old)
    assert code == 0, err
    run = tmp_path/'r'
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['last.pt', 'step_0000004.pt', 'step_0000005.pt']
    periodic, last = (torch.load(run/'checkpoints'/n, weights_only=True) for n in ('step_0000005.pt', 'last.pt'))
    assert 'optimizer' not in periodic and 'optimizer' in last and periodic['step'] == last['step'] == 5   # weights only
    assert all(torch.equal(periodic['model'][k], v) for k, v in last['model'].items())
    assert (run/'checkpoints'/'step_0000005.pt').stat().st_size < 0.5 * (run/'checkpoints'/'last.pt').stat().st_size
    for p in ('config.json', 'metrics.jsonl', 'checkpoints/last.pt', 'checkpoints/step_0000005.pt'):
        assert stat.S_IMODE((run/p).stat().st_mode) == 0o640, p
    assert stat.S_IMODE((run/'checkpoints').stat().st_mode) == 0o750


# ---- distributed -----------------------------------------------------------------------------------------------------
def _tiny_model():
    from learn_and_search.learn.models import create_model
    torch.manual_seed(0)
    return create_model('model1', dim=16, levels=('P3', 'P4')).eval()   # eval: BatchNorm uses running statistics

def _model_batch(B=4, S=64, q=32):
    g = torch.Generator().manual_seed(1)
    scenes = torch.rand(B, 3, S, S, generator=g); crops = torch.rand(B, 3, q, q, generator=g)
    boxes = torch.tensor([[4., 8, 20, 16], [30, 30, 16, 20], [10, 40, 24, 12], [40, 2, 12, 12]])
    return crops, scenes, boxes

def _ddp_worker(rank, world, store, out_dir):
    import torch.distributed as dist
    from learn_and_search.learn.loss import AntXentLoss
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    # levels P3, P4 only: P5's output conv and P6/P7 get no gradient, so DDP must be told (as `train` does)
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model(), find_unused_parameters=True)
    crops, scenes, mboxes = _model_batch()
    ms = slice(rank * 2, rank * 2 + 2)
    query, mgrids = model(crops[ms], scenes[ms])
    mout = AntXentLoss(temperature=0.1)(query, mgrids, mboxes[ms], 64)
    mout.loss.backward()
    mloss = mout.loss.detach().clone(); dist.all_reduce(mloss); mloss /= world
    torch.save(dict(model_loss=mloss, param_grads={n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}),
               f'{out_dir}/rank{rank}.pt')
    dist.destroy_process_group()

def test_ddp_model_loss_and_gradients_equal_single_process(tmp_path):
    """2 gloo ranks, each with half of the global batch, give the single-process loss and parameter gradients through DDP
    and the real model (the loss alone on embeddings is pinned in tests/test_loss.py, the one copy of that check)"""
    import torch.multiprocessing as mp
    from learn_and_search.learn.loss import AntXentLoss
    mp.spawn(_ddp_worker, args=(2, str(tmp_path/'store'), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2)]
    model = _tiny_model()
    crops, scenes, mboxes = _model_batch()
    mref = AntXentLoss(temperature=0.1)(*model(crops, scenes), mboxes, 64)
    mref.loss.backward()
    torch.testing.assert_close(r[0]['model_loss'], mref.loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r[1]['model_loss'], mref.loss.detach(), rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == r[0]['param_grads'].keys()
    for n, g in grads.items():   # DDP leaves the same averaged gradient on both ranks
        torch.testing.assert_close(r[0]['param_grads'][n], g, rtol=1e-3, atol=1e-5)
        assert torch.equal(r[0]['param_grads'][n], r[1]['param_grads'][n])


def test_torchrun_two_process_smoke(tmp_path):
    run = tmp_path/'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'learn_and_search.learn.train', *TINY, '--steps', '2', '--checkpoint-every', '1', '--cache-dir', tmp_path/'cache',
           '--out', run]
    p = subprocess.run(list(map(str, cmd)), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [l['step'] for l in metric_lines(run)] == [1, 2]    # rank 0 logs, once per step
    ck = weights(run)
    assert ck['step'] == 2 and not any(k.startswith('module.') for k in ck['model'])
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['last.pt', 'step_0000001.pt', 'step_0000002.pt']


# ---- a real learning check ---------------------------------------------------------------------------------------------
COCO_ROOT = os.environ.get('COCO_ROOT')

def localization_accuracy(model, images, image_size, query_size, seed=0, n_per_image=4, batch=16)->dict:
    "Per level: SGA of random crops (`evaluate.metrics.sga_hits`: the argmax cell's centre inside the crop box) and its chance rate"
    from learn_and_search.data.images import random_crop_queries, resize_square
    from learn_and_search.data.crops import crop_queries
    from learn_and_search.evaluate.metrics import sga_hits, chance_sga
    from learn_and_search.learn.models import similarity_maps
    queries = random_crop_queries(images, image_size=image_size, n_per_image=n_per_image, seed=seed)
    boxes = torch.stack([q['box'] for q in queries]).float().view(len(images), n_per_image, 4)   # (N, k, 4)
    hits, chance = {}, {}
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(images), batch):                   # each scene encoded once, with its k queries
            s = torch.stack([resize_square(images[j]['image'], image_size) for j in range(i, min(i + batch, len(images)))])
            s = s.to(dev).float() / 255                          # (n, 3, S, S)
            b = boxes[i:i + len(s)].reshape(-1, 4).to(dev)       # (n*k, 4)
            grids = {k: g.repeat_interleave(n_per_image, 0) for k, g in model.embed_scenes(s).items()}  # level -> (n*k, D, H, W)
            query = model.embed_queries(crop_queries(s.repeat_interleave(n_per_image, 0), b, query_size))  # (n*k, D)
            for lvl, h in sga_hits(similarity_maps(query, grids), b, image_size).items():
                if lvl != 'all': hits.setdefault(lvl, []).append(h)
            for lvl, c in chance_sga(b, {k: tuple(g.shape[-2:]) for k, g in grids.items()}, image_size).items():
                if lvl in grids: chance.setdefault(lvl, []).append((c, len(b)))
    return {lvl: dict(acc=torch.cat(hits[lvl]).float().mean().item(),
                      chance=sum(c * n for c, n in chance[lvl]) / sum(n for _, n in chance[lvl])) for lvl in hits}

LEARN = dict(image_size=64, query_size=32, batch_size=32, dim=128, levels=["P3", "P4"], steps=120, lr=3e-3,
             checkpoint_every=1000, log_every=10, workers=1, seed=0)

@pytest.mark.skipif(not COCO_ROOT, reason='COCO_ROOT is not set (e.g. COCO_ROOT=/work/shared/data/coco-mini)')
def test_training_on_real_photos_learns_to_localize(tmp_path):
    "A short CPU run on real photos raises held-out localization accuracy >= 3x random init and above chance"
    from learn_and_search.data.images import open_images
    from learn_and_search.learn.train import train
    from learn_and_search.learn.config import TrainConfig
    from learn_and_search.learn.models import load_model
    train_data = os.environ.get('COCO_UNLABELED') or str(Path(COCO_ROOT)/'train2017')
    cfg = TrainConfig(data=train_data, out=str(tmp_path/'run'), cache_dir=str(tmp_path/'cache'),
                      **{**LEARN, 'levels': tuple(LEARN['levels'])})
    t = time.time()
    torch.set_num_threads(min(2, os.cpu_count()))
    res = train(cfg)
    minutes = (time.time() - t) / 60
    val = open_images(COCO_ROOT, split='val2017')
    trained = localization_accuracy(load_model(res['checkpoint']), val, cfg.image_size, cfg.query_size)
    torch.manual_seed(cfg.seed)   # the same initial weights as the run
    from learn_and_search.learn.models import create_model
    init = localization_accuracy(create_model(cfg.preset, arch=cfg.arch, dim=cfg.dim, levels=cfg.levels), val,
                                 cfg.image_size, cfg.query_size)
    report = {lvl: dict(trained=round(trained[lvl]['acc'], 3), random_init=round(init[lvl]['acc'], 3),
                        chance=round(trained[lvl]['chance'], 3)) for lvl in trained}
    print(f'\nlearning check ({minutes:.1f} min, {res["step"]} steps, last loss {res["metrics"]["loss"]:.3f}): {report}')
    for lvl, r in report.items():
        assert r['trained'] > r['chance'], (lvl, report)
        assert r['trained'] >= 3 * r['random_init'], (lvl, report)


@pytest.mark.parametrize('cache', [True, False])
def test_resume_refuses_a_training_folder_that_changed(tmp_path, cache):
    "Images added, removed or rewritten since last.pt: --resume names the change (count and hash) instead of going on"
    from PIL import Image
    import numpy as np
    data = tmp_path/'imgs'; data.mkdir()
    g = np.random.default_rng(0)
    for i in range(8): Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data/f'{i}.png')
    base = ['--data', data, '--image-size', '64', '--query-size', '32', '--batch-size', '4', '--dim', '32', '--levels', 'P3',
            '--checkpoint-every', '1', '--cache-dir', tmp_path/'cache', *([] if cache else ['--no-cache', '--workers', '0'])]
    code, err = cli(*base, '--steps', '2', '--out', tmp_path/'r')
    assert code == 0, err
    assert weights(tmp_path/'r')['data']['images'] == 8
    code, err = cli(*base, '--steps', '3', '--out', tmp_path/'r', '--resume')   # nothing changed: resumes
    assert code == 0, err
    for change in (lambda: Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data/'8.png'),   # added
                   lambda: (data/'8.png').unlink() or (data/'0.png').unlink(),                                    # removed
                   lambda: Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data/'1.png')):  # rewritten
        change()
        code, err = cli(*base, '--steps', '4', '--out', tmp_path/'r', '--resume')
        assert_one_line_error(code, err, 'cannot resume from', 'the training data changed since it was written', '8 images')
        assert weights(tmp_path/'r')['step'] == 3


def test_no_skip_hint_when_already_skipping(tmp_path):
    "Every image unreadable under --skip-unreadable: one line, without advising the flag that was given"
    data = tmp_path/'imgs'; data.mkdir()
    for i in range(3): (data/f'{i}.jpg').write_bytes(b'not an image')
    base = ['--data', data, '--image-size', '64', '--query-size', '32', '--batch-size', '2', '--dim', '32', '--steps', '1',
            '--cache-dir', tmp_path/'cache']
    code, err = cli(*base, '--out', tmp_path/'a')
    assert_one_line_error(code, err, '0.jpg', '--skip-unreadable')
    code, err = cli(*base, '--skip-unreadable', '--out', tmp_path/'b')
    assert_one_line_error(code, err)
    assert 'pass --skip-unreadable' not in err, err
