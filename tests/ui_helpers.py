"""Small helpers the web UI's tests share: images in memory, files on disk, a free port."""

from __future__ import annotations

import io
import socket
from pathlib import Path

from PIL import Image


def png_bytes(colour: str = "red", size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_worker_ui(ws, pipe, tmp_path: Path, **values):
    """A UI of ``ws`` whose jobs run in the real worker, with ``pipe`` saved as the base model and two 32 px images
    uploaded; returns (the UI, the form's values for a small 16 px run, updated with ``values``)."""
    from ui import form
    from ui.app import RankwrightUI

    pipe.save_pretrained(tmp_path / "model")
    ui = RankwrightUI(ws, preset_dirs=[])
    ui.upload([str(write(tmp_path / f"{c}.png", png_bytes(c, (32, 32)))) for c in ("red", "green")],
              str(ws.default_dataset()), "shape", 1)
    form_values = form.config_to_values(ui.default_config())
    form_values.update({"model.base": str(tmp_path / "model"), "dataset.resolution": 16,
                        "dataset.min_bucket_side": 8, "dataset.max_bucket_side": 32, "dataset.bucket_step": 8,
                        "output.tensorboard": False, "network.lora.rank": 2, **values})
    return ui, form_values
