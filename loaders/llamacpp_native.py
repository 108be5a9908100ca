"""llama-cpp-python's internals, in one place: the raw context, memory and vocabulary handles.

llama-cpp-python's ``Llama`` covers one sequence; continuous batching (llamacpp_batch.py) needs the
context's own pointers (``llama_decode``, the KV memory, logits by row) and a context made for
several sequences, which its constructor has no option for. Everything that reaches past
``Llama``'s public methods goes through ``NativeLlama``, so a change in llama-cpp-python's private
layout is mended here alone. All of it runs on the one thread that owns the model (the
model's engine core, inside a worker process). ``llama_cpp`` is imported inside functions only.
"""

from __future__ import annotations

from typing import Any


class NativeLlama:
    """A ``llama_cpp.Llama`` and the native handles of its context."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @property
    def ctx(self) -> Any:
        """The ``llama_context *`` (for ``llama_decode``, ``llama_get_logits_ith``, samplers)."""
        return self.llm._ctx.ctx

    @property
    def memory(self) -> Any:
        """The context's KV memory (for ``llama_memory_seq_rm`` and ``llama_memory_clear``)."""
        return self.llm._ctx.memory

    @property
    def vocab(self) -> Any:
        """The ``llama_vocab *`` (for ``llama_token_to_piece`` and grammar samplers)."""
        return self.llm._model.vocab

    def adds_bos(self) -> bool:
        """Whether the model's tokenizer adds a beginning-of-sequence token."""
        return bool(self.llm._model.add_bos_token())

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary holds it (special tokens by name)."""
        return str(self.llm._model.token_get_text(token))

    @property
    def n_ctx(self) -> int:
        return int(self.llm._ctx.n_ctx())

    @property
    def n_batch(self) -> int:
        return int(self.llm.n_batch)

    def embedding_context(self, n_ctx: int, threads: int) -> Any:
        """A second context on the same weights (no copy), in embedding mode, one sequence of ``n_ctx``
        tokens read in one pass; pooled as the GGUF's header says, else the mean over the tokens."""
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        arch = self.llm.metadata.get("general.architecture", "")
        own = f"{arch}.pooling_type" in self.llm.metadata  # embedding models say how they pool
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if own else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        return _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)

    def embed_tokens(self, context: Any, tokens: list[int]) -> list[float]:
        """The pooled embedding of ``tokens`` (at most the context's size) in ``context``."""
        import llama_cpp
        from llama_cpp import _internals

        batch = _internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1, verbose=False)
        try:
            llama_cpp.llama_memory_clear(context.memory, True)
            batch.add_sequence(tokens, 0, True)
            context.decode(batch)
            pointer = llama_cpp.llama_get_embeddings_seq(context.ctx, 0)
            return [float(v) for v in pointer[: self.llm.n_embd()]]
        finally:
            batch.close()

    def make_context(self, sequences: int, n_ctx: int) -> None:
        """Replace the context by one for ``sequences`` sequences of ``n_ctx`` tokens each.

        Each sequence gets a KV cache of its own (not one unified cache): in a shared cache a
        sequence's cells end up out of position order as others come and go, attention then adds
        them up in another order, and measured greedy answers changed (1 of 16 in a batch); with
        a cache each they are the answers given alone, token for token."""
        from llama_cpp import _internals

        params = self.llm.context_params
        params.n_seq_max = sequences
        params.n_ctx = n_ctx * sequences  # llama.cpp gives each sequence n_ctx / n_seq_max
        params.kv_unified = False
        self.llm._ctx.close()
        self.llm._ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
