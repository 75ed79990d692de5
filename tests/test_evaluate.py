"""Tests of learn_and_search.evaluate.metrics, .evaluate and .baselines that need subprocesses, files or real data."""
import csv, itertools, json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch

from learn_and_search.evaluate.metrics import (chance_sga, relevance, retrieval_chance, retrieval_metrics, sga_hits, sga_rates,
                                      gap_ratio, wilson_interval, bootstrap_interval, sga_intervals, query_retrieval,
                                      chance_per_query, category_retrieval, per_category)
from learn_and_search.evaluate.baselines import ncc_locate, template_matching_hits, template_sizes
pytestmark = pytest.mark.slow   # trains, evaluates or runs the command lines: `make test`, not `make check`

LAS_EVAL = Path(sys.executable).parent / 'las-eval'


def test_sga_constructed():
    "Similarity maps whose argmax is placed by hand: per-level, global and strict hits as computed by hand"
    S = 128                                            # P3 grid 4 x 4 (32 px cells), P4 grid 2 x 2 (64 px cells)
    boxes = torch.tensor([[0., 0., 40., 40.],          # holds P3 cell (0, 0) centre (16, 16) and that whole cell
                          [70., 70., 50., 50.],        # holds P3 cell (3, 3) centre (112, 112), P4 cell (1, 1) centre (96, 96)
                          [50., 0., 20., 20.]])        # holds no cell centre of either grid
    p3, p4 = torch.zeros(3, 4, 4), torch.zeros(3, 2, 2)
    p3[0, 0, 0] = 0.9; p4[0, 1, 1] = 0.5               # query 0: P3 right, P4 wrong, global = P3 (0.9) -> right
    p3[1, 0, 0] = 0.4; p4[1, 1, 1] = 0.8               # query 1: P3 wrong, P4 right, global = P4 (0.8) -> right
    p3[2, 1, 1] = 0.7                                  # query 2: nothing inside
    hits = sga_hits({'P3': p3, 'P4': p4}, boxes, S)
    assert {k: v.tolist() for k, v in hits.items()} == {'P3': [True, False, False], 'P4': [False, True, False],
                                                        'all': [True, True, False]}
    strict = sga_hits({'P3': p3, 'P4': p4}, boxes, S, strict=True)
    # query 0: the 32-px P3 cell (0,0) fits in the 40-px box; query 1: the 64-px P4 cell (64..128) does not fit in 70..120
    assert {k: v.tolist() for k, v in strict.items()} == {'P3': [True, False, False], 'P4': [False, False, False],
                                                          'all': [True, False, False]}
    assert sga_rates(hits) == pytest.approx({'P3': 1 / 3, 'P4': 1 / 3, 'all': 2 / 3})
    assert gap_ratio(sga_rates(hits), {'P3': 1 / 6, 'P4': 0.0, 'all': 1 / 3}) == pytest.approx({'P3': 2.0, 'P4': None, 'all': 2.0})


def test_chance_sga_constructed():
    "Fraction of cells whose centre lies in the box, by hand"
    boxes = torch.tensor([[0., 0., 64., 64.], [0., 0., 10., 10.]])   # quarter of a 128 scene; a box holding no centre
    c = chance_sga(boxes, {'P3': (4, 4), 'P4': (2, 2), 'P7': (1, 1)}, 128)
    assert c['P3'] == pytest.approx((4 / 16 + 0) / 2)       # centres 16 and 48 on each axis -> 2 x 2 cells
    assert c['P4'] == pytest.approx((1 / 4 + 0) / 2)        # centre (32, 32)
    assert c['P7'] == pytest.approx((1 + 0) / 2)            # centre (64, 64) lies on box 0's border: borders count
    assert c['area'] == pytest.approx((0.25 + 100 / 128 ** 2) / 2)
    assert c['all'] == pytest.approx((6 / 21 + 0) / 2)      # 4 + 1 + 1 of the 16 + 4 + 1 cells


