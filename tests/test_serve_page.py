"""The page to try a specialist, in a real headless Chromium (Debian's `chromium` driven by Playwright).

The real server (uvicorn on 127.0.0.1, a free port, `make_app`) serves tiny bundles fit here; the
browser loads the page, types the token, classifies a text and a photo, and the labels and scores it
shows must be the bundle's own `predict`. No browser is ever downloaded: Playwright drives the system
`chromium` by `executable_path`. Without chromium or Playwright the test skips with the reason, except
under CI, where it fails: a browser test that silently skips in CI is not a test.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

import headstart
from bundle_fixtures import sft_bundle, sft_files  # noqa: F401  (fixtures are found by name)
from headstart.bundle.commands import load, predict
from serve_fakes import serving

QUIET = {"progress": False, "log": lambda s: None}
TOKEN = "page-test-token-0123456789"
WAIT_MS = 30_000
"""Every browser wait is bounded: a page that never answers fails the test, it does not hang it."""
TOP_K = 3


# ---- the browser ------------------------------------------------------------------------------

def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install -y chromium; make test does it)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{missing}: under CI the browser test must run, not skip")
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    # `expect` has its own 5 s default: too short for a real base on two busy cores, still bounded.
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        # Never `playwright install`: the system chromium, no download.
        chromium = p.chromium.launch(executable_path=shutil.which("chromium"), timeout=WAIT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def open_page(browser, base_url: str):
    """A fresh tab (its own sessionStorage) that records every URL it asks for."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.console_errors = []
    # Chromium logs every 4xx as "Failed to load resource"; those the test provokes on purpose.
    page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith("Failed to load resource")
            and page.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
    try:
        page.goto(base_url + "/")
        yield page
    finally:
        context.close()


# ---- the server --------------------------------------------------------------------------------

def server_app(sources: list[Path], token: str | None):
    from headstart.serve.app import make_app

    return make_app(sources, token=token)


# ---- what the page shows ----------------------------------------------------------------------

def connect(page, token: str) -> None:
    """The page asks for the token once; a wrong one is refused and asked again."""
    from playwright.sync_api import expect

    expect(page.locator("#token-form")).to_be_visible()
    page.get_by_label("Access token").fill("not-the-token")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#status")).to_contain_text("Token refused")
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#token-form")).to_be_hidden()


def pick(page, specialist_id: str, ids: list[str]) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#models .model")).to_have_count(len(ids))
    page.locator(f'#models input[value="{specialist_id}"]').check()
    expect(page.locator("#work-title")).to_have_text(specialist_id)
    expect(page.locator("#facts [data-fact=task]")).not_to_be_empty()


def shown_top(page, k: int) -> list[tuple[str, float]]:
    """The (label, score) bars, best first, once the answer is there."""
    from playwright.sync_api import expect

    rows = page.locator("#results li")
    expect(rows).to_have_count(k)
    return [(li.get_attribute("data-label"), float(li.get_attribute("data-score"))) for li in rows.all()]


def classify_text(page, text: str) -> list[tuple[str, float]]:
    page.get_by_label("Text to classify").fill(text)
    page.locator("#text-top-k").fill(str(TOP_K))
    page.locator("#text-form").get_by_role("button", name="Classify").click()
    return shown_top(page, TOP_K)


def choose_image(page, path: Path) -> list[tuple[str, float]]:
    """The file picker: it takes keyboard focus, and choosing a file classifies it at once.

    The file is set on the focused input rather than through the native dialog that Space opens: on a
    loaded 2-core CI machine Chromium once never raised that dialog's event (30 s), and the dialog is the
    browser's own code, not the page's. What the page owns is tested: the input is reachable by
    keyboard (a `display: none` input would not take focus) and its `change` classifies.
    """
    from playwright.sync_api import expect

    page.locator("#image-top-k").fill(str(TOP_K))
    picker = page.locator("#image-input")
    picker.focus()
    expect(picker).to_be_focused()
    picker.set_input_files(str(path))
    return shown_top(page, TOP_K)


def drop_image(page, path: Path, mime: str) -> list[tuple[str, float]]:
    """The drop zone: a real `drop` event carrying a File, as a dragged file makes."""
    page.locator("#results li").first.wait_for(state="detached")  # set by the caller: no stale bars
    page.evaluate("""([bytes, name, type]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], name, {type}));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    }""", [list(path.read_bytes()), path.name, mime])
    return shown_top(page, TOP_K)


def expected_top(bundle, x, k: int = TOP_K) -> list[tuple[str, float]]:
    """The bundle's own answer, loaded apart from the server."""
    return [(r["label"], r["score"]) for r in predict(bundle, [x], top_k=k)[0]["top"]]


