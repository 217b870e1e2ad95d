"""The panel at the top of the app's page, and the `Page` every tab module builds on.

At 1280x720 the recipe, the image and the predictions fit on one screen, side by side; the
explanation, the per-layer table and the tabs follow below. `build(demo)` lays the panel out and
registers its events (a model chosen, Apply, an image, a link opened). The `Page` it returns holds
the session's state and the components any part of the page may read or update, and their
handlers, each returning `{component: update}`; a tab module lays out its tab with `page.tab`.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import gradio as gr

from spiq.config import METHODS, QuantConfig
from spiq.core.errors import SpiqError
from spiq.models.registry import loadable
from spiq.quantize.api import methods_for
from spiq.ui import echo, state, views
from spiq.ui.background import FAILED
from spiq.ui.components import BitsSlider, SafeDataframe, SafeImage
from spiq.ui.page import DEFAULT_MODEL, EXAMPLES, first_predictions, link_query, link_state
from spiq.ui.request import (NO_IMAGE, fit_waits, group, progress_bar, recipe, recipe_images, runnable,
                             user_errors, work)

TITLE = ("## SPIQ Explorer · data-free post-training quantization, live\n"
         "Pick a recipe, press **Apply**, and compare the float and the quantized model on an image.")
ABOUT = """**SPIQ** (Yvinec et al., WACV 2023) quantizes each conv/linear input *per input channel* with ranges
derived from BatchNorm statistics (no data) and folds the per-channel scales into the weights. Compare it with
per-tensor, calibrated and dynamic ranges, and see *why* a setting works in the tabs below: channel ranges,
per-layer error, error maps, attribution drift.

