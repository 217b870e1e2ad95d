"""The tabs that show a view of the applied state (all but Deploy and Recipe), computed only when
shown: on a 2-core server every view computed ahead of time delays other visitors' predictions.

A tab module declares its unit of work, a `TabWork` (its id, what it computes for a `Request`, the
request's options its result depends on), and registers a `ViewTab` on the page: its components,
how a result shows in them (`{component: update}`) and which of its controls are options. Results
are kept in the cache's bounded LRU of views, so going back to a tab, an image or a recipe is
answered without computing. `wire(page)` then registers the events every view tab shares:
`open_tab` when a tab comes into view or the page's state changes, `compute_tab` for a tab that is
not in the cache, and the `refresh` API endpoint.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr
from PIL import Image

from spiq.config import QuantConfig
from spiq.ui import echo, state, views
from spiq.ui.cache import ModelCache, config_key
from spiq.ui.request import VIEW_IMAGES, group, progress_bar, recipe, user_errors, work

if TYPE_CHECKING:
    from spiq.ui.panel import Page

# A job not done after this long is asked again when its tab comes into view (it may have failed).
PENDING_S = 60.0


@dataclass(frozen=True)
class Request:
    """One session's request for a tab: the applied model and recipe, the image, and the tabs'
    options (the values of their controls, checked: see `ViewTab.controls`)."""
    model: str
    config: QuantConfig
    image: Image.Image
    digest: str
    options: Mapping[str, object] = field(default_factory=dict)

    def option(self, name: str, default=None):
        value = self.options.get(name)
        return default if value is None else value

    def drawn(self) -> str:
        """What a tab drawn for this request shows, but for its own options (which its own controls
        redraw): a tab whose drawn value is this needs no request when it comes into view again."""
        return f"{self.model}|{config_key(self.config)}|{self.digest}"


@dataclass(frozen=True)
class TabWork:
    """A tab's unit of work: `compute(cache, request, progress)` is its result, kept in the cache's
    LRU of views under the request and the `options` it depends on. `marks(cache, request)`: what
    the result shows beyond its request (the Layer error tab marks the layers the advisor raises)."""
    id: str
    compute: Callable[[ModelCache, Request, Callable | None], object]
    options: tuple[str, ...] = ()
    marks: Callable[[ModelCache, Request], tuple] | None = None

    def key(self, cache: ModelCache, req: Request) -> tuple:
        return (req.model, config_key(req.config), req.digest, self.id,
                *(req.options.get(o) for o in self.options), *self.marked(cache, req))

    def marked(self, cache: ModelCache, req: Request) -> tuple:
        return () if self.marks is None else self.marks(cache, req)


def drawn_key(cache: ModelCache, req: Request, tab: TabWork) -> str:
    """`req.drawn()` for a tab, with what it marks: a Layer error view drawn before the advisor
    measured is drawn again when it comes into view."""
    return "|".join([req.drawn(), *map(str, tab.marked(cache, req))])


def cached(cache: ModelCache, req: Request, tab: TabWork) -> tuple[bool, object]:
    """(found, result) of a tab computed before for this request: never computes."""
    return cache.cached_view(tab.key(cache, req))


def compute(cache: ModelCache, req: Request, tab: TabWork, progress=None):
    """A tab's result for `req`, from the cache or computed now."""
    return cache.view(tab.key(cache, req), lambda: tab.compute(cache, req, progress))


@dataclass(frozen=True)
class ViewTab:
    """What a tab module registers for the tab it laid out, to show a view (`Page.add_view`).

    `outputs`: every component `show(result)` may update, in the order of the `refresh` endpoint's
    outputs. `controls`: option name -> (its control, the check of the value a client sends, or None
    to take it as sent); the name is a keyword of the shared handlers, and the option is in every
    `Request`. `refresh`: the tab's step in the `refresh` endpoint (what its progress bar says), or
    None to leave it out."""
    work: TabWork
    outputs: tuple
    show: Callable[[object], dict]
    controls: Mapping[str, tuple] = field(default_factory=dict)
    refresh: str | None = None


