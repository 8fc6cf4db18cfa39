"""trainer/dataset.py and trainer/cache.py: scanning, unusable files, image modes, buckets, crops, captions,
batch sampling (with accelerate's sharding) and the latent / text-embedding caches. All images are tiny and made
here; nothing is downloaded."""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from trainer.cache import LatentCache, TextEmbeddingCache
from trainer.config import DatasetSection
from trainer.dataset import (
    BucketBatchSampler,
    ImageDataset,
    assign_bucket,
    collate_batch,
    cover_size,
    load_datasets,
    load_image,
    make_buckets,
    make_dataloader,
    process_caption,
    render,
    scan_dataset,
)

# Small buckets for fast tests: resolution 64 → (32,96) (32,112) (32,128) (48,80) (64,64) (80,48) (96,32) ...
SMALL = {"resolution": 64, "min_bucket_side": 32, "max_bucket_side": 128, "bucket_step": 16}


def section(folder: Path, **overrides) -> DatasetSection:
    return DatasetSection(**{"dir": str(folder), **SMALL, **overrides})


def save(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def png_bytes(size=(64, 64), seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size=(64, 64), seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """(height, width) uint8, 0 at the left edge to 255 at the right."""
    return np.tile(np.linspace(0, 255, width).round().astype(np.uint8), (height, 1))


@pytest.fixture
def concept_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save(root / "10_mychar" / "a.png", (100, 50))
    (root / "10_mychar" / "a.txt").write_text("mychar, smile", encoding="utf-8")
    save(root / "10_mychar" / "b.jpg", (50, 100), (20, 20, 200))  # no caption
    save(root / "10_mychar" / "a_mask.png", (100, 50), 255, "L")  # a mask, not an image to train on
    (root / "10_mychar" / "notes.md").write_text("not a caption")
    save(root / "3_style woman" / "c.webp", (64, 64))
    (root / "3_style woman" / "c.txt").write_bytes("\ufeffstyle, woman\n".encode())  # UTF-8 with BOM
    save(root / "3_style woman" / "E.JPEG", (64, 64))  # upper-case extensions, caption found case-insensitively
    (root / "3_style woman" / "E.TXT").write_text("style, smile", encoding="utf-8")
    save(root / "root.png", (64, 64))  # images directly in the root: concept "data", 1 repeat
    save(root / ".hidden" / "x.png")  # hidden folder ignored
    save(root / "5_deep" / "nested" / "y.png")  # deeper folders ignored; "5_deep" has no image of its own
    return root


# ----- scanning ------------------------------------------------------------------------------------------------


def test_scan_repeats_captions_and_metadata(concept_folder: Path):
    scan = scan_dataset(section(concept_folder), seed=0)
    by_name = {item.path.name: item for item in scan.items}
    assert sorted(by_name) == ["E.JPEG", "a.png", "b.jpg", "c.webp", "root.png"]
    assert by_name["a.png"].n_repeats == 10 and by_name["a.png"].folder == "10_mychar"
    assert by_name["c.webp"].n_repeats == 3 and by_name["root.png"].n_repeats == 1
    assert by_name["a.png"].caption == "mychar, smile"
    assert by_name["c.webp"].caption == "style, woman"  # BOM stripped
    assert by_name["E.JPEG"].caption == "style, smile"
    assert by_name["b.jpg"].caption == ""  # missing_caption = "empty"
    assert by_name["a.png"].size == (50, 100) and by_name["b.jpg"].size == (100, 50)  # (height, width)
    assert not scan.skipped and not scan.validation
    assert scan.tag_frequency == {
        "10_mychar": {"mychar": 1, "smile": 1},
        "3_style woman": {"style": 2, "woman": 1, "smile": 1},
        "data": {},  # a folder without tags is still listed, as kohya does
    }
    assert scan.dataset_dirs == {
        "data": {"n_repeats": 1, "img_count": 1},
        "10_mychar": {"n_repeats": 10, "img_count": 2},
        "3_style woman": {"n_repeats": 3, "img_count": 2},
    }
    assert scan.num_train_images == 1 + 20 + 6
    dataset = ImageDataset(scan.items, section(concept_folder), seed=0)
    assert len(dataset) == 27 and dataset.num_images == 5

    class_scan = scan_dataset(section(concept_folder, missing_caption="class_word"), seed=0)
    captions = {item.path.name: item.caption for item in class_scan.items}
    assert captions["b.jpg"] == "mychar" and captions["root.png"] == "data" and captions["a.png"] == "mychar, smile"
    assert class_scan.tag_frequency["10_mychar"] == {"mychar": 2, "smile": 1}
    assert class_scan.tag_frequency["data"] == {"data": 1}


def test_root_with_repeat_prefix_blank_caption_and_other_extension(tmp_path: Path):
    root = tmp_path / "5_my thing"
    save(root / "one.bmp")
    (root / "one.caption").write_text("  \n", encoding="utf-8")  # blank → treated as missing
    save(root / "two.png")
    (root / "two.caption").write_text("first line\nsecond line\n", encoding="utf-8")  # first line only (kohya)
    scan = scan_dataset(section(root, caption_extension="caption", missing_caption="class_word"))
    assert [(i.path.name, i.n_repeats, i.caption) for i in scan.items] == [
        ("one.bmp", 5, "my thing"), ("two.png", 5, "first line")]
    assert scan.dataset_dirs == {"5_my thing": {"n_repeats": 5, "img_count": 2}}


def test_regularisation_images_are_flagged_weighted_and_balanced(tmp_path: Path):
    save(tmp_path / "data" / "2_x" / "a.png")
    save(tmp_path / "data" / "2_x" / "b.png")
    for name in ("r1", "r2", "r3"):
        save(tmp_path / "reg" / "1_person" / f"{name}.png", color=(0, 90, 0))
    config = section(tmp_path / "data", reg_dir=str(tmp_path / "reg"), reg_weight=0.5, missing_caption="class_word")
    scan = scan_dataset(config)
    reg = scan.reg_items
    assert [item.path.name for item in reg] == ["r1.png", "r2.png", "r3.png"]
    assert all(item.is_reg and item.loss_weight == 0.5 and item.caption == "person" for item in reg)
    assert all(not item.is_reg and item.loss_weight == 1.0 for item in scan.train_items)
    # kohya: reg samples = training samples (4): folder repeats first, then one more per image in order
    assert [item.n_repeats for item in reg] == [2, 1, 1]
    assert scan.reg_dataset_dirs == {"1_person": {"n_repeats": 1, "img_count": 3}}
    assert scan.dataset_dirs == {"2_x": {"n_repeats": 2, "img_count": 2}}
    assert scan.num_reg_images == 3 and scan.num_train_images == 4
    assert "1_person" in scan.tag_frequency

    dataset = ImageDataset(scan.items, config, seed=0)
    weights = sorted(dataset[i]["loss_weight"] for i in range(len(dataset)))
    assert weights == [0.5] * 4 + [1.0] * 4

    for name in ("r4", "r5", "r6", "r7"):
        save(tmp_path / "reg" / "1_person" / f"{name}.png", color=(0, 90, 0))
    many = scan_dataset(config).reg_items  # more reg images than training samples: only the first 4 are used
    assert [item.path.name for item in many] == ["r1.png", "r2.png", "r3.png", "r4.png"]
    assert [item.n_repeats for item in many] == [1, 1, 1, 1]


def test_validation_split_is_deterministic_and_never_takes_reg_images(tmp_path: Path):
    for i in range(10):
        save(tmp_path / "data" / "3_x" / f"{i:02d}.png")
    save(tmp_path / "reg" / "r.png")
    config = section(tmp_path / "data", reg_dir=str(tmp_path / "reg"), validation_split=0.2)
    first, again = scan_dataset(config, seed=7), scan_dataset(config, seed=7)
    held = [item.path.name for item in first.validation]
    assert len(held) == 2 and held == [item.path.name for item in again.validation]
    assert all(not item.is_reg and item.n_repeats == 1 for item in first.validation)
    assert not set(held) & {item.path.name for item in first.items}
    assert len(first.train_items) == 8 and first.dataset_dirs == {"3_x": {"n_repeats": 3, "img_count": 8}}
    others = {tuple(item.path.name for item in scan_dataset(config, seed=s).validation) for s in range(8)}
    assert len(others) > 1  # the seed picks the held-out images

    train, validation, _ = load_datasets(config, seed=7)
    assert len(validation) == 2 and not validation.augment and len(train) == 8 * 3 + 24


def test_unusable_files_are_skipped_and_named(tmp_path: Path, caplog):
    root = tmp_path / "data"
    save(root / "good.png", (64, 48))
    root.joinpath("corrupt.jpg").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)))
    data = png_bytes()
    root.joinpath("truncated.png").write_bytes(data[: len(data) // 2])
    data = jpeg_bytes()
    root.joinpath("truncated.jpg").write_bytes(data[: len(data) // 2])
    broken = bytearray(png_bytes(seed=2))
    broken[100:200] = bytes(100)
    root.joinpath("broken_stream.png").write_bytes(bytes(broken))
    root.joinpath("empty.png").write_bytes(b"")
    root.joinpath("text.png").write_text("this is not an image")
    save(root / "huge.png", (100, 100))

    caplog.set_level(logging.WARNING, logger="trainer.dataset")
    scan = scan_dataset(section(root, max_pixels=5000))
    assert [item.path.name for item in scan.items] == ["good.png"]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert set(reasons) == {"corrupt.jpg", "truncated.png", "truncated.jpg", "broken_stream.png", "empty.png",
                            "text.png", "huge.png"}
    assert "not an image" in reasons["corrupt.jpg"] and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.png"] and "truncated" in reasons["truncated.jpg"]
    assert "corrupt" in reasons["broken_stream.png"]
    assert "0 bytes" in reasons["empty.png"]
    assert "too many pixels" in reasons["huge.png"] and "100×100" in reasons["huge.png"]
    for name, reason in reasons.items():
        assert any(name in record.getMessage() and reason in record.getMessage() for record in caplog.records)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # truncation is detected, never papered over


def test_folder_without_usable_images_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "text.png").write_text("nope")
    (root / "photo.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError) as error:
        scan_dataset(section(root))
    message = str(error.value)
    assert str(root) in message and ".png" in message and ".webp" in message and "skipped" in message
    with pytest.raises(ValueError, match="not a folder"):
        scan_dataset(section(tmp_path / "missing"))
    save(tmp_path / "ok" / "a.png")
    with pytest.raises(ValueError, match="reg_dir"):
        scan_dataset(section(tmp_path / "ok", reg_dir=str(root)))


# ----- image modes ---------------------------------------------------------------------------------------------


def _palette_with_transparency(path: Path) -> Path:
    image = Image.new("P", (8, 4), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(0, (0, 0, 4, 4))  # left half: index 0 = transparent red
    image.save(path, transparency=0)
    return path


MODES = {
    # name: (builder, expected RGB at (1,1), expected RGB at (6,1), has alpha)
    "cmyk": (lambda p: save(p.with_suffix(".jpg"), (8, 4), (0, 255, 255, 0), "CMYK"), (255, 0, 0), (255, 0, 0), False),
    "16bit": (lambda p: save(p, (8, 4), 32896, "I;16"), (128, 128, 128), (128, 128, 128), False),
    "palette_transparency": (_palette_with_transparency, (255, 255, 255), (0, 255, 0), True),
    "la": (lambda p: save(p, (8, 4), (0, 0), "LA"), (255, 255, 255), (255, 255, 255), True),
    "rgba": (lambda p: save(p, (8, 4), (0, 0, 255, 128), "RGBA"), (127, 127, 255), (127, 127, 255), True),
    "grayscale": (lambda p: save(p, (8, 4), 77, "L"), (77, 77, 77), (77, 77, 77), False),
    "bilevel": (lambda p: save(p.with_suffix(".bmp"), (8, 4), 1, "1"), (255, 255, 255), (255, 255, 255), False),
}


@pytest.mark.parametrize("kind", list(MODES))
def test_image_modes_become_rgb(tmp_path: Path, kind: str):
    builder, left, right, has_alpha = MODES[kind]
    path = builder(tmp_path / f"{kind}.png")
    scan = scan_dataset(section(tmp_path))
    assert scan.items[0].has_alpha == has_alpha and scan.items[0].size == (4, 8)
    image, alpha = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 4)
    assert (alpha is not None) == has_alpha
    for at, expected in (((1, 1), left), ((6, 1), right)):
        assert np.abs(np.array(image.getpixel(at)) - expected).max() <= 6, (kind, at, image.getpixel(at))


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    assert scan_dataset(section(tmp_path)).items[0].size == (40, 20)  # (height, width) as displayed
    upright, _ = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = np.array(upright.getpixel((10, 5))), np.array(upright.getpixel((10, 35)))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


# ----- masks ---------------------------------------------------------------------------------------------------


def _interior(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[..., 2:-2, 2:-2]


def test_mask_file_follows_resize_crop_and_flip(tmp_path: Path):
    ramp = gradient(120, 60)
    pixels = np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], axis=-1)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(ramp).save(tmp_path / "a_mask.png")
    save(tmp_path / "plain.png", (64, 64))
    config = section(tmp_path, masked_loss=True, crop="random", flip=True)
    dataset = ImageDataset(scan_dataset(config).items, config, seed=3)
    index = next(i for i in range(len(dataset)) if dataset.items[dataset.item_index(i)].path.name == "a.png")
    seen_flips = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[index]
        seen_flips.add(dataset.plan(index).flip)
        assert sample["mask"].shape == (1, 48, 80) and sample["pixels"].shape == (3, 48, 80)
        expected = (sample["pixels"][0:1] + 1) / 2  # red channel carries the same ramp as the mask
        assert torch.allclose(_interior(sample["mask"]), _interior(expected), atol=0.03)
    assert seen_flips == {False, True}
    plain = next(i for i in range(len(dataset)) if dataset.items[dataset.item_index(i)].path.name == "plain.png")
    assert torch.equal(dataset[plain]["mask"], torch.ones(1, 64, 64))  # no mask: everything trains


def test_alpha_mask_and_mask_file_precedence(tmp_path: Path):
    ramp = gradient(96, 48)
    rgba = np.stack([np.full_like(ramp, 255), np.zeros_like(ramp), np.zeros_like(ramp), ramp], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(rgba).save(tmp_path / "both.png")
    save(tmp_path / "both_mask.png", (96, 48), 0, "L")
    config = section(tmp_path, masked_loss=True)
    dataset = ImageDataset(scan_dataset(config).items, config, seed=0)
    samples = {dataset.items[dataset.item_index(i)].path.name: dataset[i] for i in range(len(dataset))}
    alpha = samples["alpha.png"]
    # composited on white: green = 255·(1 − alpha), so the mask (alpha) = 1 − green
    assert torch.allclose(_interior(alpha["mask"]), _interior(1 - (alpha["pixels"][1:2] + 1) / 2), atol=0.03)
    assert samples["both.png"]["mask"].max() == 0  # the _mask.png file wins over the alpha channel
    LatentCache("memory", vae_id="v").encode_all(dataset, CountingEncoder())
    for i in range(len(dataset)):  # with cached latents the masks are still there, identical
        name = dataset.items[dataset.item_index(i)].path.name
        assert dataset[i]["latents"] is not None and torch.equal(dataset[i]["mask"], samples[name]["mask"])
    config = section(tmp_path, masked_loss=False)
    assert ImageDataset(scan_dataset(config).items, config, seed=0)[0]["mask"] is None


# ----- buckets and crops ---------------------------------------------------------------------------------------


def test_make_buckets_matches_kohya():
    assert make_buckets(512, 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]
    buckets = make_buckets(1024, 512, 2048, 64)
    assert (1024, 1024) in buckets and all(w * h <= 1024 * 1024 and w % 64 == 0 == h % 64 for w, h in buckets)
    assert min(min(b) for b in buckets) >= 512 and max(max(b) for b in buckets) <= 2048
    with pytest.raises(ValueError, match="multiple of 8"):
        make_buckets(512, 256, 1024, 12)


@pytest.mark.parametrize(("size", "bucket"), [
    ((1000, 1000), (512, 512)),
    ((500, 1000), (704, 320)),  # 2:1 landscape
    ((1000, 500), (320, 704)),  # and its portrait twin
    ((1024, 1536), (640, 384)),  # 3:2
    ((1080, 1920), (640, 384)),  # 16:9
    ((768, 1024), (576, 448)),  # 4:3
    ((1000, 4000), (1024, 256)),  # extreme panorama → widest bucket
    ((4000, 1000), (256, 1024)),
])
def test_bucket_assignment(size, bucket):
    buckets = make_buckets(512, 256, 1024, 64)
    assert buckets[assign_bucket(size, buckets)] == bucket
    assert buckets[assign_bucket(size[::-1], buckets)] == bucket[::-1]  # symmetric under rotation


def test_crop_coordinates_and_conditioning(tmp_path: Path):
    ramp = gradient(100, 50)
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "wide.png")  # 100×50 → bucket (80, 48)
    center = section(tmp_path)
    dataset = ImageDataset(scan_dataset(center).items, center, seed=0)
    assert cover_size((50, 100), (80, 48)) == (96, 48)
    sample = dataset[0]
    assert sample["pixels"].shape == (3, 48, 80)
    assert sample["original_size"] == (50, 100) and sample["target_size"] == (48, 80)
    assert sample["crop_top_left"] == (0, 8)  # (96 − 80) / 2
    assert -1.0 <= sample["pixels"].min() and sample["pixels"].max() <= 1.0

    random_crop = section(tmp_path, crop="random", flip=True)
    dataset = ImageDataset(scan_dataset(random_crop).items, random_crop, seed=0)
    lefts = set()
    for epoch in range(12):
        plan = dataset.plan(0, epoch)
        assert 0 <= plan.left <= 16 and plan.top == 0 and plan == dataset.plan(0, epoch)
        top, left = plan.crop_top_left
        assert left == (16 - plan.left if plan.flip else plan.left)  # as seen by the model, after mirroring
        lefts.add(plan.left)
        dataset.set_epoch(epoch)
        image, _ = load_image(tmp_path / "wide.png")
        expected = np.asarray(render(image, plan)).astype(np.float32) / 127.5 - 1
        assert torch.allclose(dataset[0]["pixels"], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    assert len(lefts) > 3

    no_buckets = section(tmp_path, enable_buckets=False)
    sample = ImageDataset(scan_dataset(no_buckets).items, no_buckets, seed=0)[0]
    assert sample["pixels"].shape == (3, 64, 64) and sample["crop_top_left"] == (0, 32)
    assert sample["target_size"] == (64, 64)


def test_bucket_info(concept_folder: Path):
    config = section(concept_folder)
    dataset = ImageDataset(scan_dataset(config).items, config, seed=0)
    info = dataset.bucket_info()
    by_resolution = {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()}
    assert by_resolution == {(80, 48): 10, (48, 80): 10, (64, 64): 7}  # repeats counted, like kohya
    assert all(dataset.buckets[i] == tuple(b["resolution"]) for i, b in info["buckets"].items())
    assert info["mean_img_ar_error"] == pytest.approx((abs(80 / 48 - 2) + abs(48 / 80 - 0.5)) / 5)


# ----- captions ------------------------------------------------------------------------------------------------


def test_process_caption_trigger_shuffle_keep_tokens_dropout():
    rng = random.Random(0)
    assert process_caption("a, b", rng, trigger_word="ohwx") == "ohwx, a, b"
    assert process_caption("ohwx, a, b", rng, trigger_word="ohwx") == "ohwx, a, b"
    assert process_caption("a, ohwx, b", rng, trigger_word="ohwx") == "ohwx, a, b"
    assert process_caption("a photo of ohwx man", rng, trigger_word="ohwx") == "a photo of ohwx man"
    assert process_caption("a photo of ohwxman", rng, trigger_word="ohwx") == "ohwx, a photo of ohwxman"
    assert process_caption("", rng, trigger_word="ohwx") == "ohwx"
    assert process_caption("a, b", rng) == "a, b"

    tags = [f"t{i}" for i in range(12)]
    caption = ", ".join(tags)
    shuffled = [process_caption(caption, random.Random(s), shuffle=True, keep_tokens=2) for s in range(20)]
    assert all(s.split(", ")[:2] == ["t0", "t1"] and sorted(s.split(", ")) == sorted(tags) for s in shuffled)
    assert len(set(shuffled)) > 10
    assert shuffled[5] == process_caption(caption, random.Random(5), shuffle=True, keep_tokens=2)
    # the trigger counts as the first kept tag (kohya's "ohwx, ..." with keep_tokens = 1)
    with_trigger = process_caption(caption, random.Random(1), trigger_word="ohwx", shuffle=True, keep_tokens=1)
    assert with_trigger.startswith("ohwx, ") and with_trigger.count("ohwx") == 1
    with_trigger = process_caption(caption, random.Random(1), trigger_word="ohwx", shuffle=True, keep_tokens=2)
    assert with_trigger.startswith("ohwx, t0, ")

    drops = [process_caption("ohwx, a", random.Random(s), trigger_word="ohwx", dropout=0.3) for s in range(1000)]
    assert 240 < drops.count("") < 360 and set(drops) == {"", "ohwx, a"}


def test_dataset_captions_are_reproducible_per_seed_epoch_index(tmp_path: Path):
    save(tmp_path / "4_x" / "a.png")
    (tmp_path / "4_x" / "a.txt").write_text("t0, t1, t2, t3, t4, t5, t6", encoding="utf-8")
    config = section(tmp_path, trigger_word="ohwx", shuffle_caption=True, keep_tokens=1, caption_dropout=0.2)
    items = scan_dataset(config).items
    one, two = ImageDataset(items, config, seed=11), ImageDataset(items, config, seed=11)
    grid = [[one.caption(i, epoch) for i in range(4)] for epoch in range(5)]
    assert grid == [[two.caption(i, epoch) for i in range(4)] for epoch in range(5)]
    assert len({c for row in grid for c in row}) > 5  # varies over repeats and epochs
    assert all(c == "" or c.startswith("ohwx, ") for row in grid for c in row)
    two.set_epoch(3)
    assert [two[i]["caption"] for i in range(4)] == grid[3]
    assert grid != [[ImageDataset(items, config, seed=12).caption(i, e) for i in range(4)] for e in range(5)]
    validation = ImageDataset(items, config, seed=11, augment=False)
    assert len(validation) == 1 and validation.caption(0, 4) == "ohwx, t0, t1, t2, t3, t4, t5, t6"


# ----- batches -------------------------------------------------------------------------------------------------


@pytest.fixture
def bucketed(tmp_path: Path) -> tuple[ImageDataset, DatasetSection]:
    for i, size in enumerate([(100, 50), (100, 50), (50, 100), (64, 64), (64, 64), (64, 64), (120, 40)]):
        save(tmp_path / "3_x" / f"{i}.png", size, (i * 30, 0, 0))
        (tmp_path / "3_x" / f"{i}.txt").write_text(f"img{i}, a, b, c", encoding="utf-8")
    config = section(tmp_path, shuffle_caption=True, flip=True, caption_dropout=0.1)
    return ImageDataset(scan_dataset(config).items, config, seed=5), config


def test_sampler_whole_batches_determinism_and_resume(bucketed):
    dataset, config = bucketed
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=1)
    assert len(sampler) == 2 + 1 + 3 + 1  # samples per bucket 6, 3, 9, 3 → ceil(n / 4)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler)
    for batch in epoch0:
        assert len(batch) == 4 and len({dataset.sample_bucket(i) for i in batch}) == 1
    assert set().union(*epoch0) == set(range(len(dataset)))  # every sample, partial batches filled
    assert epoch0 == list(BucketBatchSampler(dataset, 4, seed=1))
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and epoch1 == sampler.batches(1)

    sampler.resume(1, 3)
    assert list(sampler) == epoch1[3:]
    assert list(sampler) == epoch1  # the skip applies once

    dropping = BucketBatchSampler(dataset, 4, seed=1, drop_last=True)
    assert len(dropping) == 1 + 0 + 2 + 0 and all(len(b) == 4 for b in dropping)
    with pytest.raises(ValueError, match="larger than every bucket"):
        BucketBatchSampler(dataset, 10, seed=1, drop_last=True)


def test_sampler_is_lazy_in_the_number_of_samples(tmp_path: Path):
    """10⁹ repeats: nothing is built per sample, yet every batch is whole, from one bucket, and resumable."""
    import time

    for i in range(3):
        save(tmp_path / "1000000000_x" / f"{i}.png", (64, 64), (i * 80, 0, 0))
    save(tmp_path / "2_y" / "wide.png", (128, 48))
    config = section(tmp_path)
    started = time.perf_counter()
    dataset = ImageDataset(scan_dataset(config).items, config, seed=0)
    sampler = BucketBatchSampler(dataset, 4, seed=3)
    assert len(dataset) == 3 * 10**9 + 2 and len(sampler) == 3 * 10**9 // 4 + 1
    sampler.resume(7, len(sampler) - 3)
    tail = list(sampler)
    assert len(tail) == 3 and all(len(batch) == 4 for batch in tail)
    assert all(len({dataset.sample_bucket(i) for i in batch}) == 1 for batch in tail)
    first = [dataset.item_index(i) for position in range(300) for i in sampler.batch(7, position)]
    counts = [first.count(item) for item in range(4)]
    assert min(counts[:3]) > 300  # the three images of the big folder are drawn about equally (1200 draws)
    assert time.perf_counter() - started < 5
    assert sampler.batch(7, 5) == BucketBatchSampler(dataset, 4, seed=3).batch(7, 5)  # keyed: reproducible
    big = sampler.groups[dataset.item_buckets[0]]  # per bucket: its samples in order, as a lazy view
    assert len(big) == 3 * 10**9 and big[0] == 0 and big[-1] == 3 * 10**9 - 1 and big[10**9] == 10**9


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_yields_the_uninterrupted_batches(bucketed, workers: int):
    dataset, config = bucketed

    def batches(resume_at: int | None) -> list[tuple]:
        fresh = ImageDataset(dataset.items, config, seed=5)
        sampler = BucketBatchSampler(fresh, 2, seed=9)
        if resume_at is None:
            sampler.set_epoch(2)
        else:
            sampler.resume(2, resume_at)
        out = []
        for batch in make_dataloader(fresh, sampler, num_workers=workers):
            assert batch["captions"] == [fresh.caption(i, 2) for i in batch["indices"]]  # the workers know the epoch
            out.append((batch["indices"], batch["captions"], batch["crop_top_lefts"].tolist(),
                        batch["pixels"].sum().item()))
        return out

    full = batches(None)
    assert batches(4) == full[4:]


def test_accelerate_sharding_keeps_batches_whole(bucketed):
    from accelerate import Accelerator
    from accelerate.data_loader import BatchSamplerShard, prepare_data_loader

    dataset, _ = bucketed
    sampler = BucketBatchSampler(dataset, 4, seed=2)
    sampler.set_epoch(1)
    everything = sampler.batches(1)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-len(everything) // 2)
    for shard in shards:
        for batch in shard:
            assert batch in everything  # whole batches, never stitched across buckets
    assert {tuple(b) for b in everything} == {tuple(b) for shard in shards for b in shard}

    loader = prepare_data_loader(make_dataloader(dataset, sampler), num_processes=2, process_index=1,
                                 put_on_device=False)
    loader.set_epoch(3)  # reaches the wrapped sampler and the dataset through accelerate's BatchSamplerShard
    assert sampler.epoch == 3 and dataset.epoch == 3
    first = next(iter(loader))
    assert first["pixels"].shape[0] == 4 and first["indices"] == sampler.batches(3)[1]

    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(make_dataloader(dataset, BucketBatchSampler(dataset, 4, seed=2)))
    prepared.set_epoch(0)
    seen = [batch["indices"] for batch in prepared]
    assert seen == BucketBatchSampler(dataset, 4, seed=2).batches(0)
    # resume: set the epoch on the prepared loader (accelerate re-sets it on every iteration), skip on the sampler
    prepared.batch_sampler.resume(2, 3)
    prepared.set_epoch(2)
    assert [batch["indices"] for batch in prepared] == BucketBatchSampler(dataset, 4, seed=2).batches(2)[3:]


def test_collate_batch_fields(bucketed):
    dataset, _ = bucketed
    sampler = BucketBatchSampler(dataset, 3, seed=0)
    batch = collate_batch([dataset[i] for i in next(iter(sampler))])
    height, width = batch["target_sizes"][0].tolist()
    assert batch["pixels"].shape == (3, 3, height, width) and batch["latents"] is None and batch["masks"] is None
    assert batch["loss_weights"].tolist() == [1.0, 1.0, 1.0] and len(batch["captions"]) == 3
    assert batch["original_sizes"].shape == batch["crop_top_lefts"].shape == (3, 2)
    assert batch["cache_keys"] == [None] * 3 and len(batch["indices"]) == 3


# ----- latent cache --------------------------------------------------------------------------------------------


class CountingEncoder:
    """Stand-in VAE: 8× average pooling; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8)


def test_memory_cache_encodes_each_item_and_flip_once(bucketed):
    dataset, config = bucketed
    cache = LatentCache("memory", vae_id="vae-a")
    encoder = CountingEncoder()
    progress = []
    report = cache.encode_all(dataset, encoder, progress=lambda done, total: progress.append((done, total)),
                              batch_size=2)
    assert report.active and report.total == report.encoded == 2 * dataset.num_images and report.reused == 0
    assert encoder.images == 14 and progress[-1] == (14, 14)

    reference = ImageDataset(dataset.items, config, seed=5)  # same plans, no cache: pixels
    sampler = BucketBatchSampler(dataset, 2, seed=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        for batch in make_dataloader(dataset, sampler):
            assert batch["pixels"] is None and all(batch["cache_keys"])
            expected = encoder(torch.stack([reference[i]["pixels"] for i in batch["indices"]]))
            encoder.images -= len(batch["indices"])
            assert torch.allclose(batch["latents"], expected, atol=1e-6)
    assert encoder.images == 14  # the second epoch never encodes
    again = cache.encode_all(dataset, encoder)
    assert again.encoded == 0 and again.reused == 14 and encoder.images == 14


def test_disk_cache_is_reused_by_a_new_cache_object(bucketed, tmp_path: Path):
    dataset, config = bucketed
    folder = tmp_path / "latents"
    encoder = CountingEncoder()
    LatentCache("disk", folder, vae_id="vae-a").encode_all(dataset, encoder)
    files = list(folder.rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 14
    assert not [f for f in files if f.name.endswith(".tmp")]

    reopened = LatentCache("disk", folder, vae_id="vae-a")
    report = reopened.encode_all(ImageDataset(dataset.items, config, seed=5), encoder)
    assert report.active and report.encoded == 0 and report.reused == 14 and encoder.images == 14
    assert len(reopened) == 14

    fresh = ImageDataset(dataset.items, config, seed=5)
    LatentCache("disk", folder, vae_id="vae-b").encode_all(fresh, encoder)  # another VAE: everything again
    assert encoder.images == 28
    sample = fresh[0]
    assert sample["pixels"] is None and sample["latents"].shape[0] == 3

    with pytest.raises(ValueError, match="folder"):
        LatentCache("disk", None)


def test_latent_cache_keys_change_with_every_input():
    cache = LatentCache("memory", vae_id="vae-a")
    base = dict(sha256="ab" * 32, bucket=(512, 512), resized=(512, 768), crop_left_top=(0, 128), flip=False)
    key = cache.key(**base)
    assert key == LatentCache("off", vae_id="vae-a").key(**base)
    variants = [
        {**base, "sha256": "cd" * 32},
        {**base, "bucket": (448, 576), "resized": (448, 672)},
        {**base, "resized": (512, 770)},
        {**base, "crop_left_top": (0, 120)},
        {**base, "flip": True},
    ]
    keys = {cache.key(**v) for v in variants} | {LatentCache("memory", vae_id="vae-b").key(**base)}
    assert key not in keys and len(keys) == 6


def test_random_crop_and_off_mode_are_not_cached(tmp_path: Path):
    save(tmp_path / "a.png", (100, 50))
    config = section(tmp_path, crop="random")
    dataset = ImageDataset(scan_dataset(config).items, config, seed=0)
    encoder = CountingEncoder()
    report = LatentCache("memory", vae_id="v").encode_all(dataset, encoder)
    assert not report.active and "random" in report.reason and encoder.images == 0
    assert dataset[0]["pixels"] is not None and dataset[0]["latents"] is None
    validation = ImageDataset(dataset.items, config, seed=0, augment=False)  # center crop: cacheable
    assert LatentCache("memory", vae_id="v").encode_all(validation, encoder).active
    off = LatentCache("off").encode_all(dataset, encoder)
    assert not off.active and "off" in off.reason


# ----- text-embedding cache ------------------------------------------------------------------------------------


def test_text_embedding_cache_is_lazy_per_distinct_caption():
    calls: list[list[str]] = []

    def encode(captions: list[str]):
        calls.append(list(captions))
        embeds = torch.stack([torch.full((3, 4), float(len(c))) for c in captions])
        return embeds, embeds[:, 0, :2] + 1

    cache = TextEmbeddingCache("sdxl-base", clip_skip=2, max_entries=3)
    embeds, pooled = cache(["a", "bb", "a"], encode)
    assert calls == [["a", "bb"]] and embeds.shape == (3, 3, 4) and pooled.shape == (3, 2)
    assert embeds[:, 0, 0].tolist() == [1.0, 2.0, 1.0] and pooled[:, 0].tolist() == [2.0, 3.0, 2.0]
    cache(["bb", "ccc"], encode)
    assert calls[-1] == ["ccc"] and cache.hits == 1 and cache.misses == 3
    cache(["dddd"], encode)  # LRU bound 3: "a" (least recently used) is evicted
    assert "a" not in cache and "bb" in cache and len(cache) == 3
    assert cache.key("x") != TextEmbeddingCache("sdxl-base", clip_skip=1).key("x")
    assert cache.key("x") != TextEmbeddingCache("sd15", clip_skip=2).key("x")
    single = TextEmbeddingCache("sd15")(["", "x"], lambda captions: torch.zeros(len(captions), 77, 8))
    assert single.shape == (2, 77, 8)
