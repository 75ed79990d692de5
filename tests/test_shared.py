"""The weight-shared model (`branches='shared'`) through every path that takes a model: the loss against the reference
loop, `las-train` (recorded in config.json and the checkpoint), `las-eval` with its random-init twin, and `las-search`
build and query with the index's model fingerprint (all CPU, synthetic scenes, seconds)."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

from learn_and_search.learn.loss import AntXentLoss, ant_xent_reference
from learn_and_search.learn.models import create_model, load_model, model_fingerprint, random_init_model
from learn_and_search.learn.train import sample_query_boxes, step_generator
pytestmark = pytest.mark.slow   # trains, evaluates or runs the command lines: `make test`, not `make check`

ROOT = Path(__file__).resolve().parent.parent


def test_loss_of_a_shared_model_matches_the_reference_loop():
    "The fused loss on a shared model's embeddings equals the per-sample reference loop, value and gradients"
    torch.manual_seed(0)
    model = create_model('shared', dim=16, levels=('P3', 'P4'), image_size=64, query_size=32).train()
    scenes = torch.rand(3, 3, 64, 64)
    boxes = sample_query_boxes(6, 64, (0.1, 0.25), step_generator(0, 0))        # K = 2 boxes per scene
    from learn_and_search.data.crops import crop_queries
    crops = crop_queries(scenes, boxes, 32)
    grads = []
    for fn in (lambda q, g: AntXentLoss()(q, g, boxes, 64).loss, lambda q, g: ant_xent_reference(q, g, boxes, 64)):
        model.zero_grad()
        loss = fn(*model(crops, scenes))
        loss.backward()
        grads.append((float(loss.detach()), model.scene_encoder.fpn.body.conv1.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-4)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-4 * float(grads[1][1].abs().max()))   # one trunk: both views' gradients reach it


def _run(module, *args):
    p = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope='module')
def shared_checkpoint(tmp_path_factory):
    "A `--preset model4 --branches shared` model trained 2 steps on synthetic scenes by the las-train CLI"
    out = tmp_path_factory.mktemp('shared') / 'run'
    _run('learn_and_search.learn.train', '--data', 'synthetic', '--preset', 'model4', '--branches', 'shared', '--image-size', '64',
         '--query-size', '32', '--dim', '32', '--batch-size', '4', '--queries-per-scene', '2', '--steps', '2',
         '--limit-images', '8', '--workers', '0', '--no-cache', '--out', out)
    return out


def test_las_train_records_the_branches(shared_checkpoint):
    cfg = json.loads((shared_checkpoint / 'config.json').read_text())
    assert (cfg['preset'], cfg['branches'], cfg['flip'], cfg['precision']) == ('model4', 'shared', 'image', 'fp32')
    model = load_model(shared_checkpoint / 'checkpoints' / 'last.pt')
    assert model.query_encoder is None and model.config['branches'] == 'shared'
    twin = random_init_model(model.config)
    assert twin.query_encoder is None and model_fingerprint(twin) != model_fingerprint(model)


def test_las_eval_on_a_shared_checkpoint(shared_checkpoint, tmp_path):
    ck = shared_checkpoint / 'checkpoints' / 'last.pt'
    _run('learn_and_search.evaluate.run', '--checkpoint', ck, '--data', 'synthetic', '--split', 'val2017', '--max-images', '4',
         '--bootstrap', '100', '--no-baselines', '--out', tmp_path / 'eval')
    m = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    assert 0 <= m['sga']['all'] <= 1 and m['riga'] is not None   # the random-init twin (shared too) was evaluated beside it


def test_las_search_on_a_shared_checkpoint(shared_checkpoint, tmp_path):
    ck, out = shared_checkpoint / 'checkpoints' / 'last.pt', tmp_path / 'index'
    _run('learn_and_search.search.cli', 'build', '--images', 'synthetic', '--checkpoint', ck, '--limit', '6', '--out', out,
         '--no-progress')
    from learn_and_search.search.index import SearchIndex
    index = SearchIndex.load(out)
    assert index.model_info['config']['branches'] == 'shared'
    assert index.model_info['fingerprint'] == model_fingerprint(load_model(ck))   # the index names the shared model's weights
    w, h = index.sizes[0]
    res = json.loads(_run('learn_and_search.search.cli', 'query', '--index', out, '--image', index.paths[0], '--box',
                          f'{w * 0.2},{h * 0.2},{w * 0.3},{h * 0.3}', '-k', '3').stdout)
    assert len(res['results']) == 3 and all(len(r['box']) == 4 for r in res['results'])
