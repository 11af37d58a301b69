"""Who may use the browser viewer, and what it may read: the token, the data roots, the upload limit.

A real ``decipher-mr view`` on loopback (no model needed) is asked by plain HTTP and websocket clients
(aiohttp, speaking wslink's own framing) and by Debian's headless Chromium:

* no token, a wrong token -> 403 and the refusal page only, on the page, its scripts and the websocket;
* the right token -> the page works, also after a reload (the cookie), and a plain wslink client gets state;
* a path outside the data roots, a symlink escaping them, ``..`` -> refused in the page, scene unchanged;
* an upload over ``--max-upload-mb`` -> refused (in the page before sending; on the server as it arrives);
* ``--no-token`` warns, and is refused with a non-loopback ``--host``; the token is written once only.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer")
aiohttp = pytest.importorskip("aiohttp")
msgpack = pytest.importorskip("msgpack")

from browser import ROOT, ViewerPage, ViewerServer, Wslink, free_port, headless_chromium  # noqa: E402

REFUSAL = "needs its access token"
MB = 2**20


def _nifti(path: Path, shape=(24, 28, 20)) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("viewer_security")
    allowed, outside = base / "allowed", base / "outside"
    inside = _nifti(allowed / "inside.nii.gz")
    secret = _nifti(outside / "secret.nii.gz")
    (allowed / "escape.nii.gz").symlink_to(secret)
    (allowed / "escape-dir").symlink_to(outside, target_is_directory=True)
    return {"base": base, "allowed": allowed, "outside": outside, "inside": inside, "secret": secret}


@pytest.fixture(scope="module")
def viewer(files):
    server = ViewerServer("--max-upload-mb", "1", log_dir=files["base"], data_roots=[files["allowed"]])
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api")
    yield from headless_chromium()


@pytest.fixture()
def page(viewer, browser):
    p = ViewerPage(browser, viewer.url)
    yield p
    p.page.close()


# --- plain HTTP and websocket clients -----------------------------------------------------------------
def _run(coro):
    """Run a client coroutine on its own thread (Playwright's sync API holds this thread's event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _get(url: str, **kwargs) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text(), dict(response.headers)


def _ws_url(viewer, query: str = "") -> str:
    return f"ws://localhost:{viewer.port}/ws{query}"


async def _state(viewer) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(_ws_url(viewer, f"?secret={viewer.token}")) as ws:
            client = Wslink(ws)
            assert "result" in await client.hello(viewer.token)
            return (await client.call("trame.state.get"))["result"]["state"]


def _scene_names(state: dict) -> list[str]:
    return [n["name"] for n in state.get("dmr_scene") or []]


def test_no_token_gets_the_refusal_page_and_nothing_else(viewer):
    for path in ("", "index.html", "vue.global.js", "ws"):
        status, body, headers = _run(_get(viewer.base + path))
        assert status == 403, (path, status)
        assert REFUSAL in body and "dmr_" not in body and "trame" not in body.lower()
        assert "Set-Cookie" not in headers


def test_wrong_token_is_refused_on_http_and_websocket(viewer):
    wrong = viewer.token[:-1] + ("x" if viewer.token[-1] != "x" else "y")
    status, body, _ = _run(_get(f"{viewer.base}?secret={wrong}"))
    assert status == 403 and REFUSAL in body
    status, body, _ = _run(_get(viewer.base + "index.html", headers={"Authorization": f"token {wrong}"}))
    assert status == 403 and REFUSAL in body
    status, body, _ = _run(_get(viewer.base + "index.html", cookies={"dmr-viewer-0": "x"}))
    assert status == 403

    async def handshake(query: str):
        async with aiohttp.ClientSession() as session:
            await session.ws_connect(_ws_url(viewer, query))

    for query in ("", f"?secret={wrong}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            _run(handshake(query))
        assert refused.value.status == 403

    async def other_site():  # a page of another site opening the websocket, even with the token
        async with aiohttp.ClientSession() as session:
            await session.ws_connect(_ws_url(viewer, f"?secret={viewer.token}"), headers={"Origin": "http://evil.example"})

    with pytest.raises(aiohttp.WSServerHandshakeError):
        _run(other_site())


def test_right_token_http_cookie_and_websocket_state(viewer):
    status, _, headers = _run(_get(viewer.url))
    assert status == 302 and headers["Location"] == f"index.html?secret={viewer.token}"
    status, body, headers = _run(_get(f"{viewer.base}index.html?secret={viewer.token}"))
    assert status == 200 and "<div id=\"app\">" in body
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and viewer.token not in cookie
    name, value = cookie.split(";")[0].split("=", 1)
    status, _, _ = _run(_get(viewer.base + "vue.global.js", cookies={name: value}))
    assert status == 200
    status, _, _ = _run(_get(viewer.base + "vue.global.js", headers={"Authorization": f"token {viewer.token}"}))
    assert status == 200

    state = _run(_state(viewer))
    assert "dmr_status" in state and "dmr_scene" in state


def test_page_opens_with_the_token_and_survives_a_reload(page, viewer):
    assert "secret" not in page.page.url  # the trame client took it out of the address bar
    assert page.state("dmr_error") == ""
    page.page.reload()  # the URL has no token any more: the cookie lets the page and its websocket in
    page.page.wait_for_function("() => window.trame && window.trame.state && window.trame.state.get('dmr_status')",
                                timeout=60_000)


def test_browser_without_or_with_a_wrong_token_sees_only_the_refusal(browser, viewer):
    p = browser.new_page()
    try:
        for url in (viewer.base, f"{viewer.base}?secret=not-the-token"):
            response = p.goto(url)
            assert response.status == 403
            assert REFUSAL in p.inner_text("body")
            assert p.evaluate("() => typeof window.trame") == "undefined"
    finally:
        p.close()


def _refused(page, typed: str, field: str = "#dmr-volume-path") -> str:
    scene = page.scene()
    page.page.fill(field, "")
    page.type_and_enter(field, typed)
    page.wait_for(lambda: typed in (page.state("dmr_error") or ""), f"the refusal of {typed}", timeout=90)
    error = page.state("dmr_error")
    alert = page.page.locator("#dmr-error")
    alert.wait_for(state="visible", timeout=60_000)
    assert typed in alert.inner_text()
    assert page.scene() == scene  # nothing opened
    page.page.evaluate("() => window.trame.state.set('dmr_error', '')")
    return error


def test_paths_outside_the_data_roots_are_refused_in_the_page(page, files):
    error = _refused(page, str(files["secret"]))
    assert "outside the folders this viewer may read" in error and str(files["allowed"]) in error
    error = _refused(page, str(files["allowed"] / "escape.nii.gz"))  # a symlink inside that leads outside
    assert "outside" in error and "link" in error
    _refused(page, str(files["allowed"] / "escape-dir" / "secret.nii.gz"))  # through a linked folder
    error = _refused(page, str(files["allowed"] / ".." / "outside" / "secret.nii.gz"))
    assert "'..'" in error
    _refused(page, "/etc/passwd")
    error = _refused(page, str(files["outside"]), field="#dmr-bundle")  # the model fields too
    assert "outside" in error

    # A file inside the roots opens.
    before = len(page.scene("ScalarVolume"))
    page.open_volume(files["inside"])
    assert len(page.scene("ScalarVolume")) == before + 1


def test_an_oversized_upload_is_refused_in_the_page(page, files):
    scene = page.scene()
    big = _nifti(files["base"] / "upload" / "big.nii.gz", shape=(80, 80, 80))  # ~2 MB of noise, limit 1 MB
    assert big.stat().st_size > MB
    page.page.locator("input[type=file]").first.set_input_files(str(big))
    page.wait_for(lambda: "Upload refused" in (page.state("dmr_error") or ""), "the upload refusal", timeout=30)
    assert "1 MB" in page.state("dmr_error") and "--max-upload-mb" in page.state("dmr_error")
    assert page.scene() == scene


def test_an_oversized_upload_is_refused_on_the_server_as_it_arrives(viewer):
    """A client that skips the page's check: chunks past the limit are dropped, and one message larger
    than the limit is refused from its first piece."""
    state = _run(_state(viewer))
    names = _scene_names(state)
    trigger = re.search(r"trigger_name: '([^']+)'", str(state.get("trame__template_main", ""))).group(1)

    async def upload():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(viewer, f"?secret={viewer.token}")) as ws:
                client = Wslink(ws)
                await client.hello(viewer.token)
                part = {"name": "part.nii.gz", "size": 700 * 1024, "content": os.urandom(700 * 1024)}
                for _ in range(2):  # 1.4 MB in two messages, each under the limit
                    answer = await client.call("trame.trigger", [trigger, [[part]], {}])
                    assert "error" not in answer, answer
                await client.call("trame.trigger", [trigger, [[]], {}])  # the end of the upload
                state = (await client.call("trame.state.get"))["result"]["state"]
                return state["dmr_error"]

    error = _run(upload())
    assert "Upload refused" in error
    assert _scene_names(_run(_state(viewer))) == names

    async def one_big_message():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_ws_url(viewer, f"?secret={viewer.token}")) as ws:
                client = Wslink(ws)
                await client.hello(viewer.token)
                part = {"name": "big.nii.gz", "size": 3 * MB, "content": bytes(3 * MB)}
                with pytest.raises(ConnectionError):  # the server closes the websocket on the first piece
                    await client.call("trame.trigger", [trigger, [[part]], {}], only_first=True)

    _run(one_big_message())
    assert _scene_names(_run(_state(viewer))) == names  # and it still serves the next client


