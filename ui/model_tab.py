"""The Model & method tab: the base model (Detect), the method with its options, and the estimates — trainable
parameters and file size (:func:`ui.pipelines.estimate`) and GPU memory (:func:`ui.estimates.memory_estimate`) —
for the model actually chosen: the detected one, else the shapes in a model folder's configs, else a standard
model of the architecture."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from methods.base import ConfigError

from . import estimates, form, pipelines
from .common import Layout
from .workspace import WorkspaceError

log = logging.getLogger("rankwright.ui")
ESTIMATE_KEYS = ("train.train_text_encoder", "output.save_dtype", "model.arch", "model.base", "dataset.resolution",
                 "train.batch_size", "train.mixed_precision", "train.gradient_checkpointing", "train.optimizer",
                 "train.ema_decay", "model.vae_fp32", "dataset.latent_cache")


class ModelCallbacks:
    """Mixed into :class:`ui.app.RankwrightUI`."""

    def detect(self, base: str, arch: str, prediction_type: str, tokenizer: str = "") -> str:
        from trainer.models import ModelLoadError

        try:
            _, info = self.cache.load(base, arch, prediction_type, tokenizer)
        except ModelLoadError as error:
            raise WorkspaceError(str(error)) from None
        return f"Detected **{pipelines.describe(info)}**" + (f" · {'; '.join(info.notes)}" if info.notes else "")

    def method_changed(self, method: str) -> list[Any]:
        description = form.method_description(method) if method in self.methods else ""
        return [gr.update(visible=name == method) for name in self.methods] + [f"*{description}*"]

    def model_shapes(self, config: Any) -> tuple[str, Any, str]:
        """(arch, a pipeline or meta stand-in to measure, what the figures are measured on)."""
        info = self.cache.loaded(config.model.base, config.model.arch, config.model.prediction_type,
                                 getattr(config.model, "tokenizer", ""))
        if info is not None:
            return info.arch, self.cache.pipe, f"measured on the detected {pipelines.ARCH_LABELS[info.arch]} model"
        folder = estimates.folder_models(config.model.base)
        if folder is not None:
            from methods.network import detect_architecture

            arch = detect_architecture(folder)
            return arch, folder, f"measured on the {pipelines.ARCH_LABELS[arch]} model folder's configs"
        arch = config.model.arch if config.model.arch in pipelines.ARCH_LABELS else "sd1"
        return arch, None, ""

    def estimate(self, *args) -> str:
        """Trainable parameters, file size and GPU memory of the form's run, as Markdown."""
        values = self.values(args)
        try:
            config = form.values_to_config(values)
        except ConfigError as error:
            return f"⚠️ {error}"
        try:
            arch, pipe, basis = self.model_shapes(config)
            estimate = pipelines.estimate(config, arch, pipe)
            if basis:
                estimate.basis = basis
            if estimate.vram is not None:  # SD3/Flux: ui.pipelines counts their memory itself
                return estimate.text()
            if pipe is not None:
                encoders = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
                counts = estimates.parameter_counts(pipe.unet, [e for e in encoders if e is not None],
                                                    getattr(pipe, "vae", None))
            else:
                unet, encoders, vae = pipelines._real_size_parts(estimate.arch)
                counts = estimates.parameter_counts(unet, [e for e in encoders if e is not None], vae)
            from methods.arch import denoiser_prefixes

            trains_text = any(part not in denoiser_prefixes() for part in estimate.modules)
            memory = estimates.memory_estimate(config, estimate.arch, counts, estimate.parameters, trains_text)
        except (ConfigError, ValueError) as error:
            return f"⚠️ {error}"
        except Exception as error:  # an estimate must never break the page
            log.exception("estimate failed")
            return f"⚠️ cannot estimate the size ({type(error).__name__}: {error})"
        return (estimate.text() + "\n\n" + memory.text(config.dataset.resolution, config.train.batch_size,
                                                       config.train.mixed_precision if config.train.mixed_precision
                                                       != "no" else "fp32", config.train.gradient_checkpointing))

    def effective(self, *args) -> str:
        """What the empty (or 0) fields of the form mean now, as Markdown."""
        found = form.effective_values(self.values(args))
        if not found:
            return ""
        return "**Empty fields use:** " + " · ".join(f"{label} → {value}" for label, value in found)


def layout(ui: Any, L: Layout) -> None:
    with gr.Row():
        L.make("model.base", scale=4)
        detect = gr.Button("Detect", scale=1, elem_id="detect")
    detected = gr.Markdown(elem_id="detected")
    with gr.Accordion("Advanced model settings", open=False):
        L.grid([k for k in L.keys_of("model") if k != "model.base"])
    with gr.Row():
        L.make("network.method")
        L.make("network.preset")
    method_description = gr.Markdown(f"*{form.method_description(L.values['network.method'])}*",
                                      elem_id="method-description")
    groups = []
    for method, method_fields in form.method_fields().items():
        with gr.Group(visible=method == L.values["network.method"], elem_id=f"options-{method}") as group:
            L.grid([f.key for f in method_fields if f.main], 4)
            with gr.Accordion(f"More {form.method_label(method)} options", open=False):
                L.grid([f.key for f in method_fields if not f.main], 4)
        groups.append(group)
    estimate = gr.Markdown(elem_id="estimate")
    effective = gr.Markdown(elem_id="effective-model")
    with gr.Accordion("Advanced target settings", open=False):
        L.grid([k for k in L.keys_of("network") if k not in ("network.method", "network.preset")], 2)
    L.tabs["model"] = {"detect": detect, "detected": detected, "method_description": method_description,
                       "groups": groups, "estimate": estimate, "effective": effective}


def wire(ui: Any, L: Layout) -> None:
    s, comps, inputs = L.tabs["model"], L.comps, L.inputs
    s["model_inputs"] = [comps["model.base"], comps["model.arch"], comps["model.prediction_type"],
                         comps.get("model.tokenizer", gr.State(""))]
    s["detect"].click(L.guard(ui.detect, 1, 0), s["model_inputs"], [s["detected"]]).then(
        ui.estimate, inputs, [s["estimate"]], show_progress="hidden")
    comps["network.method"].change(ui.method_changed, [comps["network.method"]],
                                    [*s["groups"], s["method_description"]], show_progress="hidden")
    triggers = [comps[k].change for k in ui.keys if k.startswith("network.") or k in ESTIMATE_KEYS]
    gr.on(triggers, ui.estimate, inputs, [s["estimate"]], trigger_mode="always_last", show_progress="hidden")
