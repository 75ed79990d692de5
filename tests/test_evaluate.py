"""Tests of learn_and_search.metrics, .evaluate and .baselines that need subprocesses, files or real data."""
import json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch

from learn_and_search.metrics import (chance_sga, relevance, retrieval_chance, retrieval_metrics, sga_hits, sga_rates,
                                      gap_ratio)
from learn_and_search.baselines import ncc_locate, template_matching_hits, template_sizes

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
    proc = subprocess.run([str(LAS_EVAL), *args, '--out', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / 'metrics.json').read_text())
    assert (out / 'metrics.md').read_text() in proc.stdout + '\n'
    return metrics, proc.stdout


def _check(metrics, n_images):
    for key in ('sga', 'sga_hard', 'sga_strict', 'chance_sga', 'riga', 'gap_r', 'avg_pos', 'avg_neg', 'loss'):
        assert metrics[key] is not None, key
    assert set(metrics['sga']) == {'P3', 'P4', 'P5', 'P6', 'P7', 'all'}
    assert all(0 <= v <= 1 for v in metrics['sga'].values())
    assert metrics['gallery_size'] == n_images
    assert metrics['baselines']['template_matching']['sga'] is not None
    assert 'imagenet_resnet' in metrics['baselines']


def test_las_eval_synthetic(tmp_path):
    metrics, stdout = _run(['--random-init', '--preset', 'model2', '--data', 'synthetic', '--max-images', '6',
                            '--image-size', '128', '--batch-size', '6'], tmp_path)
    _check(metrics, 6)
    assert metrics['gap_r']['all'] in (1.0, None)          # the model is its own random-init twin
    assert metrics['top_k_instance'] is not None and metrics['retrieval_chance'] is not None
    assert '### Localization' in stdout and '### Retrieval' in stdout


def test_las_eval_bad_input(tmp_path, capsys):
    "A missing checkpoint or --random-init without --preset: clear message, non-zero exit, nothing written"
    from learn_and_search.evaluate import main
    with pytest.raises(SystemExit) as e:
        main(['--checkpoint', str(tmp_path / 'missing.pt'), '--out', str(tmp_path / 'o')])
    assert 'missing.pt' in str(e.value.code) and not (tmp_path / 'o').exists()
    with pytest.raises(SystemExit) as e: main(['--random-init', '--data', 'synthetic'])
    assert e.value.code == 2 and '--preset' in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get('COCO_ROOT'), reason='COCO_ROOT is not set (a COCO root with val2017)')
def test_las_eval_coco(tmp_path):
    metrics, stdout = _run(['--random-init', '--preset', 'model1', '--data', os.environ['COCO_ROOT'], '--split', 'val2017',
                            '--max-images', '20', '--image-size', '128'], tmp_path)
    _check(metrics, 20)
    assert metrics['n_queries']['retrieval'] > 0 and metrics['map'] is not None
    assert metrics['baselines']['colour_histogram']['map'] is not None
    print(stdout)