def assert_same_top(shown, expected) -> None:
    assert [label for label, _ in shown] == [label for label, _ in expected], (shown, expected)
    for (_, got), (_, want) in zip(shown, expected):
        assert abs(got - want) <= 2e-3, (shown, expected)


def assert_stayed_home(page, base_url: str) -> None:
    """No CDN, no network: every request went to the server that served the page (or a blob preview)."""
    elsewhere = [u for u in page.requested if not (u.startswith(base_url + "/") or u.startswith("blob:"))]
    assert not elsewhere, elsewhere
    assert not page.console_errors, page.console_errors


# ---- the routes alone (no browser) ---------------------------------------------------------------

def test_page_and_assets_are_open_and_nothing_else_is_served(tiny_bundles):
    """The page and its assets need no token (the page asks for it); only the named assets exist; the
    Content-Security-Policy keeps the page on its own server."""
    from fastapi.testclient import TestClient

    client = TestClient(server_app([tiny_bundles["topics"]], token=TOKEN))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert f"/static/{name}" in page.text
        assert "http://" not in asset.text and "https://" not in asset.text, f"{name} names another server"
    for path in ("/static/index.html", "/static/page.py", "/static/..%2Fpage.py", "/static/%2e%2e/app.py"):
        refused = client.get(path)
        assert refused.status_code == 404, path
        assert "error" in refused.json(), path
    assert client.get("/models").status_code == 401  # the API itself stays behind the token


# ---- tiny bundles (tier 2) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bundles(tiny_text_csv, tiny_image_folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("page-bundles")
    headstart.fit(tiny_text_csv, base="tiny-text", method="probe", out=root / "topics", **QUIET)
    headstart.fit(tiny_image_folder, base="tiny-image", method="probe", out=root / "colours", **QUIET)
    return {"topics": root / "topics", "colours": root / "colours"}


