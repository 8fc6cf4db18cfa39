"""The Config tab and presets: the form as the TOML the CLI reads, applied back, saved as a preset; presets loaded
into the form (the Training tab's dropdown)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import gradio as gr

from methods.base import ConfigError
from methods.files import write_text_atomic
from trainer.config import TrainerConfig

from . import form, workspace
from .common import Layout
from .jobs import PROJECT_ROOT
from .workspace import WorkspaceError

KEEP_WHEN_MISSING = ("model.base", "dataset.dir", "output.dir")  # presets without them keep the form's values


class ConfigCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI`."""

    def preset_choices(self) -> list[tuple[str, str]]:
        choices = []
        for folder in self.preset_dirs:
            if not folder.is_dir():
                continue
            for path in sorted([*folder.glob("*.toml"), *folder.glob("*/*.toml")]):
                label = ("workspace: " if folder == self.ws.presets else "") + str(path.relative_to(folder))
                choices.append((label, str(path)))
        return choices

    def merged_values(self, text: str | dict, args: tuple, keep: tuple[str, ...] = ()) -> list[Any]:
        """Form values from a TOML text. The form's base model, dataset and output folders stay where the TOML
        sets none; the keys in ``keep`` stay whatever the TOML says."""
        data = tomllib.loads(text) if isinstance(text, str) else text
        current = self.values(args)
        for key in (*KEEP_WHEN_MISSING, *keep):
            section, name = key.split(".")
            table = data.setdefault(section, {})
            if isinstance(table, dict) and (name not in table or key in keep):
                table[name] = form.Field.from_ui(next(f for f in self.fields if f.key == key), current[key])
        return self.ordered(form.config_to_values(TrainerConfig.from_dict(data)))

    def load_preset(self, path: str | None, *args) -> list[Any]:
        if not path:
            raise WorkspaceError("choose a preset first")
        file = Path(path)
        if path not in {value for _, value in self.preset_choices()} or not file.is_file():
            raise WorkspaceError(f"{path}: not one of the presets (refresh the list)")
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
            # Paths in a preset of the project (a demo model or dataset) are relative to the project folder.
            for section, name in (("model", "base"), ("model", "tokenizer"), ("model", "vae"), ("dataset", "dir")):
                table = data.get(section)
                value = table.get(name) if isinstance(table, dict) else None
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() \
                        and not Path(value).exists() and (PROJECT_ROOT / value).exists():
                    table[name] = str(PROJECT_ROOT / value)
            # A preset is a recipe: outputs stay in this workspace, and the dataset folder chosen here stays
            # unless the preset brings its own (one that exists, like a demo dataset).
            dataset = data.get("dataset", {}).get("dir") if isinstance(data.get("dataset"), dict) else None
            own_dataset = isinstance(dataset, str) and dataset and Path(dataset).expanduser().is_dir()
            keep = ("output.dir",) if own_dataset else ("dataset.dir", "output.dir")
            values = self.merged_values(data, args, keep=keep)
        except (ConfigError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"preset {file.name}: {error}") from None
        kept = "your output folder is kept" if own_dataset else "your dataset and output folders are kept"
        return [*values, f"Loaded preset `{file.name}` ({kept})."]

    def apply_toml(self, text: str, *args) -> list[Any]:
        try:
            values = self.merged_values(text or "", args)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"not valid TOML ({error})") from None
        return [*values, "Applied the TOML to the form."]

    def upload_toml(self, file: str | None, *args) -> list[Any]:
        if not file:
            return [gr.skip()] * (len(self.keys) + 2)
        text = Path(file).read_text(encoding="utf-8", errors="replace")
        values = self.apply_toml(text, *args)
        return [*values[:-1], text, f"Loaded `{Path(file).name}`."]

    def show_toml(self, *args) -> tuple[str, str, str]:
        config = self.config_from(args)
        text = config.to_toml()
        path = self.ws.root / "configs" / f"{workspace.sanitize_folder_name(config.output.name)}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, workspace.text_file(text.rstrip("\n")))
        return text, form.cli_command(str(path)), f"Written to `{path}`."

    def save_preset(self, name: str, *args) -> tuple[str, str, Any, str]:
        config = self.config_from(args)
        if not name or not name.strip():
            raise WorkspaceError("type a preset name")
        path = self.ws.presets / f"{workspace.sanitize_folder_name(name)}.toml"
        replaced = path.exists()
        write_text_atomic(path, workspace.text_file(config.to_toml().rstrip("\n")))
        self.remember(config)
        choices = gr.update(choices=self.preset_choices(), value=str(path))
        return (config.to_toml(), form.cli_command(str(path)), choices,
                f"Preset {'replaced' if replaced else 'saved'}: `{path}`.")


def layout(ui: Any, L: Layout) -> None:
    gr.Markdown("The form as the TOML file `python -m trainer train --config FILE` reads. Edit and apply it, or save "
                "it as a preset.")
    toml_box = gr.Textbox(label="TOML", lines=24, max_lines=40, elem_id="toml", elem_classes="rw-mono",
                          buttons=["copy"])
    with gr.Row():
        show = gr.Button("Show the form as TOML", elem_id="show-toml")
        apply = gr.Button("Apply this TOML to the form", elem_id="apply-toml")
        toml_file = gr.File(label="Load a .toml file", file_types=[".toml"], elem_id="toml-file", height=90)
    with gr.Row():
        preset_name = gr.Textbox(label="Preset name", elem_id="preset-name", scale=3)
        save_preset = gr.Button("Save as preset", elem_id="save-preset", scale=1)
    cli = gr.Textbox(label="Same run from a shell", elem_id="cli", buttons=["copy"], interactive=False)
    status = gr.Markdown(elem_id="config-status")
    L.tabs["config"] = {name: value for name, value in locals().items() if name not in ("ui", "L")}


def wire(ui: Any, L: Layout) -> None:
    s, guard, inputs = L.tabs["config"], L.guard, L.inputs
    count = len(inputs)
    s["show"].click(guard(ui.show_toml, 3, 2), inputs, [s["toml_box"], s["cli"], s["status"]])
    s["apply"].click(guard(ui.apply_toml, count + 1, count), [s["toml_box"], *inputs], [*inputs, s["status"]])
    s["toml_file"].upload(guard(ui.upload_toml, count + 2, count + 1), [s["toml_file"], *inputs],
                          [*inputs, s["toml_box"], s["status"]])
    s["save_preset"].click(guard(ui.save_preset, 4, 3), [s["preset_name"], *inputs],
                           [s["toml_box"], s["cli"], L.tabs["training"]["preset"], s["status"]])
