"""Test helpers for the browser viewer: a real ``decipher-mr view`` server and Debian's headless Chromium.

The server is the real command in a subprocess; the page is driven with Playwright exactly as a person
would use it (type, press Enter, click). What the server's scene holds is read from the page's own
state (``window.trame.state``), which the viewer fills from the MRML scene, and what the views show is
read from screenshots of the view elements.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DECIPHER_MR_TEST_ARTIFACTS", ROOT / "Testing" / "artifacts")) / "viewer"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1400, "height": 900}


def headless_chromium():
    """Debian's Chromium, headless, driven by Playwright (a generator for a module-scoped fixture).

    >>> browser = pytest.fixture(scope="module")(headless_chromium)
    """
    from playwright import sync_api

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make setup` installs Debian's chromium"
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ViewerServer:
    """``decipher-mr view`` in a subprocess, stopped on ``close()``; its output is kept for failures.

    It gets a fresh token through ``$DECIPHER_MR_VIEWER_TOKEN`` (never on the command line); ``url`` is the
    address with the token, as the command prints it, ``base`` the same without. ``data_roots`` are passed
    as ``--data-root`` (Colin27's folder is always one: the tests open it by path)."""

    def __init__(self, *args: str, log_dir: Path, data_roots=(), token: str | None = None) -> None:
        import secrets

        from decipher_mr import assets

        self.port = free_port()
        self.token = token or secrets.token_urlsafe(24)
        self.base = f"http://localhost:{self.port}/"
        self.url = f"{self.base}?secret={self.token}"
        self.log_path = Path(log_dir) / f"viewer-{self.port}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        cli = Path(sys.executable).with_name("decipher-mr")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DECIPHER_MR_VIEWER_TOKEN": self.token}
        roots = []
        for root in (*data_roots, assets.colin27_t1().parent):
            roots += ["--data-root", str(root)]
        self.proc = subprocess.Popen([str(cli), "view", "--port", str(self.port), "--encoder", "png", *roots, *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"decipher-mr view exited with {self.proc.returncode}:\n{self.log()}")
            if "DecipherMR viewer: http" in self.log():
                return
            time.sleep(0.2)
        raise TimeoutError(f"decipher-mr view did not start in {timeout} s:\n{self.log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class ViewerPage:
    """One Chromium page on the viewer, with the few things the tests ask of it."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.goto(url)
        self.page.wait_for_function("() => window.trame && window.trame.state && window.trame.state.get('dmr_jobs_done') !== undefined",
                                    timeout=60_000)
        self.page.wait_for_selector("#dmr-view-Red", state="attached", timeout=60_000)

    def state(self, key: str):
        return self.page.evaluate("(k) => window.trame.state.get(k)", key)

    def wait_for(self, predicate, what: str, timeout: float = 180.0, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout} s for {what}; status: {self.state('dmr_status')!r}, error: {self.state('dmr_error')!r}")

    def run_job(self, start, timeout: float = 240.0) -> dict:
        """Do what starts a job (a click or an Enter), wait until it ends, return ``{name, outcome}``."""
        done = self.state("dmr_jobs_done")
        start()
        self.wait_for(lambda: self.state("dmr_jobs_done") > done, "the job to end", timeout=timeout)
        return self.state("dmr_last_job")

    def type_and_enter(self, selector: str, text: str) -> None:
        self.page.fill(selector, text)
        self.page.press(selector, "Enter")

    def open_volume(self, path: str | Path) -> None:
        before, error = len(self.state("dmr_volumes") or []), self.state("dmr_error")
        self.type_and_enter("#dmr-volume-path", str(path))
        self.wait_for(lambda: len(self.state("dmr_volumes") or []) > before or self.state("dmr_error") not in ("", error),
                      "the volume to load")
        assert not self.state("dmr_error"), self.state("dmr_error")

    def scene(self, node_type: str | None = None) -> list[dict]:
        nodes = self.state("dmr_scene") or []
        return [n for n in nodes if node_type is None or n["type"] == node_type]

    def view_image(self, tag: str = "Red", settle: float = 1.5, name: str | None = None) -> np.ndarray:
        """An RGB screenshot of one view (``Red`` is the axial slice view), once its image has settled."""
        from PIL import Image

        element = self.page.locator(f"#dmr-view-{tag}").locator("xpath=..").locator("img.image-display-area").first
        previous, stable_since = None, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server re-renders after a change; wait for two equal frames
            png = element.screenshot()
            if png == previous:
                if time.monotonic() - stable_since >= settle:
                    break
            else:
                previous, stable_since = png, time.monotonic()
            time.sleep(0.3)
        if name:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"{name}.png").write_bytes(previous)
        return np.asarray(Image.open(io.BytesIO(previous)).convert("RGB")).astype(np.int16)

    def screenshot(self, name: str) -> Path:
        """The whole page, kept as a test artefact (and the README's pictures)."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


def colour_mask(image: np.ndarray, min_saturation: int = 60) -> np.ndarray:
    """Pixels that are clearly coloured (MRI is grey; overlays, segments and markups are not)."""
    return (image.max(axis=2) - image.min(axis=2)) >= min_saturation


def window(image: np.ndarray, fraction: tuple[float, float], half: float = 0.08) -> np.ndarray:
    """The part of a view image around a point given as fractions of width and height."""
    h, w = image.shape[:2]
    cx, cy = fraction[0] * w, fraction[1] * h
    r = half * max(h, w)
    x0, x1 = int(max(0, cx - r)), int(min(w, cx + r))
    y0, y1 = int(max(0, cy - r)), int(min(h, cy + r))
    return image[y0:y1, x0:x1]


class Wslink:
    """A bare wslink client: msgpack messages in wslink's chunk framing, as the trame page sends them."""

    def __init__(self, ws) -> None:
        from wslink.chunking import UnChunker

        self.ws, self.unchunker, self.n = ws, UnChunker(), 0
        self.unchunker.set_max_message_size(1 << 30)
        self.client = "c0"

    async def send(self, message: dict, chunk: int = 512 * 1024, only_first: bool = False) -> None:
        import msgpack
        from wslink.chunking import generate_chunks

        for piece in generate_chunks(msgpack.packb(message, use_bin_type=True), chunk):
            await self.ws.send_bytes(piece)
            if only_first:
                return

    async def reply(self, rpc_id: str, timeout: float = 30.0) -> dict:
        import aiohttp

        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise ConnectionError(f"websocket {msg.type.name}")
            full = self.unchunker.process_chunk(msg.data)
            if full is not None and full.get("id") == rpc_id:
                return full

    async def hello(self, secret: str) -> dict:
        await self.send({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello", "args": [{"secret": secret}], "kwargs": {}})
        answer = await self.reply("system:c0:0")
        if "result" in answer:
            self.client = answer["result"]["clientID"]
        return answer

    async def call(self, method: str, args=(), kwargs=None, **send) -> dict:
        self.n += 1
        rpc_id = f"rpc:{self.client}:{self.n}"
        await self.send({"wslink": "1.0", "id": rpc_id, "method": method, "args": list(args), "kwargs": kwargs or {}}, **send)
        return await self.reply(rpc_id)
