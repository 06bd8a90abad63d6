"""The `cocatk serve` page and clip-retrieval's front end in a real headless Chromium (playwright).

Skips, with the reason, when playwright or a Chromium binary is missing; `.ci/run` installs both so CI runs these.
One server over a 40-photo demo index serves the whole module; each test gets a fresh browser context.
Screenshots go to a tmp folder; `COCATK_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_browser.py`
rewrites docs/img/serve-desktop.png, serve-phone.png and clip-front.png (the README shows the desktop one).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from browser_support import (
    CHROMIUM_ARGS,
    Server,
    build_demo_index,
    clip_front_build,
    find_chromium,
    screenshot_dir,
    static_server,
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium, or set COCATK_CHROMIUM)"),
]

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
QUERY = "a red circle"
TIMEOUT = 30_000


def _params(url: str) -> dict[str, list[str]]:
    return parse_qs(urlparse(url).query)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_index(tmp_path_factory.mktemp("serve-demo"))


@pytest.fixture(scope="module")
def server(demo: Path):
    srv = Server(demo / "index", demo / "home")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=DESKTOP, base_url=server.url)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def results(pg) -> list:
    """Wait until the grid holds real cards (no skeletons) and return them."""
    pg.wait_for_selector("#grid .card:not(.skeleton)")
    pg.wait_for_function(
        "!document.querySelector('#grid .card.skeleton') && !document.body.classList.contains('loading')"
    )
    return pg.locator("#grid .card").all()


def search(pg, text: str) -> list:
    pg.goto("/")
    pg.wait_for_function("window.cocatkReady === true")
    pg.keyboard.press("/")  # focuses the search box
    assert pg.evaluate("document.activeElement.id") == "q"
    pg.keyboard.type(text)
    pg.keyboard.press("Enter")
    return results(pg)


def scores(card) -> tuple[str, str]:
    return card.locator(".score.sim").inner_text(), card.locator(".score.loglik").inner_text()


def wait_images_loaded(pg, first: int = 10) -> None:
    """The first thumbnails (those on screen; the rest load lazily) have loaded."""
    pg.wait_for_function(
        f"[...document.querySelectorAll('#grid .card img')].slice(0, {first})"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: docs/img with COCATK_UPDATE_SCREENSHOTS=1, else a tmp folder."""
    folder = screenshot_dir(tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_text_search_fills_grid_with_both_scores_and_desktop_screenshot(page, shots):
    cards = search(page, QUERY)
    assert len(cards) == 20  # the page asks for 20 by default
    assert _params(page.url)["q"] == [QUERY]
    for card in cards:
        sim, loglik = scores(card)
        assert re.fullmatch(r"sim\s*-?\d\.\d{3}", sim), sim
        assert re.fullmatch(r"loglik\s*-?\d+\.\d{2}", loglik), loglik
    ranks = [c.get_attribute("data-rank") for c in cards]
    assert ranks == [str(i) for i in range(1, 21)]
    status = page.locator("#status").inner_text()
    assert re.search(r"embed \d+ ms", status) and re.search(r"search \d+ ms", status), status
    assert re.search(r"rerank \d+ ms", status) and "reranked" in status, status
    # The demo model's warning from the response is a banner.
    assert page.locator("#warnings").is_visible()
    assert "demo model" in page.locator("#warnings").inner_text()
    # Folder filter filled from /api/folders: all, the root and its two sub-folders.
    options = page.locator("#under option").all_inner_texts()
    assert options[0] == "All folders" and any("garden" in o for o in options) and any("holiday" in o for o in options)
    wait_images_loaded(page)
    shot = shots / "serve-desktop.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000


def test_rerank_switch_updates_url_and_drops_loglik(page):
    search(page, QUERY)
    page.locator("label.switch").click()
    page.wait_for_url(re.compile(r"rerank=0"))
    cards = results(page)
    assert _params(page.url)["q"] == [QUERY]
    assert all(scores(c)[1].endswith("–") for c in cards), [scores(c) for c in cards]
    assert all(re.search(r"\d\.\d{3}", scores(c)[0]) for c in cards)
    assert "similarity only" in page.locator("#status").inner_text()
    assert "rerank" not in page.locator("#status .timings").inner_text()
    # A reload of the shared link restores the switch.
    page.reload()
    results(page)
    assert not page.locator("#rerank").is_checked()


def test_folder_filter_limits_hits(page, demo):
    search(page, QUERY)
    garden = str((demo / "photos" / "garden").resolve())
    page.select_option("#under", garden)
    page.wait_for_url(re.compile(r"under="))
    cards = results(page)
    assert _params(page.url)["under"] == [garden]
    names = [c.locator(".name").get_attribute("title") for c in cards]
    assert names and all(n.startswith(garden + "/") for n in names), names


def test_similar_then_back_restores_the_query(page):
    cards = search(page, QUERY)
    first_url = page.url
    target = cards[1].get_attribute("data-id")
    cards[1].locator("button.similar").click()
    page.wait_for_url(re.compile(rf"similar={target}\b"))
    cards = results(page)
    assert len(cards) == 20
    assert target not in [c.get_attribute("data-id") for c in cards]  # the image itself is left out
    assert "q" not in _params(page.url)
    assert page.locator("#q").input_value() == ""
    page.go_back()
    page.wait_for_url(first_url)
    cards = results(page)
    assert page.locator("#q").input_value() == QUERY
    assert re.search(r"\d", scores(cards[0])[1])  # reranked again: log-likelihoods are back
    page.go_forward()
    page.wait_for_url(re.compile(rf"similar={target}\b"))
    results(page)


def test_lightbox_arrows_and_escape(page):
    cards = search(page, QUERY)
    paths = [c.locator(".name").get_attribute("title") for c in cards]
    cards[0].locator(".thumb").click()
    dialog = page.locator("#lightbox")
    sync_api.expect(dialog).to_be_visible()
    assert page.locator("#lb-path").inner_text() == paths[0]
    page.wait_for_function(  # the thumbnail first, then the original
        "(i => i.src.includes('/api/image/') && i.complete && i.naturalWidth > 0)(document.querySelector('#lb-img'))"
    )
    page.keyboard.press("ArrowRight")
    assert page.locator("#lb-path").inner_text() == paths[1]
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # wraps to the last hit
    assert page.locator("#lb-path").inner_text() == paths[-1]
    page.keyboard.press("Escape")
    sync_api.expect(dialog).to_be_hidden()


def _data_transfer(pg, path: Path, mime: str):
    data = base64.b64encode(path.read_bytes()).decode()
    return pg.evaluate_handle(
        """([data, name, mime]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            return dt;
        }""",
        [data, path.name, mime],
    )


def _a_photo(demo: Path) -> Path:
    return sorted((demo / "photos" / "garden").glob("*.jpg"))[0]


def test_drop_an_image_searches_with_it(page, demo):
    page.goto("/")
    page.wait_for_function("window.cocatkReady === true")
    photo = _a_photo(demo)
    with page.expect_request(lambda r: r.url.endswith("/api/search/image") and r.method == "POST"):
        dt = _data_transfer(page, photo, "image/jpeg")
        page.dispatch_event("body", "dragenter", {"dataTransfer": dt})
        assert page.locator("#drop-overlay").is_visible()
        page.dispatch_event("body", "drop", {"dataTransfer": dt})
    cards = results(page)
    assert len(cards) == 20
    assert page.locator("#image-chip").is_visible()
    assert page.locator("#drop-overlay").is_hidden()
    # The dropped photo is in the index: it comes first, with similarity ~1; no text, so no rerank.
    assert cards[0].locator(".name").inner_text() == photo.name
    sim, loglik = scores(cards[0])
    assert float(re.search(r"-?\d+\.\d+", sim).group()) > 0.99 and loglik.endswith("–")
    # Clearing the chip goes back to the start page.
    page.locator("#image-clear").click()
    assert page.locator("#image-chip").is_hidden()
    sync_api.expect(page.locator("#empty")).to_be_visible()


def test_paste_and_pick_an_image_with_text(page, demo):
    page.goto("/")
    page.wait_for_function("window.cocatkReady === true")
    photo = _a_photo(demo)
    page.locator("#q").fill("a red circle")
    with page.expect_request(lambda r: r.url.endswith("/api/search/image")) as req:
        dt = _data_transfer(page, photo, "image/jpeg")
        page.evaluate("dt => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}))", dt)
    assert req.value.headers["content-type"].startswith("multipart/form-data")
    cards = results(page)
    # Text with the image: the server reranks by the text's caption likelihood.
    assert "reranked" in page.locator("#status").inner_text()
    assert re.search(r"\d", scores(cards[0])[1])
    assert cards and page.locator("#image-chip").is_visible()
    assert page.locator("#image-chip-name").inner_text() == photo.name
    # The hidden file input (the image button) works too.
    page.locator("#image-clear").dispatch_event("click")
    with page.expect_request(lambda r: r.url.endswith("/api/search/image")):
        page.set_input_files("#file-input", str(photo))
    assert results(page)


def test_empty_query_and_error_states(page, demo):
    page.goto("/")
    page.wait_for_function("window.cocatkReady === true")
    # An empty query asks nothing of the server: the start page says what to do.
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/search" in r.url else None)
    page.locator("#search-btn").click()
    sync_api.expect(page.locator("#empty")).to_be_visible()
    assert page.evaluate("document.activeElement.id") == "q" and not requests
    # A folder that is not indexed: the server's 404 shows its error and hint.
    error = page.locator("#error")
    page.goto("/?q=red&under=" + str(demo / "nowhere"))
    sync_api.expect(error).to_be_visible()
    assert "nowhere" in page.locator("#error-title").inner_text()
    assert "/api/folders" in page.locator("#error-hint").inner_text()
    assert page.locator("#grid .card").count() == 0
    # An id that is not in the index.
    page.goto("/?similar=987654")
    sync_api.expect(error).to_be_visible()
    assert page.locator("#error-title").inner_text().strip() and page.locator("#error-hint").inner_text().strip()
    # The next good search clears the error.
    page.locator("#q").fill(QUERY)
    page.keyboard.press("Enter")
    assert results(page) and error.is_hidden()


def test_phone_layout_and_screenshot(browser, server, shots):
    context = browser.new_context(
        viewport=PHONE, base_url=server.url, is_mobile=True, has_touch=True, device_scale_factor=2
    )
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    try:
        pg.goto("/?q=" + QUERY.replace(" ", "+"))
        cards = results(pg)
        assert len(cards) == 20
        wait_images_loaded(pg, first=4)
        # Two columns, nothing wider than the screen.
        assert pg.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        boxes = [c.bounding_box() for c in cards[:2]]
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] > boxes[0]["x"]
        shot = shots / "serve-phone.png"
        pg.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
    finally:
        context.close()


