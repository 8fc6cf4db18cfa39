"""sd-scripts' caption and data options: tag dropout, caption dropout every N epochs, prefix/suffix, long prompts
(max_token_length 150/225, encoded in chunks exactly as sd-scripts does for SD1/SD2/SDXL), weighted captions,
several subsets in one run, bucket_no_upscale and color_aug."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import build_model, make_config, of_kind, run, smooth_image, write_images

from methods.base import ConfigError
from trainer.conditioning import encode_captions, parse_prompt_attention
from trainer.config import DatasetSection, SubsetSection, TrainerConfig
from trainer.dataset import ImageDataset, load_datasets, no_upscale_bucket, process_caption, scan_dataset

LONG = ", ".join(["a large red circle on a white background", "a small blue square on a black background",
                  "a green triangle painting style"] * 6)  # ~100 tokens: two chunks of 75


# ==================================================================================================== captions
def test_tag_dropout_keeps_keep_tokens_and_the_trigger():
    caption = "one, two, three, four, five, six"
    kept = [process_caption(caption, random.Random(i), trigger_word="zq", keep_tokens=3, tag_dropout=0.9)
            for i in range(200)]
    assert all(text.startswith("zq, one, two") for text in kept)  # trigger + keep_tokens − 1 tags stay in front
    counts = {tag: sum(tag in text.split(", ") for text in kept) for tag in ("three", "four", "five", "six")}
    assert all(5 <= count <= 40 for count in counts.values()), counts  # ≈ 10% survive
    shuffled = {process_caption(caption, random.Random(i), keep_tokens=1, shuffle=True, tag_dropout=0.3)
                for i in range(50)}
    assert len(shuffled) > 10 and all(text.startswith("one") for text in shuffled)
    assert process_caption(caption, random.Random(0)) == caption  # off: untouched


def test_prefix_suffix_and_epoch_dropout():
    rng = random.Random(0)
    assert process_caption("a cat", rng, prefix="photo of", suffix="4k") == "photo of a cat 4k"
    assert process_caption("a cat", rng, prefix="zq,", shuffle=True, keep_tokens=1) == "zq, a cat"
    assert process_caption("a cat", rng, trigger_word="zq", drop=True) == ""


def test_caption_dropout_every_n_epochs(tmp_path):
    write_images(tmp_path / "1_zq", 2, caption="a photo of zq")
    section = DatasetSection(dir=str(tmp_path), resolution=16, min_bucket_side=8, max_bucket_side=64, bucket_step=8,
                             caption_dropout_every_n_epochs=3, caption_prefix="nice")
    dataset, _, _ = load_datasets(section, seed=0)
    captions = [dataset.caption(0, epoch) for epoch in range(6)]
    assert captions == ["nice a photo of zq"] * 2 + [""] + ["nice a photo of zq"] * 2 + [""]  # epochs 3, 6 (from 1)


# ==================================================================================================== long prompts
def kohya_input_ids(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """sd-scripts ``TokenizeStrategy._get_input_ids`` (library/strategy_base.py), unweighted, as the oracle."""
    input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt").input_ids
    if max_length <= tokenizer.model_max_length:
        return input_ids
    input_ids = input_ids.squeeze(0)
    chunks = []
    for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
        chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i:i + tokenizer.model_max_length - 2],
                           input_ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                chunk[-1] = tokenizer.eos_token_id
            if chunk[1] == tokenizer.pad_token_id:
                chunk[1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return torch.stack(chunks)


def kohya_join(hidden: torch.Tensor, batch: int, max_token_length: int, model_max_length: int = 77):
    """sd-scripts ``SdTextEncodingStrategy.encode_tokens`` / ``SdxlTextEncodingStrategy._get_hidden_states_sdxl``
    reassembly (the v2 branch's fix-up never fires: it compares ids with a string)."""
    hidden = hidden.reshape((batch, -1, hidden.shape[-1]))
    states = [hidden[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, model_max_length):
        states.append(hidden[:, i:i + model_max_length - 2])
    states.append(hidden[:, -1].unsqueeze(1))
    return torch.cat(states, dim=1)


def kohya_encode(pipe, captions: list[str], max_token_length: int, sdxl: bool, clip_skip: int = 1):
    length = max_token_length + 2
    pairs = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    outputs, pooled = [], None
    for tokenizer, encoder in pairs:
        ids = torch.stack([kohya_input_ids(tokenizer, caption, length) for caption in captions])  # b, n, 77
        chunks = ids.shape[1]
        flat = ids.reshape(-1, 77)
        if sdxl:
            out = encoder(flat, output_hidden_states=True)
            hidden = out.hidden_states[-2]
            if encoder is pipe.text_encoder_2:
                pooled = out[0][::chunks]
        elif clip_skip == 1:
            hidden = encoder(flat)[0]
        else:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(encoder(flat, output_hidden_states=True)
                                                         .hidden_states[-clip_skip])
        outputs.append(kohya_join(hidden, len(captions), chunks * 77))
    return torch.cat(outputs, dim=-1), pooled


@pytest.mark.parametrize(("arch", "max_token_length", "pad"), [("sd1", 150, None), ("sd2", 225, "a"),
                                                                ("sdxl", 150, "a"), ("sd1", 225, None)])
def test_long_prompts_are_encoded_in_chunks_as_sd_scripts_does(arch, max_token_length, pad, tiny_pipeline):
    pipe = tiny_pipeline(arch)
    if pad is not None:  # SD2 and SDXL's second tokenizer pad with a token that is not EOS
        tokenizer = pipe.tokenizer_2 if arch == "sdxl" else pipe.tokenizer
        tokenizer.pad_token = pad
        assert tokenizer.pad_token_id != tokenizer.eos_token_id
    captions = [LONG, "a small zq square"]
    assert len(pipe.tokenizer(LONG).input_ids) > 77
    with torch.no_grad():
        ours = encode_captions(pipe, captions, is_sdxl=arch == "sdxl", max_token_length=max_token_length)
        expected, pooled = kohya_encode(pipe, captions, max_token_length, arch == "sdxl")
    assert ours.hidden_states.shape[1] == max_token_length + 2
    assert torch.allclose(ours.hidden_states, expected, atol=1e-6)
    if arch == "sdxl":
        assert torch.allclose(ours.pooled, pooled, atol=1e-6)
    with torch.no_grad():  # the first 75 tokens read the same as without chunks, the rest is not cut off
        short = encode_captions(pipe, [LONG], is_sdxl=arch == "sdxl").hidden_states
    assert torch.allclose(ours.hidden_states[0, :76], short[0, :76], atol=1e-6)


def test_long_prompts_with_clip_skip(tiny_pipeline):
    pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        ours = encode_captions(pipe, [LONG], clip_skip=2, max_token_length=150).hidden_states
        expected, _ = kohya_encode(pipe, [LONG], 150, False, clip_skip=2)
    assert torch.allclose(ours, expected, atol=1e-6)


# ==================================================================================================== weighted captions
def test_attention_syntax_as_sd_scripts_parses_it():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    parsed = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [text for text, _ in parsed] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [weight for _, weight in parsed] == pytest.approx([1.0, 1.573, 1.1, 1.0, 1.1, 0.55, 1.1, 1.4641, 1.1])


@pytest.mark.parametrize(("arch", "max_token_length"), [("sd1", 75), ("sdxl", 75), ("sd1", 150)])
def test_weighted_captions_scale_the_weighted_tokens(arch, max_token_length, tiny_pipeline):
    pipe = tiny_pipeline(arch)
    sdxl = arch == "sdxl"
    with torch.no_grad():
        plain = encode_captions(pipe, ["a red circle"], is_sdxl=sdxl, max_token_length=max_token_length)
        same = encode_captions(pipe, ["a red circle"], is_sdxl=sdxl, max_token_length=max_token_length,
                               weighted=True)
        weighted = encode_captions(pipe, ["a (red:1.5) circle"], is_sdxl=sdxl, max_token_length=max_token_length,
                                   weighted=True)
    assert torch.allclose(plain.hidden_states, same.hidden_states, atol=1e-6)  # no brackets: no change
    ratio = weighted.hidden_states[0] / plain.hidden_states[0]
    # BOS a red circle EOS: the hidden state of "red" (position 2) is scaled by 1.5, the others are not
    assert torch.allclose(ratio[2], torch.full_like(ratio[2], 1.5), atol=1e-4)
    assert torch.allclose(ratio[[0, 1, 3, 4]], torch.ones_like(ratio[[0, 1, 3, 4]]), atol=1e-4)


# ==================================================================================================== subsets
@pytest.fixture
def subset_folders(tmp_path):
    concept = tmp_path / "zq_images"
    write_images(concept, 3, caption="a photo of zq")
    style = tmp_path / "style"
    write_images(style, 2, caption=None, seed=1, size=(32, 32))
    reg = tmp_path / "reg"
    write_images(reg, 2, caption="a photo", seed=2)
    return concept, style, reg


def subset_config(concept: Path, style: Path, reg: Path) -> dict:
    return {"resolution": 16, "min_bucket_side": 8, "max_bucket_side": 64, "bucket_step": 8, "trigger_word": "zq",
            "subsets": [{"image_dir": str(concept), "num_repeats": 3, "flip": True, "caption_prefix": "photo,"},
                        {"image_dir": str(style), "num_repeats": 1, "resolution": 32, "class_tokens": "zq style",
                         "trigger_word": "", "shuffle_caption": True},
                        {"image_dir": str(reg), "is_reg": True, "trigger_word": ""}]}


def test_subsets_have_their_own_folder_repeats_resolution_captions_flip_and_reg_flag(subset_folders):
    concept, style, reg = subset_folders
    section = TrainerConfig.from_dict({"dataset": subset_config(concept, style, reg)}).dataset
    scan = scan_dataset(section, seed=0)
    assert scan.subset_images == [3, 2, 2]
    assert scan.dataset_dirs == {"zq_images": {"n_repeats": 3, "img_count": 3}, "style": {"n_repeats": 1,
                                                                                          "img_count": 2}}
    assert scan.num_train_images == 11 and sum(i.n_repeats for i in scan.reg_items) == 11  # reg balanced
    dataset = ImageDataset(scan.items, section, seed=0)
    by_subset = {}
    for index in range(len(dataset)):
        item = dataset.items[dataset.item_index(index)]
        by_subset.setdefault(item.subset, []).append((dataset.plan(index), dataset.caption(index)))
    assert {plan.bucket for plan, _ in by_subset[0]} == {(16, 16)} and {c for _, c in by_subset[0]} == {
        "photo, a photo of zq"}  # the prefix first; the trigger is already in the prose
    assert any(plan.flip for plan, _ in by_subset[0]) and not any(plan.flip for plan, _ in by_subset[1])
    assert {plan.bucket for plan, _ in by_subset[1]} == {(32, 32)}  # its own resolution
    assert {c for _, c in by_subset[1]} == {"zq style"}  # class_tokens for images without captions, no trigger
    assert {c for _, c in by_subset[2]} == {"a photo"}
    assert all(item.loss_weight == 1.0 and item.is_reg for item in scan.reg_items)


def test_subsets_config_round_trips_and_names_mistakes(subset_folders, tmp_path):
    concept, style, reg = subset_folders
    config = TrainerConfig.from_dict({"dataset": subset_config(concept, style, reg)})
    text = config.to_toml()
    assert text.count("[[dataset.subsets]]") == 3
    assert TrainerConfig.from_dict(__import__("tomllib").loads(text)).dataset.subsets == config.dataset.subsets
    from ui import form

    values = form.config_to_values(config)
    assert "[[subsets]]" in values["dataset.subsets"]
    assert form.values_to_config(values).dataset.subsets == config.dataset.subsets
    mistakes = [({"subsets": [{"image_dir": "x", "repeats": 2}]}, "unknown key"),
                ({"subsets": [{"image_dir": ""}]}, "image_dir is empty"),
                ({"subsets": [{"image_dir": "x", "is_reg": True}]}, "training images"),
                ({"subsets": [{"image_dir": "x"}], "reg_dir": "r"}, "is_reg = true"),
                ({"subsets": [{"image_dir": "x", "resolution": 20}]}, "multiple of 8"),
                ({"bucket_no_upscale": True, "enable_buckets": False}, "enable_buckets"),
                ({"max_token_length": 100}, "75, 150")]
    for dataset, message in mistakes:
        with pytest.raises(ConfigError, match=message):
            TrainerConfig.from_dict({"dataset": dataset})
    nested = tmp_path / "nested"
    write_images(nested / "10_a", 1)
    with pytest.raises(ValueError, match="its own subset"):
        scan_dataset(DatasetSection(subsets=[SubsetSection(image_dir=str(nested))]))


# ==================================================================================================== buckets, colour
def test_bucket_no_upscale_never_enlarges():
    assert no_upscale_bucket((24, 40), 64, 8) == ((40, 24), (40, 24))  # small: its own size
    assert no_upscale_bucket((27, 45), 64, 8) == ((40, 24), (45, 27))  # rounded down: cropped, not enlarged
    assert no_upscale_bucket((100, 200), 64, 8) == ((80, 40), (80, 40))  # large: shrunk to the area, ratio kept
    for size in ((33, 90), (500, 120), (64, 64), (70, 66)):
        bucket, resized = no_upscale_bucket(size, 64, 8)
        assert bucket[0] * bucket[1] <= 64 * 64 and bucket[0] <= resized[0] and bucket[1] <= resized[1]
        assert resized[0] <= size[1] and resized[1] <= size[0]


def test_bucket_no_upscale_in_a_dataset(tmp_path):
    folder = tmp_path / "1_zq"
    folder.mkdir()
    smooth_image((40, 24), 0).save(folder / "small.png")
    smooth_image((16, 16), 1).save(folder / "tiny.png")
    section = DatasetSection(dir=str(tmp_path), resolution=64, min_bucket_side=8, max_bucket_side=128,
                             bucket_step=8, bucket_no_upscale=True)
    dataset, _, _ = load_datasets(section, seed=0)
    assert sorted(dataset.plan(i).bucket for i in range(len(dataset))) == [(16, 16), (40, 24)]
    assert sorted(dataset.plan(i).resized for i in range(len(dataset))) == [(16, 16), (40, 24)]


def test_color_aug_is_keyed_per_sample_and_stops_latent_caching(tmp_path):
    write_images(tmp_path / "20_zq", 1)
    section = DatasetSection(dir=str(tmp_path), resolution=16, min_bucket_side=8, max_bucket_side=64, bucket_step=8,
                             color_aug=True)
    dataset, _, _ = load_datasets(section, seed=0)
    plain, _, _ = load_datasets(DatasetSection(**{**section.__dict__, "color_aug": False}), seed=0)
    changed = [not torch.equal(dataset[i]["pixels"], plain[i]["pixels"]) for i in range(len(dataset))]
    assert 2 <= sum(changed) <= 14  # a third of the samples (20 repeats)
    assert all(torch.equal(dataset[i]["pixels"], dataset[i]["pixels"]) for i in range(3))  # same draw again
    assert "color_aug" in dataset.cache_blocker()


# ==================================================================================================== a run
def test_a_run_with_subsets_long_weighted_captions_and_data_options(tmp_path, tokenizer_dir, subset_folders):
    concept, style, reg = subset_folders
    model = build_model(tmp_path / "model", "sd1", tokenizer_dir)
    (concept / "000.txt").write_text("a (photo:1.3) of zq, " + LONG)
    dataset = {**subset_config(concept, style, reg), "max_token_length": 150, "weighted_captions": True,
               "caption_tag_dropout_rate": 0.2, "caption_dropout_every_n_epochs": 2, "color_aug": True,
               "bucket_no_upscale": True}
    config = make_config(model["folder"], tmp_path / "unused", tmp_path / "out", dataset=dataset,
                         train={"max_steps": 3, "batch_size": 2})
    result, events = run(config)
    assert len(result.losses) == 3
    assert any("color_aug" in e["message"] for e in of_kind(events, "warning"))  # latents are not cached
    with safe_open(str(result.output_file), "pt") as handle:
        metadata = handle.metadata()
    datasets = json.loads(metadata["ss_datasets"])
    assert [s["image_dir"] for s in datasets[0]["subsets"]] == ["zq_images", "style", "reg"]
    assert [s["num_repeats"] for s in datasets[0]["subsets"]] == [3, 1, 1]
    assert datasets[0]["subsets"][2]["is_reg"] is True and datasets[0]["subsets"][1]["class_tokens"] == "zq style"
    expected = {"ss_max_token_length": "150", "ss_caption_tag_dropout_rate": "0.2",
                "ss_caption_dropout_every_n_epochs": "2", "ss_color_aug": "True", "ss_bucket_no_upscale": "True"}
    assert {k: metadata[k] for k in expected} == expected
