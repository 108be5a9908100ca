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
    FEATURE_EMBEDDINGS,
    FEATURE_LOGPROBS,
    BadRequestError,
    CancelToken,
    LoadedModelInfo,
    OutputSpec,
    SamplingParams,
    StreamPiece,
    TextEmbedding,
)
from loadstar.loaders.hf_sampling import PREFILL_CHUNK, PieceStreamer, eos_ids, generate_kwargs
from loadstar.loaders.tokenizer_facts import TokenizerPrompts

if TYPE_CHECKING:
    from loadstar.loaders.hf_batch import HFBatch

log = logging.getLogger(__name__)

EMBED_MAX_TOKENS = 512  # tokens per embedded text



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
        features = info.features | {FEATURE_EMBEDDINGS} | ({FEATURE_LOGPROBS} if max_batch > 1 else set())
        self.info = replace(info, features=frozenset(features))
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
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.cancelled, dtype=torch.bool, device=input_ids.device)

        ids = self.fit_prompt(self.encode(prompt), params)
        input_ids = torch.tensor([ids], device=self.model.device)
        eos = eos_ids(self.model, self.tokenizer)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "streamer": PieceStreamer(self.tokenizer, emit, skip_special_tokens=params.skip_special_tokens),
            "stopping_criteria": StoppingCriteriaList([StopWhenCancelled()]),
            **generate_kwargs(params, len(ids), eos),
        }
        if self.tokenizer.pad_token_id is None and eos:
            kwargs["pad_token_id"] = eos[0]
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

    def embed(self, texts: list[str]) -> list[TextEmbedding]:
        """The mean of the last hidden state over each text's tokens (its attention mask), unit length."""
        import torch

        limit = self.info.context_length or EMBED_MAX_TOKENS
        out = []
        for index, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if not ids:
                raise BadRequestError(f"input {index} is empty")
            if len(ids) > min(limit, EMBED_MAX_TOKENS):
                raise BadRequestError(f"input {index} is {len(ids)} tokens long; at most {min(limit, EMBED_MAX_TOKENS)} are embedded")
            input_ids = torch.tensor([ids], device=self.model.device)
            with torch.inference_mode():
                hidden = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1][0]
            out.append(TextEmbedding.of(hidden.float().mean(dim=0).tolist(), len(ids)))
        return out

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
