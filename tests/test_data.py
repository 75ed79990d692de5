"""File-based tests of learn_and_search.data.images / synthetic / cache: bad inputs, image modes, EXIF, small images, the
image cache killed mid-build, and real-data checks over $COCO_ROOT and ../shared/data (skipped when absent).
The download against a local range server is tested in nbs/2_data/02_download.ipynb (one copy of the server)."""
import json, logging, os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import learn_and_search.data.images as data
from learn_and_search.data.images import (CocoImages, FolderImages, ImageReadError, check_readable, exif_boxes, load_image,
                                   mix_seed, object_queries, open_images, random_crop_queries, resize_square,
                                   sample_query_box)
from learn_and_search.data.synthetic import synthetic_coco

# ---------------------------------------------------------------- helpers

def write_coco(root, images, annotations=(), split='val2017', categories=((1, 'thing'),)):
    "Write root/annotations/instances_{split}.json; `images` = (id, file_name, width, height)"
    (root/split).mkdir(parents=True, exist_ok=True); (root/'annotations').mkdir(exist_ok=True)
    d = dict(images=[dict(id=i, file_name=f, width=w, height=h) for i, f, w, h in images],
             annotations=[dict(id=k + 1, image_id=i, category_id=c, bbox=list(b), iscrowd=0, area=b[2] * b[3])
                          for k, (i, c, b) in enumerate(annotations)],
             categories=[dict(id=i, name=n) for i, n in categories])
    (root/'annotations'/f'instances_{split}.json').write_text(json.dumps(d))
    return root

def rgb(w=8, h=6, colour=(10, 200, 30)): return Image.new('RGB', (w, h), colour)

def truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    b = path.read_bytes(); path.write_bytes(b[:len(b) // 2])

@pytest.fixture
def coco(tmp_path):
    "A valid two-image COCO folder"
    (tmp_path/'val2017').mkdir()
    rgb().save(tmp_path/'val2017'/'a.jpg'); rgb().save(tmp_path/'val2017'/'b.jpg')
    return write_coco(tmp_path, [(1, 'a.jpg', 8, 6), (2, 'b.jpg', 8, 6)], [(1, 1, (1, 1, 3, 2)), (2, 1, (0, 0, 8, 6))])

# ---------------------------------------------------------------- missing / malformed inputs

def test_valid(coco):
    ds = CocoImages(coco)
    assert len(ds) == 2 and ds.ids == [1, 2] and ds.categories == {1: 'thing'}
    x = ds[0]
    assert x['image'].shape == (3, 6, 8) and x['boxes'].tolist() == [[1, 1, 3, 2]] and x['category_ids'].tolist() == [1]

@pytest.mark.parametrize('remove', ['root', 'val2017', 'annotations/instances_val2017.json'])
def test_missing_folder_or_json(coco, remove):
    import shutil
    target = coco if remove == 'root' else coco/remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=str(target).replace('\\', '\\\\')): CocoImages(coco)

def test_malformed_json(coco):
    (coco/'annotations/instances_val2017.json').write_text('{"images": [1, 2')
    with pytest.raises(ValueError, match=r'instances_val2017.json: malformed JSON'): CocoImages(coco)
    (coco/'annotations/instances_val2017.json').write_text('[1, 2]')
    with pytest.raises(ValueError, match='not a COCO instances file'): CocoImages(coco)

@pytest.mark.parametrize('ann, msg', [
    (dict(id=7, image_id=99, category_id=1, bbox=[0, 0, 2, 2]), 'annotation 7 refers to image id 99'),
    (dict(id=7, image_id=1, category_id=5, bbox=[0, 0, 2, 2]), 'annotation 7 has category id 5'),
    (dict(id=7, image_id=1, category_id=1, bbox=[0, 0, 2]), r'annotation 7 bbox \[0, 0, 2\]'),
    (dict(id=7, image_id=1, category_id=1, bbox=[0, 0, 'a', 2]), 'is not \\[x, y, w, h\\]'),
    (dict(id=7, image_id=1, category_id=1), r"lacks \['bbox'\]")])
def test_bad_annotation(coco, ann, msg):
    f = coco/'annotations/instances_val2017.json'
    d = json.loads(f.read_text()); d['annotations'].append(ann); f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=msg): CocoImages(coco)

