"""End-to-end training on tiny SD1/SD2/SDXL models on the CPU: formats, methods, learning, exact resume, stops,
NaN handling, bad images, buckets and caches, and every option's effect.

Images are 16×16 (8×8 latents); a step takes tens of milliseconds on one thread. ``-m "not slow"`` skips the
longer matrix cases (other architectures per method, other methods' learning curves, subprocess runs).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    RESOLUTION,
    build_model,
    config_dict,
    make_config,
    of_kind,
    read_event_log,
    run,
    unet_output,
    write_images,
)

from methods.apply import apply_adapter
from methods.base import ConfigError
from trainer.config import TrainerConfig, TrainSection
from trainer.loop import STATE_FILE, Trainer, TrainingError
from trainer.models import load_pipeline
from trainer.objective import DiffusionObjective
from trainer.optim import build_optimizer, build_scheduler

METHODS = ("lora", "loha", "lokr", "oft", "boft")
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="session")
def models(tmp_path_factory, tokenizer_dir):
    """``models(arch)`` → {"folder", "single", "tokenizer"}: a tiny pipeline written both ways, built once."""
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in built:
            built[arch] = build_model(tmp_path_factory.mktemp(f"model-{arch}"), arch, tokenizer_dir)
        return built[arch]

    return get


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two 16×16 images with captions in a ``1_zq`` concept folder."""
    root = tmp_path / "data"
    write_images(root / "1_zq", 2)
    return root


def loaded(model: dict[str, Path], kind: str):
    pipe, _ = load_pipeline(model[kind], tokenizer=model["tokenizer"] if kind == "single" else None)
    return pipe


# ==================================================================================================== formats
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_architecture_trains_from_folder_and_single_file(arch, models, data, tmp_path):
    model = models(arch)
    folder_pipe = loaded(model, "folder")
    single_pipe = loaded(model, "single")
    reference = unet_output(folder_pipe)
    assert torch.allclose(unet_output(single_pipe), reference, atol=1e-5)  # the checkpoint round-trips
    for kind, pipe in (("folder", folder_pipe), ("single", single_pipe)):
        config = make_config(model[kind], data, tmp_path / f"out-{kind}",
                             tokenizer=model["tokenizer"] if kind == "single" else None,
                             train={"max_steps": 3, "learning_rate": 1e-2})
        result, events = run(config)
        (model_event,) = of_kind(events, "model")
        assert model_event["arch"] == arch
        assert model_event["source"] == ("folder" if kind == "folder" else "single_file")
        assert model_event["prediction_type"] == ("v_prediction" if arch == "sd2" else "epsilon")
        assert result.steps == 3 and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
        before = unet_output(pipe)
        with apply_adapter(pipe, result.output_file):
            changed = unet_output(pipe)
        assert (changed - before).abs().max() > 1e-4
        assert torch.equal(unet_output(pipe), before)  # removing the adapter restores the model


def test_single_file_without_tokenizer_names_the_key(models, data, tmp_path):
    model = models("sd1")
    config = make_config(model["single"], data, tmp_path / "out")
    with pytest.raises(ConfigError, match="model.tokenizer"):
        run(config)


@pytest.mark.parametrize("arch", ["sd1", pytest.param("sd2", marks=pytest.mark.slow),
                                  pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_file_reloads_and_changes_the_output(method, arch, models, data, tmp_path):
    model = models(arch)
    config = make_config(model["folder"], data, tmp_path / "out", network={"method": method},
                         train={"max_steps": 3, "learning_rate": 1e-2})
    result, events = run(config)
    (save,) = of_kind(events, "save")
    assert save["check_ok"] and save["check_modules"] > 0
    pipe = loaded(model, "folder")
    before = unet_output(pipe)
    handle = apply_adapter(pipe, result.output_file)
    assert handle.network.method == method
    assert len(handle.network) == save["check_modules"]
    assert (unet_output(pipe) - before).abs().max() > 1e-5
    handle.remove()


# ==================================================================================================== learning
@pytest.mark.parametrize("method", ["lora", *(pytest.param(m, marks=pytest.mark.slow) for m in METHODS[1:])])
def test_loss_falls_on_a_fixed_batch(method, models, tmp_path):
    """One image, batch 1, ``train.fixed_noise``: the same noisy latent every step, so the loss measures fitting.

    Measured (40 steps, lr 1e-2, 2 cores): final/first loss ≈ 0.06 LoRA, 0.04 LoHa, 0.23 LoKr, 0.50 OFT, 0.06 BOFT.
    """
    root = tmp_path / "data"
    write_images(root / "1_zq", 1)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out", network={"method": method},
                         train={"max_steps": 40, "learning_rate": 1e-2, "fixed_noise": True,
                                "train_text_encoder": False})
    result, _ = run(config)
    first, last = result.losses[0], result.losses[-1]
    print(f"{method}: loss {first:.4f} → {last:.4f} ({last / first:.3f})")
    assert last <= (0.5 if method == "lora" else 0.75) * first
    assert min(result.losses[-5:]) < min(result.losses[:5])


def test_fixed_noise_repeats_the_loss_without_learning(models, tmp_path):
    root = tmp_path / "data"
    write_images(root / "1_zq", 1)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out",
                         train={"max_steps": 3, "fixed_noise": True, "learning_rate": 1e-12, "weight_decay": 0.0})
    result, _ = run(config)
    assert result.losses[0] == pytest.approx(result.losses[1], abs=1e-7) == pytest.approx(result.losses[2], abs=1e-7)
    free = make_config(models("sd1")["folder"], root, tmp_path / "out2",
                       train={"max_steps": 3, "learning_rate": 1e-12, "weight_decay": 0.0})
    losses = run(free)[0].losses
    assert len({round(x, 6) for x in losses}) == 3  # fresh noise and timesteps every step


# ==================================================================================================== resume
RESUME_SETTINGS = {
    # 3 images, batch 1, accumulation 2: an optimizer step spans epochs; flips, EMA, noise offset, min-SNR and a
    # text-encoder LoRA exercise every piece of state.
    "dataset": {"flip": True, "shuffle_caption": True},
    "train": {"gradient_accumulation": 2, "ema_decay": 0.8, "noise_offset": 0.05, "min_snr_gamma": 5.0,
              "learning_rate": 5e-3, "warmup_steps": 1},
}


