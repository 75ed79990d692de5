"""Tests of `learn_and_search.index`, `.search` and `.search_cli`: save/load round trip, approximate recall, group-by-image
max, bad inputs, and the `las-search` CLI end to end on the synthetic COCO (all CPU, a few seconds)."""
import json, os, subprocess, sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn_and_search.index import group_max, random_unit_cells, recall_at_k
from learn_and_search.search import IndexFormatError, SearchIndex
from learn_and_search.search_cli import main, random_model

GRIDS = {'P5': (4, 4), 'P6': (2, 2), 'P7': (1, 1)}   # 21 cells: the default levels of a 128-px scene
ROOT = Path(__file__).resolve().parent.parent
faiss.omp_set_num_threads(1)   # tiny indexes: threads only add overhead, and the machine is shared


def gallery(n=400, dim=16, seed=1):
    "Clustered unit cells of `n` images and 20 queries near random gallery cells"
    g = torch.Generator().manual_seed(seed)
    cells = random_unit_cells(n, 21, dim, clusters=32, generator=g)
    src = torch.randint(0, n, (20,), generator=g)
    queries = F.normalize(cells[src, 0] + 0.1 * torch.randn(20, dim, generator=g), dim=-1)
    return cells, queries


def filled(kind, cells, **kw):
    n = len(cells)
    return SearchIndex(cells.shape[-1], GRIDS, 128, kind, **kw).train(cells).add(
        cells, list(range(n)), [f'/gallery/{i}.jpg' for i in range(n)], [(640, 480)] * n)


APPROX = {'ivf': dict(nlist=32, nprobe=8), 'hnsw': dict(M=16)}


def test_group_max_on_constructed_embeddings():
    # query e0; image 0: many 0.6 cells; image 1: one 0.9 cell; image 2: best 0.3; image 3: all negative
    dim, C = 4, 21
    e = torch.eye(dim)
    def cells_with(cos):                                  # C unit cells with cosine `cos[i]` to e0 (rest orthogonal)
        c = torch.tensor(cos)[:, None] * e[0] + torch.sqrt(1 - torch.tensor(cos)**2)[:, None] * e[1]
        return c
    imgs = torch.stack([cells_with([0.6] * 20 + [0.5]), cells_with([0.9] + [-0.5] * 20),
                        cells_with([0.3] + [0.1] * 20), cells_with([-0.2] * 21)])
    idx = SearchIndex(dim, GRIDS, 128).add(imgs, [10, 11, 12, 13], ['a', 'b', 'c', 'd'], [(128, 128)] * 4)
    s, r, c = idx.search_vectors(e[0][None], k=4)
    assert r[0].tolist() == [1, 0, 2, 3]
    np.testing.assert_allclose(s[0], [0.9, 0.6, 0.3, -0.2], atol=1e-6)
    assert c[0, 0] == 0 and c[0, 2] == 0                  # the best cell of images 1 and 2 is their first
    res = idx.results(s, r, c)[0]
    assert [x['image_id'] for x in res] == [11, 10, 12, 13]
    assert res[0]['box'] == [0.0, 0.0, 32.0, 32.0] and res[0]['level'] == 'P5'
    # group_max itself on unsorted hits with a pad
    s, r, c = group_max(np.array([[0.2, 0.9, 0.5, 0.0]]), np.array([[3, 25, 4, -1]]), 21, 3)
    assert r[0].tolist() == [1, 0, -1] and c[0].tolist() == [4, 4, -1]


@pytest.mark.parametrize('kind', ['flat', 'ivf', 'hnsw'])
def test_save_load_round_trip(tmp_path, kind):
    cells, queries = gallery()
    a = filled(kind, cells, **APPROX.get(kind, {}))
    a.save(tmp_path / 'idx')
    b = SearchIndex.load(tmp_path / 'idx')
    for x, y in zip(a.search_vectors(queries, 10), b.search_vectors(queries, 10)):
        np.testing.assert_array_equal(x, y)
    assert a.results(*a.search_vectors(queries, 5)) == b.results(*b.search_vectors(queries, 5))
    assert (b.kind, b.levels, b.image_size, b.params) == (kind, a.levels, 128, a.params)


