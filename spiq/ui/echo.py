"""What a visitor sent, shown back as text and never as markup: every message, toast and Markdown
panel of the app that can carry a visitor's words goes through these, and nothing else does it.

Gradio renders a toast's message as HTML and a Markdown panel as Markdown, then HTML: a value
echoed raw draws images fetched from any host, links, forms or an overlay over the page.
"""
from __future__ import annotations

import html
import re

# An absolute path: what a remote user must not see (URLs, ratios and closing tags such as
# `</script>` stay).
_SERVER_PATH = re.compile(r"(?<![\w.:/<])(?:/[\w.@+-]+)*/([\w.@+-]+)/?")
# Markdown's punctuation (CommonMark's escapable characters), each written as a backslash escape.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>=:])")


def without_paths(message: str) -> str:
    """`message` with every absolute path cut to its last part, for a public server's errors."""
    return _SERVER_PATH.sub(lambda m: m.group(1), message)


def plain(message) -> str:
    """A message for a toast (rendered as HTML): server paths cut, and every character that could
    open a tag or an entity written as an entity, so it shows as the text it is."""
    return html.escape(without_paths(str(message)), quote=False)


def markdown(text) -> str:
    """Text for a Markdown panel: server paths cut, and every character Markdown or HTML would
    read as markup escaped, so it shows as the text it is."""
    return _MARKDOWN.sub(r"\\\1", html.escape(without_paths(str(text)), quote=False))


def code(text) -> str:
    """`text` as a Markdown code span, fenced by more backticks than any run inside it, so no text
    can close it early; Markdown shows a code span's content as written, never as HTML."""
    text = without_paths(str(text)).replace("\n", " ")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"