Methods: `spiq` is data-free per-channel static; `calib-*` and `liu-ptq` (transformers only) calibrate on the
example images; `dynamic-*` compute ranges on each input. Models that cannot load here:"""


@dataclass(eq=False)
class Page:
    """The session's state and the components that show it, which any tab may read or update.

    `applied` is the recipe last applied, as JSON text: each handler parses it once on entry
    (`request.recipe`). `recipe`, `download` and `link` are made here and shown by the Recipe tab
    (`render()`). `tabs`: each tab laid out, with the view it registered (`add_view`) or None."""
    applied_model: gr.State
    applied: gr.State
    model: gr.Dropdown
    method: gr.Dropdown
    wbits: gr.Slider
    abits: gr.Slider
    wgran: gr.Dropdown
    igran: gr.Dropdown
    bias_fit: gr.Checkbox
    fit_note: gr.Markdown
    fit_timer: gr.Timer
    status: gr.Markdown
    image: gr.Image
    pred_plot: gr.Plot
    pred_text: gr.Markdown
    table: gr.Dataframe
    views_note: gr.Markdown
    recipe: gr.Code
    download: gr.DownloadButton
    link: gr.Textbox
    linked: gr.State = field(default_factory=lambda: gr.State(False))   # a link's page, not the default one
    tabs: list = field(default_factory=list)
    new_state_events: list = field(default_factory=list)
    view_events: object = None   # the view tabs' shared events, once wired (`viewtabs.wire`)

    # --- what a tab module builds with ----------------------------------------------------------

    @property
    def controls(self) -> list:
        """The recipe's controls, in the order of `views.control_values`."""
        return [self.method, self.wbits, self.abits, self.wgran, self.igran, self.bias_fit]

    @contextlib.contextmanager
    def tab(self, label: str, tab_id: str):
        """Lay out a tab: `with page.tab("Deploy", "deploy") as tab:`, its components inside."""
        with gr.Tab(label, id=tab_id) as tab:
            self.tabs.append((tab, None))
            yield tab

    def add_view(self, tab: gr.Tab, view) -> None:
        """`tab` shows a view of the applied state, computed when it is shown (`viewtabs.ViewTab`)."""
        at = next(i for i, (t, _) in enumerate(self.tabs) if t is tab)
        self.tabs[at] = (tab, view)

    def new_state(self, event):
        """After `event` (new predictions: a model, a recipe or an image), the link to this state,
        made absolute in the browser, which knows the page's address; and the tab in view
        (`viewtabs.wire`, once every tab is laid out)."""
        event.success(self.link_to, [self.applied, self.image], self.link, api_name=False, show_progress="hidden",
                      **group("cheap")).success(None, self.link, self.link,
                                                js="(q) => location.origin + location.pathname + q")
        self.new_state_events.append(event)
        return event

    @property
    def restore_outputs(self) -> list:
        return [*self.controls, self.table, self.applied]

    def restored(self, model_name: str, config: QuantConfig) -> dict:
        """The controls, the per-layer table and the session's recipe set to `config`, to be
        applied next (`then_apply`): what an uploaded recipe, a link or an advice does."""
        rows = views.layer_rows(state.CACHE.load(model_name).model, config)
        return {**dict(zip(self.controls, views.control_values(config))), self.table: rows,
                self.applied: config.to_json()}

    @property
    def apply_inputs(self) -> list:
        return [self.applied_model, self.applied, *self.controls, self.table, self.image]

    @property
    def apply_outputs(self) -> list:
        return [self.applied, self.table, self.recipe, self.download, self.status, self.pred_plot, self.pred_text]

    def then_apply(self, event):
        """After `event` (the controls and the table filled), apply them as a click on Apply does."""
        return event.success(self.apply, self.apply_inputs, self.apply_outputs, api_name=False, **group("apply"))

    # --- handlers -------------------------------------------------------------------------------

    def shows_recipe(self, config: QuantConfig) -> dict:
        return {self.applied: config.to_json(), self.recipe: config.to_json(indent=2),
                self.download: state.recipe_file(config)}

    def predictions(self, model_name: str, config: QuantConfig, image) -> dict:
        if image is None:
            return {self.pred_plot: None, self.pred_text: NO_IMAGE}
        fig, text = views.predictions(state.CACHE, views.scene(state.CACHE, model_name, config, image))
        return {self.pred_plot: fig, self.pred_text: text}

    @user_errors
    def apply(self, model_name, applied, method, wbits, abits, wgran, igran, bias_fit, rows, image,
              progress=gr.Progress()) -> dict:
        config = views.config_from_controls(recipe(applied), method, wbits, abits, wgran, igran, bias_fit, rows)
        runnable(model_name, config)
        progress(0, desc="quantizing")
        with work(model_name, recipe_images(model_name, config)):
            state.CACHE.quantized(model_name, config, progress_bar(progress))
        with state.CACHE.lock.urgent():
            shown = self.predictions(model_name, config, image)
        return {**self.shows_recipe(config), self.table: views.layer_rows(state.CACHE.load(model_name).model, config),
                self.status: f"Applied {echo.code(config.to_json())}", **shown}

    @user_errors
    def predict(self, model_name, applied, image) -> dict:
        if image is None:
            return {self.pred_plot: None, self.pred_text: NO_IMAGE}
        config = recipe(applied)
        # a recipe not quantized yet (a link's) is work like Apply's; a cached one is a forward pass
        admitted = (contextlib.nullcontext() if state.CACHE.has_quantized(model_name, config)
                    else work(model_name, recipe_images(model_name, config)))
        with admitted, state.CACHE.lock.urgent():   # before the next step of anyone's views
            return self.predictions(model_name, config, image)

    def predict_linked(self, linked, model_name, applied, image):
        """A link's predictions; a default page keeps those it was drawn with (`first_predictions`)."""
        return self.predict(model_name, applied, image) if linked else gr.skip()

    def link_to(self, applied, image) -> str:
        return link_query(recipe(applied), image)

    def fit_status(self, name: str) -> dict:
        """The note under Bias fit for model `name`, and whether its timer keeps asking."""
        job, model = state.BACKGROUND.state(name), echo.markdown(name)
        asking = job is not None and fit_waits(name)
        if job is None:
            note = ""
        elif asking:
            note = (f"Bias-fit images for **{model}** are being distilled in the background ({job.state}); until "
                    "they are ready, this model runs with the fit off. This note says when.")
        elif job.state == FAILED and not state.CACHE.fit_ready(name):
            note = (f"Distilling **{model}**'s bias-fit images in the background failed "
                    f"({echo.markdown(job.message)}); this model runs with the fit off here.")
        else:
            note = f"Bias-fit images for **{model}** are ready: tick Bias fit and Apply to use them."
        return {self.fit_note: note, self.fit_timer: gr.Timer(active=asking)}

    @property
    def select_outputs(self) -> list:
        return [self.applied_model, self.model, self.table, self.applied, self.status, self.method, self.bias_fit,
                self.fit_note, self.fit_timer]

    @user_errors
    def select_model(self, name, applied_model, method, wbits, abits, wgran, igran, bias_fit,
                     progress=gr.Progress()) -> dict:
        problem = loadable(name)
        if problem is not None:
            gr.Warning(echo.plain(f"{name} cannot be used here: {problem}"))
            return {self.applied_model: applied_model, self.model: applied_model}
        progress(0.1, desc=f"loading {name}")
        model = state.CACHE.load(name).model
        # the controls carry over (but a method the model cannot take); per-layer overrides belong to
        # the previous model's layers
        method = method if method in methods_for(model) else QuantConfig().method
        bias_fit = bias_fit and state.CACHE.fit_ready(name)   # usable at once, with the fit off
        config = views.config_from_controls(QuantConfig(), method, wbits, abits, wgran, igran, bias_fit, None)
        return {self.applied_model: name, self.model: name, self.table: views.layer_rows(model, config),
                self.applied: config.to_json(), self.method: method, self.bias_fit: bias_fit,
                self.status: f"Loaded **{echo.markdown(name)}** with {echo.code(config.to_json())}.",
                **self.fit_status(name)}

    @property
    def link_outputs(self) -> list:
        return [*self.restore_outputs, self.image, self.status, self.recipe, self.download, self.pred_plot,
                self.pred_text, self.linked]

    def open_link(self, model_name, request: gr.Request) -> dict:
        """On page load: the state a link carries (query parameters `recipe` and `example`), checked
        like an uploaded recipe. A bad link is a warning naming what is wrong, and the default state.
        `linked` says the page is not the default one, whose predictions it was drawn with: those
        are cleared until the link's own arrive."""
        query = dict(request.query_params) if request is not None else {}
        if not query.keys() & {"recipe", "example"}:
            return {self.linked: False}
        try:
            config, example = link_state(state.CACHE, query, model_name)
            if config is not None:
                runnable(model_name, config)
        except SpiqError as exc:
            gr.Warning(echo.plain(f"This link cannot be opened: {exc}"), title="Bad link",
                       duration=None)   # stays until closed: the visitor must see why the page is not the link's
            return {self.linked: False}
        out = {self.pred_plot: None, self.pred_text: "Computing the link's predictions…", self.linked: True}
        if config is not None:
            out |= {**self.restored(model_name, config), **self.shows_recipe(config),
                    self.status: f"Restored from the link: {echo.code(config.to_json())}."}
        if example is not None:
            out[self.image] = example
        return out


