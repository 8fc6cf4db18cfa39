"""Auto-captioning with tiny captioners built from configs (BLIP, GIT, a ViT tagger, a WD-style ONNX tagger): files
written, modes, prefix/suffix/trigger, stop mid-way, bad images, model sources, the CLI. Nothing is downloaded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from caption_helpers import (
    build_tiny_blip,
    build_tiny_blip2,
    build_tiny_florence2,
    build_tiny_git,
    build_tiny_onnx_tagger,
    build_tiny_tagger,
)
from PIL import Image

from trainer.captioning import (
    Captioner,
    CaptionError,
    CaptionOptions,
    TagCaptioner,
    caption_folder,
    compose_caption,
    detect_kind,
    format_tag,
    images_to_caption,
    onnx_scorer,
    resolve_model_source,
)
from trainer.events import StopSignal


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": build_tiny_blip(root / "blip"), "git": build_tiny_git(root / "git"),
            "tagger": build_tiny_tagger(root / "tagger")}


def make_dataset(root: Path, bad: bool = True) -> Path:
    """3 images in the root (mixed sizes), 1 in a repeats folder, a corrupt file and a loss mask (not captioned)."""
    root.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate([(40, 30), (20, 50), (64, 64)]):
        Image.new("RGB", size, (200, 40 * index, 10)).save(root / f"img{index}.png")
    (root / "5_thing").mkdir()
    Image.new("RGB", (30, 30), (0, 90, 0)).save(root / "5_thing" / "sub.jpg")
    Image.new("L", (30, 30), 255).save(root / "5_thing" / "sub_mask.png")
    if bad:
        (root / "broken.png").write_bytes(b"not an image at all")
    return root


class Recorder:
    def __init__(self, stop_after_batches: int | None = None, stop: StopSignal | None = None):
        self.events: list[dict] = []
        self.stop_after_batches = stop_after_batches
        self.stop = stop

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        progress = [e for e in self.events if e["event"] == "caption_progress"]
        if self.stop is not None and event["event"] == "caption_progress" and len(progress) == self.stop_after_batches:
            self.stop.request("test")

    def kinds(self) -> list[str]:
        return [event["event"] for event in self.events]


@pytest.mark.parametrize("name,word", [("blip", "cat"), ("git", "dog")])
def test_captioner_writes_a_caption_beside_every_image(models, tmp_path, name, word):
    data = make_dataset(tmp_path / "data")
    recorder = Recorder()
    options = CaptionOptions(model=str(models[name]), max_new_tokens=2, batch_size=2, trigger_word="ohwx",
                             prefix="photo", suffix="sharp")
    result = caption_folder(data, options, on_event=recorder)
    expected = f"ohwx, photo, {word} {word}, sharp"
    images = ["img0", "img1", "img2"]
    for stem in images:
        assert (data / f"{stem}.txt").read_text() == expected + "\n"
    assert (data / "5_thing" / "sub.txt").read_text() == expected + "\n"
    assert not (data / "5_thing" / "sub_mask.txt").exists()  # a loss mask is no training image
    assert [path.name for path, _ in result.failed] == ["broken.png"]
    assert "not an image" in result.failed[0][1]
    assert len(result.written) == 4 and not result.stopped
    assert not list(data.rglob(".*.tmp"))  # temporary files renamed into place
    kinds = recorder.kinds()
    assert kinds[:2] == ["caption_loading", "caption_start"] and kinds[-1] == "caption_done"
    start = recorder.events[1]
    assert start["total"] == 5 and start["model_name"] == {"blip": "BLIP", "git": "GIT"}[name]
    assert start["device"] == "cpu" and start["dtype"] == "fp32"
    errors = [e for e in recorder.events if e["event"] == "caption_error"]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.png")
    progress = [e for e in recorder.events if e["event"] == "caption_progress"]
    assert [e["done"] for e in progress] == [2, 4, 5] and progress[-1]["eta_s"] == 0
    assert all(e["total"] == 5 for e in progress)
    assert progress[0]["recent"][0]["caption"] == expected


def test_prompt_starts_the_caption_and_is_not_repeated(models, tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    for name, word in (("blip", "cat"), ("git", "dog")):
        options = CaptionOptions(model=str(models[name]), mode="overwrite", prompt="A photo of", max_new_tokens=2)
        caption_folder(data, options)
        assert (data / "img0.txt").read_text() == f"A photo of {word} {word}\n"


def test_florence2_task_prompts_and_blip2(tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    florence = build_tiny_florence2(tmp_path / "florence2")
    assert detect_kind(resolve_model_source(str(florence))) == "captioner"
    events = []
    result = caption_folder(data, CaptionOptions(model=str(florence), max_new_tokens=3, batch_size=4),
                            on_event=events.append)
    assert events[1]["model_name"] == "Florence-2" and len(result.written) == 4
    assert (data / "img0.txt").read_text() == "zz\n"  # the task token is not part of the caption
    caption_folder(data, CaptionOptions(model=str(florence), mode="overwrite", prompt="<MORE_DETAILED_CAPTION>",
                                        max_new_tokens=3))
    assert (data / "img1.txt").read_text() == "zz\n"
    with pytest.raises(CaptionError, match="not a captioning task"):
        caption_folder(data, CaptionOptions(model=str(florence), mode="overwrite", prompt="<OD>"))
    blip2 = build_tiny_blip2(tmp_path / "blip2")
    caption_folder(data, CaptionOptions(model=str(blip2), mode="overwrite", max_new_tokens=3, batch_size=3))
    assert (data / "img2.txt").read_text() == "qqq\n"
    caption_folder(data, CaptionOptions(model=str(blip2), mode="overwrite", max_new_tokens=2, prompt="a photo of"))
    assert (data / "5_thing" / "sub.txt").read_text() == "a photo of qq\n"


def test_an_empty_result_is_reported_and_never_replaces_a_caption(models, tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    (data / "img0.txt").write_text("keep me")
    result = caption_folder(data, CaptionOptions(model=str(models["tagger"]), mode="overwrite", threshold=0.95))
    assert not result.written and {reason for _, reason in result.failed} == {"no tag reached the threshold"}
    assert (data / "img0.txt").read_text() == "keep me"


def test_modes_skip_existing_overwrite_append(models, tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    (data / "img0.txt").write_text("my own caption\n")
    (data / "img1.txt").write_text("\n  \n")  # blank: counts as uncaptioned, as in training
    (data / "img2.txt").write_text("1girl, smile\nsecond line kept\n")
    tagger = str(models["tagger"])

    todo, skipped = images_to_caption(data, CaptionOptions(model=tagger))
    assert [p.name for p in skipped] == ["img0.png", "img2.png"]
    result = caption_folder(data, CaptionOptions(model=tagger))
    assert (data / "img0.txt").read_text() == "my own caption\n"
    assert (data / "img1.txt").read_text() == "1girl, long hair, ^_^\n"
    assert (data / "img2.txt").read_text() == "1girl, smile\nsecond line kept\n"
    assert len(result.skipped) == 2 and len(result.written) == 2

    caption_folder(data, CaptionOptions(model=tagger, mode="append", trigger_word="ohwx"))
    # Only what is new is appended; other lines stay; the trigger goes first once.
    assert (data / "img2.txt").read_text() == "ohwx, 1girl, smile, long hair, ^_^\nsecond line kept\n"
    assert (data / "img0.txt").read_text() == "ohwx, my own caption, 1girl, long hair, ^_^\n"
    caption_folder(data, CaptionOptions(model=tagger, mode="append", trigger_word="ohwx"))  # idempotent
    assert (data / "img0.txt").read_text() == "ohwx, my own caption, 1girl, long hair, ^_^\n"

    caption_folder(data, CaptionOptions(model=tagger, mode="overwrite", caption_extension=".tags"))
    assert (data / "img0.tags").read_text() == "1girl, long hair, ^_^\n"
    assert (data / "img0.txt").read_text() == "ohwx, my own caption, 1girl, long hair, ^_^\n"  # other extension
    caption_folder(data, CaptionOptions(model=tagger, mode="overwrite"))
    assert (data / "img0.txt").read_text() == "1girl, long hair, ^_^\n"


def test_a_differently_cased_caption_file_is_the_one_appended_to(models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20, 20)).save(data / "IMG.png")
    (data / "IMG.TXT").write_text("mine")
    caption_folder(data, CaptionOptions(model=str(models["tagger"]), mode="append"))
    assert sorted(p.name for p in data.iterdir()) == ["IMG.TXT", "IMG.png"]
    assert (data / "IMG.TXT").read_text() == "mine, 1girl, long hair, ^_^\n"


def test_stop_between_batches_keeps_what_was_written(models, tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    stop = StopSignal()
    recorder = Recorder(stop_after_batches=1, stop=stop)
    result = caption_folder(data, CaptionOptions(model=str(models["tagger"]), batch_size=1), on_event=recorder,
                            stop=stop)
    assert result.stopped and len(result.written) == 1
    assert sorted(p.name for p in data.rglob("*.txt")) == ["img0.txt"]
    assert recorder.events[-1] == {**recorder.events[-1], "event": "caption_done", "stopped": True, "written": 1}
    # A stop requested before the start loads no model and writes nothing.
    result = caption_folder(data, CaptionOptions(model="not/loaded", mode="overwrite"), stop=stop)
    assert result.stopped and not result.written and result.load_seconds == 0


def test_a_model_failure_ends_the_run_with_a_clear_error_and_keeps_earlier_captions(tmp_path):
    class FailsOnSecondBatch(Captioner):
        name = "flaky"
        calls = 0

        def caption(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA out of memory")
            return ["fine"] * len(images)

    data = make_dataset(tmp_path / "data", bad=False)
    with pytest.raises(CaptionError, match="flaky failed on the batch starting with .*out of memory.*1 caption"):
        caption_folder(data, CaptionOptions(model="unused/model", batch_size=1), captioner=FailsOnSecondBatch())
    assert (data / "img0.txt").read_text() == "fine\n"


def test_tagger_thresholds_categories_and_tag_text(models, tmp_path):
    data = make_dataset(tmp_path / "data", bad=False)
    caption_folder(data, CaptionOptions(model=str(models["tagger"]), character_threshold=0.7, threshold=0.45))
    # The rating tag is left out; the character tag passes 0.7 and goes first; ^_^ (0.40) misses 0.45.
    assert (data / "img0.txt").read_text() == "hatsune miku, 1girl, long hair\n"
    # Without a tag list every label is a general tag.
    plain = build_tiny_tagger(tmp_path / "plain", with_tag_list=False)
    caption_folder(data, CaptionOptions(model=str(plain), mode="overwrite", threshold=0.45))
    assert (data / "img0.txt").read_text() == "general, 1girl, hatsune miku, long hair\n"
    assert format_tag("^_^") == "^_^" and format_tag("long_hair") == "long hair"


class FakeOnnxSession:
    """onnxruntime's InferenceSession surface; records what it was fed."""

    class Info:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    def __init__(self, input_shape, outputs):
        self.input_shape = input_shape
        self.outputs = outputs
        self.fed: list[np.ndarray] = []

    def get_inputs(self):
        return [self.Info("input_1", self.input_shape)]

    def get_outputs(self):
        return [self.Info("predictions", ["batch", len(self.outputs)])]

    def run(self, names, feeds):
        batch = feeds["input_1"]
        self.fed.append(batch)
        return [np.tile(np.asarray(self.outputs, dtype=np.float32), (len(batch), 1))]