def test_token_from_fragment_and_prompt(browser, demo):
    srv = Server(demo / "index", demo / "home-token", ["--token", "s3cret-token"])
    context = browser.new_context(viewport=DESKTOP, base_url=srv.url)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT)
    try:
        # Without the token: 401 -> the page asks for it.
        pg.goto("/?q=red")
        sync_api.expect(pg.locator("#token-form")).to_be_visible()
        pg.locator("#token-input").fill("s3cret-token")
        pg.locator("#token-form button").click()
        results(pg)
        wait_images_loaded(pg)  # thumbnails load through the cookie
        # A fresh context with #token= in the link: stored, removed from the address bar.
        context.close()
        context = browser.new_context(viewport=DESKTOP, base_url=srv.url)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT)
        pg.goto("/?q=red#token=s3cret-token")
        results(pg)
        wait_images_loaded(pg)
        assert "token" not in pg.url
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["cocatk_token"]["value"] == "s3cret-token" and cookies["cocatk_token"]["sameSite"] == "Strict"
    finally:
        context.close()
        srv.stop()


# ---- clip-retrieval's front end against `cocatk serve --cors` ------------------------------------------------------


@pytest.fixture(scope="module")
def clip_front() -> Path:
    build = clip_front_build()
    if build is None:
        pytest.skip("clip-retrieval 2.45.0 wheel unavailable (pip download failed; .ci/run pre-downloads it)")
    return build