def test_retrieval_constructed():
    "Top-k instance/category, precision@k and mAP of a hand-ranked 5-image gallery"
    cats = [{1}, {2}, {1, 2}, {3}, {1}]
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.5],     # query from image 0, category 1: ranking 1, 2, 4, 3, 0
                           [0.3, 0.2, 0.1, 0.9, 0.4]])    # query from image 3, category 3: ranking 3, 4, 0, 1, 2
    source, qcat = torch.tensor([0, 3]), torch.tensor([1, 3])
    m = retrieval_metrics(scores, source, relevance(qcat, cats), ks=(1, 3, 5))
    assert m['top_k_instance'] == pytest.approx({'1': 0.5, '3': 0.5, '5': 1.0})   # q0's source is last (rank 5)
    # q0 without source: 1, 2, 4, 3 -> relevance 0, 1, 1, 0; q1 has no other image of category 3
    assert m['top_k_category'] == pytest.approx({'1': 0.0, '3': 0.5, '5': 0.5})
    assert m['precision_at_k'] == pytest.approx({'1': 0.0, '3': (2 / 3) / 2, '5': (2 / 4) / 2})
    assert m['map'] == pytest.approx(0.5 * (1 / 2 + 2 / 3))   # only q0 has relevant images
    assert (m['n_queries'], m['n_map_queries']) == (2, 1)


def test_retrieval_chance_constructed():
    "Chance rates from category frequencies, by hand: gallery of 5, 2 relevant candidates among 4"
    cats = [{1}, {2}, {1, 2}, {3}, {1}]
    c = retrieval_chance(torch.tensor([0]), relevance(torch.tensor([1]), cats), ks=(1, 2))
    assert c['top_k_instance'] == pytest.approx({'1': 1 / 5, '2': 2 / 5})
    assert c['top_k_category'] == pytest.approx({'1': 2 / 4, '2': 1 - math.comb(2, 2) / math.comb(4, 2)})
    assert c['precision_at_k'] == pytest.approx({'1': 0.5, '2': 0.5})
    # E[AP] with N = 4, R = 2: average of AP over the 6 equally likely position pairs of the relevant items
    pairs = [(a, b) for a in range(1, 5) for b in range(a + 1, 5)]
    assert c['map'] == pytest.approx(sum((1 / a + 2 / b) / 2 for a, b in pairs) / len(pairs))


def test_template_matching_finds_exact_crop():
    g = torch.Generator().manual_seed(3)
    scene = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g)
    x, y, w, h = 70, 30, 26, 45
    cx, cy, score = ncc_locate(scene, scene[:, y:y + h, x:x + w], template_sizes(128, n=3) + [(w, h)])
    assert (cx, cy) == (x + w / 2, y + h / 2) and score == pytest.approx(1.0, abs=1e-4)
    # resized to a 32 x 32 query and back: still found inside its box
    crop = torch.nn.functional.interpolate(scene[None, :, y:y + h, x:x + w].float(), size=(32, 32), mode='bilinear')
    hits = template_matching_hits(scene[None], crop / 255, torch.tensor([0]), torch.tensor([[x, y, w, h]]).float(),
                                  [(w, h)])
    assert hits.tolist() == [True]


def _run(args, tmp_path):
    out = tmp_path / 'eval'
    proc = subprocess.run([str(LAS_EVAL), *args, '--out', str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / 'metrics.json').read_text())
    assert (out / 'metrics.md').read_text() in proc.stdout + '\n'
    return metrics, proc.stdout


def _check(metrics, n_images):
    for key in ('sga', 'sga_hard', 'sga_strict', 'chance_sga', 'riga', 'gap_r', 'avg_pos', 'avg_neg', 'loss',
                'sga_ci', 'sga_hard_ci', 'riga_ci'):
        assert metrics[key] is not None, key
    assert set(metrics['sga']) == {'P3', 'P4', 'P5', 'P6', 'P7', 'all'}
    assert all(0 <= v <= 1 for v in metrics['sga'].values())
    assert all(lo <= metrics['sga'][k] <= hi for k, (lo, hi) in metrics['sga_ci'].items())
    assert metrics['gallery_size'] == n_images
    assert metrics['baselines']['template_matching']['sga'] is not None
    assert metrics['baselines']['template_matching']['sga_ci'] is not None
    assert 'imagenet_resnet' in metrics['baselines']
    assert metrics['settings']['queries_per_image'] == 8 and metrics['n_queries']['localization'] == 8 * n_images


