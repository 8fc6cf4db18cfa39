"""Differential output preservation: the concept stays tied to its trigger word.

Regularisation images keep an adapter near the base model on *other* images; they do not say which word the change
belongs to, and a change to every image (a background, a style) still bleeds into prompts without the trigger.
Output preservation (ai-toolkit's ``diff_output_preservation``) gives that contrast on the training images
themselves: each noised training latent is denoised a second time with its caption's trigger word replaced by a
class word (or removed), and the adapted model's prediction there is pulled toward the base model's prediction for
the same input and caption (adapters at multiplier 0, no gradient). The adapter learns "with the trigger: the new
concept; without it: what the base model did". It needs no images of its own; a step costs one more forward pass
without gradients and one with (about twice an ordinary step).

``train.output_preservation_weight`` (0: off) scales the term, added to the batch's loss; ``train.preservation_class``
is the word put where the trigger was ("" removes it). The trigger is :func:`trainer.prior.trigger_words`'s (the
dataset's ``trigger_word``, else the folder words the captions use, else the most common first tag). Samples whose
caption has no trigger (regularisation images, captions without it) add nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch


class OutputPreservation:
    def __init__(self, words: Sequence[str], replacement: str, weight: float):
        if not words:
            raise ValueError("output preservation needs at least one trigger word")
        self.words = list(words)
        self.replacement = replacement.strip()
        self.weight = float(weight)
        # Longest first, so that "zq style" is replaced before "zq"; whole words only, as prior.remove_words does.
        alternatives = "|".join(re.escape(word) for word in sorted(self.words, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")

    @classmethod
    def for_run(cls, config: Any, items: Sequence[Any]) -> OutputPreservation | None:
        """The run's preservation (None when ``train.output_preservation_weight`` is 0)."""
        from .config import ConfigError
        from .prior import trigger_words

        train = config.train
        if train.output_preservation_weight <= 0:
            return None
        words = trigger_words(config.dataset, [item for item in items if not item.is_reg])
        if not words:
            raise ConfigError("train.output_preservation_weight needs a trigger word to take out of the captions and "
                              "none was found (no dataset.trigger_word, no folder word such as 10_zq used in the "
                              "captions, no captions): set dataset.trigger_word, or output_preservation_weight = 0")
        return cls(words, train.preservation_class, train.output_preservation_weight)

    def captions(self, captions: Sequence[str]) -> tuple[list[str], list[bool]]:
        """(each caption with its trigger words replaced, whether it had any)."""
        preserved, had = [], []
        for caption in captions:
            replaced, count = self._pattern.subn(self.replacement, caption)
            replaced = re.sub(r"\s*,(\s*,)*\s*", ", ", re.sub(r"[ \t]+", " ", replaced)).strip(" ,")
            preserved.append(replaced)
            had.append(count > 0)
        return preserved, had

    def loss(self, network: Any, captions: Sequence[str], sample_weights: torch.Tensor,
             predict: Callable[[list[str]], torch.Tensor]) -> torch.Tensor | None:
        """``weight`` × the mean over the batch of the squared difference between the adapted and the base model's
        predictions for the preserved captions (``predict(captions)`` denoises the batch's noised input, which
        must be the same in both calls); None when no caption of the batch has a trigger."""
        preserved, had = self.captions(captions)
        if not any(had):
            return None
        with torch.no_grad(), network.switched_off():
            target = predict(preserved).float()
        prediction = predict(preserved).float()
        per_sample = (prediction - target).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
        mask = torch.tensor(had, dtype=per_sample.dtype, device=per_sample.device)
        weights = mask * sample_weights.to(per_sample.device, per_sample.dtype)
        return self.weight * (per_sample * weights).sum() / len(had)
