"""Sampling for Hugging Face causal LMs, shared by the one-at-a-time path (hf_causal_lm.py, through
``generate``) and the batch (hf_batch.py): the parameters' mapping to ``generate``'s arguments and
to logits processors in ``generate``'s order, the penalties ``generate`` lacks, the streamer that
turns token ids into text pieces, and the prompt chunk size. torch and transformers are imported
inside functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loadstar import SamplingParams, StreamPiece

PREFILL_CHUNK = 512  # prompt tokens per forward pass; Stop is checked between them


def generate_kwargs(params: SamplingParams, prompt_length: int, eos: list[int]) -> dict[str, Any]:
    """What ``model.generate`` is given for these parameters (the one-at-a-time path); the batch's
    ``logits_processors`` are the same mapping as processors."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(prompt_length, params.presence_penalty, params.frequency_penalty))
    if params.ban_eos and eos:
        processors.append(BanTokens(eos))
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "logits_processor": processors,
        "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        "no_repeat_ngram_size": params.no_repeat_ngram_size or None,
    }
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p or None, typical_p=params.typical_p if params.typical_p < 1.0 else None,
        )
    return kwargs


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The end-of-sequence token ids: the model's generation config's, else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return list(configured) if isinstance(configured, (list, tuple)) else [int(configured)]


def logits_processors(params: SamplingParams, prompt_length: int, eos: list[int]) -> Any:
    """The logits processors ``generate`` runs for ``generate_kwargs(params, ...)``, in its order: the
    batch samples with these, so a request gets the same reply alone or in a batch."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(prompt_length, params.presence_penalty, params.frequency_penalty))
    if params.ban_eos and eos:
        processors.append(BanTokens(eos))
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
        if params.min_p:
            processors.append(MinPLogitsWarper(min_p=params.min_p))
        if params.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(mass=params.typical_p))
    return processors


class PresenceFrequencyPenalty:
    """OpenAI-style penalties over the generated tokens only (not the prompt):
    logit -= presence * [count > 0] + frequency * count."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self._start = prompt_length
        self._presence = presence
        self._frequency = frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self._start :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)


class BanTokens:
    """Makes the given tokens (the end-of-sequence ones) impossible to pick."""

    def __init__(self, token_ids: list[int]) -> None:
        self._ids = token_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self._ids] = float("-inf")
        return scores


class PieceStreamer:
    """Turns token ids from ``generate`` into text pieces without splitting characters.

    Decodes the tokens since the last line break as a whole (so multi-token characters and
    word-initial spaces come out right), emits only the new suffix, and holds back text that
    ends in an incomplete UTF-8 sequence.
    """

    def __init__(
        self, tokenizer: Any, emit: Callable[[StreamPiece], None], *, skip_special_tokens: bool = True,
        prompt_seen: bool = False,
    ) -> None:
        """``prompt_seen``: the first ``put`` is a generated token (``generate`` first hands over the prompt)."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._emit = emit
        self._prompt_seen = prompt_seen
        self._cache: list[int] = []
        self._printed = 0
        self._pending_tokens = 0

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self._cache.extend(ids)
        self._pending_tokens += len(ids)
        text = self._tokenizer.decode(self._cache, skip_special_tokens=self._skip_special)
        if text.endswith("\ufffd"):
            return
        piece = text[self._printed :]
        if text.endswith("\n"):
            self._cache, self._printed = [], 0
        else:
            self._printed = len(text)
        if piece:
            self._emit(StreamPiece(piece, self._pending_tokens))
            self._pending_tokens = 0

    def end(self) -> None:
        text = self._tokenizer.decode(self._cache, skip_special_tokens=self._skip_special) if self._cache else ""
        # Cut short (max_new_tokens, Stop) inside a multi-byte character: drop the unfinished one.
        piece = text[self._printed :].rstrip("\ufffd")
        if piece or self._pending_tokens:
            self._emit(StreamPiece(piece, self._pending_tokens))
        self._cache, self._printed, self._pending_tokens = [], 0, 0
