"""Tests of `learn_and_search.search.layout`, `.index_store`, `.search` and `.search_cli`: save/load round trip, approximate recall,
group-by-image max, the hubness-reduced score on a planted hub, bad inputs, and the `las-search` CLI end to end on the
synthetic COCO: one-line errors, bounded memory, umask modes, locks, killed saves, unreadable images (all CPU)."""
import json, math, os, re, signal, stat, subprocess, sys, time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learn_and_search.evaluate.hubness import adjust_scores
from learn_and_search.search.layout import group_max, random_unit_cells, recall_at_k
from learn_and_search.search.store import index_lock
from learn_and_search.learn.models import random_init_model
from learn_and_search.search.index import IndexFormatError, SearchIndex
from learn_and_search.search.cli import NUMERIC_FLAGS, main
pytestmark = pytest.mark.slow   # trains, evaluates or runs the command lines: `make test`, not `make check`

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
    meta.write_text(m.replace('"version": 2', '"version": 3'))                  # (format version 2 is current)
    with pytest.raises(IndexFormatError, match='meta.json has format version 3'): SearchIndex.load(tmp_path / 'idx')
    meta.write_text(m[:50])
    with pytest.raises(IndexFormatError, match='meta.json is not valid JSON'): SearchIndex.load(tmp_path / 'idx')
    meta.unlink()
    with pytest.raises(IndexFormatError, match='meta.json is missing'): SearchIndex.load(tmp_path / 'idx')
    (tmp_path / 'idx' / 'images.json').write_text('[')
    meta.write_text(m)
    with pytest.raises(IndexFormatError, match='images.json'): SearchIndex.load(tmp_path / 'idx')


@pytest.fixture(scope='module')
def tiny_model():
    return random_init_model(None, 0, preset='model1', dim=32)


def test_bad_inputs_api(tiny_model, tmp_path):
    with pytest.raises(ValueError, match='gallery is empty'): SearchIndex.build(tiny_model, [], progress=False)
    img = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    idx = SearchIndex.build(tiny_model, [dict(image=img, image_id=0, path='x.png')], image_size=64, progress=False, reference=0)
    with pytest.raises(ValueError, match='not inside the 80x48 image'): idx.search(img, [70, 0, 20, 10])
    with pytest.raises(ValueError, match='not inside'): idx.search(img, [-5, 0, 20, 10])
    with pytest.raises(ValueError, match='under 1 px'): idx.search(img, [0, 0, 20, 0.5])
    with pytest.raises(ValueError, match='k must be >= 1'): idx.search(img, [0, 0, 20, 10], k=0)
    bad = tmp_path / 'bad.jpg'; bad.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='bad.jpg'): idx.search(bad, [0, 0, 20, 10])
    assert len(idx.search(img, [0, 0, 20, 10], k=5)) == 1                 # fewer images than k: all of them
    loc, top = idx.locate(img, [0, 0, 20, 10], img), idx.search(img, [0, 0, 20, 10])[0]
    assert loc['score'] == pytest.approx(top['score'], abs=1e-4) and loc['box'] == pytest.approx(top['box'], abs=1e-2)
    assert {l: tuple(m.shape) for l, m in loc['heatmaps'].items()} == {'P3': (8, 8), 'P4': (4, 4), 'P5': (2, 2)}


