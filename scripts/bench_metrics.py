"""Time `evaluate.metrics.retrieval_metrics` and `evaluate.metrics.sga_hits` against an earlier version of the module; print a Markdown table.

The earlier `metrics.py` is read from git (`--before`, default 0b11d0a: two sorts per k, a second argmax pass over the
concatenated levels), so no copy of the old code is kept. Both versions run on the same random inputs, in one process,
on one torch thread, and their results are checked equal before anything is timed. On a shared machine pin it:

    taskset -c 1 python scripts/bench_metrics.py                 # Q=3000 queries; G=400 and G=5000; 3000 x 5 levels
    python scripts/bench_metrics.py --queries 300 --galleries 50 --repeats 1   # a smoke run
"""
import argparse, importlib.util, subprocess, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import learn_and_search.evaluate.metrics as new


def old_module(rev:str):
    "The package's `metrics.py` at git revision `rev`, imported as `learn_and_search._metrics_old`"
    code = subprocess.run(['git', '-C', str(ROOT), 'show', f'{rev}:learn_and_search/metrics.py'],
                          capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader('learn_and_search._metrics_old', loader=None)
    mod = importlib.util.module_from_spec(spec); mod.__package__ = 'learn_and_search'
    exec(compile(code, f'{rev}:metrics.py', 'exec'), mod.__dict__)
    return mod


def timed(fn, repeats:int)->float:
    "Best of `repeats` wall-clock seconds of `fn()`"
    best = float('inf')
    for _ in range(repeats):
        t = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t)
    return best


def retrieval_inputs(Q:int, G:int, seed:int=0):
    "Scores rounded to 3 decimals (ties, as real cosines have few), sources and relevance like a COCO gallery's"
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(Q, G, generator=g) * 1000).round() / 1000
    return scores, torch.randint(0, G, (Q,), generator=g), torch.rand(Q, G, generator=g) < 0.2


def sga_inputs(B:int, image_size:int=256, seed:int=0):
    "Similarity maps of `B` queries on P3..P7 of a 256-px scene, and their boxes"
    g = torch.Generator().manual_seed(seed)
    sims = {f'P{l}': torch.rand(B, image_size >> l, image_size >> l, generator=g) for l in range(3, 8)}
    boxes = torch.cat([torch.rand(B, 2, generator=g) * 160, 16 + torch.rand(B, 2, generator=g) * 80], 1)
    return sims, boxes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--before', default='0b11d0a', help='git revision of the earlier metrics.py')
    p.add_argument('--queries', type=int, default=3000)
    p.add_argument('--galleries', type=int, nargs='+', default=[400, 5000])
    p.add_argument('--repeats', type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    old, rows = old_module(a.before), []
    for G in a.galleries:
        scores, source, rel = retrieval_inputs(a.queries, G)
        assert new.retrieval_metrics(scores, source, rel) == old.retrieval_metrics(scores, source, rel)
        rows.append((f'retrieval_metrics, Q={a.queries}, G={G}, ks=(1, 5, 10)',
                     timed(lambda: old.retrieval_metrics(scores, source, rel), a.repeats),
                     timed(lambda: new.retrieval_metrics(scores, source, rel), a.repeats)))
        def both_old(): old.retrieval_metrics(scores, source, rel); old.query_retrieval(scores, source, rel, 10)
        def both_new(): r = new.rank_gallery(scores, source, rel); r.metrics(); r.per_query(10)
        rows.append((f'one score mode (averages + per-query P@10), G={G}',
                     timed(both_old, a.repeats), timed(both_new, a.repeats)))
    sims, boxes = sga_inputs(a.queries)
    for strict in (False, True):
        assert all(torch.equal(x, y) for x, y in zip(new.sga_hits(sims, boxes, 256, strict).values(),
                                                      old.sga_hits(sims, boxes, 256, strict).values()))
    rows.append((f'sga_hits, {a.queries} queries x 5 levels',
                 timed(lambda: old.sga_hits(sims, boxes, 256), a.repeats),
                 timed(lambda: new.sga_hits(sims, boxes, 256), a.repeats)))
    def eval_old(): old.sga_hits(sims, boxes, 256); old.sga_hits(sims, boxes, 256, True); old.best_cells(sims)
    def eval_new(): b = new.best_cells(sims); new.sga_hits(sims, boxes, 256, best=b); new.sga_hits(sims, boxes, 256, True, best=b)
    rows.append(('both hit rules + winning cells (one argmax with `best=`)',
                 timed(eval_old, a.repeats), timed(eval_new, a.repeats)))
    print(f'| case | before ({a.before}) s | now s | speed-up |\n|---|---:|---:|---:|')
    for name, t0, t1 in rows: print(f'| {name} | {t0:.3f} | {t1:.3f} | {t0 / t1:.1f}x |')
    print(f'\ntorch {torch.__version__}, {torch.get_num_threads()} thread, best of {a.repeats}')


if __name__ == '__main__': main()