def test_listed_image_missing(coco, caplog):
    (coco/'val2017/b.jpg').unlink()
    with pytest.raises(FileNotFoundError, match=r'b.jpg: listed in .*instances_val2017.json \(image id 2\) but missing'): CocoImages(coco)
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data.images'): ds = CocoImages(coco, skip_unreadable=True)
    assert len(ds) == 1 and len(ds.skipped) == 1 and 'b.jpg' in ds.skipped[0][0] and 'b.jpg' in caplog.text

@pytest.mark.parametrize('name', ['../outside.jpg', '/etc/passwd', 'sub/../../outside.jpg'])
def test_path_traversal(tmp_path, name):
    (tmp_path/'c').mkdir(); rgb().save(tmp_path/'outside.jpg')
    write_coco(tmp_path/'c', [(1, name, 8, 6)])
    with pytest.raises(ValueError, match=f'file_name {name!r} escapes the image folder'): CocoImages(tmp_path/'c')

def test_subfolder_file_name_allowed(tmp_path):
    (tmp_path/'val2017/sub').mkdir(parents=True); rgb().save(tmp_path/'val2017/sub/a.png')
    assert len(CocoImages(write_coco(tmp_path, [(1, 'sub/a.png', 8, 6)]))) == 1

# ---------------------------------------------------------------- unreadable files

@pytest.mark.parametrize('make, reason', [
    (lambda p: p.write_bytes(b'this is not a jpeg'), 'cannot decode image'),
    (lambda p: p.write_bytes(b''), 'cannot decode image'),
    (truncated_jpeg, 'image file is truncated')])
def test_unreadable_file(coco, make, reason, caplog):
    make(coco/'val2017/a.jpg')
    with pytest.raises(ImageReadError, match=f'a.jpg: .*{reason}'): load_image(coco/'val2017/a.jpg')
    with pytest.raises(ImageReadError, match='a.jpg'): CocoImages(coco)[0]
    ds = CocoImages(coco, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data.images'):
        x, y = ds[0], ds[0]   # the unreadable image is replaced by the next one, logged and counted once
    assert x['image_id'] == 2 and x['index'] == 1 and len(ds.skipped) == 1 and 'a.jpg' in ds.skipped[0][0]
    assert caplog.text.count('skipped unreadable image') == 1
    assert check_readable(ds) == [] and len(ds.skipped) == 1 and len(ds) == 1 and ds.ids == [2]   # removed, counted once

def test_all_unreadable(tmp_path):
    (tmp_path/'a.jpg').write_bytes(b'x')
    ds = FolderImages(tmp_path, skip_unreadable=True)
    with pytest.raises(ImageReadError, match='none of its 1 images is readable'): ds[0]

def test_missing_image_file():
    with pytest.raises(ImageReadError, match='nowhere.jpg: no such image file'): load_image('nowhere.jpg')

# ---------------------------------------------------------------- image modes, pixel by pixel

def px(path): return load_image(path).permute(1, 2, 0)   # (H, W, 3)

def test_grayscale_palette_bilevel(tmp_path):
    Image.new('L', (2, 1), 100).save(tmp_path/'l.png'); assert px(tmp_path/'l.png').tolist() == [[[100] * 3] * 2]
    Image.new('L', (8, 8), 100).save(tmp_path/'l.jpg'); assert (px(tmp_path/'l.jpg').int() - 100).abs().max() <= 1
    p = Image.new('P', (2, 1)); p.putpalette([255, 0, 0, 0, 0, 255]); p.putpixel((1, 0), 1); p.save(tmp_path/'p.png')
    assert px(tmp_path/'p.png').tolist() == [[[255, 0, 0], [0, 0, 255]]]
    b = Image.new('1', (2, 1)); b.putpixel((1, 0), 1); b.save(tmp_path/'b.png')
    assert px(tmp_path/'b.png').tolist() == [[[0] * 3, [255] * 3]]

def test_alpha_composited_on_white(tmp_path):
    a = Image.new('RGBA', (3, 1)); a.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128)]); a.save(tmp_path/'a.png')
    assert px(tmp_path/'a.png').tolist() == [[[255, 0, 0], [255, 255, 255], [127, 127, 255]]]
    la = Image.new('LA', (2, 1)); la.putdata([(50, 255), (50, 0)]); la.save(tmp_path/'la.png')
    assert px(tmp_path/'la.png').tolist() == [[[50] * 3, [255] * 3]]
    p = Image.new('P', (2, 1)); p.putpalette([255, 0, 0, 0, 0, 255]); p.putpixel((1, 0), 1)
    p.save(tmp_path/'pt.png', transparency=1)   # palette entry 1 is transparent
    assert px(tmp_path/'pt.png').tolist() == [[[255, 0, 0], [255, 255, 255]]]

