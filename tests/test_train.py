"""Tests of `las-train` that need real processes or real photos: kill -9 and resume, 2-process DDP, learning on COCO."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest, torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--data', 'synthetic', '--image-size', '64', '--query-size', '32', '--batch-size', '4', '--dim', '32',
        '--levels', 'P3', 'P4', '--limit-images', '48', '--seed', '3']

def env(**extra):
    "Environment of a child: the repo importable, one thread each (the machine is shared)"
    e = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1'}
    return {**e, **extra}

def las_train(*args):
    "Command line of `las-train` (the console script when installed, else `python -m learn_and_search.train`)"
    return [sys.executable, '-m', 'learn_and_search.train', *map(str, args)]

def weights(run:Path)->dict:
    return torch.load(run/'checkpoints'/'last.pt', map_location='cpu', weights_only=True)

def metric_lines(run:Path)->list:
    return [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]


def test_bad_config_fails_before_training(tmp_path):
    p = subprocess.run(las_train('--lr', '-0.01', '--out', tmp_path/'r'), env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and 'TrainConfig.lr=-0.01' in p.stderr, p.stderr
    p = subprocess.run(las_train('--data', tmp_path/'missing', '--out', tmp_path/'r'), env=env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and str(tmp_path/'missing') in p.stderr, p.stderr
    assert not (tmp_path/'r').exists()


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    "A run killed with SIGKILL after its first checkpoint and resumed ends with the uninterrupted run's weights"
    common = [*TINY, '--steps', '8', '--checkpoint-every', '2']
    full, cut = tmp_path/'full', tmp_path/'cut'
    subprocess.run(las_train(*common, '--workers', '0', '--out', full), env=env(), cwd=ROOT, check=True, capture_output=True)

    # the interrupted run uses DataLoader workers: they must not change the data either
    proc = subprocess.Popen(las_train(*common, '--workers', '1', '--out', cut), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut/'checkpoints'/'step_0000002.pt').exists():
        assert proc.poll() is None, 'training ended before its first checkpoint'
        assert time.time() < deadline, 'no checkpoint within 5 minutes'
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = torch.load(cut/'checkpoints'/'last.pt', weights_only=True)['step']
    assert proc.returncode == -signal.SIGKILL and 2 <= killed_at < 8, (proc.returncode, killed_at)

    subprocess.run(las_train(*common, '--workers', '1', '--out', cut, '--resume'), env=env(), cwd=ROOT, check=True,
                   capture_output=True)
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

def _flat(d, prefix=''):
    "Nested dicts/lists -> {path: leaf}"
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        if isinstance(v, (dict, list, tuple)): out.update(_flat(v, f'{prefix}{k}.'))
        else: out[f'{prefix}{k}'] = v
    return out


# ---- distributed -----------------------------------------------------------------------------------------------------
def _global_batch(seed=0, B=6, D=16, S=64):
    "A fixed global batch: queries (B,D), grids of two levels, boxes (B,4)"
    g = torch.Generator().manual_seed(seed)
    nz = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=1)
    grids = {'P3': nz(B, D, S // 8, S // 8), 'P4': nz(B, D, S // 16, S // 16)}
    wh = torch.rand(B, 2, generator=g, dtype=torch.float64) * 16 + 8
    xy = torch.rand(B, 2, generator=g, dtype=torch.float64) * (S - wh)
    return nz(B, D), grids, torch.cat([xy, wh], 1)

def _tiny_model():
    from learn_and_search.models import create_model
    torch.manual_seed(0)
    return create_model('model1', dim=16, levels=('P3', 'P4')).eval()   # eval: BatchNorm uses running statistics

def _model_batch(B=4, S=64, q=32):
    g = torch.Generator().manual_seed(1)
    scenes = torch.rand(B, 3, S, S, generator=g); crops = torch.rand(B, 3, q, q, generator=g)
    boxes = torch.tensor([[4., 8, 20, 16], [30, 30, 16, 20], [10, 40, 24, 12], [40, 2, 12, 12]])
    return crops, scenes, boxes

def _ddp_worker(rank, world, store, out_dir):
    import torch.distributed as dist
    from learn_and_search.loss import AntXentLoss
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world)
    # 1. the loss on embeddings: this rank's half of the global batch, negatives gathered from both ranks
    q, grids, boxes = _global_batch()
    sl = slice(rank * len(q) // world, (rank + 1) * len(q) // world)
    ql = q[sl].clone().requires_grad_(); gl = {k: v[sl].clone().requires_grad_() for k, v in grids.items()}
    out = AntXentLoss(temperature=0.1)(ql, gl, boxes[sl], 64)
    out.loss.backward()
    loss = out.loss.detach().clone(); dist.all_reduce(loss); loss /= world
    # 2. the same through DistributedDataParallel and the real model
    # levels P3, P4 only: P5's output conv and P6/P7 get no gradient, so DDP must be told (as `train` does)
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model(), find_unused_parameters=True)
    crops, scenes, mboxes = _model_batch()
    ms = slice(rank * 2, rank * 2 + 2)
    query, mgrids = model(crops[ms], scenes[ms])
    mout = AntXentLoss(temperature=0.1)(query, mgrids, mboxes[ms], 64)
    mout.loss.backward()
    mloss = mout.loss.detach().clone(); dist.all_reduce(mloss); mloss /= world
    torch.save(dict(loss=loss, q_grad=ql.grad, grid_grads={k: v.grad for k, v in gl.items()}, model_loss=mloss,
                    param_grads={n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}),
               f'{out_dir}/rank{rank}.pt')
    dist.destroy_process_group()

def test_ddp_loss_equals_single_process(tmp_path):
    "2 gloo ranks, each with half of the global batch, give the single-process loss and gradients"
    import torch.multiprocessing as mp
    from learn_and_search.loss import AntXentLoss
    mp.spawn(_ddp_worker, args=(2, str(tmp_path/'store'), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path/f'rank{i}.pt', weights_only=True) for i in range(2)]

    q, grids, boxes = _global_batch()
    q.requires_grad_(); [v.requires_grad_() for v in grids.values()]
    ref = AntXentLoss(temperature=0.1)(q, grids, boxes, 64)
    ref.loss.backward()
    torch.testing.assert_close(r[0]['loss'], ref.loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r[1]['loss'], ref.loss.detach(), rtol=1e-10, atol=1e-12)
    # each rank's gradient is d(its local mean)/dx summed over ranks by the gather's backward; DDP averages over ranks
    torch.testing.assert_close(torch.cat([r[0]['q_grad'], r[1]['q_grad']]) / 2, q.grad, rtol=1e-9, atol=1e-12)
    for k in grids:
        torch.testing.assert_close(torch.cat([r[0]['grid_grads'][k], r[1]['grid_grads'][k]]) / 2, grids[k].grad,
                                   rtol=1e-9, atol=1e-12)

    model = _tiny_model()
    crops, scenes, mboxes = _model_batch()
    mref = AntXentLoss(temperature=0.1)(*model(crops, scenes), mboxes, 64)
    mref.loss.backward()
    torch.testing.assert_close(r[0]['model_loss'], mref.loss.detach(), rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == r[0]['param_grads'].keys()
    for n, g in grads.items():   # DDP leaves the same averaged gradient on both ranks
        torch.testing.assert_close(r[0]['param_grads'][n], g, rtol=1e-3, atol=1e-5)
        assert torch.equal(r[0]['param_grads'][n], r[1]['param_grads'][n])


def test_torchrun_two_process_smoke(tmp_path):
    run = tmp_path/'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'learn_and_search.train', *TINY, '--steps', '2', '--checkpoint-every', '1', '--workers', '0', '--out', run]
    p = subprocess.run(list(map(str, cmd)), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert [l['step'] for l in metric_lines(run)] == [1, 2]    # rank 0 logs, once per step
    ck = weights(run)
    assert ck['step'] == 2 and not any(k.startswith('module.') for k in ck['model'])
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['last.pt', 'step_0000001.pt', 'step_0000002.pt']


# ---- a real learning check ---------------------------------------------------------------------------------------------
COCO_ROOT = os.environ.get('COCO_ROOT')

def localization_accuracy(model, images, image_size, query_size, seed=0, n_per_image=4, batch=16)->dict:
    "Per level: share of random crops whose most similar cell has its centre inside the crop box, and the chance rate"
    from learn_and_search.data import random_crop_queries, resize_square
    from learn_and_search.augment import crop_queries
    from learn_and_search.loss import cells_in_boxes
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
            grids = model.embed_scenes(s)                        # level -> (n, D, H, W)
            query = model.embed_queries(crop_queries(s.repeat_interleave(n_per_image, 0), b, query_size))  # (n*k, D)
            for lvl, g in grids.items():
                g = g.repeat_interleave(n_per_image, 0).flatten(2)   # (n*k, D, H*W)
                sim = torch.einsum('qd,qdn->qn', query, g)           # (n*k, H*W)
                inside = cells_in_boxes(b, grids[lvl].shape[-2:], image_size)      # (n*k, H*W)
                hits.setdefault(lvl, []).append(inside[torch.arange(len(b)), sim.argmax(1)])
                chance.setdefault(lvl, []).append(inside.float().mean(1))
    return {lvl: dict(acc=torch.cat(hits[lvl]).float().mean().item(), chance=torch.cat(chance[lvl]).mean().item())
            for lvl in hits}

LEARN = dict(image_size=64, query_size=32, batch_size=32, dim=128, levels=["P3", "P4"], steps=120, lr=3e-3,
             checkpoint_every=1000, log_every=10, workers=1, seed=0)

@pytest.mark.skipif(not COCO_ROOT, reason='COCO_ROOT is not set (e.g. COCO_ROOT=/work/shared/data/coco-mini)')
def test_training_on_real_photos_learns_to_localize(tmp_path):
    "A short CPU run on real photos raises held-out localization accuracy >= 3x random init and above chance"
    from learn_and_search.data import open_images
    from learn_and_search.train import TrainConfig, train
    from learn_and_search.models import load_model
    train_data = os.environ.get('COCO_UNLABELED') or str(Path(COCO_ROOT)/'train2017')
    cfg = TrainConfig(data=train_data, out=str(tmp_path/'run'), **{**LEARN, 'levels': tuple(LEARN['levels'])})
    t = time.time()
    torch.set_num_threads(min(2, os.cpu_count()))
    res = train(cfg)
    minutes = (time.time() - t) / 60
    val = open_images(COCO_ROOT, split='val2017')
    trained = localization_accuracy(load_model(res['checkpoint']), val, cfg.image_size, cfg.query_size)
    torch.manual_seed(cfg.seed)   # the same initial weights as the run
    from learn_and_search.models import create_model
    init = localization_accuracy(create_model(cfg.preset, arch=cfg.arch, dim=cfg.dim, levels=cfg.levels), val,
                                 cfg.image_size, cfg.query_size)
    report = {lvl: dict(trained=round(trained[lvl]['acc'], 3), random_init=round(init[lvl]['acc'], 3),
                        chance=round(trained[lvl]['chance'], 3)) for lvl in trained}
    print(f'\nlearning check ({minutes:.1f} min, {res["step"]} steps, last loss {res["metrics"]["loss"]:.3f}): {report}')
    for lvl, r in report.items():
        assert r['trained'] > r['chance'], (lvl, report)
        assert r['trained'] >= 3 * r['random_init'], (lvl, report)