@pytest.mark.parametrize('kind', ['ivf', 'hnsw'])
def test_approximate_recall_at_10(kind):
    cells, queries = gallery(n=1000, dim=32)
    exact = filled('flat', cells).search_vectors(queries, 10)[1]
    approx = filled(kind, cells, **APPROX[kind])
    assert recall_at_k(approx.search_vectors(queries, 10)[1], exact) >= 0.95
    # re-ranking returns exact image scores for the images it returns
    s, r, _ = approx.search_vectors(queries, 10)
    true = torch.einsum('ncd,qd->qnc', cells, queries).amax(-1).numpy()          # (Q, n) exact image scores
    np.testing.assert_allclose(s, np.take_along_axis(true, r, 1), atol=1e-5)


def test_corrupt_truncated_and_mismatched_index_fail_to_load(tmp_path):
    cells, _ = gallery(n=50)
    filled('flat', cells).save(tmp_path / 'idx')
    f, meta = tmp_path / 'idx' / 'index.faiss', tmp_path / 'idx' / 'meta.json'
    data, m = f.read_bytes(), meta.read_text()
    f.write_bytes(data[:100])
    with pytest.raises(IndexFormatError, match='index.faiss has 100 bytes'): SearchIndex.load(tmp_path / 'idx')
    f.write_bytes(data[:-8] + b'\0' * 8)
    with pytest.raises(IndexFormatError, match='index.faiss fails its SHA-256'): SearchIndex.load(tmp_path / 'idx')
    f.write_bytes(b'XXXX' + data[4:])                      # a broken header, same size, hash check skipped
    with pytest.raises(IndexFormatError, match='index.faiss could not be read by FAISS'): SearchIndex.load(tmp_path / 'idx', verify=False)
    f.write_bytes(data)
    meta.write_text(m.replace('"version": 1', '"version": 2'))
    with pytest.raises(IndexFormatError, match='meta.json has format version 2'): SearchIndex.load(tmp_path / 'idx')
    meta.write_text(m[:50])
    with pytest.raises(IndexFormatError, match='meta.json is not valid JSON'): SearchIndex.load(tmp_path / 'idx')
    meta.unlink()
    with pytest.raises(IndexFormatError, match='meta.json is missing'): SearchIndex.load(tmp_path / 'idx')
    (tmp_path / 'idx' / 'images.json').write_text('[')
    meta.write_text(m)
    with pytest.raises(IndexFormatError, match='images.json'): SearchIndex.load(tmp_path / 'idx')


@pytest.fixture(scope='module')
def tiny_model():
    return random_model('model1', dim=32, seed=0)


def test_bad_inputs_api(tiny_model, tmp_path):
    with pytest.raises(ValueError, match='gallery is empty'): SearchIndex.build(tiny_model, [], progress=False)
    img = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    idx = SearchIndex.build(tiny_model, [dict(image=img, image_id=0, path='x.png')], image_size=64, progress=False)
    with pytest.raises(ValueError, match='not inside the 80x48 image'): idx.search(img, [70, 0, 20, 10])
    with pytest.raises(ValueError, match='not inside'): idx.search(img, [-5, 0, 20, 10])
    with pytest.raises(ValueError, match='under 1 px'): idx.search(img, [0, 0, 20, 0.5])
    with pytest.raises(ValueError, match='k must be >= 1'): idx.search(img, [0, 0, 20, 10], k=0)
    bad = tmp_path / 'bad.jpg'; bad.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='bad.jpg'): idx.search(bad, [0, 0, 20, 10])
    assert len(idx.search(img, [0, 0, 20, 10], k=5)) == 1                 # fewer images than k: all of them
    loc, top = idx.locate(img, [0, 0, 20, 10], img), idx.search(img, [0, 0, 20, 10])[0]
    assert loc['score'] == pytest.approx(top['score'], abs=1e-4) and loc['box'] == pytest.approx(top['box'], abs=1e-2)
    assert {l: tuple(m.shape) for l, m in loc['heatmaps'].items()} == {'P5': (2, 2), 'P6': (1, 1), 'P7': (1, 1)}


