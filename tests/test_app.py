"""`las-app` in a real browser: Debian's headless Chromium driven by selenium draws a box on the page, and the hits it
shows must be `SearchIndex.search`'s for that box; bad inputs show one line in red. Skipped, with the reason, where
Chromium, its driver or selenium is absent (`make install` installs them). Set LAS_SCREENSHOT=PATH to keep a screenshot,
and LAS_APP_CHECKPOINT=CK LAS_APP_IMAGES=DIR [LAS_APP_SPLIT=val2017 LAS_APP_SOURCE=g3 LAS_APP_DRAG=x0,y0,x1,y1] to run
it over real photos (the README's picture)."""
import json, os, shutil, time
from pathlib import Path
import pytest

selenium = pytest.importorskip('selenium', reason='selenium is not installed (make install adds it)')
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, DRIVER = shutil.which('chromium'), shutil.which('chromedriver')
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason='chromium and chromedriver are not installed (make install adds them)')]


@pytest.fixture(scope='module')
def served():
    "The page over a tiny synthetic index, on a free loopback port"
    from learn_and_search.app.server import LookupApp, serve_in_thread
    from learn_and_search.data.images import open_images
    from learn_and_search.learn.models import random_init_model
    from learn_and_search.search.index import SearchIndex
    if os.environ.get('LAS_APP_CHECKPOINT'):   # the README's screenshot: a trained model over real photos
        from learn_and_search.app.server import _index_for_images
        index = _index_for_images(os.environ['LAS_APP_CHECKPOINT'], os.environ['LAS_APP_IMAGES'],
                                  os.environ.get('LAS_APP_SPLIT', 'val2017'), 'cpu', progress=False)
    else:
        model = random_init_model(None, 0, preset='model1', dim=32, image_size=64)
        index = SearchIndex.build(model, open_images('synthetic', 'val2017'), reference=8, progress=False)
    app = LookupApp(index, k=6)
    server = serve_in_thread(app)
    yield app, server.url
    server.shutdown(); server.server_close()


@pytest.fixture(scope='module')
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1280,800'):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def status(driver, wait_for:str|None=None, timeout=60):
    "The status line's text (and whether it is an error), once it contains `wait_for`"
    el = driver.find_element(By.ID, 'status')
    if wait_for: WebDriverWait(driver, timeout).until(lambda d: wait_for in el.text, f'no {wait_for!r} in the status line: {el.text!r}')
    return el.text, el.get_attribute('class') == 'err'


def drag(driver, canvas, x0, y0, x1, y1):
    "Drag on `canvas` from (x0, y0) to (x1, y1), in CSS pixels from its top-left corner"
    w, h = canvas.size['width'], canvas.size['height']
    ActionChains(driver).move_to_element_with_offset(canvas, x0 - w / 2, y0 - h / 2).click_and_hold() \
        .move_by_offset(x1 - x0, y1 - y0).release().perform()


def open_page(driver, url, source='g3'):
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#thumbs img[data-source="{source}"]'))
    driver.find_element(By.CSS_SELECTOR, f'#thumbs img[data-source="{source}"]').click()
    status(driver, 'Draw a box')
    return driver.find_element(By.ID, 'query')


def test_a_drawn_box_shows_the_index_hits(served, browser, tmp_path):
    app, url = served
    t0 = time.time()
    source = os.environ.get('LAS_APP_SOURCE', 'g3')                            # the README's picture picks its object
    x0, y0, x1, y1 = (float(v) for v in os.environ.get('LAS_APP_DRAG', '60,50,200,170').split(','))
    canvas = open_page(browser, url, source)
    drag(browser, canvas, x0, y0, x1, y1)
    text, err = status(browser, 'results,')
    assert not err and '6 results' in text and 'ms on the server' in text, text
    asked = json.loads(browser.find_element(By.TAG_NAME, 'body').get_attribute('data-query'))
    shown = [f.get_attribute('data-source') for f in browser.find_elements(By.CSS_SELECTOR, '#results figure')]
    want = app.index.search(app.index.paths[int(source[1:])], asked['box'], 6, score=asked['score'])
    assert asked['source'] == source and shown == [f"g{app.index.paths.index(h['image'])}" for h in want]
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, '#results figcaption')]
    assert all(f"{h['score']:.3f}" in c and h['level'] in c for c, h in zip(captions, want)), captions
    browser.find_elements(By.CSS_SELECTOR, '#results figure')[1].click()       # its heatmaps
    status(browser, 'Heatmaps of')
    assert len(browser.find_elements(By.CSS_SELECTOR, '#heat figure')) == len(app.index.levels)
    browser.save_screenshot(os.environ.get('LAS_SCREENSHOT') or str(tmp_path/'page.png'))
    print(f'browser test: {time.time() - t0:.1f} s')