@pytest.mark.parametrize("how", ["mid-run save", "finished short run"])
def test_resume_matches_the_uninterrupted_run(how, models, tmp_path):
    root = tmp_path / "data"
    write_images(root / "1_zq", 3, caption="a photo, of zq, red")
    base = models("sd1")["folder"]
    total, cut = 5, 2
    scheduler = "cosine" if how == "mid-run save" else "constant"
    straight = make_config(base, root, tmp_path / "straight", **RESUME_SETTINGS)
    straight = straight.with_overrides([f"train.max_steps={total}", f"train.scheduler='{scheduler}'"])
    if how == "mid-run save":  # the uninterrupted run itself leaves the state of step `cut`
        straight = straight.with_overrides([f"output.save_every_n_steps={cut}"])
        reference, _ = run(straight)
        state = tmp_path / "straight" / f"adapter-step{cut:06d}-state"
    else:  # a run that ended at `cut`, continued to `total`
        reference, _ = run(straight)
        short = straight.with_overrides([f"train.max_steps={cut}", f"output.dir='{tmp_path / 'short'}'"])
        run(short)
        state = tmp_path / "short" / "adapter-state"
    assert (state / STATE_FILE).is_file()
    resumed_config = straight.with_overrides([f"output.dir='{tmp_path / 'resumed'}'", "output.save_every_n_steps=0"])
    resumed, events = run(resumed_config, resume=state)
    (event,) = of_kind(events, "resumed")
    assert event["step"] == cut
    assert not of_kind(events, "warning")
    assert [e["step"] for e in of_kind(events, "step")] == list(range(cut + 1, total + 1))
    difference = max(abs(a - b) for a, b in zip(resumed.losses, reference.losses))
    print(f"{how}: losses {reference.losses}; max |resumed − uninterrupted| = {difference:.3g}")
    assert len(resumed.losses) == len(reference.losses) == total
    assert difference <= 1e-6
    final_a, final_b = load_file(reference.output_file), load_file(resumed.output_file)
    assert final_a.keys() == final_b.keys()
    assert max(float((final_a[k] - final_b[k]).abs().max()) for k in final_a) <= 1e-6


def test_resume_refuses_a_foreign_state(models, data, tmp_path):
    base = models("sd1")["folder"]
    config = make_config(base, data, tmp_path / "a")
    run(config)
    other = make_config(base, data, tmp_path / "b", network={"method": "loha"})
    with pytest.raises(ConfigError, match=r"\[network\]"):
        run(other, resume=tmp_path / "a" / "adapter-state")
    with pytest.raises(ConfigError, match="not a resumable state folder"):
        run(make_config(base, data, tmp_path / "c"), resume=tmp_path / "a")