def test_las_eval_synthetic(tmp_path):
    "A --random-init run against a separately built twin of the same seed: RIGA equals SGA because it was measured twice"
    metrics, stdout = _run(['--random-init', '--preset', 'model2', '--data', 'synthetic', '--max-images', '6',
                            '--image-size', '128', '--batch-size', '6', '--reference-queries', '16', '--per-query'], tmp_path)
    _check(metrics, 6)
    assert not metrics['settings']['random_init_is_model']           # two model objects, each evaluated
    assert metrics['riga'] == metrics['sga'] and metrics['riga_hard'] == metrics['sga_hard']
    assert metrics['baselines']['random_init']['map'] == metrics['map']
    measured = [v for v in metrics['gap_r'].values() if v is not None]
    assert measured and all(v == 1.0 for v in measured), metrics['gap_r']   # measured somewhere, and 1 there
    assert metrics['top_k_instance'] is not None and metrics['retrieval_chance'] is not None
    assert set(metrics['hubness']) >= {'max', 'zscore', 'csls'} and set(metrics['hubness_reduced']) == {'zscore', 'csls'}
    assert '### Localization' in stdout and '### Retrieval' in stdout and "paper's reading" in stdout
    rows = list(csv.DictReader(open(tmp_path / 'eval' / 'per_query.csv')))
    std = [r for r in rows if r['method'] == 'model' and r['kind'] == 'standard']
    assert len(std) == 48 and sum(int(r['hit_all']) for r in std) / 48 == pytest.approx(metrics['sga']['all'])
    obj = [r for r in rows if r['method'] == 'model' and r['kind'] == 'object']
    assert len(obj) == metrics['n_queries']['retrieval'] and all(r['top10'] and r['source_rank'] for r in obj)
    assert (tmp_path / 'eval' / 'per_category.csv').is_file()


def _cli(argv, capsys):
    from learn_and_search.evaluate.run import main
    try: code = main(argv)
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err


def test_las_eval_bad_input(tmp_path, capsys):
    "A missing checkpoint or --random-init without --preset: clear message, non-zero exit, nothing written"
    code, err = _cli(['--checkpoint', str(tmp_path / 'missing.pt'), '--out', str(tmp_path / 'o')], capsys)
    assert code == 2 and 'missing.pt' in err and err.startswith('las-eval: error:') and not (tmp_path / 'o').exists()
    code, err = _cli(['--random-init', '--data', 'synthetic'], capsys)
    assert code == 2 and '--preset' in err


@pytest.mark.parametrize('flags, message', [
    (['--query-size', '0'], '--query-size 0'), (['--query-size', '-5'], '--query-size -5'),
    (['--query-size', '4000', '--image-size', '128'], '--query-size 4000'), (['--batch-size', '0'], '--batch-size 0'),
    (['--queries-per-image', '0'], '--queries-per-image 0'), (['--max-images', '0'], '--max-images 0'),
    (['--image-size', '100'], '--image-size=100'), (['--reference-queries', '1'], '--reference-queries 1'),
    (['--bootstrap', '5'], '--bootstrap 5'), (['--bootstrap', '100000000'], '--bootstrap 100000000: must be in [100, 100,000]'),
    (['--image-size', '100000'], '--image-size=100000: must be a multiple of 32 between 64 and 2048'),
    (['--seed', '-1'], '--seed -1'), (['--device', 'tpu'], "'tpu'")])
def test_las_eval_rejects_bad_flag_values(tmp_path, capsys, flags, message):
    "Every numeric flag is checked before any work: one line naming the flag and value, exit 2, nothing written"
    code, err = _cli(['--random-init', '--preset', 'model1', '--out', str(tmp_path / 'o'), *flags], capsys)
    assert code == 2 and err.startswith('las-eval: error: ') and message in err and err.count('\n') == 1, err
    assert not (tmp_path / 'o').exists()