def las_search(*args, cwd=ROOT):
    return subprocess.run([sys.executable, '-m', 'learn_and_search.search.cli', *map(str, args)], cwd=cwd,
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
    assert info['images'] == 12 and info['levels'] == ['P3', 'P4', 'P5'] and (out / 'meta.json').is_file()
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
    m = random_init_model(None, 5, dim=32)
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


# ---------------------------------------------------------------- hubness-reduced scores (issue 10 item 4)

def planted_hub(G=300, C=21, D=32, Q=12, seed=0):
    "A gallery whose image 0 is a hub (every cell near one direction the queries lean to), queries, their true matches, reference queries"
    g = torch.Generator().manual_seed(seed)
    def toward(d, n, cos):
        e = torch.randn(n, D, generator=g); e = F.normalize(e - (e @ d)[:, None] * d, dim=-1)
        return cos * d + math.sqrt(1 - cos**2) * e
    hub_dir = F.normalize(torch.randn(D, generator=g), dim=0)
    cells = F.normalize(torch.randn(G, C, D, generator=g), dim=-1)
    cells[0] = toward(hub_dir, C, 0.97)
    queries, ref = toward(hub_dir, Q, 0.6), toward(hub_dir, 64, 0.6)
    truth = torch.arange(1, Q + 1) * 7
    cells[truth, 3] = F.normalize(queries + 0.05 * torch.randn(Q, D, generator=g), dim=-1)
    return cells, queries, truth, ref


@pytest.mark.parametrize('kind', ['flat', 'ivf', 'hnsw'])
def test_planted_hub_is_demoted_and_true_match_is_not(tmp_path, kind):
    cells, queries, truth, ref = planted_hub()
    G = len(cells)
    idx = SearchIndex(32, GRIDS, 128, kind, **APPROX.get(kind, {})).train(cells).add(cells, list(range(G)), [f'{i}.jpg' for i in range(G)], [(128, 128)] * G)
    idx.set_reference(ref)
    _, r, _ = idx.search_vectors(queries, 10, score='max')
    assert (r == 0).any(1).all()                                           # the paper's score: the hub is in every top 10
    assert (r[:, 0] == truth.numpy()).all()
    idx.save(tmp_path / 'idx')
    for index in (idx, SearchIndex.load(tmp_path / 'idx')):                # the statistics travel with the index
        _, rz, _ = index.search_vectors(queries, 10, score='zscore')
        assert not (rz == 0).any(), 'the hub must leave every top-10 list'
        assert (rz[:, 0] == truth.numpy()).all(), 'each true match must stay first'
    # exact against brute force (flat), whatever the first candidate count
    if kind == 'flat':
        img = torch.einsum('gcd,qd->qgc', cells, queries).amax(-1)
        for mode in ('zscore', 'csls'):
            for rerank in (0, 50):
                s, r, _ = idx.search_vectors(queries, 10, rerank=rerank, score=mode)
                want = adjust_scores(img, idx.ref_stats, mode).topk(10)
                np.testing.assert_array_equal(r, want.indices.numpy())
                np.testing.assert_allclose(s, want.values.numpy(), atol=1e-4)


def test_hubness_scores_need_reference_statistics():
    cells, queries, _, _ = planted_hub(G=100)
    idx = filled('flat', cells)
    with pytest.raises(ValueError, match='needs reference statistics'): idx.search_vectors(queries, 5, score='zscore')
    with pytest.raises(ValueError, match="score must be one of"): idx.search_vectors(queries, 5, score='mean')


# ---------------------------------------------------------------- the CLI under a demanding user (issue 12)

def run_cli_lines(*args, **kw):
    "las-search in a subprocess: (returncode, stdout, stderr lines)"
    p = las_search(*args, **kw)
    return p.returncode, p.stdout, p.stderr.strip().splitlines()


def test_query_k_memory_is_bounded_by_the_gallery(built):
    "-k 100000000 peaks no higher than -k 5 (it peaked at 3.2 GB before -k was clamped to the gallery)"
    out, _ = built
    index = SearchIndex.load(out)
    w, h = index.sizes[0]
    def peak_mb(k):
        code = ("import resource, sys; from learn_and_search.search.cli import main; "
                f"rc = main(['query', '--index', {str(out)!r}, '--image', {index.paths[0]!r}, '--box', '0,0,{w/2},{h/2}', '-k', '{k}']); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
        p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
        assert p.returncode == 0, p.stderr
        assert len(json.loads(p.stdout)['results']) == min(k, 12)           # every image once, no more
        return int(re.search(r'PEAK (\d+)', p.stderr).group(1)) / 1024      # ru_maxrss is in KB on Linux
    small, huge = peak_mb(5), peak_mb(100000000)
    assert huge < small + 150 and huge < 2500, f'peak RSS {huge:.0f} MB with -k 100000000 vs {small:.0f} MB with -k 5'



BUILD = ['build', '--images', 'synthetic', '--random-init', '--preset', 'model1', '--dim', '32', '--image-size', '64',
         '--limit', '6', '--reference', '8', '--no-progress']


def test_invalid_ivf_and_hnsw_parameters_are_refused_at_build_time(tmp_path, capsys):
    rc, so, err = run_cli_lines(*BUILD, '--out', tmp_path / 'idx', '--kind', 'ivf', '--nprobe', '0')   # the console script
    assert rc == 2 and so == '' and err == ['las-search: error: --nprobe must be >= 1, got 0'], err
    for extra, msg in [(['--kind', 'ivf', '--nlist', '0'], '--nlist must be >= 1, got 0'),
                       (['--kind', 'hnsw', '--M', '1'], '--M must be >= 2, got 1'),
                       (['--kind', 'hnsw', '--ef-search', '0'], '--ef-search must be >= 1, got 0')]:
        assert main([*BUILD, '--out', str(tmp_path / 'idx'), *extra]) == 2
        err = capsys.readouterr()
        assert err.out == '' and err.err == f'las-search: error: {msg}\n', (extra, err.err)
    assert not (tmp_path / 'idx').exists()
    with pytest.raises(ValueError, match='nprobe >= 1'): SearchIndex(16, GRIDS, kind='ivf', nlist=4, nprobe=0)


def test_build_embeds_the_reference_crops_las_eval_cuts(built):
    "las-search build's reference queries are the crops `data.gallery.reference_crops` cuts (those las-eval validates on), embedded"
    from torch.utils.data import Subset
    from learn_and_search.data.images import open_images
    from learn_and_search.search.embed import embed_reference
    import learn_and_search.evaluate.run as evaluate
    from learn_and_search.data.gallery import reference_crops
    from learn_and_search.search.cli import model_from_source
    out, _ = built
    index = SearchIndex.load(out)
    info, images = index.reference_info, Subset(open_images('synthetic', 'train2017'), range(12))   # the build's --limit 12
    ref = reference_crops(images, info['crops'], index.image_size, index.query_size, seed=info['seed'])
    assert info['rule'] == 'gallery.reference_crops' and len(ref.crops) == len(index.reference) == 256
    assert evaluate.reference_crops is reference_crops   # las-eval cuts its reference queries with the same function
    np.testing.assert_array_equal(index.reference_sources, ref.source.numpy())
    want = F.normalize(embed_reference(model_from_source(index.model_info['source']), ref.crops), dim=-1).numpy()
    np.testing.assert_allclose(index.reference, want, atol=1e-5)


def test_every_numeric_flag_is_validated(built, tmp_path, capsys):
    "Table-driven: each numeric flag one below its lower bound is refused with one line naming it, before any work"
    out, _ = built
    index = SearchIndex.load(out)
    query = ['query', '--index', str(out), '--image', index.paths[0], '--box', '0,0,10,10']
    build = ['build', '--images', 'synthetic', '--random-init', '--out', str(tmp_path / 'x')]
    for flag, (dest, lo) in NUMERIC_FLAGS.items():
        assert main((query if flag in ('-k', '--rerank') else build) + [flag, str(lo - 1)]) == 2, flag
        err = capsys.readouterr()
        assert err.out == '' and err.err == f'las-search: error: {flag} must be >= {lo}, got {lo - 1}\n', (flag, err.err)
    for argv, msg in [(query + ['-k', 'many'], "argument -k: invalid int value: 'many'"),
                      (build + ['--image-size', '100'], '--image-size=100: must be a multiple of 32 between 64 and 2048'),
                      (build + ['--reference', '1'], '--reference must be 0 (none) or >= 2 crops, got 1')]:
        assert main(argv) == 2
        assert capsys.readouterr().err == f'las-search: error: {msg}\n'
    assert not (tmp_path / 'x').exists()


def test_box_with_negative_numbers_parses_and_a_bad_box_names_the_flag(built):
    out, _ = built
    index = SearchIndex.load(out)
    img, (w, h) = index.paths[0], index.sizes[0]
    rc, so, err = run_cli_lines('query', '--index', out, '--image', img, '--box', '-10,-10,50,50')
    assert rc == 2 and so == '' and err == [f'las-search: error: box x,y,w,h = -10,-10,50,50 is not inside the {w}x{h} image']
    rc, so, err = run_cli_lines('query', '--index', out, '--image', img, '--box', 'a,b,c,d')
    assert rc == 2 and err == ["las-search: error: --box must be x,y,w,h (4 comma-separated numbers), got 'a,b,c,d'"]
    rc, so, _ = run_cli_lines('query', '--index', out, '--image', img, '--box=0,0,10,10', '-k', '2', '--score', 'max')
    assert rc == 0 and len(json.loads(so)['results']) == 2


def test_index_files_and_folders_follow_the_umask(tmp_path):
    def build_with(mask, name):
        return subprocess.run([sys.executable, '-m', 'learn_and_search.search.cli', *BUILD, '--out', str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(mask))
    for mask in (0o022, 0o027):
        p = build_with(mask, f'idx{mask:o}')
        assert p.returncode == 0, p.stderr
        folder = tmp_path / f'idx{mask:o}'
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        for f in folder.iterdir(): assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    index = SearchIndex.load(tmp_path / 'idx22')
    grid = tmp_path / 'grid.png'
    p = subprocess.run([sys.executable, '-m', 'learn_and_search.search.cli', 'query', '--index', str(tmp_path / 'idx22'), '--image',
                        index.paths[0], '--box', '0,0,10,10', '--grid', str(grid)], capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.umask(0o022))
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(grid.stat().st_mode) == 0o644


def test_a_killed_save_leaves_leftovers_that_the_next_build_removes(tmp_path):
    out = tmp_path / 'idx'
    assert las_search(*BUILD, '--out', out).returncode == 0
    # a save killed (SIGKILL) while writing leaves its hidden temporary folder
    code = f'''if 1:
        import time, faiss, learn_and_search.search.index as s
        idx = s.SearchIndex.load({str(out)!r})
        real = faiss.write_index
        def slow(index, path): real(index, path); print('writing', flush=True); time.sleep(60)
        s.faiss.write_index = slow
        idx.save({str(out)!r}, overwrite=True)'''
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try: assert p.stdout.readline().strip() == 'writing'
    finally: p.send_signal(signal.SIGKILL); p.wait()
    (tmp_path / '.idx.old').mkdir()                                   # and a kill between the two renames, an .old folder
    left = sorted(x.name for x in tmp_path.iterdir() if x.is_dir() and x.name.startswith('.idx.'))
    assert len(left) == 2 and '.idx.old' in left and any(re.fullmatch(r'\.idx\.\w{8}\.tmp', x) for x in left), left
    SearchIndex.load(out)                                              # the index itself is intact
    assert las_search(*BUILD, '--out', out, '--overwrite').returncode == 0
    assert [x.name for x in tmp_path.iterdir() if x.is_dir() and x.name.startswith('.')] == []


def test_a_second_build_of_the_same_out_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / 'idx'
    holder = subprocess.Popen([sys.executable, '-c', f'''if 1:
        import time; from learn_and_search.search.store import index_lock
        index_lock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)'''], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        rc, so, err = run_cli_lines(*BUILD, '--out', out)
        assert rc == 2 and so == '' and len(err) == 1 and f'is in use by process {holder.pid}' in err[0], err
        assert not out.exists()
    finally: holder.kill(); holder.wait()
    assert las_search(*BUILD, '--out', out).returncode == 0           # the dead holder's lock is taken over


def test_build_skip_unreadable_counts_and_names_bad_images(tmp_path):
    from PIL import Image
    folder = tmp_path / 'imgs'; folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(4): Image.fromarray(g.integers(0, 255, (50 + 5 * i, 60, 3), dtype=np.uint8)).save(folder / f'ok{i}.png')
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff this is not a jpeg')
    args = ['build', '--images', folder, '--random-init', '--dim', '32', '--image-size', '64', '--reference', '8', '--no-progress']
    rc, so, err = run_cli_lines(*args, '--out', tmp_path / 'idx')
    assert rc == 2 and so == '' and len(err) == 1 and 'broken.jpg' in err[0] and '--skip-unreadable' in err[0], err
    assert not (tmp_path / 'idx').exists()
    rc, so, err = run_cli_lines(*args, '--out', tmp_path / 'idx', '--skip-unreadable')
    assert rc == 0, err
    res = json.loads(so)
    assert res['images'] == 4 and res['skipped'] == 1 and 'broken.jpg' in res['skipped_images'][0]
    assert any('left out 1 unreadable image' in l and 'broken.jpg' in l for l in err), err
    assert len(SearchIndex.load(tmp_path / 'idx')) == 4
    # with --limit the bad image is met while reading: left out too, never replaced by a duplicate of its neighbour
    rc, so, err = run_cli_lines(*args, '--out', tmp_path / 'idx3', '--skip-unreadable', '--limit', '3')
    assert rc == 0, err
    res = json.loads(so)
    assert res['images'] == 2 and res['skipped'] == 1 and 'broken.jpg' in res['skipped_images'][0]
    assert sorted(Path(p).name for p in SearchIndex.load(tmp_path / 'idx3').paths) == ['ok0.png', 'ok1.png']


def test_library_imports_without_fastcore():
    """The search, training, evaluation, paper and app modules import without fastcore (a requirement that only the flags' help texts
    import, lazily), as on a machine with just torch, numpy and faiss, such as the GPU machine `scripts/gpu_run.sh` expects"""
    code = ("import sys; sys.modules['fastcore'] = None; "        # any `import fastcore...` now raises ImportError
            "import learn_and_search.search.layout, learn_and_search.search.embed, learn_and_search.search.store, "
            "learn_and_search.search.index, learn_and_search.search.cli, learn_and_search.bench.search, "
            "learn_and_search.learn.train, learn_and_search.learn.config, learn_and_search.learn.run_folder, "
            "learn_and_search.evaluate.run, learn_and_search.paper.reproduce, learn_and_search.app.server, learn_and_search.bench.train")
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_build_skip_unreadable_leaves_out_a_coco_entry_whose_file_is_missing(tmp_path):
    "A COCO image record whose file is gone: named without --skip-unreadable, left out and counted with it (as las-train does)"
    from learn_and_search.data.synthetic import make_synthetic_coco
    root = make_synthetic_coco(tmp_path / 'coco', n_train=2, n_val=4, image_size=64, seed=0)
    gone = sorted((Path(root) / 'val2017').iterdir())[1]; gone.unlink()
    args = ['build', '--images', root, '--split', 'val2017', '--random-init', '--dim', '32', '--image-size', '64',
            '--reference', '0', '--no-progress']
    rc, so, err = run_cli_lines(*args, '--out', tmp_path / 'idx')
    assert rc == 2 and so == '' and len(err) == 1 and gone.name in err[0] and 'missing' in err[0], err
    rc, so, err = run_cli_lines(*args, '--out', tmp_path / 'idx', '--skip-unreadable')
    assert rc == 0, err
    res = json.loads(so)
    assert res['images'] == 3 and res['skipped'] == 1 and gone.name in res['skipped_images'][0], res


def test_grid_problems_never_cost_the_results(tmp_path):
    "A non-UTF-8 file name and a gallery image deleted after the build: the JSON comes first, the grid is drawn anyway"
    from PIL import Image
    folder = tmp_path / 'imgs'; folder.mkdir()
    g = np.random.default_rng(0)
    names = [os.fsdecode(b'caf\xe9.png'), 'a.png', 'b.png', 'c.png']   # the first is Latin-1 bytes, not UTF-8
    for i, n in enumerate(names): Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / n)
    rc, so, err = run_cli_lines('build', '--images', folder, '--random-init', '--dim', '32', '--image-size', '64',
                                '--reference', '0', '--no-progress', '--out', tmp_path / 'idx')
    assert rc == 0, err
    query = ['query', '--index', tmp_path / 'idx', '--image', folder / 'a.png', '--box', '8,8,30,30', '-k', '4']
    p = las_search(*query, '--grid', tmp_path / 'g1.png')
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)['results']) == 4 and (tmp_path / 'g1.png').read_bytes()[:4] == b'\x89PNG'
    (folder / 'b.png').unlink()
    p = las_search(*query, '--grid', tmp_path / 'g2.png')
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)['results']) == 4 and (tmp_path / 'g2.png').read_bytes()[:4] == b'\x89PNG'
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'warning: --grid' in lines[0] and '1 result image(s) unreadable' in lines[0] and 'b.png' in lines[0]


