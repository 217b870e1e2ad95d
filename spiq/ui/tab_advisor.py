"""The Advisor tab: per-layer input widths under an average-bits budget, from the data-free
sensitivity of each layer (`spiq advise` in the page), and Fill, which writes the advice into the
controls and the per-layer table and applies it. Its budget is an option of every view request:
the Layer error tab marks the layers the advice raises at it."""
from __future__ import annotations

import gradio as gr

from spiq.config import QuantConfig
from spiq.ui import advisor, state
from spiq.ui.components import BudgetSlider
from spiq.ui.panel import Page
from spiq.ui.request import admitted, budget, group, progress_bar, recipe, user_errors
from spiq.ui.viewtabs import Request, TabWork, ViewTab

INTRO = ("Per-layer input widths under an average-bits budget, from the data-free sensitivity of each layer "
         "measured on images distilled from BatchNorm statistics (the first time for a model and recipe: tens of "
         "seconds).")


def advice(cache, req: Request, progress=None):
    """(summary, ranking figure, table rows) of the advice at the session's budget."""
    return advisor.advisor(cache, req.model, req.config, req.option("budget", advisor.DEFAULT_BUDGET), progress)


WORK = TabWork("advisor", advice, options=("budget",))


def advised(model_name: str, config: QuantConfig, at_budget, progress=None) -> QuantConfig:
    """The recipe the advice at `at_budget` makes of `config` (measuring the table first if it has not)."""
    at_budget = budget(at_budget)   # refused before any work
    table = advisor.sensitivity_table(state.CACHE, model_name, config, progress)
    return advisor.advice_for(table, config, at_budget).config


def build(page: Page) -> None:
    with page.tab("Advisor", WORK.id) as tab:
        gr.Markdown(INTRO)
        with gr.Row():
            slider = BudgetSlider(4.0, 8.0, value=advisor.DEFAULT_BUDGET, step=0.25, elem_id="budget",
                                  label="Budget: average input bits, weighted by input values per image")
            fill = gr.Button("Fill table and apply", variant="primary", elem_id="fill-advice")
        shown = (gr.Markdown(elem_id="advice-text"), gr.Plot(label="Sensitivity ranking", elem_id="advice-plot"),
                 gr.Dataframe(headers=advisor.ADVISOR_HEADERS, type="array", interactive=False, elem_id="advice-table"))

    def show(result) -> dict:
        return dict(zip(shown, result, strict=True))

    @user_errors
    @admitted()
    def show_advisor(model_name, applied, at_budget, progress=gr.Progress()) -> dict:
        """The tab at another budget; measures first if it has not."""
        config = recipe(applied)
        return show(advisor.advisor(state.CACHE, model_name, config, budget(at_budget), progress_bar(progress)))

    @user_errors
    @admitted()
    def fill_advice(model_name, applied, at_budget, progress=gr.Progress()) -> dict:
        """The advice as the session's controls, per-layer table and recipe, applied next."""
        return page.restored(model_name, advised(model_name, recipe(applied), at_budget, progress_bar(progress)))

    page.add_view(tab, ViewTab(WORK, shown, show, controls={"budget": (slider, budget)}))
    inputs = [page.applied_model, page.applied, slider]
    slider.release(show_advisor, inputs, list(shown), api_name="advisor", **group("views"))
    # The advice becomes the controls and the table, then is applied like a click on Apply.
    page.new_state(page.then_apply(fill.click(fill_advice, inputs, page.restore_outputs, api_name="fill_advice",
                                              **group("views"))))
