"""File-based tests of learn_and_search.data / synthetic / download: bad inputs, image modes, EXIF, the local-server
download, and a real-data check over $COCO_ROOT (skipped when unset)."""
import hashlib, http.server, io, json, logging, os, threading, zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import learn_and_search.data as data
from learn_and_search.data import (CocoImages, FolderImages, ImageReadError, LearnPairs, exif_boxes, load_image,
                                   object_queries, open_images, random_crop_queries)
from learn_and_search.download import download_coco
from learn_and_search.synthetic import synthetic_coco

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
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data'): ds = CocoImages(coco, skip_unreadable=True)
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
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data'):
        x, y = ds[0], ds[0]   # the unreadable image is replaced by the next one, logged and counted once
    assert x['image_id'] == 2 and x['index'] == 1 and len(ds.skipped) == 1 and 'a.jpg' in ds.skipped[0][0]
    assert caplog.text.count('skipped unreadable image') == 1
    assert ds.verify() == 1 and len(ds) == 1 and ds.ids == [2]

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
    with caplog.at_level(logging.WARNING, logger='learn_and_search.data'): ds = CocoImages(tmp_path)
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
    with caplog.at_level(logging.INFO, logger='learn_and_search.data'): fi = FolderImages(tmp_path)
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

def test_learn_pairs_workers(tmp_path):
    "Boxes depend on (seed, epoch, index) only: the same with 0 or 2 DataLoader workers"
    (tmp_path/'val2017').mkdir()
    for i in range(6): rgb(40, 30, (i * 40, 0, 0)).save(tmp_path/'val2017'/f'{i}.png')
    ds = CocoImages(write_coco(tmp_path, [(i, f'{i}.png', 40, 30) for i in range(6)]))
    pairs = LearnPairs(ds, image_size=64, seed=5); pairs.set_epoch(2)
    def boxes(workers): return torch.cat([b for _, b in torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=workers)])
    b0 = boxes(0)
    assert torch.equal(b0, boxes(2)) and b0.shape == (6, 4)
    assert torch.equal(b0[3], pairs[3][1]) and pairs[3][0].shape == (3, 64, 64)

# ---------------------------------------------------------------- download against a local server

class RangeServer(http.server.ThreadingHTTPServer):
    "Serves `files` (url path -> bytes) on 127.0.0.1 with Range support; the first response is cut after `cut` bytes"
    def __init__(self, files, cut=None):
        super().__init__(('127.0.0.1', 0), RangeHandler); self.files, self.cut, self.ranges = files, cut, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

class RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body, rng = self.server.files.get(self.path), self.headers.get('Range')
        if body is None: return self.send_error(404)
        self.server.ranges.append((self.path, rng))
        start = int(rng[6:-1]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng: self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start)); self.end_headers()
        out, self.server.cut = body[start:start + self.server.cut] if self.server.cut else body[start:], None
        self.wfile.write(out)

def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for name, content in files.items(): z.writestr(name, content)
    return buf.getvalue()

def test_download_coco_local_server(tmp_path):
    img = io.BytesIO(); rgb().save(img, 'JPEG')
    val = zip_bytes({'val2017/000000000001.jpg': img.getvalue(), 'val2017/pad.bin': os.urandom(200_000)})
    ann = zip_bytes({'annotations/instances_val2017.json': json.dumps(dict(
        images=[dict(id=1, file_name='000000000001.jpg', width=8, height=6)], annotations=[], categories=[dict(id=1, name='a')]))})
    srv = RangeServer({'/zips/val2017.zip': val, '/annotations/annotations_trainval2017.zip': ann}, cut=50_000)
    try:
        url = f'http://127.0.0.1:{srv.server_address[1]}'
        md5 = {'val2017': hashlib.md5(val).hexdigest(), 'annotations': hashlib.md5(ann).hexdigest()}
        root = download_coco('val2017', tmp_path/'coco', base_url=url, checksums=md5, progress=False)
        assert srv.ranges[:2] == [('/zips/val2017.zip', None), ('/zips/val2017.zip', 'bytes=50000-')]   # cut, then resumed
        ds = CocoImages(root, 'val2017')
        assert len(ds) == 1 and ds[0]['image'].shape == (3, 6, 8) and not list(root.glob('*.zip*'))
        bad = dict(md5, val2017='0' * 32)
        with pytest.raises(ValueError, match='does not match'):
            download_coco('val2017', tmp_path/'coco2', base_url=url, checksums=bad, progress=False)
        assert not list((tmp_path/'coco2').glob('*.part'))
    finally:
        srv.shutdown(); srv.server_close()

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
    scene, box = LearnPairs(ds, image_size=256)[0]
    assert scene.shape == (3, 256, 256) and box.shape == (4,)
