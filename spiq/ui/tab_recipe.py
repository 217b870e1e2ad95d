"""The Recipe tab: the applied recipe as JSON and its download, the upload of a recipe that restores
every control and the per-layer table (then applies it), and the link to the applied state."""
from __future__ import annotations

import gradio as gr
from gradio.utils import get_upload_folder

from spiq.quantize.api import check_config
from spiq.ui import state, views
from spiq.ui.components import SafeFile
from spiq.ui.panel import Page
from spiq.ui.request import group, runnable, user_errors


def build(page: Page) -> None:
    with page.tab("Recipe", "recipe"):
        page.recipe.render()   # the page's: Apply and a link fill them
        with gr.Row():
            page.download.render()
            upload = SafeFile(file_types=[".json"], type="filepath", label="Upload a recipe JSON")
        page.link.render()

    @user_errors
    def load_recipe(file, model_name) -> dict:
        if file is None:
            raise gr.Error("Choose a recipe JSON file first.")
        config = views.read_recipe(file, (get_upload_folder(),))
        check_config(state.CACHE.load(model_name).model, config)   # before the session takes it: a bad recipe
        runnable(model_name, config)                                 # leaves it as it was
        return page.restored(model_name, config)

    # An uploaded recipe replaces the controls and the table, then is applied like a click on Apply.
    page.new_state(page.then_apply(upload.upload(load_recipe, [upload, page.applied_model], page.restore_outputs,
                                                 api_name="load_recipe", **group("cheap"))))
