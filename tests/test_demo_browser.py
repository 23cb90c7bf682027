"""End to end in a real browser: Debian's headless Chromium, driven by Playwright, against the launched demo.

Loads the page, uploads a clip of the synthetic corpus, asks, watches masked positions appear and resolve, reads
the answer from the page and saves a screenshot (pytest's tmp dir and `test-artifacts/demo-answer.png`); then
checks that an upload over the size limit and a file that is not audio get a message in the page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import clip
from test_demo import REPO, install_checkpoint, run, serve, write_wav

from diffa2.demo.answer import MASK_GLYPH, DecodeSettings
from diffa2.demo.examples import example_clips
from diffa2.diffusion.decoding import DEFAULT_MODE

CHROMIUM = Path("/usr/bin/chromium")
# The network is closed: no first-run work, no background or component updates, no QUIC probing.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = REPO / "test-artifacts" / "demo-answer.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium; .ci/run installs it)"),
]


def test_ask_about_a_synthetic_clip_in_headless_chromium(tmp_path, checkpoint, small_corpus):
    from playwright.sync_api import sync_playwright

    from diffa2.demo.ui import DemoOptions

    final = install_checkpoint(checkpoint, tmp_path / "runs")
    rows, kinds = example_clips(small_corpus)
    clip_path, question = rows[kinds.index("Pitch")]
    expected = run(clip_path, question, str(final), DecodeSettings.from_mode(DEFAULT_MODE))[-1]
    too_large = write_wav(tmp_path / "long.wav", np.tile(clip(2.0), 20))  # 40 s of 16-bit PCM: 1.3 MB
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio\n" * 100)
    options = DemoOptions(runs_dir=tmp_path / "runs", examples_dir=small_corpus, max_upload_mb=1)
    with serve(options) as url, sync_playwright() as pw:
        # Playwright gives the browser a fresh, empty profile directory of its own.
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(clip_path)
            page.locator("#audio audio").first.wait_for(state="attached")  # the player appears once uploaded
            page.locator("#question textarea").fill(question)
            page.locator("#ask").click()
            page.wait_for_function(f"document.querySelector('#answer textarea').value.includes('{MASK_GLYPH}')")
            page.wait_for_function("document.querySelector('#status').textContent.includes('Done: NFE')")
            answer = page.locator("#answer textarea").input_value()
            status = page.locator("#status").inner_text()
            page.screenshot(path=str(tmp_path / "demo-answer.png"), full_page=True)

            page.locator("#audio button[aria-label='Clear']").click()
            page.locator("input[type=file]").first.set_input_files(str(too_large))
            page.get_by_text("exceed the maximum allowed size").wait_for()  # Gradio refuses it before uploading
            page.locator("input[type=file]").first.set_input_files(str(not_audio))
            page.locator("#ask").click()
            page.get_by_text("Could not read the audio: notes.wav: cannot be decoded").wait_for()
        finally:
            browser.close()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "demo-answer.png", SCREENSHOT)
    assert answer == expected.text
    assert status.split(",")[0] == expected.status.split(",")[0]  # "Done: NFE n" (the time differs)
