"""The app's input components: Gradio's own in the browser, with a server side that checks what
any client can send (the API accepts any JSON) and names the control it refuses for.

Files: only uploads and the shipped examples are read. Gradio downloads an http(s) URL given as a
file payload's `path` before any component sees it; these components refuse it instead.
"""
from __future__ import annotations

import gradio as gr
from gradio.components.dataframe import DataframeData
from gradio.utils import get_upload_folder
from pydantic import model_validator
from gradio_client import utils as client_utils

from spiq.config import ConfigError
from spiq.models.data import ImageError, decode_data_url, open_allowed_image, open_image
from spiq.ui import echo, limits, views
from spiq.ui.page import ASSETS

REMOTE_REFUSED = "Only uploaded files and the shipped examples are read here, not URLs."


class _LocalFilesOnly:
    """Refuses a payload that names an http(s) URL, where Gradio would fetch it (any size, any host)."""

    def move_resource_to_block_cache(self, url_or_file_path):
        _refuse_remote(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        _refuse_remote(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)


def _refuse_remote(url_or_file_path) -> None:
    if url_or_file_path is not None and client_utils.is_http_url_like(str(url_or_file_path)):
        raise gr.Error(REMOTE_REFUSED)


class SafeImage(_LocalFilesOnly, gr.Image):
    """An image input decoded by spiq's own safe decoder, so a bad upload is a clear message.

    Whatever the payload claims, only files in Gradio's upload folder or the shipped examples are
    opened: a payload without Gradio's `meta` key skips Gradio's own check."""

    def get_block_name(self) -> str:
        return "image"  # the browser side is Gradio's own image component

    def preprocess(self, payload):
        if payload is None:
            return None
        try:
            if payload.url and payload.url.startswith("data:"):
                return open_image(decode_data_url(payload.url))
            return open_allowed_image(payload.path, (get_upload_folder(), ASSETS))
        except ImageError as exc:
            raise gr.Error(echo.plain(f"This image cannot be used: {exc}"), title="Bad image") from None


class SafeFile(_LocalFilesOnly, gr.File):
    """A file input that reads uploads only (the recipe's)."""

    def get_block_name(self) -> str:
        return "file"


class BudgetSlider(gr.Slider):
    """The Advisor's budget slider, refusing what its steps cannot give: None, "4.5", 4.3."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        try:
            return limits.check_budget(payload)
        except ConfigError as exc:
            raise gr.Error(echo.plain(exc)) from None


class BitsSlider(gr.Slider):
    """A bit-width slider that refuses, by its own name, what the API can send it: 8.5, NaN, "8"."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        try:
            return views.control_bits(self.label, payload)
        except ConfigError as exc:
            raise gr.Error(echo.plain(exc)) from None


TABLE = "the per-layer table"


class _TableData(DataframeData):
    """Gradio's table payload, its shape checked before pydantic's own check, which names nothing.
    A malformed one becomes an empty table carrying the reason, refused by name in `preprocess`
    (an error raised in a validator would be wrapped by pydantic)."""

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value):
        problem = _table_problem(value)
        return value if problem is None else {"headers": [], "data": [], "metadata": {_REFUSED: [problem]}}


_REFUSED = "spiq_refused"


def _table_problem(value) -> str | None:
    if not isinstance(value, dict):
        return f"{TABLE} must be an object with headers and data, got {type(value).__name__}"
    data = value.get("data")
    if not isinstance(data, list) or not all(isinstance(row, (list, tuple)) for row in data):
        return f"{TABLE}'s data must be a list of rows, got {type(data).__name__}"
    if not isinstance(value.get("headers", []), list):
        return f"{TABLE}'s headers must be a list"
    return None


class SafeDataframe(gr.Dataframe):
    """The per-layer table as an input: a malformed payload is refused naming the table (the
    cells themselves are checked where the table becomes a recipe, `views.config_from_rows`)."""
    data_model = _TableData

    def get_block_name(self) -> str:
        return "dataframe"

    def preprocess(self, payload):
        if payload is None:
            raise gr.Error(f"{TABLE} is missing: send its headers and data (an empty list keeps the recipe's)")
        if payload.metadata and _REFUSED in payload.metadata:
            raise gr.Error(echo.plain(payload.metadata[_REFUSED][0]))
        return super().preprocess(payload)