def test_page_classifies_text_and_images_like_the_bundle(browser, tiny_bundles, tiny_image_folder):
    from playwright.sync_api import expect

    text, png = "goal team referee today", tiny_image_folder / "val" / "red" / "red_0.png"
    ids = sorted(tiny_bundles)
    specs = {name: load(path) for name, path in tiny_bundles.items()}
    with serving(server_app(list(tiny_bundles.values()), token=TOKEN)) as base_url, \
            open_page(browser, base_url) as page:
        connect(page, TOKEN)

        pick(page, "topics", ids)
        expect(page.locator("#facts [data-fact=task]")).to_have_text("text-classification")
        expect(page.locator("#facts [data-fact=metrics]")).to_contain_text("accuracy")
        page.get_by_text("Model card").click()  # the card, as the bundle's README has it
        card_title = (tiny_bundles["topics"] / "README.md").read_text().strip().splitlines()[0]
        expect(page.locator("#card")).to_contain_text(card_title)
        button = page.locator("#text-form").get_by_role("button", name="Classify")
        where = "el => { const r = el.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY]; }"
        before = button.evaluate(where)  # page coordinates: scrolling does not count as a jump
        assert_same_top(classify_text(page, text), expected_top(specs["topics"], text))
        assert button.evaluate(where) == before, "the answer moved the controls (a layout jump)"

        # By keyboard: the arrow keys move between specialists (native radio buttons).
        page.locator('#models input[value="topics"]').focus()
        page.keyboard.press("ArrowUp")
        expect(page.locator("#work-title")).to_have_text("colours")
        pick(page, "colours", ids)
        expect(page.get_by_label("Text to classify")).to_be_hidden()
        assert_same_top(choose_image(page, png), expected_top(specs["colours"], str(png)))
        page.locator("#results").evaluate("el => el.replaceChildren()")
        green = tiny_image_folder / "val" / "green" / "green_1.png"
        assert_same_top(drop_image(page, green, "image/png"), expected_top(specs["colours"], str(green)))

        # The server's own words for a file that is no image, and no stale bars beside them.
        import httpx

        junk = tiny_image_folder / "train" / "red" / "x.jpg"  # random bytes
        refusal = httpx.post(f"{base_url}/models/colours/predict", content=junk.read_bytes(), timeout=30,
                             headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/jpeg"})
        assert 400 <= refusal.status_code < 500, refusal.text
        page.locator("#image-input").set_input_files(str(junk))
        expect(page.locator("#error")).to_have_text(refusal.json()["error"]["message"])
        expect(page.locator("#results li")).to_have_count(0)
        assert_stayed_home(page, base_url)


def test_page_remembers_the_token_for_the_tab_and_needs_none_without_auth(browser, tiny_bundles):
    from playwright.sync_api import expect

    with serving(server_app([tiny_bundles["topics"]], token=TOKEN)) as base_url, \
            open_page(browser, base_url) as page:
        connect(page, TOKEN)
        page.reload()  # same tab: sessionStorage keeps the token, the page does not ask again
        expect(page.locator("#models .model")).to_have_count(1)
        expect(page.locator("#token-form")).to_be_hidden()
    with serving(server_app([tiny_bundles["topics"]], token=None)) as base_url, \
            open_page(browser, base_url) as page:
        expect(page.locator("#models .model")).to_have_count(1)
        expect(page.locator("#token-form")).to_be_hidden()
        # A lone specialist is picked at once; every control has a label (keyboard and screen readers).
        expect(page.locator("#work-title")).to_have_text("topics")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, textarea, select")]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label"))
            .map(el => el.id || el.name)""")
        assert not unlabelled, unlabelled
        assert_stayed_home(page, base_url)


def test_page_streams_a_chat_with_a_generator(browser, sft_bundle, tiny_bundles):
    """The chat box reads /v1/chat/completions as SSE and shows the same answer the server gives whole;
    a question to a generator goes nowhere near /predict."""
    import httpx
    from playwright.sync_api import expect

    sources = [sft_bundle, tiny_bundles["topics"]]
    with serving(server_app(sources, token=None)) as base_url, open_page(browser, base_url) as page:
        pick(page, sft_bundle.name, sorted([sft_bundle.name, "topics"]))
        expect(page.locator("#facts [data-fact=task]")).to_have_text("text-generation")
        expect(page.get_by_label("Text to classify")).to_be_hidden()
        page.get_by_label("Max tokens").fill("6")
        page.get_by_label("Message").fill("What is the colour of snow?")
        page.get_by_label("Message").press("Enter")  # Enter sends, as in any chat box
        answer = page.locator('#chat-log .turn[data-role=assistant][data-done=true] .text')
        expect(answer).to_have_count(1)
        expect(page.locator("#error")).to_be_empty()
        whole = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
            "model": sft_bundle.name, "max_tokens": 6,
            "messages": [{"role": "user", "content": "What is the colour of snow?"}]}).json()
        assert answer.text_content(), "the greedy tiny generator writes 6 tokens, not nothing"
        assert answer.text_content() == whole["choices"][0]["message"]["content"]
        expect(page.locator("#chat-send")).to_be_enabled()
        assert [u for u in page.requested if "/predict" in u] == []
        assert_stayed_home(page, base_url)


# ---- real bases on slices of real data (tier 3) ---------------------------------------------------

def _trec_slice(data_root: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` questions of each coarse TREC class, train and test."""
    import csv

    out.mkdir(parents=True)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        with open(data_root / "trec" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows, seen = [], {}
            for row in csv.DictReader(f):
                if seen.get(row["label"], 0) < n:
                    seen[row["label"]] = seen.get(row["label"], 0) + 1
                    rows.append((row["text"], row["label"]))
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    return out


def _hymenoptera_slice(data_root: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` photos of ants and bees per split (sorted names: the same every run)."""
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for cls in ("ants", "bees"):
            (out / split / cls).mkdir(parents=True)
            for photo in sorted((data_root / "hymenoptera" / split / cls).glob("*.jpg"))[:n]:
                shutil.copy(photo, out / split / cls / photo.name)
    return out


@pytest.mark.real
def test_page_with_real_specialists_on_real_data(browser, data_root, tmp_path):
    """minilm-l6 on TREC questions and efficientnet-lite0 on ants and bees: a typed question and a
    real photo (one the probe never saw) show the bundle's own top labels."""
    bundles = {"trec": tmp_path / "trec", "ants-bees": tmp_path / "ants-bees"}
    headstart.fit(_trec_slice(data_root, tmp_path / "trec-data", per_class=20), base="minilm-l6",
                  method="probe", out=bundles["trec"], **QUIET)
    headstart.fit(_hymenoptera_slice(data_root, tmp_path / "hym-data", per_class=16), base="efficientnet-lite0",
                  method="probe", out=bundles["ants-bees"], **QUIET)
    question = "Who wrote the novel Moby Dick ?"
    photo = sorted((data_root / "hymenoptera" / "val" / "bees").glob("*.jpg"))[-1]
    specs = {name: load(path) for name, path in bundles.items()}
    with serving(server_app(list(bundles.values()), token=TOKEN)) as base_url, \
            open_page(browser, base_url) as page:
        connect(page, TOKEN)
        pick(page, "trec", sorted(bundles))
        assert_same_top(classify_text(page, question), expected_top(specs["trec"], question))
        pick(page, "ants-bees", sorted(bundles))
        page.locator("#image-top-k").fill("2")
        page.locator("#image-input").set_input_files(str(photo))
        assert_same_top(shown_top(page, 2), expected_top(specs["ants-bees"], str(photo), k=2))
        assert_stayed_home(page, base_url)