def test_cmyk(tmp_path):
    c = Image.new('CMYK', (8, 8), (0, 255, 255, 0))   # pure red
    c.save(tmp_path/'c.jpg', quality=100); c.save(tmp_path/'c.tif')
    assert Image.open(tmp_path/'c.jpg').mode == 'CMYK'
    assert (px(tmp_path/'c.jpg').int() - torch.tensor([255, 0, 0])).abs().max() <= 2
    assert px(tmp_path/'c.tif')[0, 0].tolist() == [255, 0, 0]

def test_16bit_and_float(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path/'g16.png')
    assert Image.open(tmp_path/'g16.png').mode.startswith('I;16')
    assert px(tmp_path/'g16.png')[0, :, 0].tolist() == [0, 100, 255]
    Image.fromarray(np.array([[257 * 50, 70000, -5]], np.int32)).save(tmp_path/'i.tif')   # mode I: clipped
    assert px(tmp_path/'i.tif')[0, :, 0].tolist() == [50, 255, 0]
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)).save(tmp_path/'f.tif')  # mode F: [0, 1]
    assert px(tmp_path/'f.tif')[0, :, 0].tolist() == [0, 128, 255, 255]
    a = np.zeros((1, 2, 3), np.uint16); a[0, 0] = (65535, 0, 257 * 128); a[0, 1] = (0, 257 * 7, 65535)   # RGB
    cv2.imwrite(str(tmp_path/'rgb16.png'), a[..., ::-1])   # OpenCV writes BGR
    assert px(tmp_path/'rgb16.png').tolist() == [[[255, 0, 128], [0, 7, 255]]]

@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_jpeg(tmp_path, orientation):
    im = Image.new('L', (32, 16)); im.paste(255, (8, 0, 16, 8))   # white block on the 8x8 JPEG grid
    exif = im.getexif(); exif[ExifTags.Base.Orientation] = orientation
    im.convert('RGB').save(tmp_path/'e.jpg', exif=exif, quality=95)
    x = load_image(tmp_path/'e.jpg')
    assert x.shape[1:] == ((32, 16) if orientation >= 5 else (16, 32))
    ys, xs = np.nonzero(x[0].numpy() > 128)
    found = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert exif_boxes(torch.tensor([[8., 0, 8, 8]]), orientation, 32, 16)[0].tolist() == found

# ---------------------------------------------------------------- boxes

def test_degenerate_boxes_clipped_and_dropped(tmp_path, caplog):
    (tmp_path/'val2017').mkdir(); rgb(10, 10).save(tmp_path/'val2017/a.png')
    boxes = [(2, 2, 3, 3),      # fine
             (-2, 5, 4, 10),    # clipped to (0, 5, 2, 5)
             (3, 3, 0.5, 4),    # w < 1: dropped
             (4, 4, 3, 0),      # h = 0: dropped
             (12, 1, 3, 3),     # outside: dropped
             (9.5, 0, 3, 3)]    # clipped to 0.5 wide: dropped
    write_coco(tmp_path, [(1, 'a.png', 10, 10)], [(1, 1, b) for b in boxes])
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data.images'): ds = CocoImages(tmp_path)
    assert ds.clipped_boxes == 1 and ds.dropped_boxes == [3, 4, 5, 6]
    assert 'clipped 1 boxes' in caplog.text and 'dropped 4' in caplog.text and 'instances_val2017.json' in caplog.text
    assert ds[0]['boxes'].tolist() == [[2, 2, 3, 3], [0, 5, 2, 5]]

