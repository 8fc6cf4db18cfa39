"""Rankwright's web UI: a Gradio front end over the trainer's public API (``python app.py``).

- :mod:`ui.workspace`: uploads (sanitized, never overwriting, safe zip extraction) and caption editing;
- :mod:`ui.form`: every ``TrainerConfig`` key as a UI field, and the exact round trip UI values ↔ TOML;
- :mod:`ui.jobs`: one training job at a time in a worker process, its state on disk, its events as a view;
- :mod:`ui.pipelines`: the base-model cache (Detect, Try it) and parameter/file-size estimates;
- :mod:`ui.app`: the Gradio Blocks layout and callbacks;
- :mod:`ui.server`: the launch (served folders fixed, a back-off for wrong logins) and the address it prints.
"""