def test_onnx_tagger_input_is_a_white_padded_bgr_square():
    session = FakeOnnxSession([1, 8, 8, 3], [0.9, 0.2])  # a fixed batch of one, NHWC
    scores = onnx_scorer(session)
    red_wide = Image.new("RGB", (16, 8), (255, 0, 0))
    result = scores([red_wide, red_wide])
    assert result.shape == (2, 2) and len(session.fed) == 2  # run image by image
    fed = session.fed[0][0]
    assert fed.shape == (8, 8, 3) and fed.dtype == np.float32
    assert fed[4, 4].tolist() == [0.0, 0.0, 255.0]  # BGR, 0–255
    assert fed[0, 4].tolist() == [255.0, 255.0, 255.0]  # white padding above the wide image
    tagger = TagCaptioner("fake", scores, ["1girl", "hat"], None, 0.35, 0.85)
    assert tagger.caption([red_wide]) == ["1girl"]
    logits = TagCaptioner("logits", lambda images: np.array([[3.0, -3.0]]), ["a_b", "c"], None, 0.5, 0.9)
    assert logits.caption([red_wide]) == ["a b"]  # scores outside [0, 1] are logits: sigmoid applied
    nchw = FakeOnnxSession(["batch", 3, 4, 4], [0.5])
    onnx_scorer(nchw)([red_wide, red_wide])
    assert nchw.fed[0].shape == (2, 3, 4, 4)


