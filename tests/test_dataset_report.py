"""Dataset report: buckets, crop boxes and warnings agree with what training does (trainer.dataset), duplicates,
captions and token counts, the JSON and contact sheet, the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trainer.config import DatasetSection
from trainer.dataset import ImageDataset, assign_bucket, cover_size, make_buckets, scan_dataset
from trainer.dataset_report import (
    CAPTION_TOKEN_LIMIT,
    approximate_token_count,
    build_report,
    check_out_dir,
    difference_hash,
    near_duplicate_pairs,
    render_contact_sheet,
    sheet_selection,
    token_counter,
    write_report,
)
from trainer.events import StopSignal


def scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A picture with shapes (structure a perceptual hash can see), different for each seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (600, 400), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, 600)), int(rng.integers(0, 400))
        draw.ellipse((x, y, x + int(rng.integers(20, 300)), y + int(rng.integers(20, 200))),
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image.resize(size)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Mixed sizes: wide, tall, small square, panorama, a repeats folder, an exact copy, a resized JPEG copy."""
    root = tmp_path / "data"
    (root / "3_thing").mkdir(parents=True)
    scene(1, (600, 400)).save(root / "wide.png")
    scene(1, (300, 200)).save(root / "wide_copy.jpg", quality=80)  # near duplicate of wide.png
    scene(2, (300, 450)).save(root / "tall.png")
    scene(3, (100, 100)).save(root / "small.png")
    scene(4, (1024, 256)).save(root / "pano.png")
    scene(5, (512, 512)).save(root / "3_thing" / "square.png")
    shutil.copy(root / "small.png", root / "3_thing" / "small_again.png")  # exact duplicate
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "wide.txt").write_text("a cat, " + ", ".join(f"tag{i}" for i in range(40)))
    (root / "tall.txt").write_text("a dog, red")
    (root / "small.txt").write_text("   \n")
    (root / "3_thing" / "square.txt").write_text("red, a dog")
    return root


def section(root: Path, **values) -> DatasetSection:
    defaults = dict(dir=str(root), resolution=256, min_bucket_side=128, max_bucket_side=512, bucket_step=64)
    return DatasetSection(**{**defaults, **values})


def by_name(report) -> dict:
    return {image.name: image for image in report.images}


def test_buckets_and_crop_boxes_are_the_training_ones(dataset):
    config = section(dataset)
    report = build_report(config, batch_size=2)
    images = by_name(report)
    assert sorted(images) == ["pano.png", "small.png", "small_again.png", "square.png", "tall.png", "wide.png",
                              "wide_copy.jpg"]
    buckets = make_buckets(256, 128, 512, 64)
    scan = scan_dataset(config)
    training = ImageDataset(scan.items, config, 0, augment=False)
    for index, item in enumerate(scan.items):
        image = images[item.path.name]
        bucket = buckets[assign_bucket(item.size, buckets)]
        assert image.bucket == bucket and image.resized == cover_size(item.size, bucket)
        plan = training.plan(index)
        assert image.crop_box == tuple(round(v, 1) for v in plan.source_box(image.width, image.height))
        assert image.repeats == item.n_repeats and image.role == "train"
    wide = images["wide.png"]
    assert (wide.width, wide.height) == (600, 400) and wide.aspect == 1.5
    left, top, right, bottom = wide.crop_box
    assert 0 <= left < right <= 600 and 0 <= top < bottom <= 400
    # Samples per bucket count repeats (square.png and small_again.png are in 3_thing).
    summary = {tuple(b["bucket"]): b for b in report.buckets}
    assert summary[(256, 256)]["images"] == 3 and summary[(256, 256)]["samples"] == 1 + 3 + 3
    assert sum(b["samples"] for b in report.buckets) == sum(item.n_repeats for item in scan.items)
    assert all(b["filled"] == -b["samples"] % 2 for b in report.buckets)
    codes = {w["code"] for w in report.warnings}
    assert "batch_fill" in codes and "buckets_off" not in codes
    # With buckets on, nothing here loses much to the crop; the 100 px image is upscaled.
    assert not any(w["code"] == "heavy_crop" for image in report.images for w in image.warnings)
    assert [w["code"] for w in images["small.png"].warnings].count("upscaled") == 1
    assert images["small.png"].scale == pytest.approx(2.56)


