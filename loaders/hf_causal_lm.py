"""A loaded Hugging Face causal LM (a transformers model + tokenizer) behind the LoadedModel interface.

Shared by the loaders whose result is a transformers ``generate``-capable model. torch and
transformers are imported inside methods only.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loadstar import (
    ALL_PARAMS,
    FEATURE_LOGPROBS,
    CancelToken,
    LoadedModelInfo,
    OutputSpec,
    SamplingParams,
    StreamPiece,
)
from loadstar.loaders.tokenizer_facts import TokenizerPrompts

if TYPE_CHECKING:
    from loadstar.loaders.hf_batch import HFBatch

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # prompt tokens per forward pass before generation; Stop is checked between them


def batch_size(model: Any, requested: int) -> tuple[int, str]:
    """The batch a loaded transformers model gets, and the words for its load details."""
    from loadstar.loaders.hf_batch import batchable

    if requested == 1:
        return 1, "one request at a time"
    why_not = batchable(model)
    if why_not is not None:
        return 1, f"one request at a time ({why_not})"
    return requested, f"batch {requested}"


class HFCausalLM(TokenizerPrompts):
    supported_params = ALL_PARAMS

    def __init__(
        self, model: Any, tokenizer: Any, info: LoadedModelInfo, *, keepalive: Any = None, max_batch: int = 1
    ) -> None:
        """``keepalive``: an object that owns the model (e.g. a gptqmodel wrapper), freed on unload.
        ``max_batch`` > 1: requests decode together (``hf_batch``); give 1 where ``batchable`` says no.
        Requests then go through the batch only, which also gives log probabilities."""
        self.model = model
        self.tokenizer = tokenizer
        self.info = replace(info, features=info.features | {FEATURE_LOGPROBS}) if max_batch > 1 else info
        self._keepalive = keepalive
        self.max_batch = max_batch
        self._batch: HFBatch | None = None

    def open_batch(self) -> HFBatch:
        """The model's one batch (continuous batching, see hf_batch.py)."""
        from loadstar.loaders.hf_batch import HFBatch

        if self._batch is None:
            self._batch = HFBatch(self, self.max_batch)
        return self._batch

    # -- generation ----------------------------------------------------------------------------

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, emit: Callable[[StreamPiece], None],
        output: OutputSpec | None = None,
    ) -> None:  # ``output`` (log probabilities) goes to the batch, never here: a model that has them batches
        """Generate on the calling thread, handing each piece to ``emit`` (the engine's fast path)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.cancelled, dtype=torch.bool, device=input_ids.device)

        ids = self.fit_prompt(self.encode(prompt), params)
        input_ids = torch.tensor([ids], device=self.model.device)
        eos_ids = self._eos_ids()
        processors = LogitsProcessorList()
        if params.presence_penalty or params.frequency_penalty:
            processors.append(_PresenceFrequencyPenalty(len(ids), params.presence_penalty, params.frequency_penalty))
        if params.ban_eos and eos_ids:
            processors.append(_BanTokens(eos_ids))
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": params.max_new_tokens,
            "streamer": _PieceStreamer(self.tokenizer, emit, skip_special_tokens=params.skip_special_tokens),
            "stopping_criteria": StoppingCriteriaList([StopWhenCancelled()]),
            "logits_processor": processors,
            "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1.0 else None,
            "no_repeat_ngram_size": params.no_repeat_ngram_size or None,
        }
        if self.tokenizer.pad_token_id is None and eos_ids:
            kwargs["pad_token_id"] = eos_ids[0]
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                min_p=params.min_p or None, typical_p=params.typical_p if params.typical_p < 1.0 else None,
            )
        past = self._prefill(input_ids, cancel)
        if cancel.cancelled:
            return
        if past is not None:
            kwargs["past_key_values"] = past
        torch.manual_seed(seed)
        with torch.inference_mode():
            self.model.generate(**kwargs)

    def _prefill(self, input_ids: Any, cancel: CancelToken) -> Any:
        """A long prompt is read in chunks, Stop (or a client gone) checked between them.

        Returns the KV cache of all but the last prompt token (``generate`` reads that one), or None
        for a short prompt or a model whose forward pass does not take a cache.
        """
        import torch

        length = input_ids.shape[1]
        if length <= PREFILL_CHUNK:
            return None
        from transformers import DynamicCache

        config = getattr(self.model, "config", None)
        cache = DynamicCache(config=config)
        try:
            with torch.inference_mode():
                for start in range(0, length - 1, PREFILL_CHUNK):
                    if cancel.cancelled:
                        return cache
                    end = min(start + PREFILL_CHUNK, length - 1)
                    self.model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True,
                               cache_position=torch.arange(start, end, device=input_ids.device))
        except (TypeError, ValueError, NotImplementedError) as error:
            log.warning("chunked prefill unavailable for this model (%s): reading the prompt at once", error)
            return None
        return cache

    def _eos_ids(self) -> list[int]:
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if configured is None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            return []
        return list(configured) if isinstance(configured, (list, tuple)) else [int(configured)]

    def unload(self) -> None:
        device = str(getattr(self.model, "device", "cpu"))
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        self.model = None
        self.tokenizer = None
        self._keepalive = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class _PresenceFrequencyPenalty:
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


class _BanTokens:
    """Makes the given tokens (the end-of-sequence ones) impossible to pick."""

    def __init__(self, token_ids: list[int]) -> None:
        self._ids = token_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores[:, self._ids] = float("-inf")
        return scores


class _PieceStreamer:
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
