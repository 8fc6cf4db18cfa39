"""The Compare tab: train several methods on the form's settings (a queued job like any other, see
:func:`trainer.compare.compare`), then show the report table, the preview grid and the loss curves.

The comparison's progress names its phase — which method trains, or the rendering of the grid and the scores with
its count of denoising steps and an ETA — and Stop ends any of them within seconds (a stop during training still
renders the methods that finished; a second Stop ends that too).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from trainer.compare import DEFAULT_METHODS

from . import form
from .common import Layout, job_controls, progress_html
from .views import JobView
from .workspace import WorkspaceError


class CompareCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI`."""

    def compare(self, methods: list[str] | None, steps: float | None, drift_prompts: str, *args) -> tuple[str, dict]:
        """Queue a comparison of the ticked methods on the form's settings, each method with its own options."""
        from trainer.compare import OPTIONS_KEY, default_out_dir, resolve_methods

        config = self.confine(self.config_from(args))
        self.remember(config)
        if steps not in (None, ""):
            if not float(steps).is_integer() or float(steps) < 1:
                raise WorkspaceError(f"steps per method must be a whole number ≥ 1, got {steps}")
            config = config.with_overrides([f"train.max_steps={int(steps)}", "train.epochs=0"])
        methods = resolve_methods(methods or [])
        values = self.values(args)
        # What Start would train with each method selected: the options of that method's group in the form.
        overrides = {method: {OPTIONS_KEY: form.values_to_data({**values, "network.method": method})["network"]
                              ["options"]} for method in methods}
        prompts = [line.strip() for line in (drift_prompts or "").splitlines() if line.strip()]
        record = self.runner.submit_compare(config, methods, default_out_dir(config), overrides, prompts)
        position = self.runner.position(record.id)
        what = (f"{', '.join(methods)}, {config.train.max_steps} steps each → `{record.output_dir}`. The report "
                "(report.md, grid.png, losses.png) is written there.")
        if position is None:
            gr.Info("Comparison started")
            return f"Started comparison `{record.id}`: {what}", {}
        gr.Info(f"Queued at position {position}")
        return f"Queued comparison `{record.id}` at position {position}: {what}", {}

    def latest_comparison(self) -> Any:
        """The running comparison, else the newest one of the workspace (None if there is none)."""
        current = self.own_job(self.runner.current())
        if current is not None and current.kind == "compare":
            return current
        return next((record for record in self.runner.history() if record.kind == "compare"
                     and self.own_job(record) is not None), None)

    def poll_compare(self, session: dict | None) -> tuple:
        """Timer tick of the Compare tab: status, progress, table, preview grid, loss plot, report files."""
        idle = ("No comparison yet.", progress_html(0, "idle"), None, None, None, None)
        return self._tick(self.latest_comparison, self._show_comparison, lambda: idle, 6, session)

    def _show_comparison(self, record: Any, view: JobView, session: dict) -> tuple:
        status = f"**{view.status_text()}** — comparison `{record.id}` · {', '.join(view.methods) or '…'}"
        table = {"headers": list(view.rows[0]), "data": [list(row.values()) for row in view.rows]} \
            if view.rows else None
        plot = gr.skip()
        points = sum(len(losses) for losses in view.method_losses.values())
        if points != session.get("losses"):
            from trainer.plots import loss_curves_png

            session["losses"] = points
            plot = loss_curves_png(view.method_losses, title="training loss per method", width=720, height=320) \
                if points else None
        report = view.report
        grid = next(iter(self.servable([report.get("grid")])), None)
        files = self.servable([report.get("markdown"), report.get("report"), report.get("grid"),
                               report.get("loss_plot")])
        return status, progress_html(view.fraction, view.progress_text()), table, grid, plot, files or None


def layout(ui: Any, L: Layout) -> None:
    gr.Markdown("Train several methods with the settings of the other tabs — the same data, steps and seed, each "
                "method with its own options from *Model & method* — then compare previews, loss, size, speed and "
                "prior drift (how much each adapter changes unrelated prompts). Joins the queue like any job.")
    with gr.Row():
        methods = gr.CheckboxGroup(choices=ui.methods, label="Methods", elem_id="compare-methods",
                                   value=[m for m in DEFAULT_METHODS if m in ui.methods], scale=3)
        steps = gr.Number(value=None, precision=0, minimum=1, elem_id="compare-steps",
                          label="Steps per method (empty: the Training tab's)", scale=1)
    drift = gr.Textbox(lines=2, elem_id="compare-drift", label="Prior-drift prompts, one per line (empty: a generic "
                                                               "list, or the toy model's own)")
    start, stop, message, status, progress = job_controls(
        "Compare", "No comparison yet.",
        ids=("compare-start", "compare-stop", "compare-message", "compare-status", "compare-progress"))
    table = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="compare-table")
    with gr.Row():
        grid = gr.Image(label="Previews (rows: base model, then each method)", type="filepath", interactive=False,
                        elem_id="compare-grid")
        loss = gr.Image(label="Loss per method", type="pil", interactive=False, elem_id="compare-loss", height=320)
    files = gr.File(label="Report (click to download)", file_count="multiple", interactive=False,
                    elem_id="compare-files")
    L.tabs["compare"] = {name: value for name, value in locals().items() if name not in ("ui", "L")}


def wire(ui: Any, L: Layout) -> None:
    s, guard, inputs = L.tabs["compare"], L.guard, L.inputs
    session = gr.State({})
    s["start"].click(guard(ui.compare, 2, 0), [s["methods"], s["steps"], s["drift"], *inputs],
                     [s["message"], session], concurrency_limit=1)
    s["stop"].click(guard(ui.stop, 1, 0), None, [s["message"]])
    L.poll(ui.poll_compare, [session], [s["status"], s["progress"], s["table"], s["grid"], s["loss"],
                                        s["files"], session])
