"""A loaded Hugging Face causal LM (a transformers model + tokenizer) behind the LoadedModel interface.

Shared by the loaders whose result is a transformers ``generate``-capable model. torch and
transformers are imported inside methods only.
"""

from __future__ import annotations

import gc
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

from engine.chat import ChatMessage
from engine.loader_api import CancelToken, LoadedModelInfo, StreamPiece
from engine.sampling import SamplingParams

_DONE = object()


class HFCausalLM:
    def __init__(self, model: Any, tokenizer: Any, info: LoadedModelInfo, *, keepalive: Any = None) -> None:
        """``keepalive``: an object that owns the model (e.g. a gptqmodel wrapper), freed on unload."""
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._keepalive = keepalive

    # -- prompts -------------------------------------------------------------------------------

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        dicts = [m.as_dict() for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        # No template: a plain transcript the model can continue (named formats come with presets).
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in dicts]
        return "\n".join(lines) + "\nAssistant:"

    def encode(self, prompt: str) -> list[int]:
        # Chat templates write the BOS token into the text themselves; add it only when missing.
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and prompt.startswith(bos))
        return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # -- generation ----------------------------------------------------------------------------

    def stream_to(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, emit: Callable[[StreamPiece], None]
    ) -> None:
        """Generate on the calling thread, handing each piece to ``emit`` (the engine's fast path)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.cancelled, dtype=torch.bool)

        input_ids = torch.tensor([self.encode(prompt)], device=self.model.device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": params.max_new_tokens,
            "streamer": _PieceStreamer(self.tokenizer, emit),
            "stopping_criteria": StoppingCriteriaList([StopWhenCancelled()]),
        }
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.eos_token_id
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        torch.manual_seed(seed)
        with torch.inference_mode():
            self.model.generate(**kwargs)

    def stream(self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int) -> Iterator[StreamPiece]:
        """The generator form of ``stream_to`` (generation runs on a helper thread)."""
        out: queue.Queue[Any] = queue.Queue()
        abandoned = _EitherToken(cancel)

        def run() -> None:
            try:
                self.stream_to(prompt, params, abandoned, seed=seed, emit=out.put)
            except BaseException as error:  # handed to the consumer, raised there
                out.put(error)
            finally:
                out.put(_DONE)

        worker = threading.Thread(target=run, name="loadstar-generate", daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abandoned.cancel()  # the consumer went away: stop generating for nobody
            worker.join()

    def unload(self) -> None:
        device = str(getattr(self.model, "device", "cpu"))
        self.model = None
        self.tokenizer = None
        self._keepalive = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class _EitherToken(CancelToken):
    """Cancelled when the request is, or when this side cancels it."""

    def __init__(self, outer: CancelToken) -> None:
        super().__init__()
        self._outer = outer

    @property
    def cancelled(self) -> bool:
        return self._outer.cancelled or super().cancelled


class _PieceStreamer:
    """Turns token ids from ``generate`` into text pieces without splitting characters.

    Decodes the tokens since the last line break as a whole (so multi-token characters and
    word-initial spaces come out right), emits only the new suffix, and holds back text that
    ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[StreamPiece], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._prompt_seen = False
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
        text = self._tokenizer.decode(self._cache, skip_special_tokens=True)
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
        text = self._tokenizer.decode(self._cache, skip_special_tokens=True) if self._cache else ""
        piece = text[self._printed :]
        if piece or self._pending_tokens:
            self._emit(StreamPiece(piece, self._pending_tokens))
        self._cache, self._printed, self._pending_tokens = [], 0, 0