def las_search(*args, cwd=ROOT):
    return subprocess.run([sys.executable, '-m', 'learn_and_search.search_cli', *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    "An index of 12 synthetic COCO images built by the CLI with a random model"
    out = tmp_path_factory.mktemp('cli') / 'index'
    p = las_search('build', '--images', 'synthetic', '--random-init', '--preset', 'model1', '--dim', '32',
                   '--image-size', '64', '--limit', '12', '--batch-size', '6', '--out', out, '--no-progress')
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def test_cli_build_and_query_end_to_end(built, tmp_path):
    out, info = built
    assert info['images'] == 12 and info['levels'] == ['P5', 'P6', 'P7'] and (out / 'meta.json').is_file()
    index = SearchIndex.load(out)
    query_image = index.paths[4]
    w, h = index.sizes[4]
    grid = tmp_path / 'grid.png'
    p = las_search('query', '--index', out, '--image', query_image, '--box', f'{w*0.1},{h*0.2},{w*0.3},{h*0.25}', '-k', '5',
                   '--grid', grid)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res['query']['image'] == query_image and res['query']['box'] == pytest.approx([w*0.1, h*0.2, w*0.3, h*0.25])
    assert len(res['results']) == 5
    for r in res['results']:
        assert set(r) >= {'image', 'image_id', 'score', 'box'} and r['image'] in index.paths and len(r['box']) == 4
        x, y, bw, bh = r['box']; W, H = index.sizes[index.paths.index(r['image'])]
        assert 0 <= x and 0 <= y and x + bw <= W + 1e-3 and y + bh <= H + 1e-3
    scores = [r['score'] for r in res['results']]
    assert scores == sorted(scores, reverse=True)
    assert grid.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_bad_inputs_fail_and_write_nothing(built, tmp_path, capsys):
    out, _ = built
    index = SearchIndex.load(out)
    img, (w, h) = index.paths[0], index.sizes[0]
    bad = tmp_path / 'bad.jpg'; bad.write_bytes(b'\xff\xd8\xff garbage')
    grid = tmp_path / 'grid.png'
    cases = [(['--image', img, '--box', f'{w-5},0,10,10'], 'not inside'),
             (['--image', img, '--box', '0,0,0.5,10'], 'under 1 px'),
             (['--image', img, '--box', '0,0,10'], '--box must be x,y,w,h'),
             (['--image', bad, '--box', '0,0,10,10'], 'bad.jpg'),
             (['--image', tmp_path / 'missing.png', '--box', '0,0,10,10'], 'missing.png'),
             (['--image', img, '--box', '0,0,10,10', '-k', '0'], '-k must be >= 1'),
             (['--image', img, '--box', '0,0,10,10', '--index', tmp_path / 'nowhere'], 'nowhere')]
    for args, msg in cases:
        assert main(['query', '--index', str(out), *map(str, args), '--grid', str(grid)]) == 2, args
        err = capsys.readouterr()
        assert msg in err.err and err.out == '' and not grid.exists(), (args, err)
    empty = tmp_path / 'empty'; empty.mkdir()
    assert main(['build', '--images', str(empty), '--random-init', '--dim', '32', '--out', str(tmp_path / 'idx2')]) == 2
    assert 'no images' in capsys.readouterr().err and not (tmp_path / 'idx2').exists()
    assert main(['build', '--images', 'synthetic', '--random-init', '--dim', '32', '--out', str(out)]) == 2
    assert 'already exists' in capsys.readouterr().err
    # an index queried with another model is refused
    m = random_model(dim=32, seed=5)
    torch.save(dict(model=m.state_dict(), config=m.config, step=0), tmp_path / 'other.pt')
    assert main(['query', '--index', str(out), '--image', img, '--box', '0,0,10,10', '--checkpoint', str(tmp_path / 'other.pt')]) == 2
    assert 'not the one' in capsys.readouterr().err
    # and the console script exits non-zero with the message on stderr
    p = las_search('query', '--index', out, '--image', img, '--box', f'{w-5},0,10,10', '--grid', grid)
    assert p.returncode == 2 and 'not inside' in p.stderr and p.stdout == '' and not grid.exists()


@pytest.mark.skipif(not os.environ.get('COCO_ROOT'), reason='COCO_ROOT is not set (point it at a COCO-layout folder, e.g. coco-mini)')
def test_cli_on_real_coco(tmp_path):
    root = os.environ['COCO_ROOT']
    p = las_search('build', '--images', root, '--split', 'val2017', '--random-init', '--dim', '32', '--limit', '8',
                   '--out', tmp_path / 'idx', '--no-progress')
    assert p.returncode == 0, p.stderr
    index = SearchIndex.load(tmp_path / 'idx')
    w, h = index.sizes[3]
    p = las_search('query', '--index', tmp_path / 'idx', '--image', index.paths[3], '--box', f'{w/4},{h/4},{w/5},{h/5}', '-k', '3')
    assert p.returncode == 0, p.stderr
    assert [r['image'] in index.paths for r in json.loads(p.stdout)['results']] == [True] * 3
