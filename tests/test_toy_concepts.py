"""The toy model's held-out concepts (trainer/toy.py ``CONCEPTS``): drawings, datasets, triggers and pixel scores.

Each concept's score must say 1 on the concept's own drawings and 0 on the pretraining kind of drawing, keep saying
so through the toy VAE (an adapter can only draw what the VAE decodes), and the classifier must still name the
shape on the concept's drawings (the "trigger subject kept" metric rests on it).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import toy

MODEL = Path(__file__).resolve().parents[1] / "presets" / "toy" / "model"
NEW = ["orange", "checkered", "hollow"]
# Measured through the committed toy VAE on 24 drawings each (see test_scores_survive_the_toy_vae): score
# purple 1.0, orange 0.96, checkered 1.0, hollow 1.0; shape named right 0.96, 0.88, 0.71, 0.92 — the VAE rounds
# small squares' corners on a checker, which caps "trigger subject kept" for that concept.
MIN_SCORE_THROUGH_VAE = {"purple": 0.9, "orange": 0.9, "checkered": 0.9, "hollow": 0.9}
MIN_SHAPE_THROUGH_VAE = {"purple": 0.9, "orange": 0.8, "checkered": 0.6, "hollow": 0.8}


def concept_drawings(concept: toy.Concept, count: int, seed: int = 3) -> list[tuple[toy.Image.Image, toy.Drawing]]:
    rng = random.Random(seed)
    drawings = [concept.drawing(rng, index) for index in range(count)]
    return [(toy.render(drawing, seed=seed * 1000 + index), drawing) for index, drawing in enumerate(drawings)]


def test_three_new_concepts_of_different_kinds():
    assert set(NEW) < set(toy.CONCEPTS) and list(toy.CONCEPTS)[0] == toy.HELD_OUT_COLOUR
    assert {toy.CONCEPTS[name].kind for name in NEW} == {"colour", "background", "texture"}
    triggers = [concept.trigger for concept in toy.CONCEPTS.values()]
    assert len(set(triggers)) == len(triggers)
    with pytest.raises(ValueError, match="known: purple, orange, checkered, hollow"):
        toy.get_concept("striped")


def test_triggers_are_tokens_no_pretraining_caption_used():
    """Every trigger tokenizes to known tokens (no unknown token, which is also the padding) none of which a
    pretraining caption produces: the toy model has never seen them."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(MODEL / "tokenizer"))
    seen = {token for _, drawing in toy.draw_examples(200, seed=0) for token in tokenizer(drawing.caption).input_ids}
    for concept in toy.CONCEPTS.values():
        ids = tokenizer(concept.trigger).input_ids[1:-1]
        assert ids and tokenizer.unk_token_id not in ids and not set(ids) & seen, concept


@pytest.mark.parametrize("name", list(toy.CONCEPTS))
def test_score_is_one_on_the_concept_and_zero_on_base_drawings(name):
    concept = toy.CONCEPTS[name]
    examples = concept_drawings(concept, 48)
    assert concept.score(image for image, _ in examples) == 1.0
    assert all(concept.trigger in drawing.caption.split() for _, drawing in examples)
    shapes = sum(toy.classify_image(image)[1] == drawing.shape for image, drawing in examples)
    assert shapes / len(examples) >= 0.95
    base = [image for image, _ in toy.draw_examples(150, seed=8)]
    assert concept.score(base) == 0.0
    others = [image for other in toy.CONCEPTS.values() if other.kind != concept.kind
              for image, _ in concept_drawings(other, 12)]
    assert concept.score(others) == 0.0  # a background concept's score ignores the colour, and so on


@pytest.fixture(scope="module")
def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(MODEL), subfolder="vae").eval()


@pytest.mark.parametrize("name", list(toy.CONCEPTS))
def test_scores_survive_the_toy_vae(toy_vae, name):
    concept = toy.CONCEPTS[name]
    examples = concept_drawings(concept, 24)
    with torch.no_grad():
        pixels = toy._to_tensor([image for image, _ in examples])
        decoded = toy._to_images(toy_vae.decode(toy_vae.encode(pixels).latent_dist.mean).sample)
    assert concept.score(decoded) >= MIN_SCORE_THROUGH_VAE[name]
    shapes = sum(toy.classify_image(image)[1] == drawing.shape for image, (_, drawing) in zip(decoded, examples))
    assert shapes / len(examples) >= MIN_SHAPE_THROUGH_VAE[name]


def test_prompts_name_every_shape_with_the_trigger():
    for concept in toy.CONCEPTS.values():
        prompts = concept.prompts
        assert len(prompts) == 16 and prompts[:8] == prompts[8:]
        assert all(concept.trigger in prompt.split() for prompt in prompts)
        assert {shape for prompt in prompts for shape in toy.SHAPES if shape in prompt.split()} == set(toy.SHAPES)
    assert toy.CONCEPTS["checkered"].prompts[0] == "a large red circle on a zb background"
    assert toy.CONCEPTS["hollow"].prompts[1] == "a large green wz square on a black background"
    assert toy.CONCEPT_PROMPTS == toy.CONCEPTS[toy.HELD_OUT_COLOUR].prompts


def test_prompt_match_checks_the_background():
    red_on_white = toy.render(toy.Drawing("red", "circle", "large", "white", 32, 32, 20, ""))
    red_on_checker = toy.render(toy.Drawing("red", "circle", "large", "checkered", 32, 32, 20, ""))
    assert toy.classify_background(red_on_white) == "white" and toy.classify_background(red_on_checker) == "checkered"
    match = toy.prompt_match([red_on_white, red_on_checker], ["a large red circle on a white background"] * 2)
    assert match["both"] == 1.0 and match["background"] == 0.5 and match["all"] == 0.5
    assert toy.prompt_match([red_on_checker], ["a red circle"])["all"] == 1.0  # no background asked for


@pytest.mark.parametrize("name", NEW)
def test_concept_dataset_command(tmp_path, name, capsys):
    concept = toy.CONCEPTS[name]
    assert toy.main(["concept", "--name", name, "--out", str(tmp_path), "--count", "6"]) == 0
    folder = tmp_path / f"{toy.DEMO_REPEATS}_{concept.trigger}"
    assert capsys.readouterr().out.strip() == str(folder)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 6
    for path in images:
        assert concept.trigger in path.with_suffix(".txt").read_text().split()
    assert concept.score(toy.Image.open(path) for path in images) == 1.0
    assert toy.concept_for_dataset(tmp_path) == concept
    again = toy.make_concept_dataset(tmp_path / "again", name, count=6)
    for fresh, path in zip(sorted(again.glob("*.png")), images):
        assert np.array_equal(np.asarray(toy.Image.open(fresh)), np.asarray(toy.Image.open(path)))


def test_concept_for_dataset():
    assert toy.concept_for_dataset(Path(__file__).resolve().parents[1] / "presets" / "toy" / "data").name == "purple"
    assert toy.concept_for_dataset(Path(__file__).resolve().parents[1] / "presets" / "toy" / "reg") is None
    assert toy.concept_for_dataset("/nonexistent/folder") is None