@pytest.mark.parametrize('kind, params', [('ivf', dict(nlist=16, nprobe=16)), ('hnsw', dict(M=32, ef_search=512))])
def test_approximate_search_matches_brute_force_in_every_score_mode(kind, params):
    """IVF probing every list is exact, HNSW at a wide ef_search near exact, for max, zscore and csls alike (the candidate
    widening of the hubness-reduced scores included), against the scores computed by hand over every cell"""
    cells, queries, _, ref = planted_hub(G=200)
    G = len(cells)
    idx = SearchIndex(32, GRIDS, 128, kind, **params).train(cells).add(cells, list(range(G)), [f'{i}.jpg' for i in range(G)],
                                                                      [(128, 128)] * G)
    idx.set_reference(ref)
    img = torch.einsum('gcd,qd->qgc', cells, queries).amax(-1)               # (Q, G) the paper's image score
    for mode in ('max', 'zscore', 'csls'):
        want = (img if mode == 'max' else adjust_scores(img, idx.ref_stats, mode)).topk(10)
        s, r, _ = idx.search_vectors(queries, 10, score=mode)
        if kind == 'ivf':
            np.testing.assert_array_equal(r, want.indices.numpy(), err_msg=mode)
            np.testing.assert_allclose(s, want.values.numpy(), atol=1e-4, err_msg=mode)
        else:
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r.tolist(), want.indices.tolist())])
            assert recall >= 0.95, (mode, recall)


