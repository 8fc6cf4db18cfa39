"""Text conditioning for SD1/SD2 (one CLIP) and SDXL (two CLIPs, pooled embedding and size/crop ids)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # (B, 77, C); (B, 152 or 227, C) with dataset.max_token_length 150 or 225
    pooled: torch.Tensor | None = None  # SDXL: (B, 1280) from the second encoder

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        return Conditioning(self.hidden_states.to(device, dtype), pooled)

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        pooled = torch.cat([c.pooled for c in items]) if items[0].pooled is not None else None
        return Conditioning(torch.cat([c.hidden_states for c in items]), pooled)

    def split(self) -> list[Conditioning]:
        count = self.hidden_states.shape[0]
        return [Conditioning(self.hidden_states[i:i + 1],
                             self.pooled[i:i + 1] if self.pooled is not None else None) for i in range(count)]


def tokenize(tokenizer: Any, captions: list[str], device: torch.device, encoder: Any = None) -> torch.Tensor:
    """Token ids padded/truncated to the encoder's positions (77 for CLIP).

    A tokenizer saved without ``tokenizer_config.json`` (vocab + merges only) reports a ``model_max_length`` of
    1e30, which the fast tokenizer cannot even pass to its backend, so the encoder's size bounds it.
    """
    length = tokenizer.model_max_length
    positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if positions is not None:
        length = min(length, positions)
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_captions(pipe: Any, captions: list[str], clip_skip: int = 1, is_sdxl: bool = False,
                    max_token_length: int = 75, weighted: bool = False) -> Conditioning:
    """Hidden states as the pipelines compute them; ``clip_skip`` 2 takes the penultimate layer (kohya's sense).

    SD1/SD2 apply the final layer norm to a skipped layer as diffusers' pipelines do; SDXL uses the penultimate
    layer of both encoders (plus ``clip_skip - 1`` more) without it, and the pooled projection of the second.

    ``max_token_length`` 150 or 225 (sd-scripts' option) encodes captions up to that many tokens in 77-token chunks
    and ``weighted`` reads ``(word:1.2)`` / ``(word)`` / ``[word]`` attention weights, both exactly as sd-scripts'
    tokenize and text-encoding strategies do (:func:`chunked_token_ids`, :func:`join_chunks`).
    """
    device = pipe.text_encoder.device if pipe.text_encoder is not None else torch.device("cpu")
    if max_token_length > 75 or weighted:
        return _encode_long(pipe, captions, clip_skip, is_sdxl, max_token_length, weighted)
    if not is_sdxl:
        ids = tokenize(pipe.tokenizer, captions, device, pipe.text_encoder)
        return Conditioning(_sd_hidden_states(pipe.text_encoder, ids, clip_skip))
    hidden_states = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenize(tokenizer, captions, encoder.device, encoder)
        output = encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-(clip_skip + 1)])
        pooled = output[0] if encoder is pipe.text_encoder_2 else pooled
    return Conditioning(torch.cat(hidden_states, dim=-1), pooled)


def _sd_hidden_states(encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        return encoder(ids)[0]
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return _final_layer_norm(encoder)(hidden)


# ----- sd-scripts' long and weighted captions ---------------------------------------------------------------------
_ATTENTION = re.compile(r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:""")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's (and sd-scripts') attention syntax → [(text, weight)]: ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.3)`` ×1.3,
    nested multiplicatively, ``\\(`` a literal bracket; unclosed brackets apply to the rest; runs of equal weight
    are merged. ``'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).'`` → ``[('a ', 1.0), ('house', 1.573),
    (' ', 1.1), ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun, ', 1.1), ('sky', 1.4641), ('.', 1.1)]``."""
    result: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for entry in result[start:]:
            entry[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            result.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(result))
        elif piece == "[":
            square_brackets.append(len(result))
        elif weight is not None and round_brackets:
            multiply(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply(square_brackets.pop(), 1 / 1.1)
        else:
            result.append([piece, 1.0])
    for start in round_brackets:
        multiply(start, 1.1)
    for start in square_brackets:
        multiply(start, 1 / 1.1)
    if not result:
        result = [["", 1.0]]
    merged = [result[0]]
    for piece, weight in result[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged]


def chunked_token_ids(tokenizer: Any, text: str, max_token_length: int, weighted: bool,
                      chunk: int = 77) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sd-scripts' ``TokenizeStrategy._get_input_ids``: ``<BOS> tokens <EOS> <PAD>…`` padded (and truncated) to
    ``max_token_length + 2``, then cut into ``n = max_token_length / 75`` chunks ``<BOS> 75 tokens <last>``, the
    last of each chunk being the sequence's final token. Where the pad token is not EOS (SD2, SDXL's second
    encoder), a chunk whose content runs to its end closes with EOS, and an empty chunk starts ``<BOS> <EOS>``.
    With ``weighted`` the tokens come piece by piece from :func:`parse_prompt_attention` (each piece tokenized on
    its own, as sd-scripts does) and the weights are returned per chunk position (1 at BOS, the last token and
    padding). Returns ids (n, 77) and weights (n, 77) or None."""
    length = max_token_length + 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if weighted:
        tokens: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_prompt_attention(text):
            piece_ids = tokenizer(piece).input_ids[1:-1]
            tokens += piece_ids
            weights += [weight] * len(piece_ids)
            if len(tokens) > length - 2:
                break
        tokens, weights = tokens[:length - 2], weights[:length - 2]
        ids = torch.tensor([bos] + tokens + [eos] + [pad] * (length - 2 - len(tokens)))
        token_weights = torch.tensor([1.0] + weights + [1.0] * (length - 1 - len(weights)))
    else:
        ids = tokenizer(text, padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt").input_ids[0]
        token_weights = None
    if length <= chunk:
        return ids.unsqueeze(0), token_weights.unsqueeze(0) if token_weights is not None else None
    content = chunk - 2
    chunks, chunk_weights = [], []
    for start in range(1, length - chunk + 2, content):
        piece = torch.cat([ids[:1], ids[start:start + content], ids[-1:]])
        if pad != eos:
            if piece[-2] != eos and piece[-2] != pad:
                piece[-1] = eos
            if piece[1] == pad:
                piece[1] = eos
        chunks.append(piece)
        if token_weights is not None:
            row = torch.ones(chunk)
            row[1:1 + content] = token_weights[start:start + content]
            chunk_weights.append(row)
    return torch.stack(chunks), torch.stack(chunk_weights) if token_weights is not None else None


def join_chunks(hidden: torch.Tensor, chunks: int, chunk: int = 77) -> torch.Tensor:
    """sd-scripts' reassembly of chunk outputs (B·n, 77, C) → (B, 75·n + 2, C): the first chunk's BOS, every chunk's
    75 content positions, and the last chunk's final position."""
    batch = hidden.shape[0] // chunks
    flat = hidden.reshape(batch, chunks * chunk, hidden.shape[-1])
    if chunks == 1:
        return flat
    parts = [flat[:, :1]] + [flat[:, start:start + chunk - 2] for start in range(1, chunks * chunk, chunk)]
    return torch.cat(parts + [flat[:, -1:]], dim=1)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sd-scripts' ``encode_tokens_with_weights``: hidden states (B, 75·n + 2, C) scaled by the caption's token
    weights (B, n, 77) — all 77 positions for one chunk, the 75 content positions of each chunk otherwise."""
    weights = weights.to(hidden.device, hidden.dtype)
    if weights.shape[1] == 1:
        return hidden * weights[:, 0].unsqueeze(-1)
    scale = torch.ones(hidden.shape[:2], device=hidden.device, dtype=hidden.dtype)
    for index in range(weights.shape[1]):
        scale[:, index * 75 + 1:index * 75 + 76] = weights[:, index, 1:-1]
    return hidden * scale.unsqueeze(-1)


def _encode_long(pipe: Any, captions: list[str], clip_skip: int, is_sdxl: bool, max_token_length: int,
                 weighted: bool) -> Conditioning:
    pairs = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)) if is_sdxl else \
        ((pipe.tokenizer, pipe.text_encoder),)
    hidden_states, pooled = [], None
    for tokenizer, encoder in pairs:
        tokenized = [chunked_token_ids(tokenizer, caption, max_token_length, weighted) for caption in captions]
        ids = torch.cat([chunk_ids for chunk_ids, _ in tokenized]).to(encoder.device)
        chunks = tokenized[0][0].shape[0]
        if is_sdxl:
            output = encoder(ids, output_hidden_states=True)
            hidden = output.hidden_states[-(clip_skip + 1)]
            if encoder is pipe.text_encoder_2:
                pooled = output[0][::chunks]  # the first chunk's, as sd-scripts
        else:
            hidden = _sd_hidden_states(encoder, ids, clip_skip)
        hidden = join_chunks(hidden, chunks)
        if weighted:
            hidden = apply_token_weights(hidden, torch.stack([chunk_weights for _, chunk_weights in tokenized]))
        hidden_states.append(hidden)
    return Conditioning(torch.cat(hidden_states, dim=-1), pooled)


def _final_layer_norm(encoder: Any):
    model = getattr(encoder, "text_model", encoder)
    return model.final_layer_norm


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor,
                  device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample, each input (B, 2)."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).to(device, dtype)