# --- layout -------------------------------------------------------------------------------------

def build(demo: gr.Blocks) -> Page:
    """Lay out the panel (in `demo`'s context) and register its events; the page it makes."""
    default = QuantConfig()
    first_plot, first_text = first_predictions(state.CACHE)   # in the page itself: no request before the first result
    gr.Markdown(TITLE)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            controls = _recipe_controls(default)
        with gr.Column(scale=3, min_width=300):
            image = SafeImage(value=EXAMPLES[0] if EXAMPLES else None, type="pil", image_mode=None,
                              sources=["upload", "webcam", "clipboard"], label="Image", height=260, elem_id="image")
            examples = gr.Examples(EXAMPLES, inputs=image, label="Examples (freely licensed, see assets/LICENSES.md)")
        with gr.Column(scale=4, min_width=360):
            pred_text = gr.Markdown(first_text, elem_id="pred-text")
            pred_plot = gr.Plot(first_plot, format="png", label="Top-5, float vs quantized", elem_id="pred-plot")
    with gr.Accordion("What SPIQ does, the methods, and the models not available here", open=False):
        gr.Markdown(ABOUT)
        gr.Markdown(state.unavailable_note())
    with gr.Accordion("Per-layer settings (edit, then Apply)", open=False):
        table = SafeDataframe(views.layer_rows(state.CACHE.load(DEFAULT_MODEL).model, default),
                              headers=views.LAYER_TABLE_HEADERS, type="array", interactive=True,
                              datatype=["str", "str", "number", "str", "number", "number", "str", "bool"],
                              static_columns=[0, 1, 2], elem_id="layer-table")
    apply_btn = controls.pop("apply_btn")
    page = Page(applied_model=gr.State(DEFAULT_MODEL), applied=gr.State(default.to_json()), image=image,
                pred_plot=pred_plot, pred_text=pred_text, table=table, views_note=gr.Markdown(elem_id="views-note"),
                **controls, **_recipe_shown(default))
    _wire(page, demo, apply_btn, examples)
    return page