class _Payload:
    """Unpickling this creates a file: the proof that a loader ran code from a state folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_unpickles(models, data, tmp_path):
    import pickle
    import shutil

    base = models("sd1")["folder"]
    run(make_config(base, data, tmp_path / "a"))
    state = tmp_path / "a" / "adapter-state"
    assert sorted(p.name for p in state.iterdir()) == ["adapter.safetensors", "state.json", "state.safetensors"]
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"progress": _Payload(marker)})

    legacy = tmp_path / "legacy-state"  # the pickled format of earlier versions, with a crafted payload
    legacy.mkdir()
    shutil.copy(state / "adapter.safetensors", legacy)
    (legacy / "state.pt").write_bytes(payload)
    with pytest.raises(ConfigError, match="state.pt.*not loaded.*unpickling"):
        run(make_config(base, data, tmp_path / "b"), resume=legacy)
    assert not marker.exists()

    (state / "state.pt").write_bytes(payload)  # a stray pickle beside a good state is never read
    resumed, events = run(make_config(base, data, tmp_path / "c", train={"max_steps": 3}), resume=state)
    assert resumed.steps == 3 and of_kind(events, "resumed")[0]["step"] == 2 and not marker.exists()

    forged = tmp_path / "forged-state"  # JSON asking for an object of some class: refused, not built
    shutil.copytree(state, forged)
    document = json.loads((forged / "state.json").read_text())
    document["state"]["losses"] = {"$": "object", "class": "os.system", "args": ["touch " + str(marker)]}
    (forged / "state.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="unknown value form 'object'"):
        run(make_config(base, data, tmp_path / "d", train={"max_steps": 3}), resume=forged)
    assert not marker.exists()


def test_a_state_that_needs_pickle_is_not_written_and_the_adapter_still_is(models, data, tmp_path, monkeypatch):
    import trainer.saving

    original = trainer.saving.resume_state_tree
    monkeypatch.setattr(trainer.saving, "resume_state_tree",
                        lambda *args: {**original(*args), "optimizer": {"state": {0: {"helper": object()}}}})
    result, events = run(make_config(models("sd1")["folder"], data, tmp_path / "out", train={"max_steps": 1}))
    assert result.output_file.is_file() and result.state_dir is None
    assert not (tmp_path / "out" / "adapter-state").exists() and not list((tmp_path / "out").glob("*.tmp"))
    assert any("no resumable state for adapter.safetensors: state.optimizer.state.0.helper: a object cannot be "
               "stored" in e["message"] for e in of_kind(events, "warning"))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "sgd"])
def test_state_file_round_trips_optimizer_scheduler_and_rng_exactly(optimizer, tmp_path):
    import random

    import numpy as np

    from trainer.checkpoint import rng_state
    from trainer.statefile import StateFormatError, read_state, write_state

    parameter = torch.nn.Parameter(torch.randn(4, 3))
    train = TrainSection(optimizer=optimizer, scheduler="cosine", warmup_steps=2)
    built = build_optimizer(train, [{"params": [parameter], "lr": 1e-3, "name": "lora_unet"}])
    schedule = build_scheduler(built, train, 10)
    for _ in range(3):
        parameter.grad = torch.randn(4, 3)
        built.step()
        schedule.step()
    random.random(), np.random.rand(), torch.rand(1)
    tree = {"optimizer": built.state_dict(), "scheduler": schedule.state_dict(), "rng": rng_state(),
            "numbers": [float("nan"), float("inf"), 0.1 + 0.2, 2**62, None, True], "ids": {0: "a", 7: "b"}}
    write_state(tmp_path, "state", tree)
    back = read_state(tmp_path, "state")
    assert json.dumps(back["optimizer"]["param_groups"]) == json.dumps(tree["optimizer"]["param_groups"])
    for index, entries in tree["optimizer"]["state"].items():
        for key, value in entries.items():
            again = back["optimizer"]["state"][index][key]
            assert torch.equal(again, value) if isinstance(value, torch.Tensor) else again == value, key
    assert back["scheduler"] == tree["scheduler"] and back["ids"] == {0: "a", 7: "b"}
    assert math.isnan(back["numbers"][0]) and back["numbers"][1:] == tree["numbers"][1:]
    assert back["rng"]["python"] == tree["rng"]["python"] and torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["rng"]["numpy"], tree["rng"]["numpy"]))
    with pytest.raises(StateFormatError, match=r"state\.extra: a object cannot be stored"):
        write_state(tmp_path, "other", {"extra": object()})


def test_resume_extends_a_finished_run_in_its_own_folder(models, data, tmp_path):
    base = models("sd1")["folder"]
    out = tmp_path / "out"
    config = make_config(base, data, out, train={"max_steps": 2})
    first, _ = run(config)
    content = first.output_file.read_bytes()
    with pytest.raises(ConfigError, match="already at step 2 of 2.*raise train.max_steps"):
        run(config, resume=out / "adapter-state")
    assert first.output_file.read_bytes() == content
    longer = config.with_overrides(["train.max_steps=4"])
    result, events = run(longer, resume=out / "adapter-state")
    kept = out / "adapter-step000002.safetensors"
    assert of_kind(events, "resumed")[0]["kept"] == str(kept)
    assert kept.read_bytes() == content and (out / "adapter-step000002-state" / STATE_FILE).is_file()
    assert result.steps == 4 and result.output_file == out / "adapter.safetensors"
    assert (out / "adapter-state" / STATE_FILE).is_file() and result.output_file.read_bytes() != content
    straight, _ = run(longer.with_overrides([f"output.dir='{tmp_path / 'straight'}'"]))
    assert max(abs(a - b) for a, b in zip(result.losses, straight.losses)) <= 1e-6
    # resuming from a mid-run state of a finished folder still never replaces its final file
    with pytest.raises(ConfigError, match="already exists.*resume from its final state"):
        run(longer.with_overrides(["train.max_steps=6"]), resume=out / "adapter-step000002-state")


# ==================================================================================================== disk trouble
@pytest.fixture
def refusing_disk(monkeypatch):
    """Adapter files written into refused folders fail as on a full disk (ENOSPC) or a read-only mount (EROFS)."""
    import errno

    import methods.files

    refused: dict[Path, int] = {}
    original = methods.files.atomic_write_bytes

    def write(path, data, overwrite=True):
        for folder, code in refused.items():
            if Path(path).suffix == ".safetensors" and Path(path).resolve().is_relative_to(folder.resolve()):
                raise OSError(code, os.strerror(code), str(path))
        return original(path, data, overwrite=overwrite)

    monkeypatch.setattr(methods.files, "atomic_write_bytes", write)
    return refused, errno


def test_a_full_disk_at_the_final_save_writes_to_the_rescue_folder(models, data, tmp_path, monkeypatch,
                                                                     refusing_disk, capsys):
    from trainer.cli import main

    refused, errno = refusing_disk
    out, rescue = tmp_path / "out", tmp_path / "rescue"
    monkeypatch.setenv("RANKWRIGHT_RESCUE_DIR", str(rescue))
    config = make_config(models("sd1")["folder"], data, out, train={"max_steps": 2})
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    refused[out] = errno.ENOSPC
    assert main(["train", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    (failed,) = of_kind(read_event_log(out), "save_failed")
    assert failed["path"] == str(out / "adapter.safetensors") and "No space left" in failed["error"]
    assert failed["needed_bytes"] > 10_000 and failed["final"] and Path(failed["next_path"]).parent == rescue
    (written,) = rescue.glob("adapter-*.safetensors")
    assert failed["next_path"] == str(written)
    assert f"writing it to {written}" in printed and f"done after 2 steps: {written}" in printed
    pipe = loaded(models("sd1"), "folder")
    before = unet_output(pipe)
    with apply_adapter(pipe, written):
        assert not torch.equal(unet_output(pipe), before)  # the trained weights, not lost
    assert not list(out.glob(".*.tmp"))


def test_an_intermediate_save_on_a_full_disk_is_skipped_and_training_goes_on(models, data, tmp_path,
                                                                                refusing_disk):
    refused, errno = refusing_disk
    out = tmp_path / "out"
    refused[out] = errno.ENOSPC
    events: list[dict] = []
    from trainer.loop import train

    def free_space_after_the_first_failure(event):
        events.append(event)
        if event["event"] == "save_failed":
            refused.clear()

    result = train(make_config(models("sd1")["folder"], data, out, train={"max_steps": 4},
                               output={"save_every_n_steps": 2}), on_event=free_space_after_the_first_failure)
    (failed,) = of_kind(events, "save_failed")
    assert failed["step"] == 2 and not failed["final"] and failed["next_path"] is None
    assert result.steps == 4 and result.output_file == out / "adapter.safetensors" and result.saves == [
        result.output_file]


def test_save_errors_can_be_retried_through_the_api_and_fail_loudly_when_nothing_works(models, data, tmp_path,
                                                                                        monkeypatch, refusing_disk):
    from trainer.checkpoint import SaveFailure
    from trainer.loop import train

    refused, errno = refusing_disk
    out = tmp_path / "out"
    refused[out] = errno.EROFS
    asked: list[SaveFailure] = []

    def retry_after_remount(failure: SaveFailure):
        asked.append(failure)
        refused.clear()  # the user made the folder writable: try the same path again
        return failure.path

    config = make_config(models("sd1")["folder"], data, out, train={"max_steps": 1})
    result = train(config, on_save_error=retry_after_remount)
    assert result.output_file == out / "adapter.safetensors" and result.output_file.is_file()
    assert asked[0].final and asked[0].error.errno == errno.EROFS and asked[0].needed_bytes > 0

    for folder in (tmp_path / "out2", tmp_path / "rescue", Path.home()):  # nowhere to write
        refused[folder] = errno.ENOSPC
    monkeypatch.setenv("RANKWRIGHT_RESCUE_DIR", str(tmp_path / "rescue"))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "rescue"))
    with pytest.raises(TrainingError, match=r"could not be written anywhere: .*adapter.safetensors \(No space"):
        run(config.with_overrides([f"output.dir='{tmp_path / 'out2'}'"]))


def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(models, data, tmp_path):
    out = tmp_path / "out"
    (out / "adapter-step000002-state.tmp").mkdir(parents=True)
    (out / ".adapter.safetensors.1a2b3c4d5e6f.tmp").write_bytes(b"half a file")
    (out / "samples").mkdir()
    (out / "samples" / ".000002_0.x1y2.tmp").write_bytes(b"half a png")
    (out / "notes.tmp").write_text("the user's own file")
    result, events = run(make_config(models("sd1")["folder"], data, out, train={"max_steps": 1}))
    assert result.output_file.is_file() and (out / "notes.tmp").is_file()
    assert not list(out.rglob(".*.tmp")) and not (out / "adapter-step000002-state.tmp").exists()
    assert any("removed 3 temporary file(s)" in e["message"] for e in of_kind(events, "warning"))


def test_an_unwritable_output_folder_is_a_clear_error_before_anything_loads(data, tmp_path, monkeypatch):
    import errno

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("trainer.saving.write_text_atomic", read_only)
    with pytest.raises(ConfigError, match="output.dir = .* cannot be written \\(Read-only file system\\)"):
        run(make_config(tmp_path / "no-such-model", data, tmp_path / "out"))


def test_the_event_log_survives_a_full_disk(tmp_path):
    from trainer.events import EventLog, RunWarning

    received: list[dict] = []
    log = EventLog(tmp_path, [received.append])
    log.path.mkdir()  # appending to it now fails like a full disk would
    log.emit(RunWarning(message="still heard"))
    assert received[0]["message"] == "still heard"


# ==================================================================================================== stopping
def test_stop_from_another_thread_saves_state(models, data, tmp_path):
    from trainer.events import StopSignal

    config = make_config(models("sd1")["folder"], data, tmp_path / "out", train={"max_steps": 1000})
    stop = StopSignal()
    first_step = threading.Event()

    def listen(event):
        if event["event"] == "step":
            first_step.set()

    def requester():
        first_step.wait(60)
        stop.request("test asked")

    thread = threading.Thread(target=requester)
    thread.start()
    from trainer.loop import train

    events: list[dict] = []
    result = train(config, on_event=lambda e: (events.append(e), listen(e)), stop=stop)
    thread.join()
    assert result.stopped_early and result.reason == "test asked"
    assert 1 <= result.steps < 1000
    (stopping,) = of_kind(events, "stopping")
    assert stopping["reason"] == "test asked"
    assert result.output_file.is_file() and result.output_file.name == f"adapter-step{result.steps:06d}.safetensors"
    assert (result.state_dir / STATE_FILE).is_file()
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_stop_file_ends_the_run(models, data, tmp_path):
    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out, train={"max_steps": 1000},
                         output={"save_every_n_steps": 2})

    def on_event(event):
        if event["event"] == "step" and event["step"] == 2:
            (out / "STOP").touch()  # what the web UI's Stop button does

    from trainer.loop import train

    result = train(config, on_event=on_event)
    assert result.stopped_early and "STOP" in result.reason
    assert result.steps == 2
    assert result.output_file.is_file() and (result.state_dir / STATE_FILE).is_file()
    # step 2 was just saved by save_every_n_steps: the stop reuses that save instead of writing a copy
    assert result.saves == [out / "adapter-step000002.safetensors"] == [result.output_file]


def test_sigterm_saves_and_exits_cleanly(models, data, tmp_path):
    """A training subprocess sent SIGTERM finishes its step, saves the adapter and state, and exits with 0."""
    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out, train={"max_steps": 100000})
    config_path = tmp_path / "run.toml"
    config_path.write_text(config.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            log = out / "events.jsonl"
            if log.exists() and any(e["event"] == "step" for e in read_event_log(out)):
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read().decode()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.decode()[-3000:]
    events = read_event_log(out)
    kinds = [e["event"] for e in events]
    assert "stopping" in kinds and kinds[-1] == "done"
    (stopping,) = of_kind(events, "stopping")
    assert "SIGTERM" in stopping["reason"]
    (save,) = of_kind(events, "save")
    assert Path(save["path"]).is_file() and save["check_ok"]
    assert (Path(save["state"]) / STATE_FILE).is_file()


def test_a_stop_file_is_honoured_while_scanning_the_images(tmp_path, monkeypatch):
    """The web UI's Stop (a STOP file) during the scan ends the run there: no model is loaded, nothing saved."""
    import trainer.dataset as dataset_module

    root = tmp_path / "data"
    write_images(root / "1_zq", 8)
    out = tmp_path / "out"
    original, inspected = dataset_module.inspect_image, []

    def slow_inspect(path, max_pixels):
        inspected.append(path)
        (out / "STOP").touch()
        time.sleep(0.2)
        return original(path, max_pixels)

    monkeypatch.setattr(dataset_module, "inspect_image", slow_inspect)
    config = make_config(tmp_path / "no-such-model", root, out)  # loading it would fail: must not be reached
    result, events = run(config)
    assert result.stopped_early and result.steps == 0 and result.output_file is None and "STOP" in result.reason
    assert len(inspected) <= 4  # the images not started yet were not read
    (stopping,) = of_kind(events, "stopping")
    assert "scanning" in stopping["reason"] and not stopping["saving"]
    assert of_kind(events, "done")[0]["stopped"] and not of_kind(events, "model") and not of_kind(events, "save")


