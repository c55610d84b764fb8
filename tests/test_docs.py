"""The documentation site builds with ``mkdocs build --strict``, and no relative link in the docs is broken."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# pages a reader reaches from the README or the nav; each must come out of the build
KEY_PAGES = [
    "index.html",
    "installation/index.html",
    "concepts/side-tuning/index.html",
    "concepts/adapters/index.html",
    "concepts/taps/index.html",
    "how-to/data/index.html",
    "how-to/training/index.html",
    "how-to/evaluation/index.html",
    "how-to/multi-gpu/index.html",
    "how-to/hub/index.html",
    "how-to/app/index.html",
    "benchmarks/index.html",
    "differences/index.html",
    "reference/index.html",
]
# objects whose API entries must be rendered from the docstrings (proves mkdocstrings ran on the code)
API_ANCHORS = {
    "reference/config/index.html": "m2ist.config.M2ISTConfig",
    "reference/model/index.html": "m2ist.model.SideTunedModel.from_pretrained",
    "reference/taps/index.html": "m2ist.taps.register_taps",
    "reference/data/index.html": "m2ist.data.refer.load_refer",
    "reference/app/index.html": "m2ist.app.predict_page",
}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.I)


def _markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def _relative_links(text: str) -> list[str]:
    """Link targets of inline links and reference definitions, outside code, that are not URLs or bare anchors."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = _INLINE_LINK.findall(prose) + _REFERENCE_DEFINITION.findall(prose)
    return [target for target in targets if not _EXTERNAL.match(target)]


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file():
    broken = []
    checked = 0
    for path in _markdown_files():
        for target in _relative_links(path.read_text(encoding="utf-8")):
            checked += 1
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert checked > 0, "no relative links found: the link pattern is broken"
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_link_finder_sees_links_and_ignores_code_and_urls():
    text = (
        "See [a](docs/a.md#part), ![img](pics/b.png) and [c](https://example.org/c.md).\n"
        "`[not](inline/code.md)`\n```python\nx = '[not](fenced/code.md)'\n```\n[ref]: other/d.md\n[top](#anchor)\n"
    )
    assert _relative_links(text) == ["docs/a.md#part", "pics/b.png", "other/d.md"]


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: `pip install -e '.[dev]'` installs the documentation tools")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    missing = [page for page in KEY_PAGES if not (site / page).is_file()]
    assert not missing, f"pages missing from the built site: {missing}"
    for page, anchor in API_ANCHORS.items():
        html = (site / page).read_text(encoding="utf-8")
        assert f'id="{anchor}"' in html, f"{page} has no rendered API entry for {anchor}"
        assert ":class:<code>" not in html and ":func:<code>" not in html, f"{page} shows raw Sphinx roles"