def _recipe_controls(default: QuantConfig) -> dict:
    with gr.Row():
        model = gr.Dropdown(state.model_choices(), value=DEFAULT_MODEL, label="Model", elem_id="model", min_width=150)
        method = gr.Dropdown(list(METHODS), value=default.method, label="Method", elem_id="method", min_width=150)
    with gr.Row():
        wbits = BitsSlider(2, 16, value=default.weight_bits, step=1, label="Weight bits", elem_id="wbits")
        abits = BitsSlider(2, 16, value=default.input_bits, step=1, label="Input bits", elem_id="abits")
    with gr.Row():
        wgran = gr.Dropdown(["channel", "tensor"], value="channel", label="Weight granularity", min_width=150)
        igran = gr.Dropdown(["method default", "channel", "tensor"], value="method default",
                            label="Input granularity", min_width=150)
    bias_fit = gr.Checkbox(value=True, label="Bias fit on distilled images", elem_id="bias-fit",
                           info="bias correction on images distilled from BatchNorm statistics "
                                "(data-free; other models' images are distilled after start)")
    return dict(model=model, method=method, wbits=wbits, abits=abits, wgran=wgran, igran=igran, bias_fit=bias_fit,
                fit_note=gr.Markdown(elem_id="fit-note"),
                fit_timer=gr.Timer(5, active=False),   # asks whether the background fit is ready
                apply_btn=gr.Button("Apply", variant="primary", elem_id="apply"),
                status=gr.Markdown(elem_id="status"))


def _recipe_shown(default: QuantConfig) -> dict:
    """The applied recipe's displays, laid out by the Recipe tab."""
    return dict(recipe=gr.Code(default.to_json(indent=2), language="json", label="Applied recipe", interactive=False,
                               render=False),
                download=gr.DownloadButton("Download recipe JSON", value=state.recipe_file(default),
                                           elem_id="download-recipe", render=False),
                link=gr.Textbox(label="Link to this recipe and, for a shipped example, this image", buttons=["copy"],
                                interactive=False, elem_id="share-link", render=False))


def _wire(page: Page, demo: gr.Blocks, apply_btn: gr.Button, examples: gr.Examples) -> None:
    predict = dict(fn=page.predict, inputs=[page.applied_model, page.applied, page.image],
                   outputs=[page.pred_plot, page.pred_text])
    page.new_state(page.model.change(page.select_model, [page.model, page.applied_model, *page.controls],
                                     page.select_outputs, api_name="select_model", **group("apply")
                                     ).success(**predict, api_name=False, **group("predict")))
    page.new_state(apply_btn.click(page.apply, page.apply_inputs, page.apply_outputs, api_name="apply",
                                   **group("apply")))
    # Not image.change: Gradio's image empties itself when a new file starts uploading over a shown
    # one, so .change fires twice and both requests carry the new file (a bad file: its error twice).
    # .upload is once per file, pasted and webcam ones too; examples and Remove are wired apart.
    page.new_state(page.image.upload(**predict, api_name="predict", trigger_mode="always_last", **group("predict")))
    page.new_state(examples.load_input_event.success(**predict, api_name=False, trigger_mode="always_last",
                                                     **group("predict")))
    page.fit_timer.tick(page.fit_status, page.applied_model, [page.fit_note, page.fit_timer], api_name=False,
                        show_progress="hidden", **group("cheap"))
    page.image.clear(None, None, [page.pred_plot, page.pred_text], js=f"() => [null, {json.dumps(NO_IMAGE)}]",
                     api_name=False)
    # A link restores its recipe and example, then predicts; a default page has its predictions already.
    page.new_state(demo.load(page.open_link, page.applied_model, page.link_outputs, api_name=False,
                             show_progress="hidden", **group("cheap")
                             # a link's recipe is quantized first: work like Apply's, not a prediction's
                             ).success(page.predict_linked, [page.linked, page.applied_model, page.applied, page.image],
                                       [page.pred_plot, page.pred_text], api_name=False, show_progress="hidden",
                                       **group("apply")))
