"""The trace page in a real headless browser (Chromium: `.ci/run` installs it, so a missing one fails here):
from the file alone, with the network cut off, it draws the tree, the best sequence's tokens on its path."""
import shutil
import subprocess
from html.parser import HTMLParser

import numpy
import pytest
import torch
from PIL import Image

from specbeam import Engine, SpecConfig
from specbeam.assets import load_default_pair
from specbeam.trace import to_html
from test_trace_html import page_data

PROMPT = "import os\n\n\ndef main():\n"
WINDOW = (1400, 900)
GREEN, ORANGE = (0x2C, 0xA0, 0x2C), (0xFF, 0x7F, 0x0E)  # running edges and nodes; the returned path


def chromium(url: str, tmp_path, *options: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is missing: .ci/run installs it (apt-get install chromium)"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}",
               # no network: every name resolves to nothing and every request goes to a closed port
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", *options, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class NodeLabels(HTMLParser):
    """The text drawn in each tree node (`<g data-id=...>`), and every `<code>` text of the page."""

    def __init__(self):
        super().__init__()
        self.labels, self.codes, self.node, self.tag = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "g" and "data-id" in attrs:
            self.node = int(attrs["data-id"])
        self.tag = tag

    def handle_endtag(self, tag):
        if tag == "g":
            self.node = None
        self.tag = None

    def handle_data(self, data):
        if self.tag == "text" and self.node is not None:
            self.labels[self.node] = self.labels.get(self.node, "") + data
        elif self.tag == "code":
            self.codes.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A speculative beam search on the shipped pair, written as a page."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        target, draft, tokenizer = load_default_pair()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    engine = Engine(target, draft_model=draft, spec=SpecConfig(depth=2, adaptive=False))
    out = engine.generate(**inputs, num_beams=4, max_new_tokens=12, return_dict_in_generate=True)
    assert out.trace.drafts
    path = tmp_path_factory.mktemp("page") / "trace.html"
    to_html(out.trace, tokenizer, str(path))
    return path


def test_the_browser_draws_the_tree(page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(f"{page.as_uri()}#drafts", tmp_path, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    image = torch.from_numpy(numpy.asarray(Image.open(shot).convert("RGB")).astype("int32"))
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    pixels = image.flatten(0, 1)

    def near(color) -> int:
        return int(((pixels - torch.tensor(color)).abs().sum(dim=1) < 40).sum())

    drawn = int(((255 - pixels).sum(dim=1) > 60).sum())
    assert drawn > 0.02 * pixels.shape[0]  # not blank
    assert near(GREEN) > 500 and near(ORANGE) > 200  # the tree's running beams and the returned path


def test_the_best_sequence_is_on_the_rendered_page(page, tmp_path):
    dom = chromium(f"{page.as_uri()}#drafts", tmp_path, "--dump-dom").stdout
    data = page_data(page)["prompts"][0]
    rendered = NodeLabels()
    rendered.feed(dom)
    assert len(rendered.labels) == len(data["nodes"])  # every node drawn, with its label
    best = data["returned"][0]
    for node in best["path"]:
        assert rendered.labels[node] == data["nodes"][node]["label"]
    # the returned list shows the best sequence's text (its line breaks as arrows) ...
    assert best["text"].replace("\n", "↵").replace("\t", "⇥") in rendered.codes
    assert "".join(data["nodes"][n]["text"] for n in best["path"]) == best["text"]
    # ... and the drafted trees are drawn, with the nodes the target kept
    assert 'class="draft kept"' in dom and 'class="draft rejected"' in dom