def test_object_queries_skip_crowd_and_small(tmp_path):
    (tmp_path/'val2017').mkdir(); rgb(100, 50).save(tmp_path/'val2017/a.png')
    write_coco(tmp_path, [(1, 'a.png', 100, 50)], [(1, 1, (0, 0, 40, 40)), (1, 2, (50, 0, 20, 20)), (1, 1, (10, 10, 32, 32))],
               categories=((1, 'a'), (2, 'b')))
    f = tmp_path/'annotations/instances_val2017.json'; d = json.loads(f.read_text()); d['annotations'][2]['iscrowd'] = 1
    f.write_text(json.dumps(d))
    ds = CocoImages(tmp_path)
    qs = object_queries(ds, image_size=64)   # the 20x20 box is under 32x32, the last one is a crowd
    assert [(q['index'], q['image_id'], q['category_id']) for q in qs] == [(0, 1, 1)]
    assert torch.allclose(qs[0]['box'], torch.tensor([0, 0, 40 * 64 / 100, 40 * 64 / 50]))
    assert len(object_queries(ds, 64, min_area=0, skip_crowd=False)) == 3

def test_exif_rotated_coco_image(tmp_path):
    "Boxes annotated on the stored pixels follow the image into its upright frame"
    (tmp_path/'val2017').mkdir()
    im = Image.new('RGB', (32, 16)); im.paste((255, 255, 255), (8, 0, 16, 8))
    exif = im.getexif(); exif[ExifTags.Base.Orientation] = 6
    im.save(tmp_path/'val2017/stored.png', exif=exif); im.save(tmp_path/'val2017/upright.png', exif=exif)
    write_coco(tmp_path, [(1, 'stored.png', 32, 16), (2, 'upright.png', 16, 32), (3, 'wrong.png', 20, 20)],
               [(1, 1, (8, 0, 8, 8)), (2, 1, (8, 8, 8, 8))])   # stored frame, upright frame
    im.save(tmp_path/'val2017/wrong.png')
    ds = CocoImages(tmp_path)
    for i in (0, 1):
        x = ds[i]; bx, by, bw, bh = x['boxes'][0].int().tolist()
        assert x['image'].shape == (3, 32, 16) and bx == 8 and by == 8
        assert (x['image'][:, by:by + bh, bx:bx + bw] == 255).all() and x['image'].sum() == 255 * 3 * 64
        assert ds.target(i)['size'] == (32, 16)
    with pytest.raises(ImageReadError, match=r'wrong.png: image is 32x16 but .* says 20x20'): ds[2]

# ---------------------------------------------------------------- folders, open_images, workers

def test_folder_images(tmp_path, caplog):
    (tmp_path/'x/y').mkdir(parents=True)
    rgb().save(tmp_path/'b.PNG'); rgb().save(tmp_path/'x/y/a.jpeg'); rgb().save(tmp_path/'x/c.bmp')
    (tmp_path/'notes.txt').write_text('hi'); rgb().save(tmp_path/'d.gif')
    with caplog.at_level(logging.INFO, logger='learn_and_search.data.images'): fi = FolderImages(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in fi.paths] == ['b.PNG', 'x/c.bmp', 'x/y/a.jpeg']
    assert 'ignoring 2 files' in caplog.text
    x = fi[2]; assert x['image_id'] == 2 and x['boxes'].shape == (0, 4) and x['category_ids'].dtype == torch.int64
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='empty: no images'): FolderImages(tmp_path/'empty')

def test_open_images(tmp_path, monkeypatch, coco):
    assert isinstance(open_images(coco, 'val2017'), CocoImages)
    assert isinstance(open_images(coco/'val2017'), FolderImages)
    with pytest.raises(FileNotFoundError, match='missing: no such folder'): open_images(tmp_path/'missing')
    monkeypatch.setenv('LAS_CACHE', str(tmp_path/'cache'))   # a small synthetic set stands in for the default one
    monkeypatch.setattr(data, 'synthetic_coco', lambda: synthetic_coco(n_train=3, n_val=2, image_size=64))
    ds = open_images('synthetic', 'val2017')
    assert len(ds) == 2 and ds.root.parent == tmp_path/'cache' and len(ds.categories) == 6