class ViewEvents:
    """The events every view tab shares, for the view tabs laid out on `page`."""

    def __init__(self, page: Page):
        _check_layout(page)
        self.page = page
        registered = [v for _, v in page.tabs if v is not None]
        self.tabs = {v.work.id: v for v in registered}
        self.controls = {name: c for v in registered for name, c in v.controls.items()}
        self.checks = {name: check or _as_sent for name, (_, check) in self.controls.items()}
        taken = set(self.controls) & {"tab_id", "job", "drawn", "model_name", "applied", "image", "progress"}
        if taken:   # the options are keyword arguments of the handlers below
            raise ValueError(f"a tab's option may not be named {', '.join(sorted(taken))}")
        # `shown` is the tab in view, `drawn` what each tab shows, and a new `job` value asks for a
        # tab that is not in the cache.
        self.shown, self.drawn, self.job = gr.State(next(iter(self.tabs), None)), gr.State({}), gr.State(None)
        self.outputs = [*(o for v in registered for o in v.outputs), page.views_note]
        self.refreshed = [v for v in registered if v.refresh]

    def wire(self) -> None:
        page, kw = self.page, {"inputs_kwargs": {n: c for n, (c, _) in self.controls.items()}}
        state_in = [page.applied_model, page.applied, page.image]
        opened = [self.shown, self.drawn, self.job, *self.outputs]
        for tab, view in page.tabs:
            if view is None:   # no view to compute: nothing follows its being shown
                tab.select(lambda: None, None, self.shown, api_name=False, **group("cheap"))
            else:
                tab.select(functools.partial(self.open_tab, view.work.id), [self.drawn, *state_in], opened,
                           api_name=False, show_progress="hidden", **kw, **group("cheap"))
        for event in page.new_state_events:   # new predictions: the tab in view, from the cache or a job
            event.success(self.open_tab, [self.shown, self.drawn, *state_in], opened, api_name=False,
                          show_progress="hidden", **kw, **group("cheap"))
        self.job.change(self.compute_tab, [self.job, self.drawn, *state_in], [self.drawn, *self.outputs],
                        api_name=False, **kw, **group("views"))
        api_only = gr.Button(visible=False)   # an API endpoint only: every refreshed view at once
        api_only.click(self.refresh, state_in, [*(o for v in self.refreshed for o in v.outputs), page.views_note],
                       inputs_kwargs={n: c for v in self.refreshed for n, (c, _) in v.controls.items()},
                       api_name="refresh", **group("views"))

    def request(self, model_name: str, applied: str, image: Image.Image, options: dict) -> Request:
        """The request of one event: the recipe parsed, each option checked by its control's check."""
        checked = {name: self.checks[name](value) for name, value in options.items()}
        return Request(model_name, recipe(applied), image, views.image_digest(image), checked)

    def updates(self, view: ViewTab, result, req: Request) -> dict:
        """A tab's result as updates of its components, and the note saying what the views show."""
        note = f"Views show {echo.code(req.config.to_json())} on {echo.code(req.model)}."
        return {**view.show(result), self.page.views_note: note}

    @user_errors
    def open_tab(self, tab_id, drawn, model_name, applied, image, **options) -> dict:
        """A tab comes into view, or the shown tab's model, recipe or image changed: what it shows
        already stays, a view computed before is sent, and anything else becomes a job for
        `compute_tab` (a value of the `job` state, whose change starts it). Never computes, so it
        answers at once however busy the server is. `drawn` maps each tab to what it shows."""
        view, idle = self.tabs.get(tab_id), {self.shown: tab_id}
        if image is None or view is None:   # a cleared image: keep the last views
            return idle
        req = self.request(model_name, applied, image, options)
        drawn, shows, now = drawn or {}, drawn_key(state.CACHE, req, view.work), time.time()
        if drawn.get(tab_id) == shows or _pending(drawn.get(tab_id), shows, now):
            return idle
        found, result = cached(state.CACHE, req, view.work)
        if found:
            return {self.shown: tab_id, self.drawn: {**drawn, tab_id: shows}, **self.updates(view, result, req)}
        # marked pending, so the same tab asked again meanwhile (a page load selects it too) is one job
        return {self.shown: tab_id, self.drawn: {**drawn, tab_id: [shows, now]},
                self.job: {"tab": tab_id, "request": shows, "at": now}}

    @user_errors
    def compute_tab(self, job, drawn, model_name, applied, image, progress=gr.Progress(), **options) -> dict:
        """The tab a job names, for the session's current request."""
        view = self.tabs.get(job["tab"]) if job else None
        if view is None or image is None:
            return gr.skip()
        with work(model_name, VIEW_IMAGES):
            req = self.request(model_name, applied, image, options)
            result = compute(state.CACHE, req, view.work, progress_bar(progress))
            shows = drawn_key(state.CACHE, req, view.work)
        return {self.drawn: {**(drawn or {}), view.work.id: shows}, **self.updates(view, result, req)}

    @user_errors
    def refresh(self, model_name, applied, image, progress=gr.Progress(), **options) -> dict:
        """Every refreshed view for the current image and recipe, at once: an API endpoint (the page
        computes each tab when it is shown). Results are shared with the tabs' cache."""
        if image is None:   # a cleared image: keep the last views
            return gr.skip()
        with work(model_name, VIEW_IMAGES):
            progress(0.0, desc="quantizing")
            req = self.request(model_name, applied, image, options)
            views.scene(state.CACHE, model_name, req.config, image)
            out = {}
            for i, view in enumerate(self.refreshed):
                progress((i + 1) / (len(self.refreshed) + 1), desc=view.refresh)
                out |= self.updates(view, compute(state.CACHE, req, view.work), req)
        return out


def _check_layout(page: Page) -> None:
    """Refuse a component laid out between the tabs, outside any (made after its tab's `with
    page.tab(...)` block): Gradio's front end would then show one tab's button in another's place."""
    for container in {id(tab.parent): tab.parent for tab, _ in page.tabs}.values():
        strays = [type(c).__name__ for c in container.children if not isinstance(c, gr.Tab)]
        if strays:
            raise ValueError(f"{', '.join(strays)} laid out between the tabs: make it inside its tab's "
                             "`with page.tab(...)` block")


def _as_sent(value):
    return value


def _pending(entry, shows: str, now: float) -> bool:
    return isinstance(entry, list) and entry[0] == shows and now - entry[1] < PENDING_S


def wire(page: Page) -> ViewEvents:
    """The shared events of the view tabs on `page`: call it once, after every tab is laid out."""
    page.view_events = ViewEvents(page)
    page.view_events.wire()
    return page.view_events