def test_sigterm_while_caching_latents_ends_the_run_before_training(models, tmp_path, monkeypatch):
    from trainer.backbone import Models

    root = bucketed_data(tmp_path / "data")  # three buckets: three VAE calls
    original, calls = Models.encode_pixels, []

    def encode_and_get_terminated(self, pixels):
        calls.append(pixels.shape)
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler turns it into a stop request
        return original(self, pixels)

    monkeypatch.setattr(Models, "encode_pixels", encode_and_get_terminated)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out", train={"batch_size": 2, "max_steps": 6})
    result, events = run(config)
    assert result.stopped_early and "SIGTERM" in result.reason and result.steps == 0
    assert len(calls) == 1 and not of_kind(events, "step") and not of_kind(events, "save")
    assert "caching latents (2 of 6 encoded)" in of_kind(events, "stopping")[0]["reason"]


@pytest.mark.slow
def test_a_folder_asking_for_a_hundred_million_repeats_trains_at_once(models, tmp_path):
    """``100000000_zq``: the sampler works from image counts, never from a list per sample (was: minutes at ~6 GB
    before step 1, deaf to SIGTERM)."""
    root = tmp_path / "data"
    write_images(root / "100000000_zq", 2)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out", train={"max_steps": 2, "batch_size": 2})
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    probe = ("import resource, subprocess, sys; "
             "code = subprocess.call([sys.executable, '-m', 'trainer', 'train', '--config', sys.argv[1]]); "
             "print('peak_mb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(code)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.time()
    completed = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    peak = int(completed.stdout.split("peak_mb")[1])
    (ready,) = of_kind(read_event_log(tmp_path / "out"), "ready")
    print(f"2 steps over 2×10⁸ samples: {time.time() - started:.1f} s, peak {peak} MB")
    assert ready["samples_per_epoch"] == 200_000_000 and ready["batches_per_epoch"] == 100_000_000
    assert peak < 1500 and of_kind(read_event_log(tmp_path / "out"), "done")[0]["step"] == 2


# ==================================================================================================== failures
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_save(models, data, tmp_path, monkeypatch):
    original = Trainer._training_loss

    def poisoned(self, state, batch, keys, **options):
        loss = original(self, state, batch, keys, **options)
        return loss * float("nan") if state.progress.step >= 3 else loss

    monkeypatch.setattr(Trainer, "_training_loss", poisoned)
    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out,
                         train={"max_steps": 10}, output={"save_every_n_steps": 2})
    events: list[dict] = []
    from trainer.loop import train

    with pytest.raises(TrainingError) as caught:
        train(config, on_event=events.append)
    message = str(caught.value)
    kept = out / "adapter-step000002.safetensors"
    assert "nan" in message and "step 4" in message and str(kept) in message
    (error,) = of_kind(events, "error")
    assert error["kind"] == "TrainingError" and error["last_good_save"] == str(kept)
    assert not (out / "adapter.safetensors").exists()
    assert [e["path"] for e in of_kind(events, "save")] == [str(kept)]
    pipe = loaded(models("sd1"), "folder")
    before = unet_output(pipe)
    with apply_adapter(pipe, kept):
        assert torch.isfinite(unet_output(pipe)).all() and not torch.equal(unet_output(pipe), before)


