"""The Deploy tab: the applied recipe exported to ONNX int8 and run with ONNX Runtime on this image,
timed against FP32, ONNX Runtime's static int8 and dynamic int8, with its real-vs-simulated SQNR per
layer and the .onnx to download."""
from __future__ import annotations

import gradio as gr

from spiq.export.onnx import ExportError
from spiq.ui import echo, state, views
from spiq.ui.panel import Page
from spiq.ui.request import DEPLOY_COPIES, admitted, group, need_image, progress_bar, recipe, user_errors

INTRO = ("Export the applied recipe as an ONNX int8 model (per-tensor activation quantizers: SPIQ's per-channel "
         "grids are folded into the weights), run it with ONNX Runtime on this image and time it against FP32, "
         "ONNX Runtime's static int8 (calibrated on the example images) and dynamic int8. Needs 8-bit inputs and "
         "a static method.")


def build(page: Page) -> None:
    with page.tab("Deploy", "deploy"):
        gr.Markdown(INTRO)
        button = gr.Button("Export and run int8", elem_id="deploy")
        text = gr.Markdown(elem_id="deploy-text")
        with gr.Row():
            latency = gr.Plot(label="Latency", elem_id="latency-plot")
            parity = gr.Plot(label="Real int8 vs simulation", elem_id="parity-plot")
        onnx_file = gr.File(label="The exported .onnx", interactive=False)
    shown = (latency, parity, text, onnx_file)   # views.deploy's (latency, parity, text, path)

    @user_errors
    @admitted(copies=DEPLOY_COPIES)
    def show_deploy(model_name, applied, image, progress=gr.Progress()) -> dict:
        try:
            result = views.deploy(state.CACHE, model_name, recipe(applied), need_image(image), state.EXPORTS,
                                  progress_bar(progress))
        except ExportError as exc:
            raise gr.Error(echo.plain(f"This recipe cannot be exported to int8: {exc}")) from None
        return dict(zip(shown, result, strict=True))

    button.click(show_deploy, [page.applied_model, page.applied, page.image], list(shown), api_name="deploy",
                 **group("deploy"))
