"""ANT-Xent under torch.distributed: 2 CPU processes (gloo) gather positives and match one process on the global batch,
with one query per scene and with several."""
import os, tempfile
import pytest
import torch, torch.distributed as dist, torch.multiprocessing as mp
from learn_and_search.learn.loss import AntXentLoss, ant_xent_reference

B, D, S = 3, 8, 64   # scenes per rank, embedding size, scene side

def make_batch(K=1):
    "A global batch of 2*B scenes and 2*B*K queries, scene-major (same on every process)"
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2 * B * K, D, generator=g, dtype=torch.float64)
    grids = {'P3': torch.randn(2 * B, D, 8, 8, generator=g, dtype=torch.float64),
             'P4': torch.randn(2 * B, D, 4, 4, generator=g, dtype=torch.float64)}
    wh = (0.1 + 0.3 * torch.rand(2 * B * K, 2, generator=g, dtype=torch.float64)) * S
    xy = torch.rand(2 * B * K, 2, generator=g, dtype=torch.float64) * (S - wh)
    return query, grids, torch.cat([xy, wh], 1)

def worker(rank, init_file, out_dir, K):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        query, grids, boxes = make_batch(K)
        sl, ss = slice(rank * B * K, (rank + 1) * B * K), slice(rank * B, (rank + 1) * B)   # this rank's queries, scenes
        q = query[sl].clone().requires_grad_()
        g = {k: v[ss].clone().requires_grad_() for k, v in grids.items()}
        out = AntXentLoss(temperature=0.2)(q, g, boxes[sl], S)          # gather=None: on, since world size is 2
        out.loss.backward()
        with torch.no_grad():   # compile=True falls back to the eager loss when positives are gathered across ranks
            compiled = AntXentLoss(temperature=0.2, compile=True)(q, g, boxes[sl], S).loss
        torch.save({'loss': out.loss.detach(), 'q_grad': q.grad, 'g_grad': {k: v.grad for k, v in g.items()},
                    'compiled_loss': compiled},
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()

@pytest.mark.parametrize('K', [1, 3])
def test_gathered_loss_equals_single_process(K):
    query, grids, boxes = make_batch(K)
    q = query.clone().requires_grad_()
    g = {k: v.clone().requires_grad_() for k, v in grids.items()}
    ref = AntXentLoss(temperature=0.2)(q, g, boxes, S)
    ref.loss.backward()
    torch.testing.assert_close(ref.loss.detach(), ant_xent_reference(query, grids, boxes, S, 0.2))   # the loop, at K
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, 'init'), tmp, K), nprocs=2, join=True)
        res = [torch.load(os.path.join(tmp, f'rank{r}.pt'), weights_only=True) for r in range(2)]
    # DDP averages over ranks: the mean of the per-rank losses is the global loss
    torch.testing.assert_close((res[0]['loss'] + res[1]['loss']) / 2, ref.loss.detach())
    for r in range(2): torch.testing.assert_close(res[r]['compiled_loss'], res[r]['loss'])
    # each rank's gradient (own loss + other ranks' losses through all_gather) is world_size x the global-loss gradient,
    # so DDP's average of parameter gradients equals the single-process gradient
    for r in range(2):
        sl, ss = slice(r * B * K, (r + 1) * B * K), slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res[r]['q_grad'] / 2, q.grad[sl])
        for k in grids: torch.testing.assert_close(res[r]['g_grad'][k] / 2, g[k].grad[ss])

def test_without_gather_the_loss_is_per_rank():
    "Sanity check that the test above is not vacuous: a per-rank loss differs from the global one"
    query, grids, boxes = make_batch()
    full = AntXentLoss(temperature=0.2)(query, grids, boxes, S).loss
    halves = [AntXentLoss(temperature=0.2)(query[s], {k: v[s] for k, v in grids.items()}, boxes[s], S).loss
              for s in (slice(0, B), slice(B, 2 * B))]
    assert not torch.allclose((halves[0] + halves[1]) / 2, full)