def test_las_eval_skip_unreadable_leaves_a_bad_gallery_image_out(tmp_path, capsys):
    "A corrupt gallery image stops las-eval with the hint to --skip-unreadable, which it accepts: left out first, counted"
    from learn_and_search.data.synthetic import make_synthetic_coco
    root = make_synthetic_coco(tmp_path / 'coco', n_train=2, n_val=5, image_size=64, seed=0)
    bad = sorted((Path(root) / 'val2017').iterdir())[2]; bad.write_bytes(b'not an image')
    argv = ['--random-init', '--preset', 'model1', '--dim', '32', '--data', str(root), '--image-size', '64', '--query-size', '32',
            '--no-baselines', '--reference-queries', '0', '--bootstrap', '100', '--out', str(tmp_path / 'o')]
    code, err = _cli(argv, capsys)
    assert code == 2 and bad.name in err and 'pass --skip-unreadable' in err and err.count('\n') == 1, err
    code, err = _cli(argv + ['--skip-unreadable'], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
    assert metrics['gallery']['size'] == 4 and metrics['gallery']['parts'][0]['n_unreadable'] == 1, metrics['gallery']
    assert metrics['n_queries']['localization'] == 4 * 8


def test_las_eval_refuses_corrupt_and_hostile_checkpoints(tmp_path, capsys):
    "Empty, truncated, foreign and pickled-object checkpoints: one line, never advising weights_only=False, nothing run"
    class Boom:
        def __reduce__(self): return (os.system, (f'touch {tmp_path / "pwned"}',))
    torch.save({'model': Boom(), 'config': {}}, tmp_path / 'evil.pt')
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'text.pt').write_text('hello')
    torch.save({'a': torch.zeros(2)}, tmp_path / 'foreign.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'foreign.pt').read_bytes()[:100])
    for name in ('evil', 'empty', 'text', 'foreign', 'cut'):
        code, err = _cli(['--checkpoint', str(tmp_path / f'{name}.pt'), '--out', str(tmp_path / 'o')], capsys)
        assert code == 2 and err.startswith('las-eval: error: ') and err.count('\n') == 1, (name, err)
        assert 'weights_only=False' not in err and f'{name}.pt' in err, (name, err)
    assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'o').exists()


def test_las_eval_out_is_a_file_fails_before_work(tmp_path, capsys):
    (tmp_path / 'taken').write_text('x')
    code, err = _cli(['--random-init', '--preset', 'model1', '--out', str(tmp_path / 'taken')], capsys)
    assert code == 2 and 'is not a folder' in err and (tmp_path / 'taken').read_text() == 'x'


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_las_eval_cuda_without_gpu(tmp_path, capsys):
    code, err = _cli(['--random-init', '--preset', 'model1', '--device', 'cuda', '--out', str(tmp_path / 'o')], capsys)
    assert code == 2 and 'CUDA is not available' in err and err.count('\n') == 1


def test_wilson_interval_known_values():
    "Closed-form Wilson intervals worked by hand (z = 1.95996)"
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)


def test_image_bootstrap_interval():
    "All hits -> [1, 1]; one query per image -> the normal approximation; 8 copies per image -> no narrower"
    assert bootstrap_interval(torch.ones(20), torch.arange(20)) == (1.0, 1.0)
    v = torch.zeros(400); v[:120] = 1
    lo, hi = bootstrap_interval(v, torch.arange(400), n_boot=4000)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert (lo, hi) == pytest.approx((0.3 - half, 0.3 + half), abs=0.01)
    lo8, hi8 = bootstrap_interval(v.repeat_interleave(8), torch.arange(400).repeat_interleave(8), n_boot=4000)
    assert hi8 - lo8 == pytest.approx(hi - lo, abs=0.01)
    ci = sga_intervals({'all': v.bool()}, torch.arange(400), seed=1)
    assert ci == sga_intervals({'all': v.bool()}, torch.arange(400), seed=1) and ci['all'][0] < 0.3 < ci['all'][1]


