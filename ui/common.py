"""What the tabs share: the errors a callback turns into a message, the progress bar, form components and the
layout context each tab builds into."""

from __future__ import annotations

import dataclasses
import html
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from methods.base import ConfigError

from . import form
from .jobs import JobError
from .workspace import WorkspaceError

USER_ERRORS = (ConfigError, WorkspaceError, JobError, ValueError, OSError, KeyError, tomllib.TOMLDecodeError)


def progress_html(fraction: float, text: str) -> str:
    percent = max(0.0, min(1.0, float(fraction))) * 100
    return (f'<div class="rw-progress" role="progressbar" aria-valuenow="{percent:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="bar" style="width:{percent:.1f}%"></div>'
            f'<div class="label">{html.escape(text)}</div></div>')


def adapter_label(path: str) -> str:
    """``outputs/my_adapter.safetensors``: the file and its folder, for the adapter list."""
    file = Path(path)
    return f"{file.parent.name}/{file.name}"


def component(field: form.Field, value: Any, **extra: Any):
    """The input for one field, showing ``value`` (already in its UI form, see Field.to_ui)."""
    common = {"label": field.label, "info": field.info, "elem_id": "f-" + field.key.replace(".", "-"),
              "value": value, **extra}
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), **common)
    if field.kind == "bool":
        return gr.Checkbox(**common)
    if field.kind == "int":
        return gr.Number(precision=0, **common)
    if field.kind == "float":
        return gr.Number(**common)
    if field.kind.startswith("optional"):  # empty means "not set" (None), which a gr.Number cannot express
        return gr.Textbox(placeholder="empty = not set", **common)
    if field.kind in ("lines", "table", "text"):
        return gr.Textbox(lines=3 if field.kind == "lines" else 2, **common)
    return gr.Textbox(**common)


def job_controls(start_label: str, idle_status: str, ids: tuple[str, str, str, str, str]) -> tuple:
    """Start and Stop buttons, the message of the last click, the job's status line and its progress bar."""
    start_id, stop_id, message_id, status_id, progress_id = ids
    with gr.Row():
        start = gr.Button(start_label, variant="primary", elem_id=start_id)
        stop = gr.Button("Stop", variant="stop", elem_id=stop_id)
    message = gr.Markdown(elem_id=message_id)
    status = gr.Markdown(idle_status, elem_id=status_id)
    progress = gr.HTML(progress_html(0, "idle"), elem_id=progress_id)
    return start, stop, message, status, progress


@dataclasses.dataclass
class Layout:
    """What :func:`ui.app.build_app` hands each tab's builder: the form's components by key (``make`` creates one
    showing the initial value), the timer and the components other tabs wire to."""

    values: dict[str, Any]
    fields: dict[str, form.Field]
    guard: Callable
    comps: dict[str, Any] = dataclasses.field(default_factory=dict)
    tabs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # each tab's components by name
    tab_components: dict[str, Any] = dataclasses.field(default_factory=dict)  # the gr.Tab of each tab, by id
    timer: Any = None
    visible_tab: Any = None  # a gr.State: the id of the tab the browser shows
    polls: list[tuple[Callable, list[Any], list[Any]]] = dataclasses.field(default_factory=list)

    def poll(self, function: Callable, inputs: list[Any], outputs: list[Any]) -> None:
        """Call ``function(*inputs)`` on every timer tick, updating ``outputs`` (a tuple for several); see
        :meth:`wire_polls`."""
        self.polls.append((function, list(inputs), list(outputs)))

    def wire_polls(self) -> None:
        """All polls of the page as one event per tick. Each event the browser receives costs it a pass over the
        components it updates, even when every value is ``gr.skip()``: nine polls as nine events each second kept
        a core of the browser busy on an idle page (1.07 CPU s/s, a form field taking 6.6 s to fill); as one event:
        0.26 CPU s/s and 1.1 s. A poll that raises skips its outputs this tick and is logged; the others still run."""
        import logging

        inputs = list({id(component): component for _, ins, _ in self.polls for component in ins}.values())
        where = {id(component): index for index, component in enumerate(inputs)}
        outputs = [component for _, _, outs in self.polls for component in outs]
        if len({id(component) for component in outputs}) != len(outputs):
            raise ValueError("a component is the output of two polls; one poll must own it")
        polls = [(function, [where[id(c)] for c in ins], len(outs)) for function, ins, outs in self.polls]

        def tick(*values: Any) -> list[Any]:
            sent: list[Any] = []
            for function, positions, count in polls:
                try:
                    result = function(*(values[i] for i in positions))
                except Exception:
                    logging.getLogger("rankwright.ui").exception("the timer's poll %s failed",
                                                                 getattr(function, "__name__", function))
                    result = (gr.skip(),) * count
                sent.extend(result if count > 1 else (result,))
            return sent

        self.timer.tick(tick, inputs, outputs, show_progress="hidden", concurrency_limit=None, queue=False)

    @property
    def inputs(self) -> list[Any]:
        """The form's components in field order (what ``RankwrightUI.values`` reads)."""
        return [self.comps[field.key] for field in form.all_fields()]

    def make(self, key: str, **extra: Any):
        self.comps[key] = component(self.fields[key], self.values[key], **extra)
        return self.comps[key]

    def grid(self, keys: list[str], columns: int = 3) -> None:
        for start in range(0, len(keys), columns):
            with gr.Row():
                for key in keys[start:start + columns]:
                    self.make(key)

    def keys_of(self, section: str) -> list[str]:
        return [f.key for f in form.config_fields() if f.section == section]
