"""pocketlm: run language models locally (a Rust library), with mlx-lm's API.

Type stubs of the extension module built from bindings/python/src/lib.rs (keep them in step).
"""

import os
from collections.abc import Iterator, Sequence
from typing import Literal, overload

__version__: str

class PocketLMError(Exception):
    """Base class of the errors pocketlm raises (one line, naming the file, tensor or field)."""

class NotFoundError(PocketLMError, FileNotFoundError):
    """A model, adapter or other file that does not exist."""

class InvalidArgumentError(PocketLMError, ValueError):
    """A bad value: sampling settings, an empty prompt, a prompt longer than the context, a
    token id outside the vocabulary, a message without `role` or `content`."""

class Model:
    """A loaded model (network, tokenizer, chat template). Made by `load`; thread-safe."""

    @property
    def path(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def load_adapter(self, path: str | os.PathLike[str]) -> int:
        """Loads a LoRA adapter folder (mlx-lm format: adapter_config.json,
        adapters.safetensors), replacing any loaded one; returns the layers adapted. Raises
        NotFoundError, or PocketLMError while a ChatSession or running generation uses the
        model."""
    def unload_adapter(self) -> int:
        """Removes the adapter; returns the layers restored (0 when none was loaded)."""

class Tokenizer:
    """The model's tokenizer and chat template (transformers' method names)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: Literal[True] = True,
    ) -> list[int]: ...
    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        tokenize: Literal[False],
    ) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation."""
    @property
    def chat_template(self) -> str | None:
        """The chat template's Jinja source."""

class GenerationResponse:
    """One step of a stream (mlx-lm's GenerationResponse)."""

    text: str
    """Text that became final with this step (may be empty)."""
    token: int | None
    """The token of this step; None on a last response that carries no new token."""
    finish_reason: Literal["stop", "length"] | None
    """None until the last response."""
    prompt_tokens: int
    """Prompt tokens prefilled (last response only)."""
    prompt_tps: float
    """Prefill tokens per second (last response only)."""
    generation_tokens: int
    """Tokens generated so far."""
    generation_tps: float
    """Decode tokens per second (last response only)."""
    peak_memory: float
    """Peak resident memory in GB (last response only, Linux)."""

class GenerationStream(Iterator[GenerationResponse]):
    """A running generation; deleting it stops the generation."""

    def __iter__(self) -> GenerationStream: ...
    def __next__(self) -> GenerationResponse: ...

def load(
    path_or_hf_repo: str | os.PathLike[str] | None = None,
    adapter_path: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    exact_mlx_matmul: bool = False,
    no_repack: bool = False,
) -> tuple[Model, Tokenizer]:
    """Loads a .gguf file, a Hugging Face / MLX folder or a hub id `org/name[@revision]`; None
    loads the default model (SmolLM2-135M-Instruct Q4_1, downloaded on first use)."""

def generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    verbose: bool = False,
) -> str:
    """The whole answer. Settings left None take the model's defaults (temperature 0.8,
    top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 unless generation_config.json
    says otherwise); temp=0.0 is greedy. The GIL is released while the model runs."""

def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
) -> GenerationStream:
    """The answer as GenerationResponse steps; errors are raised by the iterator."""

class ChatSession:
    """A conversation that keeps its KV cache between turns."""

    def __init__(
        self,
        model: Model,
        system: str | None = None,
        max_tokens: int = 256,
        *,
        temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        repetition_context_size: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> None: ...
    def send(self, text: str) -> str:
        """Answers a user message; the reply joins the history."""
    def stream(self, text: str) -> GenerationStream:
        """Answers a user message as a stream; the reply joins the history when it ends or
        is deleted."""
    def reset(self) -> None:
        """Forgets the conversation (the system message stays)."""
    @property
    def history(self) -> list[dict[str, str]]:
        """The messages so far, without the system message."""

def convert(
    hf_path: str | os.PathLike[str] | None = None,
    mlx_path: str | os.PathLike[str] = "mlx_model",
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: str | None = None,
    dequantize: bool = False,
    quant_predicate: Literal["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"] | None = None,
    *,
    q_overrides: Sequence[str] | None = None,
    quantize_vision: bool = False,
) -> str:
    """Converts a GGUF file or a Hugging Face / MLX folder to an MLX folder (as mlx-lm's
    convert and `pocketlm convert`); returns the output folder."""

class EmbeddingModel:
    """A sentence-embedding model (encoder, tokenizer, pooling, normalization), as
    sentence-transformers computes embeddings. Made by `load_embedding`; thread-safe."""

    @property
    def dimension(self) -> int:
        """Length of the embeddings (384 for all-MiniLM-L6-v2)."""
    @property
    def max_tokens(self) -> int:
        """Longest input in tokens (special tokens included); longer texts are truncated."""
    @property
    def normalizes(self) -> bool:
        """Whether `embed` L2-normalizes by default (`normalize=None`)."""
    @property
    def architecture(self) -> str:
        """`bert` or `qwen3`."""
    @property
    def path(self) -> str:
        """The folder the model was loaded from."""
    def embed(
        self,
        texts: str | Sequence[str],
        normalize: bool | None = None,
        dimensions: int | None = None,
        batch_size: int = 32,
    ) -> list[list[float]]:
        """One list of `dimension` floats per text, in order. A single str is one text: the
        answer is a list holding one vector (`embed("hi")[0]`). `normalize`: unit length or
        not (None: the model's choice). `dimensions`: keep the first values and normalize
        again (only models trained for it, Qwen3-Embedding; others accept their full
        dimension only). The GIL is released while it runs. Raises InvalidArgumentError for
        unsupported `dimensions` or `batch_size` 0, TypeError for texts that are not str."""

def load_embedding(
    path_or_id: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
) -> EmbeddingModel:
    """Loads a sentence-transformers / Hugging Face folder (BERT, or Qwen3 as
    Qwen3-Embedding), a hub id, or the name `all-minilm-l6-v2`; None is all-minilm-l6-v2
    (downloaded on first use). `device`: "auto" (None), "cpu", "cuda", "cuda:N" or "metal"."""