def test_category_chance_rates_brute_force():
    "Micro/macro P@k and mAP, with and without 'person', averaged over every ordering of a toy gallery = exact chance"
    cats = [{1}, {1, 2}, {2}, {1}, {3}, {1, 3}, {2, 3}]
    source, qcat = torch.tensor([0, 2, 4, 1, 3, 6]), torch.tensor([1, 2, 3, 1, 1, 2])
    rel = relevance(qcat, cats)
    runs = []
    for perm in itertools.permutations(range(7)):
        pq = query_retrieval(torch.tensor(perm).float().expand(6, 7), source, rel, k=3)
        runs.append(category_retrieval(pq['p_at_k'], pq['ap'], qcat, person=1))
    ch = chance_per_query(source, rel)
    expected = category_retrieval(ch['p_at_k'], ch['ap'], qcat, person=1)
    for part in ('all', 'no_person'):
        for key in ('p_at_10_micro', 'p_at_10_macro', 'map_micro', 'map_macro'):
            assert sum(r[part][key] for r in runs) / len(runs) == pytest.approx(expected[part][key], abs=1e-6), (part, key)
    assert expected['no_person']['n_queries'] == 3
    assert [c for c, _, _ in per_category(ch['p_at_k'], qcat)] == [1, 2, 3]


def test_gallery_disjoint_from_training_folder(tmp_path):
    "Images whose COCO id names a file of the training folder are removed and counted; the rest are all kept"
    from learn_and_search.data.gallery import open_gallery, training_ids
    train = tmp_path / 'train'; train.mkdir()
    for name in ('000001000004.jpg', '000000000007.png', 'COCO_train2014_000001000010.jpg', 'cat.jpg'):
        (train / name).write_bytes(b'')
    ids, unnamed = training_ids(train)
    assert ids == {1000004, 7, 1000010} and unnamed == 1
    full = open_gallery([('synthetic', 'val2017'), ('synthetic', 'train2017')])
    gal = open_gallery([('synthetic', 'val2017'), ('synthetic', 'train2017')], ids)
    assert gal.removed_training == 3 and len(gal) == len(full) - 3
    assert not set(gal.ids) & ids and set(gal.ids) == set(full.ids) - ids


@pytest.mark.skipif(not os.environ.get('COCO_ROOT'), reason='COCO_ROOT is not set (a COCO root with val2017)')
def test_las_eval_coco(tmp_path):
    metrics, stdout = _run(['--random-init', '--preset', 'model1', '--data', os.environ['COCO_ROOT'],
                            '--split', 'val2017,train2017', '--max-images', '20', '--image-size', '128'], tmp_path)
    _check(metrics, 20)
    assert metrics['n_queries']['retrieval'] > 0 and metrics['map'] is not None
    assert metrics['baselines']['colour_histogram']['map'] is not None
    print(stdout)


def test_las_eval_and_the_reproduce_step_report_the_same_numbers(tmp_path, capsys):
    """One checkpoint, the same settings: `las-eval` and `las-reproduce`'s evaluate step choose the same gallery, exclusions
    and reference images (`evaluate.run.evaluation_data`), so metrics.json holds the same numbers and the same record"""
    from learn_and_search.evaluate.run import main
    from learn_and_search.paper.notebooks import EvaluateNotebook, TrainNotebook
    # fp32 by name: what this test compares is the two evaluation paths, and 'auto' would train in bf16 on CPUs with
    # native bf16 (one such machine saw a non-finite checkpoint here, which the gradient check now refuses to write)
    ck = TrainNotebook(dim=32, image_size=64, query_size=32, steps=2, precision='fp32', out=str(tmp_path/'train')).run()['checkpoint']
    EvaluateNotebook(ck, max_images=6, n_examples=1, n_queries=1, k=5, out=str(tmp_path/'step')).run()
    assert main(['--checkpoint', ck, '--data', 'synthetic', '--split', 'val2017', '--max-images', '6',
                 '--out', str(tmp_path/'cli')]) == 0
    step, cli = (json.loads((tmp_path/d/'metrics.json').read_text()) for d in ('step', 'cli'))
    for key in ('sga', 'sga_ci', 'sga_hard', 'riga', 'chance_sga', 'top_k_instance', 'map', 'gallery', 'gallery_size',
                'n_queries', 'hubness', 'baselines'):
        assert step[key] == cli[key], key
    for m in (step, cli): del m['settings']['seconds']   # wall time: the one field that may differ
    assert step == cli   # one path (`evaluate.run.run_evaluation`): the whole metrics.json is the same, its source included
    assert step['settings']['reference'] == cli['settings']['reference'] and step['settings']['reference']['n_queries'] > 0
    assert step['gallery']['excluded_from'] == ['synthetic:train2017']