@pytest.mark.parametrize('sig, rc, word', [(signal.SIGTERM, 143, 'terminated'), (signal.SIGINT, 130, 'interrupted')])
def test_a_signal_during_build_stops_it_cleanly(tmp_path, sig, rc, word):
    "SIGTERM or Ctrl-C while embedding: stops within seconds, one line, exit 143 / 130, no index or partial folder left"
    out = tmp_path / 'idx'
    cmd = [sys.executable, '-m', 'learn_and_search.search.cli', 'build', '--images', 'synthetic', '--split', 'train2017',
           '--random-init', '--preset', 'model1', '--dim', '32', '--image-size', '256', '--batch-size', '2', '--reference', '0',
           '--no-progress', '--out', str(out)]
    # a shell's background job (nohup make test &) ignores SIGINT, and so would the child: give it Ctrl-C back
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / '.idx.lock').exists():                         # the lock is taken once the work begins
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    t0 = time.time(); p.send_signal(sig)
    so, err = p.communicate(timeout=30)
    assert p.returncode == rc and time.time() - t0 < 10, (p.returncode, err)
    assert so == '' and err.strip().splitlines() == [f'las-search: {word}'], err
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.endswith('.tmp')]


def test_a_query_image_too_small_is_named(built, tmp_path):
    "A 1x1 query image: one line naming the file (it said 'image tensor')"
    from PIL import Image
    out, _ = built
    Image.new('RGB', (1, 1)).save(tmp_path / 'dot.png')
    rc, so, err = run_cli_lines('query', '--index', out, '--image', tmp_path / 'dot.png', '--box', '0,0,1,1')
    assert rc == 2 and so == '' and len(err) == 1 and f"{tmp_path / 'dot.png'}: image is 1x1 px, too small" in err[0], err