def test_bad_inputs_show_one_line_in_red(served, browser, tmp_path):
    app, url = served
    canvas = open_page(browser, url)
    drag(browser, canvas, 100, 100, 106, 106)                                 # a box of 3 px of the image (shown at 2x)
    text, err = status(browser, 'minimum')
    assert err and 'under the 4 px minimum side' in text, text
    (tmp_path/'garbage.jpg').write_bytes(b'not an image at all')
    browser.find_element(By.ID, 'file').send_keys(str(tmp_path/'garbage.jpg'))
    text, err = status(browser, 'cannot decode')
    assert err and text.startswith('garbage.jpg: cannot decode image'), text
    limit, app.uploads.max_bytes = app.uploads.max_bytes, 1000
    try:
        from PIL import Image
        import numpy as np
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(tmp_path/'noise.png')
        browser.find_element(By.ID, 'file').send_keys(str(tmp_path/'noise.png'))
        text, err = status(browser, 'upload limit')
        assert err and 'noise.png' in text, text
    finally: app.uploads.max_bytes = limit
    assert browser.find_element(By.ID, 'file').get_attribute('value') == ''   # the picker names no file other than the one shown


def in_view(driver, el) -> bool:
    "Whether `el` lies entirely inside the browser window (no scrolling needed to see it)"
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return r.height > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight && r.right <= innerWidth;", el)


def test_controls_answer_at_once_and_everything_fits_one_screen(served, browser):
    app, url = served
    browser.set_window_size(1280, 800)
    try:
        canvas = open_page(browser, url)
        drag(browser, canvas, 60, 50, 200, 170)
        status(browser, '6 results')
        k = browser.find_element(By.ID, 'k')
        k.clear(); k.send_keys('3'); browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", k)   # no new box
        status(browser, '3 results')
        assert len(browser.find_elements(By.CSS_SELECTOR, '#results figure')) == 3
        hit = browser.find_elements(By.CSS_SELECTOR, '#results figure')[1]
        assert in_view(browser, hit) and in_view(browser, canvas), 'the query and its hits share one 1280x800 screen'
        hit.click()
        status(browser, 'Heatmaps of')
        heat = browser.find_elements(By.CSS_SELECTOR, '#heat figure')
        assert len(heat) == len(app.index.levels) and all(in_view(browser, f) for f in heat), 'the heatmaps are in view'
        assert 'cosine' in browser.find_element(By.CSS_SELECTOR, '#heat .bar').text     # a colour bar with its range
        boxes = browser.find_elements(By.CSS_SELECTOR, '#levels input')
        boxes[0].click()                                                              # one level fewer: redrawn at once
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#heat figure')) == len(app.index.levels) - 1)
        for b in boxes[1:]: b.click()                                                 # none: no heatmap, and it says so
        status(browser, 'No heatmap level is checked')
        assert not browser.find_elements(By.CSS_SELECTOR, '#heat figure')
        text = browser.find_element(By.ID, 'boxtext')
        text.clear(); text.send_keys('1,1,2,2\n')                                    # a box too small: the error clears the hits
        _, err = status(browser, 'minimum')
        assert err and not browser.find_elements(By.CSS_SELECTOR, '#results figure')
    finally: browser.set_window_size(1280, 800)


def test_the_keyboard_alone_finds_an_object(served, browser):
    from selenium.webdriver.common.keys import Keys
    app, url = served
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#thumbs figure[data-source="g2"]'))
    thumb = browser.find_element(By.CSS_SELECTOR, '#thumbs figure[data-source="g2"]')
    assert thumb.get_attribute('tabindex') == '0' and thumb.text                      # focusable, and named
    thumb.send_keys(Keys.ENTER)
    status(browser, 'Draw a box')
    browser.find_element(By.ID, 'boxtext').send_keys('10,12,30,28' + Keys.ENTER)    # the box, typed
    status(browser, '6 results')
    want = app.index.search(app.index.paths[2], [10, 12, 30, 28], 6, score=app.index.default_score)
    shown = [f.get_attribute('data-source') for f in browser.find_elements(By.CSS_SELECTOR, '#results figure')]
    assert shown == [f"g{app.index.paths.index(h['image'])}" for h in want]
    first = browser.find_element(By.CSS_SELECTOR, '#results figure')
    assert first.get_attribute('tabindex') == '0' and 'best cell at' in first.get_attribute('title')
    first.send_keys(Keys.ENTER)
    status(browser, 'Heatmaps of')