def test_diverging_learning_rate_is_caught(models, data, tmp_path):
    config = make_config(models("sd1")["folder"], data, tmp_path / "out",
                         train={"max_steps": 50, "learning_rate": 1e30, "optimizer": "sgd", "max_grad_norm": 0.0,
                                "optimizer_args": {"momentum": 0.0}})
    with pytest.raises(TrainingError, match=r"(loss|gradient norm) became (nan|inf)"):
        run(config)


def test_bad_images_are_skipped_reported_and_training_goes_on(models, tmp_path):
    root = tmp_path / "data"
    concept = root / "2_zq"
    write_images(concept, 2)
    (concept / "empty.png").write_bytes(b"")
    (concept / "text.png").write_text("not an image")
    good = (concept / "000.png").read_bytes()
    (concept / "truncated.png").write_bytes(good[: len(good) // 2])
    (concept / "noise.jpg").write_bytes(os.urandom(500))
    write_images(root / "huge", 1, size=(400, 400), start=10)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out", dataset={"max_pixels": 10000})
    result, events = run(config)
    reasons = {Path(e["path"]).name: e["reason"] for e in of_kind(events, "skipped_image")}
    assert set(reasons) == {"empty.png", "text.png", "truncated.png", "noise.jpg", "010.png"}
    assert "0 bytes" in reasons["empty.png"] and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.png"] and "too many pixels" in reasons["010.png"]
    (ready,) = of_kind(events, "ready")
    assert ready["skipped_images"] == 5 and ready["images"] == 4  # 2 good images × 2 repeats
    assert result.steps == 2 and result.output_file.is_file()


# ==================================================================================================== buckets/caches
@pytest.fixture
def counted_vae(monkeypatch):
    """Counts AutoencoderKL.encode calls, split into before and after the "ready" event."""
    from diffusers import AutoencoderKL

    calls = {"total": 0}
    original = AutoencoderKL.encode

    def encode(self, *args, **kwargs):
        calls["total"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    return calls


def bucketed_data(root: Path) -> Path:
    write_images(root / "1_zq", 2, size=(16, 16))
    write_images(root / "1_zq", 2, size=(32, 16), start=2)  # wide
    write_images(root / "1_zq", 2, size=(16, 32), start=4)  # tall
    return root


@pytest.mark.parametrize("cache", ["memory", "disk", "off"])
def test_buckets_and_latent_cache(cache, models, tmp_path, counted_vae, monkeypatch):
    root = bucketed_data(tmp_path / "data")
    shapes: list[tuple] = []
    original = Trainer._training_loss

    def recording(self, state, batch, keys, **options):
        if batch["latents"] is not None:
            shapes.append(tuple(batch["latents"].shape))
        else:  # pixels; the tiny VAE halves each side
            b, _, h, w = batch["pixels"].shape
            shapes.append((b, 4, h // 2, w // 2))
        return original(self, state, batch, keys, **options)

    monkeypatch.setattr(Trainer, "_training_loss", recording)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out", dataset={"latent_cache": cache},
                         train={"batch_size": 2, "max_steps": 6})  # 3 batches per epoch → 2 epochs
    at_ready: dict[str, int] = {}
    events: list[dict] = []
    from trainer.loop import train

    def on_event(event):
        events.append(event)
        if event["event"] == "ready":
            at_ready["calls"] = counted_vae["total"]

    result = train(config, on_event=on_event)
    (ready,) = of_kind(events, "ready")
    # 16×16 → (16, 16); 32×16 (w×h) → (24, 8); 16×32 → (8, 24): three buckets of two images each.
    resolutions = sorted(tuple(b["resolution"]) for b in ready["buckets"].values())
    assert resolutions == [(8, 24), (16, 16), (24, 8)]
    assert all(b["count"] == 2 for b in ready["buckets"].values())
    assert sorted(set(shapes)) == [(2, 4, 4, 12), (2, 4, 8, 8), (2, 4, 12, 4)]  # latents are (h, w) / 2
    assert result.steps == 6 and {e["epoch"] for e in of_kind(events, "step")} == {0, 1}
    during = counted_vae["total"] - at_ready["calls"]
    if cache == "off":
        assert at_ready["calls"] == 0 and during == 6  # every batch is encoded
        assert not ready["latents_cached"]
    else:
        assert at_ready["calls"] == 3 and during == 0  # one call per bucket up front, none in epochs 1 and 2
        assert ready["latents_cached"]
    if cache == "disk":  # a new run reuses the files
        counted_vae["total"] = 0
        again = config.with_overrides(["output.overwrite=true"])
        run(again)
        assert counted_vae["total"] == 0
        assert len(list((tmp_path / "out" / "cache" / "latents").glob("*/*.safetensors"))) == 6


def test_random_crop_encodes_every_batch_and_warns(models, data, tmp_path, counted_vae):
    config = make_config(models("sd1")["folder"], data, tmp_path / "out", dataset={"crop": "random"})
    _, events = run(config)
    assert any("random" in e["message"] for e in of_kind(events, "warning"))
    assert counted_vae["total"] == 2


# ==================================================================================================== config
@pytest.mark.parametrize(("section", "key", "value", "match"), [
    ("train", "optimizer", "adam", "train.optimizer"),
    ("train", "batch_size", 0, "train.batch_size"),
    ("train", "learning_rate", "fast", "train.learning_rate"),
    ("train", "bogus", 1, "bogus"),
    ("dataset", "resolution", 20, "dataset.resolution"),
    ("dataset", "bucket_step", 32, "dataset.bucket_step"),
    ("network", "rank", "x", "network.rank"),
    ("output", "save_dtype", "fp8", "output.save_dtype"),
    ("train", "ema_decay", 1.5, "train.ema_decay"),
    # optional numbers (float | None): a string, list or table must not pass as "None"
    ("network", "alpha", "x", r"network.alpha = 'x' is not a float"),
    ("network", "alpha", [1, 2], r"network.alpha = \[1, 2\]"),
    ("network", "conv_alpha", {"a": 1}, "network.conv_alpha"),
    ("network", "conv_rank", "two", "network.conv_rank"),
])
def test_config_errors_name_the_key(section, key, value, match, tmp_path):
    data = config_dict("base", tmp_path, tmp_path / "out", **{section: {key: value}})
    with pytest.raises(ConfigError, match=match):
        TrainerConfig.from_dict(data)


@pytest.mark.parametrize(("method", "key", "value"), [("oft", "block_size", "x"), ("boft", "boft_m", [2]),
                                                    ("lokr", "conv_alpha", "big")])
def test_optional_method_options_are_typed_when_read(method, key, value, tmp_path, capsys):
    from trainer.cli import main

    data = config_dict("base", tmp_path, tmp_path / "out", network={"method": method, key: value})
    with pytest.raises(ConfigError, match=f"network.{key}"):
        TrainerConfig.from_dict(data)
    path = tmp_path / "run.toml"
    path.write_text(TrainerConfig.from_dict(config_dict("base", tmp_path, tmp_path / "out")).to_toml())
    literal = json.dumps(value) if isinstance(value, str) else str(value)
    assert main(["train", "--config", str(path), "--set", f"network.method='{method}'",
                 "--set", f"network.{key}={literal}"]) == 2
    assert f"network.{key}" in capsys.readouterr().err


def test_set_overrides_and_toml_round_trip(tmp_path):
    config = make_config("base", tmp_path, tmp_path / "out")
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    loaded_config = TrainerConfig.load(path, ["train.max_steps=7", "network.rank=2", "train.fixed_noise=true"])
    assert loaded_config.train.max_steps == 7 and loaded_config.network.options["rank"] == 2
    assert loaded_config.train.fixed_noise
    with pytest.raises(ConfigError, match="train.max_steps"):
        TrainerConfig.load(path, ["train.max_steps=many"])


def test_too_small_dataset_says_so_before_loading_the_model(tmp_path):
    root = tmp_path / "data"
    write_images(root / "1_zq", 1)
    config = make_config(tmp_path / "no-such-model", root, tmp_path / "out",
                         train={"batch_size": 2, "gradient_accumulation": 2})
    with pytest.raises(ConfigError) as caught:
        run(config)
    message = str(caught.value)
    assert "1 sample(s)" in message
    assert "batch_size 2 × 1 process(es) × train.gradient_accumulation 2 = 4" in message


def test_outputs_are_never_overwritten_without_permission(models, data, tmp_path):
    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out, output={"save_every_n_steps": 1})
    first, _ = run(config)
    content = first.output_file.read_bytes()
    with pytest.raises(ConfigError, match="already exists.*output.overwrite"):
        run(config.with_overrides(["train.learning_rate=0.01"]))
    assert first.output_file.read_bytes() == content
    second, _ = run(config.with_overrides(["train.learning_rate=0.01", "output.overwrite=true"]))
    assert second.output_file == first.output_file and second.output_file.read_bytes() != content
    # Intermediate files get a fresh name instead of replacing the first run's.
    assert (out / "adapter-step000001.safetensors").is_file() and (out / "adapter-step000001-1.safetensors").is_file()


# ==================================================================================================== reporting
def test_events_log_self_check_tensorboard_and_memory(models, data, tmp_path):
    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out, train={"max_steps": 3},
                         output={"tensorboard": True, "save_every_n_steps": 2})
    result, events = run(config)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    for kind in ("model", "ready", "step", "memory", "save"):
        assert kind in kinds
    assert [e["event"] for e in read_event_log(out)] == kinds  # events.jsonl has every event, in order
    saves = of_kind(events, "save")
    assert [s["final"] for s in saves] == [False, True]
    for save in saves:
        assert save["check_ok"] and save["check_modules"] == sum(of_kind(events, "ready")[0]["modules"].values())
        assert 0 <= save["check_max_difference"] < 1e-5  # fp32 files
    (memory,) = of_kind(events, "memory")
    assert memory["peak_mb"] > 50 and of_kind(events, "done")[0]["peak_mb"] >= memory["peak_mb"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss", "grad_norm", "lr/lora_unet", "lr/lora_te", "adapter_norm/mean"} <= tags
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in accumulator.Scalars("adapter_norm/mean")] == [1, 3]  # every 10 steps, first and last
    assert (out / "adapter.toml").is_file()


def test_previews_and_validation(models, tmp_path):
    root = tmp_path / "data"
    write_images(root / "1_zq", 4)
    config = make_config(models("sd1")["folder"], root, tmp_path / "out",
                         dataset={"validation_split": 0.25},
                         train={"max_steps": 2, "validation_every_n_steps": 1},
                         sample={"prompts": ["a photo of zq"], "steps": 2, "every_n_steps": 1})
    _, events = run(config)
    validations = of_kind(events, "validation")
    assert [v["step"] for v in validations] == [1, 2] and all(math.isfinite(v["loss"]) for v in validations)
    previews = of_kind(events, "preview")
    assert [p["step"] for p in previews] == [1, 2]
    assert all(Path(p).is_file() for preview in previews for p in preview["paths"])


# ==================================================================================================== options
def test_ema_changes_the_saved_weights_only(models, data, tmp_path):
    base = models("sd1")["folder"]
    plain, _ = run(make_config(base, data, tmp_path / "plain", train={"max_steps": 3, "learning_rate": 1e-2}))
    ema, events = run(make_config(base, data, tmp_path / "ema",
                                  train={"max_steps": 3, "learning_rate": 1e-2, "ema_decay": 0.9}))
    assert of_kind(events, "save")[0]["ema"]
    assert plain.losses == ema.losses  # EMA does not touch training
    live_a = load_file(plain.state_dir / "adapter.safetensors")
    live_b = load_file(ema.state_dir / "adapter.safetensors")
    assert all(torch.equal(live_a[k], live_b[k]) for k in live_a)
    saved_a, saved_b = load_file(plain.output_file), load_file(ema.output_file)
    up = [k for k in saved_a if k.endswith("lora_up.weight")]
    # LoRA up starts at zero; the EMA holds it nearer to zero than the live weights.
    assert sum(float(saved_b[k].norm()) for k in up) < 0.8 * sum(float(saved_a[k].norm()) for k in up)


def test_masked_loss_weights_the_loss_by_the_mask(models, tmp_path):
    from PIL import Image

    base = models("sd1")["folder"]
    losses = {}
    for name, value in (("none", None), ("white", 255), ("black", 0), ("half", "half")):
        root = tmp_path / f"data-{name}"
        (path,) = write_images(root / "1_zq", 1)
        if value == "half":
            mask = Image.new("L", (RESOLUTION, RESOLUTION), 0)
            mask.paste(255, (0, 0, RESOLUTION // 2, RESOLUTION))
            mask.save(path.with_name(path.stem + "_mask.png"))
        elif value is not None:
            Image.new("L", (RESOLUTION, RESOLUTION), value).save(path.with_name(path.stem + "_mask.png"))
        config = make_config(base, root, tmp_path / f"out-{name}", dataset={"masked_loss": value is not None},
                             train={"max_steps": 1})
        losses[name] = run(config)[0].losses[0]
    assert losses["white"] == pytest.approx(losses["none"], rel=1e-6)
    assert losses["black"] == 0.0
    assert 0.0 < losses["half"] < losses["white"]


@pytest.mark.parametrize(("arch", "prediction"), [("sd1", "auto"), ("sd2", "auto"), ("sd1", "v_prediction")])
def test_min_snr_noise_offset_and_v_prediction_paths(arch, prediction, models, data, tmp_path):
    config = make_config(models(arch)["folder"], data, tmp_path / "out", model={"prediction_type": prediction},
                         train={"max_steps": 2, "min_snr_gamma": 5.0, "noise_offset": 0.1})
    trainer = Trainer(config)
    result = trainer.run()
    expected = "v_prediction" if arch == "sd2" or prediction == "v_prediction" else "epsilon"
    objective = trainer.models.objective
    assert trainer.models.prediction_type == objective.scheduler.config.prediction_type == expected
    assert all(math.isfinite(x) for x in result.losses)
    timesteps = torch.tensor([0, 500, 999])
    alphas = objective.scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = objective.min_snr_weights(timesteps)
    denominator = snr + 1 if expected == "v_prediction" else snr
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / denominator)
    # the noise offset shifts each sample's noise by one value per channel
    latents = torch.zeros(2, 4, 8, 8)
    draw = objective.draw(latents, [("k", 0), ("k", 1)])
    noise, steps = draw.noise, draw.timesteps
    plain = trainer.config.with_overrides(["train.noise_offset=0.0"])
    without_offset = DiffusionObjective(objective.scheduler.config, expected, plain.train)
    draw0 = without_offset.draw(latents, [("k", 0), ("k", 1)])
    noise0, steps0 = draw0.noise, draw0.timesteps
    assert torch.equal(steps, steps0)
    shift = (noise - noise0).flatten(2)
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0.01


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "sgd"])
def test_optimizers_run_a_step(optimizer, models, data, tmp_path):
    config = make_config(models("sd1")["folder"], data, tmp_path / "out",
                         train={"optimizer": optimizer, "max_steps": 1, "learning_rate": 1e-2})
    result, events = run(config)
    saved = load_file(result.output_file)
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize(("optimizer", "package"), [("prodigy", "prodigyopt"), ("adamw8bit", "bitsandbytes")])
def test_optional_optimizers_name_their_package(optimizer, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    parameter = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        build_optimizer(TrainSection(optimizer=optimizer), [{"params": [parameter], "lr": 1e-3, "name": "x"}])


def test_scheduler_shapes():
    def curve(scheduler: str, total: int = 100, warmup: int = 0, **options) -> list[float]:
        """The learning rate of each step for a base rate of 1."""
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        schedule = build_scheduler(optimizer, TrainSection(scheduler=scheduler, warmup_steps=warmup, **options), total)
        rates = []
        for _ in range(total):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return rates

    constant = curve("constant", warmup=4)
    assert constant[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and set(constant[4:]) == {1.0}
    linear = curve("linear")
    assert linear[0] == 1.0 and linear[50] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(linear, linear[1:]))
    cosine = curve("cosine")
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[25] == pytest.approx(0.8536, abs=1e-4)
    assert 0 < cosine[-1] < 0.001
    restarts = curve("cosine_with_restarts", scheduler_cycles=2)
    assert restarts[0] == 1.0 and restarts[25] == pytest.approx(0.5) and restarts[50] == 1.0
    assert restarts[49] < 0.01
    polynomial = curve("polynomial", scheduler_power=2.0)
    assert polynomial[50] == pytest.approx(0.25) and polynomial[0] == 1.0
    warm_linear = curve("linear", warmup=10)
    # warmup ramps (step + 1)/(warmup + 1): never a zero learning rate on the first step
    assert warm_linear[0] == pytest.approx(1 / 11) and warm_linear[9] == pytest.approx(10 / 11)
    assert warm_linear[10] == 1.0 and warm_linear[55] == pytest.approx(0.5)


def test_gradient_checkpointing_and_accumulation(models, data, tmp_path):
    base = models("sd1")["folder"]
    settings = {"max_steps": 2, "gradient_accumulation": 2, "learning_rate": 1e-2}
    plain = Trainer(make_config(base, data, tmp_path / "plain", train=settings))
    plain_result = plain.run()
    checkpointed = Trainer(make_config(base, data, tmp_path / "gc",
                                       train={**settings, "gradient_checkpointing": True}))
    result = checkpointed.run()
    assert checkpointed.models.pipe.unet.is_gradient_checkpointing
    assert checkpointed.state.progress.micro_step == plain.state.progress.micro_step == 4
    assert result.losses == pytest.approx(plain_result.losses, abs=1e-5)  # recomputation does not change the math
    a, b = load_file(plain_result.output_file), load_file(result.output_file)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_text_encoder_training_and_learning_rates(arch, models, data, tmp_path):
    base = models(arch)["folder"]
    rates = {"learning_rate": 1e-3, "unet_lr": 2e-3, "text_encoder_lr": 3e-3, "text_encoder_2_lr": 4e-3}
    trainer = Trainer(make_config(base, data, tmp_path / "on", train={**rates, "max_steps": 2}))
    result = trainer.run()
    groups = {g["name"]: g["lr"] for g in trainer.state.optimizer.param_groups}
    if arch == "sdxl":
        assert groups == {"lora_unet": 2e-3, "lora_te1": 3e-3, "lora_te2": 4e-3}
    else:
        assert groups == {"lora_unet": 2e-3, "lora_te": 3e-3}
    assert trainer.state.text_cache is None  # the text encoders change, so their outputs are not cached
    saved = load_file(result.output_file)
    for prefix in groups:
        assert any(float(t.abs().max()) > 0 for k, t in saved.items()
                   if k.startswith(prefix + "_") and k.endswith("lora_up.weight")), prefix

    frozen = Trainer(make_config(base, data, tmp_path / "off", train={**rates, "train_text_encoder": False}))
    frozen_result = frozen.run()
    assert [g["name"] for g in frozen.state.optimizer.param_groups] == ["lora_unet"]
    assert frozen.state.text_cache is not None and len(frozen.state.text_cache) == 1
    assert all(k.startswith("lora_unet_") for k in load_file(frozen_result.output_file))


# ==================================================================================================== command line
def test_train_command_with_overrides_and_resume(models, data, tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "out"
    config = make_config(models("sd1")["folder"], data, out)
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    assert main(["train", "--config", str(path), "--set", "train.max_steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "saved" in printed and "self-check ok" in printed and "done after 1 steps" in printed
    assert main(["train", "--config", str(path), "--set", f"output.dir='{tmp_path / 'more'}'",
                 "--resume", str(out / "adapter-state")]) == 0
    events = read_event_log(tmp_path / "more")
    assert of_kind(events, "resumed")[0]["step"] == 1 and of_kind(events, "done")[0]["step"] == 2
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--set", "train.bogus=1"]) == 2
    assert "error: [train]: unknown key(s) bogus" in capsys.readouterr().err


def test_mixed_precision_can_change_between_runs_in_one_process(models, data, tmp_path):
    base = models("sd1")["folder"]
    run(make_config(base, data, tmp_path / "fp32", train={"max_steps": 1}))
    result, events = run(make_config(base, data, tmp_path / "bf16",
                                     train={"max_steps": 1, "mixed_precision": "bf16"}))
    assert math.isfinite(result.losses[0])
    assert of_kind(events, "start")[0]["config"]["train"]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_throughput_bench_runs(tmp_path):
    out = tmp_path / "rows.json"
    completed = subprocess.run([sys.executable, "bench/train_throughput.py", "--model", "tiny", "--variants",
                                "cache", "--steps", "2", "--threads", "1", "--json", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    import json

    (row,) = json.loads(out.read_text())
    assert "error" not in row, row
    assert row["steps_per_s"] > 0 and row["peak_mb"] > 0 and row["first_step_s"] > 0
    assert "tiny | 64 | 1 | cache |" in completed.stdout