class ItemPairs(torch.utils.data.Dataset):
    "Scene and query box of each image, the box seeded by `mix_seed(seed, epoch, index)` (one box per item, any process)"
    def __init__(self, images, image_size, seed, epoch): self.images, self.S, self.seed, self.epoch = images, image_size, seed, epoch
    def __len__(self): return len(self.images)
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i))
        return resize_square(self.images[i]['image'], self.S), sample_query_box(self.S, self.S, g)

def test_learn_pairs_workers(tmp_path):
    "Boxes depend on (seed, epoch, index) only: the same with 0 or 2 DataLoader workers"
    (tmp_path/'val2017').mkdir()
    for i in range(6): rgb(40, 30, (i * 40, 0, 0)).save(tmp_path/'val2017'/f'{i}.png')
    ds = CocoImages(write_coco(tmp_path, [(i, f'{i}.png', 40, 30) for i in range(6)]))
    pairs = ItemPairs(ds, image_size=64, seed=5, epoch=2)
    def boxes(workers): return torch.cat([b for _, b in torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=workers)])
    b0 = boxes(0)
    assert torch.equal(b0, boxes(2)) and b0.shape == (6, 4)
    assert torch.equal(b0[3], pairs[3][1]) and pairs[3][0].shape == (3, 64, 64)

# ---------------------------------------------------------------- real data

@pytest.fixture
def coco_root():
    root = os.environ.get('COCO_ROOT')
    if not root:
        print('COCO_ROOT is unset: skipping the real-data test')
        pytest.skip('COCO_ROOT is unset (point it to a COCO-format folder, e.g. ../shared/data/coco-mini)')
    return Path(root)

@pytest.mark.parametrize('split', ['train2017', 'val2017'])
def test_real_coco(coco_root, split):
    ds = CocoImages(coco_root, split)
    n_json = len(json.loads((coco_root/'annotations'/f'instances_{split}.json').read_text())['images'])
    assert len(ds) == n_json > 0 and ds.skipped == [] and len(ds.categories) == 80
    for i in np.linspace(0, len(ds) - 1, 8).astype(int).tolist():
        x = ds[i]; _, h, w = x['image'].shape
        assert x['image'].dtype == torch.uint8 and x['image'].shape[0] == 3 and ds.target(i)['size'] == (h, w)
        b = x['boxes']
        assert (b[:, :2] >= 0).all() and (b[:, 0] + b[:, 2] <= w).all() and (b[:, 1] + b[:, 3] <= h).all()
        assert set(x['category_ids'].tolist()) <= set(ds.categories)
    qs = object_queries(ds, image_size=256)
    assert len(qs) > 0 and all(q['category_id'] in ds.categories for q in qs)
    boxes = torch.stack([q['box'] for q in qs])
    assert (boxes >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 256 + 1e-3).all()
    assert len(random_crop_queries(ds, n_per_image=2)) == 2 * len(ds)
    scene, box = resize_square(ds[0]['image'], 256), sample_query_box(256, 256, torch.Generator().manual_seed(0))
    assert scene.shape == (3, 256, 256) and box.shape == (4,)

# ---------------------------------------------------------------- annotation files, small images, original sizes

@pytest.mark.parametrize('change, msg', [
    (lambda d: d['images'][0].update(id='1'), '"id" must be an integer'),
    (lambda d: d['images'][0].update(width=None), '"width" must be a positive number'),
    (lambda d: d['images'][0].update(file_name=['a.jpg']), '"file_name" must be a non-empty string'),
    (lambda d: d['annotations'][0].update(bbox=[0, 0, float('inf'), 2]), r'is not \[x, y, w, h\]'),
    (lambda d: d['categories'].append(dict(id=1, name='again')), 'duplicate category ids')])
def test_bad_annotation_types(coco, change, msg):
    "A mistyped field anywhere in the instances file is one ValueError naming the file, never a TypeError"
    f = coco/'annotations/instances_val2017.json'
    d = json.loads(f.read_text()); change(d); f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f'instances_val2017.json: .*{msg}') as e: CocoImages(coco)
    assert type(e.value) is ValueError

