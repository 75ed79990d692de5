"""Learning per CPU-minute: one training knob at a time against today's recipe, same wall clock, side by side.

Each arm trains with the `mini` recipe (128 px scenes, 32 px queries, 16 scenes a step, K = 16, lr 2e-3 warm-up +
cosine, fp32, seed 0) on the unlabeled photos for `--minutes` of wall clock, with one setting changed, then is evaluated
zero-shot on coco-mini val2017 (8 queries per image, standard and hard). The two arms of a pair run at the same time,
one torch thread each, each pinned to its own core (`taskset`), so they share the machine the same way; each run's steps
come from a short probe of its own speed, so a slower setting gets fewer steps. The effect of a pair is the difference
of SGA on the same queries, with a paired bootstrap 95% interval. Results are kept per arm (`--runs`), so an interrupted
sweep continues where it stopped. Writes `cpu_budget_<sweep>.md` and `.csv` into `--out` (figures/mini), which the
`mini` figures README includes.

    python scripts/cpu_budget.py --sweep recipe                      # flips, branches, peak lr (about 45 minutes)
    python scripts/cpu_budget.py --sweep k --compile-check           # K x precision (about 30 minutes)
    python scripts/cpu_budget.py --minutes 0.2 --probe-steps 2 --out /tmp/x --runs /tmp/r   # a smoke run
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(preset='model4', arch='resnet18', dim=128, image_size=128, query_size=32, batch_size=16, queries_per_scene=16,
              lr=2e-3, precision='fp32', seed=0, device='cpu', workers=0, checkpoint_every=10**9, keep_checkpoints=0, log_every=1)
# arm name -> the TrainConfig fields it changes from COMMON (today's recipe: model4, its flips of the training image)
# the shared preset had projection heads until the 'shared' sweep measured them: its arms name the heads, so they stay the same runs
ARMS = {'model4': {}, 'model4, query flips': dict(flip='query'), 'shared': dict(preset='shared', projection_head=True),
        'model4, lr 1e-3': dict(lr=1e-3), 'model4, lr 4e-3': dict(lr=4e-3), 'model3': dict(preset='model3'),
        'model2': dict(preset='model2'), 'shared, lr 1e-3': dict(preset='shared', projection_head=True, lr=1e-3),
        'shared, no heads, lr 1e-3': dict(preset='shared', projection_head=False, lr=1e-3),
        **{f'K={k} {p}': dict(queries_per_scene=k, precision=p)
           for k, p in [(1, 'fp32'), (4, 'fp32'), (8, 'fp32'), (16, 'fp32'), (8, 'bf16'), (32, 'fp32')]}}
# pairs run side by side; the effect is first - second. bf16 once only: without native bf16 it is emulated and slow
SWEEPS = {'recipe': [('model4, query flips', 'model4'), ('shared', 'model4'), ('model4, lr 4e-3', 'model4, lr 1e-3'),
                     ('model4, lr 1e-3', 'model4')],
          'augment': [('model3', 'model2'), ('model3', 'model4')],   # blur + interpolation; then the projection heads
          'shared': [('shared, no heads, lr 1e-3', 'shared, lr 1e-3')],   # the heads on the weight-shared network
          'k': [('K=1 fp32', 'K=4 fp32'), ('K=8 fp32', 'K=16 fp32'), ('K=8 bf16', 'K=32 fp32')]}


def _rate(run:Path, batch:int, K:int, skip:int=2)->float:
    "Query pairs per second of a run's logged steps after `skip`"
    from learn_and_search.bench.train import metrics_pairs_per_s
    lines = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    return metrics_pairs_per_s(lines, batch, skip, K)


def child(spec:dict)->dict:
    "One arm: probe its speed, train for the budget, evaluate; the result as a dict"
    import torch
    torch.set_num_threads(1)
    from learn_and_search.learn.train import train
    from learn_and_search.learn.config import TrainConfig
    from learn_and_search.learn.models import load_model
    from learn_and_search.evaluate.run import evaluate
    from learn_and_search.data.gallery import open_gallery
    out = Path(spec['runs'])
    base = dict(COMMON, **ARMS[spec['arm']], data=spec['train_data'], compile=spec.get('compile', False))
    K, probe = base['queries_per_scene'], out/'probe'
    if not (probe/'metrics.jsonl').is_file() or len((probe/'metrics.jsonl').read_text().splitlines()) < spec['probe_steps']:
        import shutil; shutil.rmtree(probe, ignore_errors=True)
        t = time.perf_counter()
        train(TrainConfig(**base, steps=spec['probe_steps'], out=str(probe)), progress=False)
        probe_s = time.perf_counter() - t
    else: probe_s = float('nan')
    rate = _rate(probe, COMMON['batch_size'], K, skip=min(2, spec['probe_steps'] - 1))
    if spec.get('probe_only'): return dict(arm=spec['arm'], compile=base['compile'], probe_pairs_per_s=rate, probe_s=probe_s)
    steps = max(1, round(spec['minutes'] * 60 * rate / (COMMON['batch_size'] * K)))
    t = time.perf_counter()
    res = train(TrainConfig(**{**base, 'checkpoint_every': max(1, steps // 10)}, steps=steps, out=str(out/'train'), resume_if_exists=True),
                progress=False)
    wall = time.perf_counter() - t
    gallery = open_gallery([(spec['eval_data'], 'val2017')])
    m = evaluate(load_model(res['checkpoint']), gallery, image_size=128, query_size=32, queries='both', seed=0, baselines=False,
                 random_init=None, queries_per_image=8, per_query=True)
    hits = {p: [r['hit_all'] for r in m['per_query'] if r['method'] == 'model' and r['kind'] == p] for p in ('standard', 'hard')}
    return dict(arm=spec['arm'], K=K, precision=base['precision'], steps=steps, pairs=steps * COMMON['batch_size'] * K, wall_s=wall,
                pairs_per_s=_rate(out/'train', COMMON['batch_size'], K), probe_pairs_per_s=rate,
                sga=m['sga']['all'], sga_ci=m['sga_ci']['all'], sga_hard=m['sga_hard']['all'], sga_hard_ci=m['sga_hard_ci']['all'],
                n_queries=m['n_queries']['localization'], n_images=m['gallery_size'], hits=hits)


def launch(spec:dict, core:int)->subprocess.Popen:
    "Run `child(spec)` in a process pinned to `core`, one thread; its last stdout line is the result"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    Path(spec['runs']).mkdir(parents=True, exist_ok=True)
    log = open(Path(spec['runs'])/'log.txt', 'a')
    return subprocess.Popen(['taskset', '-c', str(core), sys.executable, __file__, '--child', json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def paired_effect(a:list, b:list, n_boot:int=2000, seed:int=0)->tuple:
    "Mean of `a` - mean of `b` over the same queries, and its paired bootstrap 95% interval"
    import torch
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)   # (Q,) per-query differences
    g = torch.Generator().manual_seed(seed)
    boot = d[torch.randint(len(d), (n_boot, len(d)), generator=g)].mean(1)            # (n_boot,)
    return float(d.mean()), (float(boot.quantile(0.025)), float(boot.quantile(0.975)))


def _change(arm:str)->str:
    "What `arm` changes from today's recipe, in words"
    ch = ARMS[arm]
    return ', '.join(f'{k}={v}' for k, v in ch.items()) if ch else "today's recipe"


def table(pairs:list, minutes:float, machine:str)->tuple:   # (Markdown, CSV rows)
    "The Markdown section and the CSV rows of a sweep's results, pair by pair"
    from learn_and_search.utils import markdown_table
    iv = lambda v, ci: f"{v:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if v is not None else '–'
    civ = lambda v, ci: f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    body, csv_rows = [], []
    for a, b in pairs:
        eff = {p: paired_effect(a['hits'][p], b['hits'][p]) for p in ('standard', 'hard')}
        for r, first in ((a, True), (b, False)):
            e = eff if first else {p: (None, None) for p in eff}
            body.append([r['arm'], _change(r['arm']), f"{r['steps']:,}", f"{r['pairs']:,}", f"{r['wall_s'] / 60:.1f}",
                         f"{r['pairs_per_s']:.1f}", civ(r['sga'], r['sga_ci']), civ(r['sga_hard'], r['sga_hard_ci']),
                         iv(*e['standard']), iv(*e['hard'])])
            csv_rows.append([r['arm'], _change(r['arm']), r['steps'], r['pairs'], round(r['wall_s'], 1), round(r['pairs_per_s'], 2),
                             round(r['sga'], 4), *[round(v, 4) for v in r['sga_ci']], round(r['sga_hard'], 4),
                             *[round(v, 4) for v in r['sga_hard_ci']],
                             *([round(e['standard'][0], 4), *[round(v, 4) for v in e['standard'][1]]] if first else ['', '', ''])])
    head = ['arm', 'changes', 'steps', 'query pairs', 'train min', 'pairs/s (1 thread)', 'SGA all [95%]', 'SGA hard [95%]',
            'effect vs the next row, standard [95%]', 'effect, hard [95%]']
    n = pairs[0][0]
    text = '\n'.join([
        f"One knob at a time against today's `mini` recipe (model4: 128 px scenes, 32 px queries, 16 scenes x K = 16 a step, "
        f"lr 2e-3 warm-up + cosine, fp32, flips of the training image, seed 0), each arm trained on coco-unlabeled for "
        f"{minutes:g} minutes of wall clock; zero-shot SGA on coco-mini val2017 ({n['n_images']} images, {n['n_queries']} "
        f"queries, 8 per image, best cell over P3-P7). The two rows of a pair ran at the same time, one torch thread each, "
        f"each pinned to its own core of {machine}; each run's steps were sized from a short probe of its own speed. The "
        f"effect is the first row's SGA minus the second's on the same queries (paired bootstrap, 2,000 resamples).",
        '', markdown_table(head, body), ''])
    return text, csv_rows


def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sweep', choices=list(SWEEPS), default='recipe', help='which pairs of arms to run')
    p.add_argument('--minutes', type=float, default=10.0, help='wall-clock training budget of each arm')
    p.add_argument('--probe-steps', type=int, default=4, help='steps of the speed probe before each run')
    p.add_argument('--train-data', default=str(ROOT.parent/'shared'/'data'/'coco-unlabeled'/'images'))
    p.add_argument('--eval-data', default=str(ROOT.parent/'shared'/'data'/'coco-mini'))
    p.add_argument('--runs', default='runs/cpu_budget', help='one folder per arm and budget (resumable)')
    p.add_argument('--out', default='figures/mini', help='where cpu_budget_<sweep>.md and .csv go')
    p.add_argument('--compile-check', action='store_true', help='also probe K=8 fp32 with --compile (compile time and speed)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child: print(json.dumps(child(json.loads(a.child))), flush=True); return 0
    for path in (a.train_data, a.eval_data):
        if not Path(path).is_dir(): p.error(f"no such folder: {path}")
    if a.minutes <= 0 or a.probe_steps < 2: p.error('--minutes must be > 0 and --probe-steps >= 2')
    from learn_and_search.utils import atomic_write, describe_machine
    runs, pairs = Path(a.runs), []
    name = lambda arm: arm.replace(' ', '_').replace(',', '').replace('=', '')
    # one folder per pair and arm: an arm in two pairs (today's recipe) runs in each, beside that pair's other arm
    folder = lambda pair, arm: runs/f"{name(pair[0])}-vs-{name(pair[1])}-{a.minutes:g}min"/name(arm)
    spec = lambda pair, arm, **kw: {**dict(arm=arm, minutes=a.minutes, probe_steps=a.probe_steps, train_data=a.train_data,
                                           eval_data=a.eval_data, runs=str(folder(pair, arm))), **kw}
    for pair in SWEEPS[a.sweep]:
        procs = []
        for core, arm in enumerate(pair):
            done = folder(pair, arm)/'result.json'
            if done.is_file(): procs.append((done, None)); continue
            print(f"cpu_budget: {arm} on core {core} for {a.minutes:g} min", flush=True)
            procs.append((done, launch(spec(pair, arm), core)))
        rows = []
        for done, proc in procs:
            if proc is not None:
                out, _ = proc.communicate()
                if proc.returncode: raise SystemExit(f"cpu_budget: a run failed (see {done.parent/'log.txt'})")
                atomic_write(done, out.strip().splitlines()[-1] + '\n')
            rows.append(json.loads(done.read_text()))
            r = rows[-1]; print(f"  {r['arm']}: {r['pairs']:,} pairs, {r['pairs_per_s']:.1f} pairs/s, SGA {r['sga']:.3f}, hard {r['sga_hard']:.3f}", flush=True)
        pairs.append(rows)
    text, csv_rows = table(pairs, a.minutes, describe_machine('cpu'))
    if a.compile_check:   # eager beside compiled, same setting, same time, one core each
        procs = [launch(spec(('K=8 fp32', 'K=8 fp32'), 'K=8 fp32', compile=c, probe_only=True, runs=str(runs/f'compile-{c}')), core)
                 for core, c in enumerate((False, True))]
        eager, comp = (json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs)
        text += (f"\n`--compile` on this CPU (K = 8, fp32, {a.probe_steps} steps, beside the same run without it): eager "
                 f"{eager['probe_pairs_per_s']:.1f} pairs/s, {eager['probe_s']:.0f} s in all; compiled {comp['probe_pairs_per_s']:.1f} "
                 f"pairs/s after compiling, {comp['probe_s']:.0f} s in all.\n")
    import csv, io
    buf = io.StringIO(); w = csv.writer(buf)
    w.writerow(['arm', 'changes', 'steps', 'pairs', 'wall_s', 'pairs_per_s', 'sga', 'sga_lo', 'sga_hi', 'sga_hard', 'sga_hard_lo',
                'sga_hard_hi', 'effect', 'effect_lo', 'effect_hi'])
    w.writerows(csv_rows)
    atomic_write(Path(a.out)/f'cpu_budget_{a.sweep}.csv', buf.getvalue()); atomic_write(Path(a.out)/f'cpu_budget_{a.sweep}.md', text)
    print(text)
    return 0


if __name__ == '__main__': sys.exit(main())
