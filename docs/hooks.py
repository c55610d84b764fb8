"""MkDocs hook: render the Sphinx roles used in m2ist's docstrings as plain code.

Docstrings say ``:class:`~m2ist.towers.TowerFeatures``` (Sphinx style); Markdown turns the backticks into code
but leaves the role in front of it. This hook drops the role and, for ``~``-prefixed targets, keeps only the
last dotted component, as Sphinx shows it.
"""

from __future__ import annotations

import re

_ROLE_THEN_CODE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):<code>(~)?([^<]*)</code>")


def _plain(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if match.group(1) else target}</code>"


def on_page_content(html: str, **_: object) -> str:
    """Strip Sphinx roles from the rendered page."""
    return _ROLE_THEN_CODE.sub(_plain, html)
