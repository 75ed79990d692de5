"""Learning per CPU-minute: SGA after the same wall-clock budget for K queries per scene x precision, side by side.

Each setting trains model4 (128 px scenes, 32 px queries, 16 scenes a step, lr 2e-3 cosine, seed 0) on the unlabeled
photos for `--minutes` of wall clock, then is evaluated zero-shot on coco-mini val2017 (8 queries per image, standard and
hard, 95% intervals). Two settings run at a time, one torch thread each, each pinned to its own core (`taskset`), so the
pair shares the machine the same way; its steps come from a short probe of the setting's own pairs/s. Results are kept
per setting (`--runs`), so an interrupted sweep continues where it stopped. Writes `cpu_budget.md` and `cpu_budget.csv`
into `--out` (figures/mini), which the `mini` figures README includes.

    python scripts/cpu_budget.py --compile-check                   # the table in figures/mini (about 30 minutes)
    python scripts/cpu_budget.py --minutes 0.2 --probe-steps 2 --out /tmp/x --runs /tmp/r   # a smoke run
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# run in pairs, in this order; bf16 once only: where the CPU has no native bf16 it is emulated and several times slower
SETTINGS = [(1, 'fp32'), (4, 'fp32'), (8, 'fp32'), (16, 'fp32'), (8, 'bf16'), (32, 'fp32')]
COMMON = dict(preset='model4', arch='resnet18', dim=128, image_size=128, query_size=32, batch_size=16, lr=2e-3, seed=0,
              device='cpu', workers=0, checkpoint_every=10**9, keep_checkpoints=0, log_every=1)


def _rate(run:Path, batch:int, K:int, skip:int=2)->float:
    "Query pairs per second of a run's logged steps after `skip`"
    from learn_and_search.bench_train import metrics_pairs_per_s
    lines = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    return metrics_pairs_per_s(lines, batch, skip, K)


def child(spec:dict)->dict:
    "One setting: probe its speed, train for the budget, evaluate; the result as a dict"
    import torch
    torch.set_num_threads(1)
    from learn_and_search.train import train
    from learn_and_search.train_config import TrainConfig
    from learn_and_search.models import load_model
    from learn_and_search.evaluate import evaluate
    from learn_and_search.gallery import open_gallery
    out, K, prec = Path(spec['runs']), spec['K'], spec['precision']
    base = dict(COMMON, data=spec['train_data'], queries_per_scene=K, precision=prec, compile=spec.get('compile', False))
    probe = out/'probe'
    if not (probe/'metrics.jsonl').is_file() or len((probe/'metrics.jsonl').read_text().splitlines()) < spec['probe_steps']:
        import shutil; shutil.rmtree(probe, ignore_errors=True)
        t = time.perf_counter()
        train(TrainConfig(**base, steps=spec['probe_steps'], out=str(probe)), progress=False)
        probe_s = time.perf_counter() - t
    else: probe_s = float('nan')
    rate = _rate(probe, COMMON['batch_size'], K, skip=min(2, spec['probe_steps'] - 1))
    if spec.get('probe_only'): return dict(K=K, precision=prec, compile=base['compile'], probe_pairs_per_s=rate, probe_s=probe_s)
    steps = max(1, round(spec['minutes'] * 60 * rate / (COMMON['batch_size'] * K)))
    t = time.perf_counter()
    res = train(TrainConfig(**{**base, 'checkpoint_every': max(1, steps // 10)}, steps=steps, out=str(out/'train'), resume_if_exists=True),
                progress=False)
    wall = time.perf_counter() - t
    gallery = open_gallery([(spec['eval_data'], 'val2017')])
    m = evaluate(load_model(res['checkpoint']), gallery, image_size=128, query_size=32, queries='both', seed=0, baselines=False,
                 random_init=None, queries_per_image=8)
    return dict(K=K, precision=prec, steps=steps, pairs=steps * COMMON['batch_size'] * K, wall_s=wall,
                pairs_per_s=_rate(out/'train', COMMON['batch_size'], K), probe_pairs_per_s=rate,
                sga=m['sga']['all'], sga_ci=m['sga_ci']['all'], sga_hard=m['sga_hard']['all'], sga_hard_ci=m['sga_hard_ci']['all'],
                n_queries=m['n_queries']['localization'], n_images=m['gallery_size'])


def launch(spec:dict, core:int)->subprocess.Popen:
    "Run `child(spec)` in a process pinned to `core`, one thread; its last stdout line is the result"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    Path(spec['runs']).mkdir(parents=True, exist_ok=True)
    log = open(Path(spec['runs'])/'log.txt', 'a')
    return subprocess.Popen(['taskset', '-c', str(core), sys.executable, __file__, '--child', json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def table(rows:list, minutes:float, machine:str)->str:
    "The Markdown section of the results"
    from learn_and_search.utils import markdown_table
    iv = lambda v, ci: f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    body = [[r['K'], r['precision'], f"{r['steps']:,}", f"{r['pairs']:,}", f"{r['wall_s'] / 60:.1f}", f"{r['pairs_per_s']:.1f}",
             iv(r['sga'], r['sga_ci']), iv(r['sga_hard'], r['sga_hard_ci'])] for r in rows]
    head = ['K (queries per scene)', 'precision', 'steps', 'query pairs', 'train min', 'pairs/s (1 thread)', 'SGA all [95%]',
            'SGA hard [95%]']
    n = rows[0]
    return '\n'.join([
        f"model4, 128 px scenes, 32 px queries, 16 scenes a step, lr 2e-3 cosine, seed 0, trained on coco-unlabeled for "
        f"{minutes:g} minutes of wall clock each; zero-shot SGA on coco-mini val2017 ({n['n_images']} images, "
        f"{n['n_queries']} queries, 8 per image). Two settings at a time (in the order of the rows), one torch thread each, "
        f"each pinned to its own core of {machine}; each run's steps were sized from a short probe of its own speed.",
        '', markdown_table(head, body), ''])


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--minutes', type=float, default=6.0, help='wall-clock training budget of each setting')
    p.add_argument('--probe-steps', type=int, default=4, help='steps of the speed probe before each run')
    p.add_argument('--train-data', default=str(ROOT.parent/'shared'/'data'/'coco-unlabeled'/'images'))
    p.add_argument('--eval-data', default=str(ROOT.parent/'shared'/'data'/'coco-mini'))
    p.add_argument('--runs', default='runs/cpu_budget', help='one folder per setting (resumable)')
    p.add_argument('--out', default='figures/mini', help='where cpu_budget.md and cpu_budget.csv go')
    p.add_argument('--compile-check', action='store_true', help='also probe K=8 fp32 with --compile (compile time and speed)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: print(json.dumps(child(json.loads(a.child))), flush=True); return 0
    for path in (a.train_data, a.eval_data):
        if not Path(path).is_dir(): p.error(f"no such folder: {path}")
    if a.minutes <= 0 or a.probe_steps < 2: p.error('--minutes must be > 0 and --probe-steps >= 2')
    from learn_and_search.utils import atomic_write, describe_machine
    runs, rows = Path(a.runs), []
    spec = lambda K, prec, **kw: {**dict(K=K, precision=prec, minutes=a.minutes, probe_steps=a.probe_steps,
                                         train_data=a.train_data, eval_data=a.eval_data, runs=str(runs/f'K{K}-{prec}')), **kw}
    for i in range(0, len(SETTINGS), 2):
        pair, procs = SETTINGS[i:i + 2], []
        for core, (K, prec) in enumerate(pair):
            done = runs/f'K{K}-{prec}'/'result.json'
            if done.is_file(): procs.append((done, None)); continue
            print(f"cpu_budget: K={K} {prec} on core {core} for {a.minutes:g} min", flush=True)
            procs.append((done, launch(spec(K, prec), core)))
        for done, proc in procs:
            if proc is not None:
                out, _ = proc.communicate()
                if proc.returncode: raise SystemExit(f"cpu_budget: a run failed (see {done.parent/'log.txt'})")
                atomic_write(done, out.strip().splitlines()[-1] + '\n')
            rows.append(json.loads(done.read_text()))
            r = rows[-1]; print(f"  K={r['K']} {r['precision']}: {r['pairs']:,} pairs, {r['pairs_per_s']:.1f} pairs/s, SGA {r['sga']:.3f}, hard {r['sga_hard']:.3f}", flush=True)
    text = table(rows, a.minutes, describe_machine('cpu'))
    if a.compile_check:   # eager beside compiled, same setting, same time, one core each
        procs = [launch(spec(8, 'fp32', compile=c, probe_only=True, runs=str(runs/f'compile-{c}')), core) for core, c in enumerate((False, True))]
        eager, comp = (json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs)
        text += (f"\n`--compile` on this CPU (K = 8, fp32, {a.probe_steps} steps, beside the same run without it): eager "
                 f"{eager['probe_pairs_per_s']:.1f} pairs/s, {eager['probe_s']:.0f} s in all; compiled {comp['probe_pairs_per_s']:.1f} "
                 f"pairs/s after compiling, {comp['probe_s']:.0f} s in all.\n")
    import csv, io
    buf = io.StringIO(); w = csv.writer(buf)
    w.writerow(['queries_per_scene', 'precision', 'steps', 'pairs', 'wall_s', 'pairs_per_s', 'sga', 'sga_lo', 'sga_hi',
                'sga_hard', 'sga_hard_lo', 'sga_hard_hi'])
    for r in rows: w.writerow([r['K'], r['precision'], r['steps'], r['pairs'], round(r['wall_s'], 1), round(r['pairs_per_s'], 2),
                               round(r['sga'], 4), *[round(v, 4) for v in r['sga_ci']], round(r['sga_hard'], 4),
                               *[round(v, 4) for v in r['sga_hard_ci']]])
    atomic_write(Path(a.out)/'cpu_budget.csv', buf.getvalue()); atomic_write(Path(a.out)/'cpu_budget.md', text)
    print(text)
    return 0


if __name__ == '__main__': sys.exit(main())