def test_tiny_images_refused_or_skipped(tmp_path):
    "A 1x1 image is refused by open_images (naming it, saying how to skip) and skipped with a count under --skip-unreadable"
    rgb(40, 30).save(tmp_path/'a.png'); rgb(1, 1).save(tmp_path/'b.png'); rgb(40, 30).save(tmp_path/'c.png')
    with pytest.raises(ImageReadError, match=r'b.png: image is 1x1 px, too small .*--skip-unreadable'): open_images(tmp_path)[1]
    with pytest.raises(ImageReadError, match='b.png'): data.check_readable(open_images(tmp_path))
    ds = open_images(tmp_path, skip_unreadable=True)
    assert [Path(p).name for p, _ in data.check_readable(ds)] == ['b.png'] and len(ds) == 2 and len(ds.skipped) == 1
    assert FolderImages(tmp_path)[1]['image'].shape == (3, 1, 1)   # the raw reader still reads it

def test_object_queries_original_size(tmp_path):
    "min_area is in original pixels: a half-size copy whose records keep original_width/height keeps the same objects"
    for name, scale in (('full', 1), ('half', 2)):
        (tmp_path/name/'val2017').mkdir(parents=True); rgb(200 // scale, 100 // scale).save(tmp_path/name/'val2017/a.png')
        write_coco(tmp_path/name, [(1, 'a.png', 200 // scale, 100 // scale)],
                   [(1, 1, tuple(v / scale for v in b)) for b in ((0, 0, 32, 32), (40, 0, 32, 31), (80, 10, 50, 40))])
    f = tmp_path/'half/annotations/instances_val2017.json'; d = json.loads(f.read_text())
    d['images'][0].update(original_width=200, original_height=100); f.write_text(json.dumps(d))
    full, half = object_queries(CocoImages(tmp_path/'full'), 64), object_queries(CocoImages(tmp_path/'half'), 64)
    assert len(full) == len(half) == 2   # the 32x31 box is under 32x32 original pixels in both
    assert all(torch.allclose(a['box'], b['box']) for a, b in zip(full, half))

@pytest.fixture
def shared_data():
    root = Path(__file__).resolve().parents[1].parent/'shared'/'data'
    if not (root/'coco-mini').is_dir() or not (root/'coco-mini-320').is_dir(): pytest.skip(f'{root}: no coco-mini / coco-mini-320')
    return root

def test_coco_mini_320_same_object_queries(shared_data):
    "coco-mini-320 gives exactly the 651 object queries of full-resolution coco-mini val2017"
    full, small = (object_queries(CocoImages(shared_data/n, 'val2017')) for n in ('coco-mini', 'coco-mini-320'))
    assert len(full) == 651 and [(q['image_id'], q['category_id']) for q in full] == [(q['image_id'], q['category_id']) for q in small]

# ---------------------------------------------------------------- decoded-image cache

def test_cache_build_killed_with_sigkill_is_not_reused(tmp_path):
    "A build killed with SIGKILL leaves only a hidden temp folder; the next call builds a whole cache and removes it"
    import subprocess, sys, time
    from learn_and_search.data.cache import image_cache
    from learn_and_search.data.synthetic import make_synthetic_coco
    syn, caches = make_synthetic_coco(tmp_path/'syn', n_train=8, n_val=1, image_size=64), tmp_path/'caches'
    code = (f"import time, learn_and_search.data.cache as C\nreal = C.resize_square\n"
            f"def slow(x, s): time.sleep(0.3); return real(x, s)\nC.resize_square = slow\n"
            f"C.image_cache({str(syn)!r}, 'train2017', 32, cache_dir={str(caches)!r}, progress=False, workers=1)\n")
    p = subprocess.Popen([sys.executable, '-c', code])
    try:
        deadline = time.time() + 120
        while not any(f.stat().st_size > 0 for f in caches.glob('.*.tmp/images.u8')):
            assert p.poll() is None and time.time() < deadline, 'the build ended before it could be killed'
            time.sleep(0.05)
    finally: p.kill(); p.wait()
    assert [f.name for f in caches.iterdir() if not f.name.startswith('.')] == []        # no cache was installed
    c = image_cache(syn, 'train2017', 32, cache_dir=caches, progress=False)
    assert len(c) == 8 and not list(caches.glob('.*.tmp'))
    assert all(torch.equal(c[i]['image'], data.resize_square(load_image(syn/c.names[i]), 32)) for i in range(8))