CLIP_IMAGES_JS = """n => {
    const f = document.querySelector('clip-front');
    const imgs = f && f.shadowRoot ? [...f.shadowRoot.querySelectorAll('img')] : [];
    return imgs.filter(i => (i.src || '').includes('/api/image/') && i.complete && i.naturalWidth > 0).length >= n;
}"""


def test_clip_retrieval_front_end(browser, demo, clip_front, shots):
    """clip-retrieval 2.45's own front end, unchanged, on `cocatk serve --cors`: text, upload and click-to-search."""
    photo = _a_photo(demo)
    with static_server(clip_front) as front_url:
        srv = Server(demo / "index", demo / "home-cors", ["--cors", front_url])
        context = browser.new_context(viewport=DESKTOP)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT)
        log: list[str] = []
        pg.on("console", lambda m: log.append(f"console.{m.type}: {m.text[:300]}"))
        pg.on("requestfailed", lambda r: log.append(f"failed: {r.method} {r.url} {r.failure}"))
        pg.on("response", lambda r: log.append(f"{r.status} {r.request.method} {r.url}"))

        def knn_response(action):
            with pg.expect_response(lambda r: r.url.endswith("/knn-service")) as resp:
                action()
            return resp.value

        try:
            indices = pg.request.get(f"{srv.url}/indices-list").json()
            assert isinstance(indices, list) and indices
            # clip front's fetch() posts JSON as a plain string: Content-Type text/plain (a CORS "simple" request).
            probe = pg.request.post(
                f"{srv.url}/knn-service",
                headers={"Content-Type": "text/plain;charset=UTF-8"},
                data='{"text": "a red circle", "modality": "image", "num_images": 3}',
            )
            assert probe.status == 200, f"POST /knn-service with a text/plain JSON body: {probe.text()[:200]}"
            # 1. Text search from the URL.
            resp = knn_response(lambda: pg.goto(f"{front_url}/?back={srv.url}&index={indices[0]}&query=a+red+circle"))
            assert resp.status == 200, resp.text()
            try:
                pg.wait_for_function(CLIP_IMAGES_JS, arg=5)
            except Exception as e:  # the log says which request failed
                raise AssertionError(f"clip front showed no results: {e}\n" + "\n".join(log[-40:])) from None
            pg.wait_for_timeout(300)
            shot = shots / "clip-front.png"
            pg.screenshot(path=str(shot))
            assert shot.stat().st_size > 20_000
            # 2. Image search: the front's upload (a hidden file chooser), base64 in "image".
            resp = knn_response(lambda: pg.set_input_files("clip-front #filechooser", str(photo)))
            assert resp.status == 200, resp.text()
            first = resp.json()[0]
            assert str(first.get("image_path") or first.get("caption")).endswith(photo.name), first
            pg.wait_for_function(CLIP_IMAGES_JS, arg=5)
            # 3. Click-to-search: each result's image-search icon (the first icon is the search bar's).
            icons = pg.locator("clip-front img[src*='image-search.png']")
            assert icons.count() > 2
            resp = knn_response(lambda: icons.nth(2).dispatch_event("click"))
            assert resp.status == 200, resp.text()
            assert resp.json(), "click-to-search returned no results"
            pg.wait_for_function(CLIP_IMAGES_JS, arg=5)
        finally:
            context.close()
            srv.stop()


def test_tags_show_under_each_thumbnail(browser, demo, tmp_path):
    """Issue 31: the page shows each hit's zero-shot tags (`cocatk tag`) under its thumbnail, as the API has them."""
    import json
    import shutil
    import urllib.request

    from cocatk.cli import main

    idx = tmp_path / "tagged"
    shutil.copytree(demo / "index", idx)
    assert main(["tag", "--index", str(idx), "--threshold", "0.5", "--max-tags", "4", "--json"]) == 0
    srv = Server(idx, demo / "home")
    try:
        context = browser.new_context(viewport=DESKTOP, base_url=srv.url)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT)
        cards = search(pg, QUERY)
        with urllib.request.urlopen(f"{srv.url}/api/search?q={QUERY.replace(' ', '+')}&n=20") as r:
            hits = json.load(r)["hits"]
        shown = [[t.inner_text() for t in c.locator(".tag").all()] for c in cards]
        assert shown == [h["tags"][:6] for h in hits] and any(shown), shown
        context.close()
    finally:
        srv.stop()