def test_buckets_off_warns_about_every_crop(dataset):
    report = build_report(section(dataset, enable_buckets=False))
    images = by_name(report)
    assert all(image.bucket == (256, 256) for image in report.images)
    assert images["wide.png"].crop_box == (100.0, 0.0, 500.0, 400.0)  # the centre square of a 600×400 image
    assert images["wide.png"].cropped_fraction == pytest.approx(1 / 3, abs=1e-3)
    heavy = sorted(image.name for image in report.images if any(w["code"] == "heavy_crop" for w in image.warnings))
    assert heavy == ["pano.png", "tall.png", "wide.png", "wide_copy.jpg"]
    assert "enable_buckets = true" in images["pano.png"].warnings[0]["message"]
    warnings = {w["code"]: w["message"] for w in report.warnings}
    assert "4 non-square image(s)" in warnings["buckets_off"]


def test_captions_statuses_tokens_and_tags(dataset, tokenizer_dir):
    report = build_report(section(dataset, trigger_word="zq", missing_caption="class_word"))
    images = by_name(report)
    assert images["tall.png"].caption == "zq, a dog, red" and images["tall.png"].caption_status == "ok"
    assert images["small.png"].caption_status == "empty"
    assert images["pano.png"].caption_status == "missing"
    assert images["pano.png"].caption == "zq, data"  # the class word (root folder's name) with the trigger
    assert "no caption file: trains on 'zq, data'" in images["pano.png"].warnings[0]["message"]
    assert report.tokens == {"counter": "approximation", "exact": False, "limit": CAPTION_TOKEN_LIMIT}
    long = [w for w in images["wide.png"].warnings if w["code"] == "long_caption"]
    assert len(long) == 1 and "~" in long[0]["message"]
    assert report.tag_frequency["a dog"] == 2 and report.tag_frequency["red"] == 2
    # A real (tiny) CLIP tokenizer counts exactly: "red", "," and "a" are in its vocabulary, "dog" is spelt d-o-g.
    assert images["square.png"].caption_tokens == approximate_token_count("zq, red, a dog") == 6
    exact = build_report(section(dataset), tokenizer=tokenizer_dir)
    assert exact.tokens["exact"] and by_name(exact)["square.png"].caption_tokens == 6


def test_approximate_token_count():
    assert approximate_token_count("a photo of a cat") == 5
    assert approximate_token_count("1girl, long_hair") == 6  # 1 / girl / , / long / _ / hair
    assert approximate_token_count("extraordinarily") == 3
    assert approximate_token_count("") == 0
    counter = token_counter(Path("/nonexistent/tokenizer"))
    assert not counter.exact and counter.name == "approximation"


def test_duplicates(dataset):
    report = build_report(section(dataset))
    groups = {(d["kind"], tuple(sorted(Path(p).name for p in d["paths"]))) for d in report.duplicates}
    assert ("exact", ("small.png", "small_again.png")) in groups
    assert ("near", ("wide.png", "wide_copy.jpg")) in groups
    assert len(groups) == 2  # distinct pictures are not flagged
    images = by_name(report)
    assert any(w["code"] == "near_duplicate" for w in images["wide_copy.jpg"].warnings)
    assert not any("duplicate" in w["code"] for w in images["tall.png"].warnings)


def test_difference_hash_and_pairs():
    a = scene(7, (400, 300))
    buffer = io.BytesIO()
    a.resize((200, 150)).save(buffer, format="JPEG", quality=60)
    copy = Image.open(buffer)
    other = scene(8, (400, 300))
    hashes = [difference_hash(a.resize((64, 48))), difference_hash(copy.resize((64, 48))),
              difference_hash(other.resize((64, 48))), None]
    pairs = near_duplicate_pairs(hashes)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_unusable_files_and_a_missing_folder(dataset, tmp_path):
    report = build_report(section(dataset))
    assert [Path(s["path"]).name for s in report.skipped] == ["broken.png"]
    assert any(w["code"] == "skipped" and "broken.png" in w["message"] for w in report.warnings)
    with pytest.raises(ValueError, match="is not a folder"):
        build_report(section(tmp_path / "nowhere"))


def test_stop_while_hashing(dataset):
    stop = StopSignal()
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "report_progress" and event["phase"] == "hashing" and event["done"] == 2:
            stop.request("test")

    report = build_report(section(dataset), on_event=on_event, stop=stop)
    assert report.stopped and any(w["code"] == "stopped" for w in report.warnings)
    assert [image.dhash is None for image in report.images].count(False) == 2
    assert events[0]["phase"] == "scanning" and events[-1]["event"] == "report_done"
    assert len(report.images) == 7  # geometry and captions are complete anyway


