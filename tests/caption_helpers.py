"""Tiny captioners written to folders, the way a downloaded model sits on disk (config, weights, processor,
tokenizer files); random weights from configs, nothing downloaded. Each builder returns the folder.

``word`` (BLIP, GIT): the output layer is set so that this word wins every step, so the caption is
``word`` repeated ``max_new_tokens`` times (a known answer); ``word=None`` keeps the random weights.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "sitting", "on", "the", "grass"]
# WD-style tag list: (name, category, probability the tiny tagger gives every image)
TAGS = [("general", 9, 0.99), ("1girl", 0, 0.90), ("hatsune_miku", 4, 0.80), ("long_hair", 0, 0.50),
        ("^_^", 0, 0.40), ("hat", 0, 0.10)]
IMAGE_SIZE = 32


def _bert_tokenizer(folder: Path, extra: Sequence[str] = ()):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra, *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def _favour(linear: torch.nn.Module, token_id: int) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(-10.0)
        linear.bias[token_id] = 10.0


def build_tiny_blip(folder: Path, word: str | None = "cat", seed: int = 0) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _bert_tokenizer(folder, extra=["[DEC]"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id, **size),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, projection_dim=32, **size), projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    if word is not None:
        _favour(model.text_decoder.cls.predictions.decoder, tokenizer.convert_tokens_to_ids(word))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_git(folder: Path, word: str | None = "dog", seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _bert_tokenizer(folder)
    config = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    if word is not None:
        _favour(model.output, tokenizer.convert_tokens_to_ids(word))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def write_tag_list(folder: Path, tags: Sequence[tuple[str, int, float]] = TAGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "selected_tags.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category, _) in enumerate(tags):
            writer.writerow([index, name, category, 100 - index])
    return path


def _logits(tags: Sequence[tuple[str, int, float]]) -> torch.Tensor:
    probabilities = torch.tensor([probability for _, _, probability in tags], dtype=torch.float64)
    return torch.log(probabilities / (1 - probabilities)).float()


def build_tiny_tagger(folder: Path, tags: Sequence[tuple[str, int, float]] = TAGS, with_tag_list: bool = True,
                      seed: int = 0) -> Path:
    """A ViT image classifier whose labels are tags; every image gets the probabilities in ``tags``."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=IMAGE_SIZE, patch_size=8, problem_type="multi_label_classification",
                       id2label={i: name for i, (name, _, _) in enumerate(tags)},
                       label2id={name: i for i, (name, _, _) in enumerate(tags)})
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(_logits(tags))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    if with_tag_list:
        write_tag_list(folder, tags)
    return folder


def build_tiny_onnx_tagger(folder: Path, tags: Sequence[tuple[str, int, float]] = TAGS, side: int = 16) -> Path:
    """A WD-style ``model.onnx`` (NHWC float input, probabilities out) + ``selected_tags.csv``; needs the onnx
    package. The output ignores the picture: every image gets the probabilities in ``tags``."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    count = len(tags)
    weights = helper.make_tensor("weights", TensorProto.FLOAT, [3, count], [0.0] * (3 * count))
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [count], _logits(tags).tolist())
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    nodes = [helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
             helper.make_node("Add", ["logits", "bias"], ["scores"]),
             helper.make_node("Sigmoid", ["scores"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", count])],
        initializer=[weights, bias, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    write_tag_list(folder, tags)
    return folder
