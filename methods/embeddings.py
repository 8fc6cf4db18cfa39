"""Pivotal tuning: the trigger word's own token vectors, trained next to an adapter, saved as a textual-inversion
file beside it.

An adapter alone has to make a rare word ("zq") mean the concept by changing the layers every prompt goes through,
which is where it bleeds into prompts without the word. Training the word's input vectors too (the "pivot" of
cloneofsimo's LoRA and of diffusers' advanced SDXL script) lets the word itself carry the concept: the vectors are
read only where the word is written. Here the word keeps its tokens — the vectors of its token n-gram replace the
encoder's embedding output wherever that n-gram occurs (a forward hook on each CLIP token-embedding table, so no
table is copied and no optimizer state is kept for it) —, and the trained vectors are written in the layout
every consumer reads as a textual inversion:

* SD1/SD2: ``emb_params`` [n, width] (sd-scripts' and A1111's single-tensor safetensors embedding);
* SDXL: ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] (A1111/Forge, ComfyUI, diffusers' advanced script).

The file is ``<adapter stem>_emb.safetensors`` (the name diffusers' script gives it); the adapter's metadata names
it and the word (``rw_embedding_file``, ``rw_embedding_word``), and :func:`methods.apply.apply_adapter` applies both.
In A1111/Forge/ComfyUI the embedding is called by its file name, written where the trigger was; in diffusers
``pipe.load_textual_inversion(file, token=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .base import ConfigError
from .files import AdapterFileError, atomic_write_bytes, load_adapter_file, save_adapter_file

EMBEDDING_SUFFIX = "_emb.safetensors"
METADATA_FILE = "rw_embedding_file"
METADATA_WORD = "rw_embedding_word"
# The file key of each text encoder's vectors, in pipeline order (text_encoder, text_encoder_2).
FILE_KEYS = {"sd1": ("emb_params",), "sd2": ("emb_params",), "sdxl": ("clip_l", "clip_g")}
MODELSPEC_IDS = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def embedding_path(adapter_path: str | os.PathLike) -> Path:
    """The textual-inversion file that belongs to an adapter file: ``<stem>_emb.safetensors`` beside it."""
    path = Path(adapter_path)
    return path.with_name(path.stem + EMBEDDING_SUFFIX)


def replace_word(token_ids: torch.Tensor, embedded: torch.Tensor, sequence: torch.Tensor,
                 vectors: torch.Tensor) -> torch.Tensor:
    """``embedded`` ([..., L, width], the table's output for ``token_ids`` [..., L]) with the n rows of every
    occurrence of the token n-gram ``sequence`` replaced by ``vectors`` [n, width]; differentiable in ``vectors``."""
    count = sequence.numel()
    if token_ids.shape[-1] < count:
        return embedded
    windows = token_ids.unfold(-1, count, 1)  # [..., L - n + 1, n]
    starts = (windows == sequence.to(token_ids.device)).all(dim=-1)
    vectors = vectors.to(embedded.dtype)
    for offset in range(count):
        at = F.pad(starts, (offset, count - 1 - offset))  # the offset-th token of each occurrence
        embedded = torch.where(at.unsqueeze(-1), vectors[offset], embedded)
    return embedded


class WordVectors(nn.Module):
    """One text encoder's vectors for the word: ``vectors`` [n, width] for its token ids [n]."""

    def __init__(self, key: str, token_ids: list[int], initial: torch.Tensor):
        super().__init__()
        self.key = key
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.vectors = nn.Parameter(initial.detach().clone().float())

    def forward(self, token_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return replace_word(token_ids, embedded, self.token_ids, self.vectors)


def _encoders(pipe: Any, arch: str) -> list[tuple[str, Any, nn.Module]]:
    """(file key, tokenizer, text encoder) of each CLIP encoder that takes the word's vectors."""
    keys = FILE_KEYS.get(arch)
    if keys is None:
        raise ConfigError(f"trigger vectors (train.embedding_lr) are trained for SD1, SD2 and SDXL bases; this base "
                          f"is {arch}: set train.embedding_lr = 0")
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    found = [(key, tokenizer, encoder) for key, (tokenizer, encoder) in zip(keys, pairs)
             if tokenizer is not None and encoder is not None]
    if len(found) != len(keys):
        raise ConfigError(f"trigger vectors need the {arch} pipeline's {len(keys)} tokenizer(s) and text encoder(s)")
    return found


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word.strip() or not ids:
        raise ConfigError(f"the trigger word {word!r} has no tokens to train vectors for; set dataset.trigger_word")
    return list(ids)


class TriggerEmbeddings(nn.Module):
    """The word's vectors for every text encoder of a pipeline, applied through forward hooks on their token
    embedding tables while attached and ``enabled`` (:meth:`methods.network.AdapterNetwork.switched_off` turns
    them off with the adapters)."""

    def __init__(self, word: str, arch: str, entries: list[WordVectors], tables: list[nn.Module]):
        super().__init__()
        self.word, self.arch = word, arch
        self.entries = nn.ModuleList(entries)
        self._tables = list(tables)  # not submodules: the frozen tables are the pipeline's
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.enabled = True

    @classmethod
    def for_word(cls, pipe: Any, arch: str, word: str) -> TriggerEmbeddings:
        """Vectors starting from the word's present rows (the model's own reading of it)."""
        entries, tables = [], []
        for key, tokenizer, encoder in _encoders(pipe, arch):
            table = encoder.get_input_embeddings()
            ids = word_token_ids(tokenizer, word)
            entries.append(WordVectors(key, ids, table.weight[ids]))
            tables.append(table)
        return cls(word, arch, entries, tables)

    @classmethod
    def from_tensors(cls, pipe: Any, arch: str, word: str, tensors: dict[str, torch.Tensor],
                     source: str = "file") -> TriggerEmbeddings:
        """Vectors read from a textual-inversion file for ``word`` (raises when they do not fit this pipeline)."""
        embeddings = cls.for_word(pipe, arch, word)
        with torch.no_grad():
            for entry in embeddings.entries:
                if entry.key not in tensors:
                    raise AdapterFileError(f"{source}: no {entry.key!r} tensor; is it a {arch} embedding?")
                vectors = tensors[entry.key]
                if tuple(vectors.shape) != tuple(entry.vectors.shape):
                    raise AdapterFileError(
                        f"{source}: {entry.key} is {tuple(vectors.shape)}, but {word!r} is "
                        f"{len(entry.token_ids)} token(s) of width {entry.vectors.shape[1]} in this model's "
                        f"{entry.key} encoder; is the embedding for another base model?")
                entry.vectors.copy_(vectors.float())
        return embeddings

    def attach(self) -> TriggerEmbeddings:
        if not self._hooks:
            for entry, table in zip(self.entries, self._tables):
                self._hooks.append(table.register_forward_hook(
                    lambda module, args, output, e=entry: e(args[0], output) if self.enabled else output))
        return self

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def bake(self) -> None:
        """Write the vectors into the token tables for good (a merged model): each of the word's tokens then reads
        its vector wherever it appears, not only inside the word — the same for a rare trigger word."""
        for entry, table in zip(self.entries, self._tables):
            table.weight[entry.token_ids.to(table.weight.device)] = entry.vectors.to(table.weight)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {entry.key: entry.vectors.detach().float().cpu().contiguous() for entry in self.entries}

    def __iter__(self) -> Iterator[WordVectors]:
        return iter(self.entries)


def save_embedding_file(embeddings: TriggerEmbeddings, path: str | os.PathLike, *, title: str,
                        dtype: str | torch.dtype = "fp16", overwrite: bool = False) -> Path:
    """Write the vectors as a textual-inversion file (atomically; ModelSpec keys name it one)."""
    metadata = {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": f"{MODELSPEC_IDS[embeddings.arch]}/textual-inversion",
                "modelspec.implementation": "https://github.com/huggingface/diffusers", "modelspec.title": title,
                "modelspec.implementation_version": "rankwright/0.1.0", METADATA_WORD: embeddings.word}
    return save_adapter_file(path, embeddings.file_tensors(), metadata, dtype, overwrite)


def embedding_file_of(adapter_path: str | os.PathLike, metadata: dict[str, str]) -> Path | None:
    """The embedding file of an adapter whose metadata names a trigger word (None when it names none):
    ``<stem>_emb.safetensors`` beside it, else the file name it was saved with (a renamed or converted adapter).
    An adapter trained with vectors is a different model without them, so a missing file is an error."""
    word = metadata.get(METADATA_WORD)
    if not word:
        return None
    named = Path(adapter_path).with_name(Path(metadata.get(METADATA_FILE) or embedding_path(adapter_path).name).name)
    path = next((p for p in (embedding_path(adapter_path), named) if p.is_file()), None)
    if path is None:
        raise AdapterFileError(f"{adapter_path} was trained with vectors for {word!r}, saved as {named.name}, which "
                               f"is not beside it; put it in the same folder as {embedding_path(adapter_path).name}")
    return path


def embeddings_for_adapter(pipe: Any, arch: str, adapter_path: str | os.PathLike,
                           metadata: dict[str, str]) -> TriggerEmbeddings | None:
    """The trigger vectors of an adapter file (:func:`embedding_file_of`), read for this pipeline."""
    path = embedding_file_of(adapter_path, metadata)
    if path is None:
        return None
    tensors, _ = load_adapter_file(path)
    return TriggerEmbeddings.from_tensors(pipe, arch, metadata[METADATA_WORD], tensors, source=str(path))


def copy_embedding_file(adapter_path: str | os.PathLike, metadata: dict[str, str], out_adapter: str | os.PathLike,
                        overwrite: bool = False) -> Path | None:
    """An adapter's embedding file copied beside a file made from it (``<out stem>_emb.safetensors``); None when
    the adapter has none. Update the new file's :data:`METADATA_FILE` to the returned name."""
    source = embedding_file_of(adapter_path, metadata)
    if source is None:
        return None
    target = embedding_path(out_adapter)
    atomic_write_bytes(target, source.read_bytes(), overwrite=overwrite)
    return target