def test_json_and_contact_sheet(dataset, tmp_path):
    report = build_report(section(dataset))
    json_path, png_path = write_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["summary"]["images"] == 7 and data["summary"]["skipped"] == 1
    assert data["summary"]["warnings"]["upscaled"] == 2
    entry = next(image for image in data["images"] if image["path"].endswith("wide.png"))
    assert set(entry) >= {"width", "height", "aspect", "bucket", "crop_box", "scale", "cropped_fraction", "caption",
                          "caption_status", "caption_tokens", "dhash", "warnings"}
    with Image.open(png_path) as sheet:
        assert sheet.format == "PNG" and sheet.width > 7 * 100
    # The part of a cropped image outside its box is dimmed, the kept part is not.
    wide = build_report(section(dataset, enable_buckets=False))
    only_wide = [image for image in wide.images if image.name == "wide.png"]
    wide.images = only_wide
    picture = render_contact_sheet(wide, cell=150)
    thumb = scene(1, (150, 100))
    pad, header, top = 8, 40, 40 + 25
    kept = np.asarray(picture.getpixel((pad + 75, top + 50)), dtype=int)
    cut = np.asarray(picture.getpixel((pad + 5, top + 50)), dtype=int)
    assert np.abs(kept - np.asarray(thumb.getpixel((75, 50)))).max() < 40
    assert cut.sum() < np.asarray(thumb.getpixel((5, 50))).sum() * 0.6 + 10
    assert header == 40


def test_sheet_shows_images_with_warnings_first_when_over_the_limit(dataset):
    report = build_report(section(dataset))
    shown = sheet_selection(report, limit=3)
    assert len(shown) == 3 and all(image.warnings for image in shown)
    assert sheet_selection(report, limit=100) == report.images


def test_report_folder_inside_the_dataset_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="inside the dataset folder"):
        check_out_dir(dataset / "report", section(dataset))
    assert check_out_dir(tmp_path / "elsewhere", section(dataset)) == (tmp_path / "elsewhere").resolve()


def test_cli_report(dataset, tmp_path, capsys):
    from trainer.cli import main

    out = tmp_path / "out"
    assert main(["report", str(dataset), "--set", "dataset.resolution=256", "--set", "dataset.min_bucket_side=128",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bucket" in text and "256×256" in text and "warning:" in text and "dataset_report.png" in text
    assert (out / "dataset_report.json").is_file() and (out / "dataset_report.png").is_file()
    config = tmp_path / "run.toml"
    config.write_text(f'[dataset]\ndir = "{dataset}"\nresolution = 256\n[train]\nbatch_size = 2\n'
                      f'[output]\ndir = "{tmp_path / "runs"}"\nname = "mine"\n')
    assert main(["report", "--config", str(config)]) == 0
    assert (tmp_path / "runs" / "mine-dataset-report" / "dataset_report.json").is_file()
    assert main(["report", "--config", str(config)]) == 0  # a second report gets a new folder
    assert (tmp_path / "runs" / "mine-dataset-report-1" / "dataset_report.json").is_file()
    assert main(["report", str(dataset), "--out", str(dataset / "r")]) == 2
    assert "inside the dataset folder" in capsys.readouterr().err


def test_a_trigger_the_tokenizer_splits_is_reported(tmp_path):
    """The toy tokenizer keeps the demo's trigger ``zq`` whole and spells orange's ``kq`` as k + q (orange binds more
    slowly with it: README, "Further LoRA runs"); only an exact count can tell, and only words the user named as
    the trigger (a folder word the captions use, or dataset.trigger_word) are checked."""
    from trainer.toy import CONCEPTS, make_concept_dataset

    toy_tokenizer = Path(__file__).resolve().parents[1] / "presets" / "toy" / "model" / "tokenizer"
    make_concept_dataset(tmp_path / "orange", CONCEPTS["orange"], count=3)
    make_concept_dataset(tmp_path / "purple", CONCEPTS["purple"], count=3)

    def split(folder: Path, **values) -> list[str]:
        report = build_report(section(folder, resolution=64, **values), tokenizer=toy_tokenizer)
        return [w["message"] for w in report.warnings if w["code"] == "split_trigger"]

    assert split(tmp_path / "orange") == [
        "the trigger word 'kq' is 2 tokens of the model's tokenizer: a trigger that is one rare token ties the "
        "concept to itself faster; consider a rare word the tokenizer keeps whole (in the captions, and the folder "
        "name or dataset.trigger_word)"]
    assert split(tmp_path / "purple") == []
    assert split(tmp_path / "purple", trigger_word="wz") and not split(tmp_path / "orange", trigger_word="zq")
    approximate = build_report(section(tmp_path / "orange", resolution=64))
    assert not [w for w in approximate.warnings if w["code"] == "split_trigger"]