def test_the_token_is_written_once_and_nowhere_else(viewer):
    log = viewer.log()
    assert log.count(viewer.token) == 1 and f"?secret={viewer.token}" in log
    assert "Data roots" in log


def _cli(*args: str, env=None, timeout: float = 60):
    cli = Path(sys.executable).with_name("decipher-mr")
    return subprocess.run([str(cli), "view", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_no_token_is_refused_beyond_loopback_and_a_short_token_is_refused():
    done = _cli("--host", "0.0.0.0", "--no-token", "--port", str(free_port()))
    assert done.returncode == 2 and "needs the token" in done.stderr
    done = _cli("--token", "short", "--port", str(free_port()))
    assert done.returncode == 2 and "at least 8" in done.stderr


def test_no_token_on_localhost_warns_and_lets_in(tmp_path):
    port = free_port()
    cli = Path(sys.executable).with_name("decipher-mr")
    log = tmp_path / "view.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(cli), "view", "--no-token", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    try:
        import time

        deadline = time.monotonic() + 90
        while "DecipherMR viewer: http" not in log.read_text(encoding="utf-8") and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(encoding="utf-8")
            time.sleep(0.2)
        text = log.read_text(encoding="utf-8")
        assert "WARNING: --no-token" in text and f"http://localhost:{port}/\n" in text
        status, body, _ = _run(_get(f"http://localhost:{port}/index.html"))
        assert status == 200 and REFUSAL not in body
    finally:
        proc.terminate()
        proc.wait(timeout=20)