def test_onnx_tagger_with_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = build_tiny_onnx_tagger(tmp_path / "wd")
    assert detect_kind(resolve_model_source(str(model))) == "onnx_tagger"
    data = make_dataset(tmp_path / "data", bad=False)
    result = caption_folder(data, CaptionOptions(model=str(model)))
    assert len(result.written) == 4
    assert (data / "img0.txt").read_text() == "1girl, long hair, ^_^\n"


def test_onnx_tagger_without_onnxruntime_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    folder = tmp_path / "wd"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not read")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n")
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    data = make_dataset(tmp_path / "data", bad=False)
    with pytest.raises(CaptionError, match="install onnxruntime"):
        caption_folder(data, CaptionOptions(model=str(folder)))
    assert not list(data.rglob("*.txt"))


def test_model_sources_and_kinds(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bad names must not resolve from where pytest runs ("../../etc" is /etc from /a/b)
    local = resolve_model_source(str(models["blip"]))
    assert local.is_local and local.load_kwargs == {"local_files_only": True}
    hub = resolve_model_source("Salesforce/blip-image-captioning-base")
    assert not hub.is_local and hub.location == "Salesforce/blip-image-captioning-base" and hub.load_kwargs == {}
    for text in ("nope", "../../etc", "a/b/c", "owner/../x"):
        with pytest.raises(CaptionError, match="neither a model folder nor a hub id"):
            resolve_model_source(text)
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(CaptionError, match="is a folder"):
        resolve_model_source(str(file))
    assert detect_kind(resolve_model_source(str(models["blip"]))) == "captioner"
    assert detect_kind(resolve_model_source(str(models["git"]))) == "captioner"
    assert detect_kind(resolve_model_source(str(models["tagger"]))) == "tagger"
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(CaptionError, match="'bert' is not a supported captioner"):
        detect_kind(resolve_model_source(str(other)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptionError, match="neither a transformers model"):
        detect_kind(resolve_model_source(str(empty)))


def test_pickled_weights_are_never_loaded(models, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(models["tagger"], folder)
    state = {key: torch.from_numpy(value.copy()) for key, value in safetensors_numpy(folder / "model.safetensors")}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    data = make_dataset(tmp_path / "data", bad=False)
    with pytest.raises(CaptionError, match="cannot load the tagger"):
        caption_folder(data, CaptionOptions(model=str(folder)))


def safetensors_numpy(path: Path):
    from safetensors.numpy import load_file

    return load_file(str(path)).items()


@pytest.mark.parametrize("field,value,message", [
    ("caption_extension", ".png", "caption_extension"), ("caption_extension", "../x.txt", "caption_extension"),
    ("mode", "replace", "mode"), ("device", "tpu", "device"), ("dtype", "int8", "dtype"),
    ("batch_size", 0, "batch_size"), ("threshold", 1.5, "threshold"), ("prefix", "a\nb", "one line"),
    ("model", " ", "no captioning model"),
])
def test_options_are_validated(tmp_path, field, value, message):
    data = make_dataset(tmp_path / "data", bad=False)
    options = CaptionOptions(model="owner/name")
    setattr(options, field, value)
    with pytest.raises(CaptionError, match=message):
        caption_folder(data, options)
    assert not list(data.rglob("*.txt"))


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(models, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_dataset(tmp_path / "data", bad=False)
    with pytest.raises(CaptionError, match="no CUDA GPU"):
        caption_folder(data, CaptionOptions(model=str(models["tagger"]), device="cuda"))


def test_dtype_is_applied(models, tmp_path):
    import torch

    from trainer.captioning import load_captioner

    captioner = load_captioner(CaptionOptions(model=str(models["blip"]), dtype="bf16", device="cpu", max_new_tokens=1))
    assert captioner.model.dtype == torch.bfloat16 and captioner.describe()["dtype"] == "bf16"
    data = make_dataset(tmp_path / "data", bad=False)
    # A loaded captioner keeps its model options (here max_new_tokens 1); the call's options give the file side.
    result = caption_folder(data, CaptionOptions(model="unused/model", max_new_tokens=9, prefix="p"),
                            captioner=captioner)
    assert (data / "img0.txt").read_text() == "p, cat\n" and result.load_seconds == 0


def test_compose_caption():
    options = CaptionOptions(model="x", prefix=" photo of, ", suffix="", trigger_word="ohwx")
    assert compose_caption("a  cat\nsitting", options) == "ohwx, photo of, a cat sitting"
    assert compose_caption("ohwx, a cat", options) == "ohwx, photo of, a cat"  # trigger moved first, not repeated
    append = CaptionOptions(model="x", mode="append")
    assert compose_caption("red, blue", append, existing="blue, green") == "blue, green, red"
    assert compose_caption("", CaptionOptions(model="x")) == ""


def test_cli_caption(models, tmp_path, capsys):
    from trainer.cli import main

    data = make_dataset(tmp_path / "data")
    code = main(["caption", str(data), "--model", str(models["git"]), "--max-new-tokens", "1", "--trigger", "ohwx",
                 "--ext", ".caption"])
    out = capsys.readouterr()
    assert code == 0
    assert (data / "img1.caption").read_text() == "ohwx, dog\n"
    assert "wrote 4 caption(s)" in out.out and "broken.png" in out.out + out.err
    code = main(["caption", str(data), "--model", "not a model"])
    assert code == 2 and "neither a model folder nor a hub id" in capsys.readouterr().err


def test_tiny_captioner_speed(models, tmp_path):
    """Not a benchmark (no assertion on time): the figure the report quotes, 12 images in batches of 4."""
    data = tmp_path / "data"
    data.mkdir()
    for index in range(12):
        Image.new("RGB", (64 + index, 48), (index * 20, 0, 0)).save(data / f"{index}.png")
    for name in ("blip", "git", "tagger"):
        started = time.perf_counter()
        result = caption_folder(data, CaptionOptions(model=str(models[name]), mode="overwrite", max_new_tokens=8))
        print(f"{name}: 12 images in {time.perf_counter() - started:.2f} s (load {result.load_seconds:.2f} s)")
        assert len(result.written) == 12

