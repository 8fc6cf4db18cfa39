"""Tiny captioners written to folders, the way a downloaded model sits on disk (config, weights, processor,
tokenizer files); random weights from configs, nothing downloaded. Each builder returns the folder.

``word`` (BLIP, GIT): the output layer is set so that this word wins every step, so the caption is
``word`` repeated ``max_new_tokens`` times (a known answer); ``word=None`` keeps the random weights.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _byte_level_files(folder: Path, specials: Sequence[str]) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a byte-level BPE with no merges: every byte is a token (BART, GPT-2/OPT style)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in [*specials, *bytes_to_unicode().values()]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _constant_output(last_norm: torch.nn.Module, lm_head: torch.nn.Module, token_id: int) -> None:
    """The last layer norm outputs a constant, and the head scores only ``token_id`` on it: greedy decoding
    repeats that token whatever the image (for heads without a bias)."""
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.fill_(1.0)
        lm_head.weight.zero_()
        lm_head.weight[token_id] = 1.0


def _image_token() -> Any:
    from tokenizers import AddedToken

    return AddedToken("<image>", normalized=False, special=True)


def build_tiny_florence2(folder: Path, letter: str = "z", seed: int = 0) -> Path:
    """Florence-2 (DaViT + BART) with a byte-level tokenizer; the caption repeats ``letter``."""
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    vocab, merges = _byte_level_files(folder, ["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = BartTokenizer(str(vocab), str(merges), extra_special_tokens={"image_token": _image_token()})
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=256, d_model=16,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                         encoder_attention_heads=1, decoder_attention_heads=1, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=12, projection_dim=16),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    decoder = model.model.language_model.decoder
    _constant_output(decoder.layers[-1].final_layer_norm, model.lm_head, tokenizer.convert_tokens_to_ids(letter))
    image_processor = CLIPImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False)
    image_processor.image_seq_length = (IMAGE_SIZE // 4) ** 2 + 1  # one token per 4×4 patch, plus a pooled one
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_tiny_blip2(folder: Path, letter: str = "q", seed: int = 0, query_tokens: int = 4) -> Path:
    """BLIP-2 (ViT + Q-Former + OPT) with a byte-level tokenizer; the caption repeats ``letter``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    vocab, merges = _byte_level_files(folder, ["<pad>", "</s>", "<unk>"])
    tokenizer = GPT2Tokenizer(str(vocab), str(merges), bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>")
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # The processor adds its "<image>" token to the tokenizer (as the hub's BLIP-2 tokenizers have it).
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=query_tokens)
    size = len(tokenizer)
    config = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                            encoder_hidden_size=16, vocab_size=size),
        text_config=dict(model_type="opt", vocab_size=size, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=128, word_embed_proj_dim=16,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False),
        num_query_tokens=query_tokens, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    language = model.language_model
    _constant_output(language.model.decoder.final_layer_norm, language.lm_head, tokenizer.convert_tokens_to_ids(letter))
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
