"""The LLM's attention backends, chosen by `llm.attention = auto | sdpa | flex | flash_attn | xformers`.

  sdpa        PyTorch's scaled_dot_product_attention through transformers' own "sdpa" (PyTorch picks flash, cuDNN or
              memory-efficient); packed rows get a dense block-diagonal causal mask.
  flex        torch.nn.attention.flex_attention with a document mask (a BlockMask built once per forward), compiled
              on CUDA. PyTorch has no FlexAttention backward on CPU, so it is not available there for training.
  flash_attn  flash-attn's varlen kernel over all rows flattened, each sample (and each row's padding tail) a sequence
              of its own through cu_seqlens. CUDA sm80+, fp16/bf16.
  xformers    xformers' memory_efficient_attention with a block-diagonal causal mask over the same sequences.

`auto` takes the first available of AUTO_PRIORITY on CUDA (flash_attn, xformers, sdpa) and sdpa on CPU; flex is only
used when asked for (it compiles a kernel per new shape). The three non-sdpa backends are registered in transformers'
public attention-function registry (`AttentionInterface`) under `merv_<name>` and read the row layout from the
`documents` keyword that `llm.llm_forward` passes through the model on training forwards; called without it
(generation with a KV cache, a direct `llm(...)` call) they run transformers' sdpa on the mask transformers builds
for them (registered as sdpa's). On packed rows transformers still builds that mask from the restarting position ids
once per forward (rows x length^2 booleans, unused): small next to the step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from merv_fast.config import LLM_ATTENTION, ConfigError

ATTENTION_BACKENDS = tuple(n for n in LLM_ATTENTION if n != "auto")
AUTO_PRIORITY = ("flash_attn", "xformers", "sdpa")


# ----------------------------------------------------------------------------------------------- row layout
def sample_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row of a right-padded [B, S] mask (ones, then zeros); anything else is a ValueError."""
    real = attention_mask.bool()
    counts = real.sum(dim=1)
    if not torch.equal(real, torch.arange(real.shape[1], device=real.device)[None] < counts[:, None]):
        raise ValueError("attention_mask is not right-padded (ones, then zeros)")
    if not bool((counts > 0).all()):
        raise ValueError("attention_mask has a row without any token")
    return counts.tolist()


@dataclass
class Documents:
    """Which positions of a [rows, length] batch attend which: each row is a run of segments (one per sample, then
    the row's padding tail, if any), and a position attends causally within its own segment only."""

    segments: list[list[int]]  # per row: segment lengths, summing to the row length
    device: torch.device
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        lengths = {sum(row) for row in self.segments}
        if len(lengths) != 1 or any(n <= 0 for row in self.segments for n in row):
            raise ValueError(f"segments {self.segments} do not tile rows of one length")

    @classmethod
    def from_padding_mask(cls, attention_mask: torch.Tensor) -> "Documents":
        """A right-padded [B, S] mask: each row is one sample followed by its padding."""
        width = attention_mask.shape[1]
        return cls([[n, width - n] if n < width else [n] for n in sample_lengths(attention_mask)],
                   attention_mask.device)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.segments), sum(self.segments[0])

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def doc_ids(self) -> torch.Tensor:
        """[rows, length] int64, a distinct id per segment."""
        def build():
            lengths = torch.tensor([n for row in self.segments for n in row])
            ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            return ids.view(self.shape).to(self.device)
        return self._cached("doc_ids", build)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """int32 [segments + 1]: segment boundaries over all rows flattened (flash-attn's varlen layout)."""
        def build():
            lengths = torch.tensor([0] + [n for row in self.segments for n in row])
            return lengths.cumsum(0).to(torch.int32).to(self.device)
        return self._cached("cu_seqlens", build)

    @property
    def max_seqlen(self) -> int:
        return max(n for row in self.segments for n in row)

    def dense_mask(self) -> torch.Tensor:
        """[rows, 1, length, length] bool, True where attention is allowed (block-diagonal causal)."""
        def build():
            ids = self.doc_ids
            pos = torch.arange(ids.shape[1], device=self.device)
            causal = pos[None, :] <= pos[:, None]
            return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
        return self._cached("dense", build)

    def block_mask(self):
        """FlexAttention's BlockMask for this layout, built once and shared by every layer."""
        def build():
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.doc_ids

            def same_document_causal(b, h, q, k):
                return (ids[b, q] == ids[b, k]) & (k <= q)

            rows, length = self.shape
            return create_block_mask(same_document_causal, rows, None, length, length, device=self.device)
        return self._cached("block", build)


# ----------------------------------------------------------------------------------------------- availability
def _cuda_why(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device (this is {device.type})"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def _import_why(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as err:  # optional GPU packages also fail with OSError/RuntimeError (missing .so, ABI)
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {text[:200]}"
    return None


def sdpa_available(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    return True, f"torch {torch.__version__} scaled_dot_product_attention"


def flex_available(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    why = _import_why("torch.nn.attention.flex_attention")
    if why:
        return False, f"torch {torch.__version__} has no FlexAttention ({why})"
    if device.type == "cpu":
        return False, f"torch {torch.__version__} has no FlexAttention backward on CPU (forward only)"
    why = _cuda_why(device) or _import_why("triton")
    return (False, why) if why else (True, "torch.nn.attention.flex_attention, compiled")


def _cuda_package_why(module: str, label: str, device: torch.device) -> str | None:
    why = _import_why(module)
    return f"{label} not importable ({why})" if why else _cuda_why(device)


def flash_attn_available(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    why = _cuda_package_why("flash_attn", "flash-attn", device)
    if why:
        return False, why
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"flash-attn needs sm80+, this GPU is sm{major}{minor}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"flash-attn needs fp16/bf16, not {dtype}"
    import flash_attn

    return True, f"flash-attn {getattr(flash_attn, '__version__', '?')} varlen"


def xformers_available(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    why = _cuda_package_why("xformers.ops", "xformers", device)
    if why:
        return False, why
    import xformers

    return True, f"xformers {getattr(xformers, '__version__', '?')} memory_efficient_attention"


AVAILABLE = {"sdpa": sdpa_available, "flex": flex_available, "flash_attn": flash_attn_available,
             "xformers": xformers_available}


def availability(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, tuple[bool, str]]:
    device = torch.device(device)
    return {name: AVAILABLE[name](device, dtype) for name in ATTENTION_BACKENDS}


def resolve_attention(requested: str, device: torch.device | str,
                      dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(backend, why) for `requested` on `device`; an unknown or unavailable request is a ConfigError saying why."""
    device = torch.device(device)
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa", f"auto on {device.type}: sdpa (the others need CUDA)"
        skipped = []
        for name in AUTO_PRIORITY:
            ok, why = AVAILABLE[name](device, dtype)
            if ok:
                tried = f" ({'; '.join(skipped)})" if skipped else ""
                return name, f"auto on cuda: first available of {list(AUTO_PRIORITY)}{tried}"
            skipped.append(f"{name}: {why}")
    if requested not in ATTENTION_BACKENDS:
        raise ConfigError(f"llm.attention={requested!r}; choose one of {list(LLM_ATTENTION)}")
    ok, why = AVAILABLE[requested](device, dtype)
    if not ok:
        raise ConfigError(f"llm.attention={requested!r} is not available on {device}: {why}")
    return requested, f"requested ({why})"


# ----------------------------------------------------------------------------------------------- the kernels
# Each takes transformers' layout (query [B, H, S, D], key/value [B, Hkv, S, D]) and returns [B, S, H, D].
def sdpa_documents(query, key, value, documents: Documents, scaling: float | None, dropout: float = 0.0):
    """The torch reference for every backend: SDPA with the dense block-diagonal causal mask (rows x length^2: what
    transformers' sdpa gets for packed rows when `sdpa_packed` is not installed)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=documents.dense_mask(), dropout_p=dropout,
                                         scale=scaling)
    return out.transpose(1, 2)


def sdpa_segments(query, key, value, documents: Documents, scaling: float | None, dropout: float = 0.0):
    """SDPA once per segment (each packed sample, each padding tail), causal within it: the block-diagonal causal
    attention with no mask in memory, so PyTorch may pick its flash or cuDNN kernel and packed rows cost what their
    samples cost. Exact: a segment's positions see exactly their own segment's earlier positions."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    rows = []
    for r, segments in enumerate(documents.segments):
        parts, start = [], 0
        for n in segments:
            end = start + n
            parts.append(F.scaled_dot_product_attention(query[r:r + 1, :, start:end], key[r:r + 1, :, start:end],
                                                        value[r:r + 1, :, start:end], dropout_p=dropout,
                                                        is_causal=True, scale=scaling))
            start = end
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_documents(query, key, value, documents: Documents, scaling: float | None, dropout: float = 0.0):
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ValueError("llm.attention=flex has no attention dropout")
    fn = _compiled_flex() if query.is_cuda else flex_attention  # eager flex is a slow reference path
    out = fn(query, key, value, block_mask=documents.block_mask(), scale=scaling,
             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _flat(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def flash_attn_documents(query, key, value, documents: Documents, scaling: float | None, dropout: float = 0.0):
    from flash_attn import flash_attn_varlen_func

    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"llm.attention=flash_attn needs fp16/bf16 activations, got {query.dtype} (train under "
                         "bf16 autocast or mixed precision, or choose sdpa)")
    b, h, s, d = query.shape
    cu, longest = documents.cu_seqlens, documents.max_seqlen
    out = flash_attn_varlen_func(_flat(query), _flat(key), _flat(value), cu, cu, longest, longest,
                                 dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.view(b, s, h, d)


def xformers_documents(query, key, value, documents: Documents, scaling: float | None, dropout: float = 0.0):
    from xformers.ops import fmha, memory_efficient_attention

    b, h, s, d = query.shape
    groups = h // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bias = _xformers_bias(documents, fmha)
    out = memory_efficient_attention(_flat(query)[None], _flat(key)[None], _flat(value)[None], attn_bias=bias,
                                     p=dropout, scale=scaling)
    return out.view(b, s, h, d)


def _xformers_bias(documents: Documents, fmha):
    return documents._cached("xformers", lambda: fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(
        [n for row in documents.segments for n in row]))


# `sdpa_packed` is sdpa for packed training (TrainModule installs it in place of sdpa when packing is on): the
# same function, one SDPA call per sample instead of transformers' sdpa on a dense block-diagonal mask.
KERNELS = {"sdpa": sdpa_documents, "sdpa_packed": sdpa_segments, "flex": flex_documents,
           "flash_attn": flash_attn_documents, "xformers": xformers_documents}


# ----------------------------------------------------------------------------------------------- transformers glue
def hf_name(backend: str) -> str:
    """The name `config._attn_implementation` carries for `backend`."""
    return "sdpa" if backend == "sdpa" else f"merv_{backend}"


def _registered_function(backend: str):
    kernel = KERNELS[backend]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, documents=None, **kwargs):
        if documents is None:  # not our training forward: transformers' sdpa on the mask it built for us
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        device = query.device.type
        if torch.is_autocast_enabled(device):
            # RoPE's fp32 cos/sin promote q and k to fp32 under autocast; sdpa is autocast-listed, these kernels are
            # not (and need one dtype): cast to the autocast dtype, as sdpa would.
            dtype = torch.get_autocast_dtype(device)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        return kernel(query, key, value, documents, scaling, dropout), None

    attention.__name__ = f"{hf_name(backend)}_attention"
    return attention


@functools.lru_cache(maxsize=None)
def register(backend: str) -> str:
    """Register `backend` with transformers (once) and return its implementation name."""
    name = hf_name(backend)
    if backend == "sdpa":
        return name
    from transformers import AttentionInterface

    AttentionInterface.register(name, _registered_function(backend))
    try:  # transformers >= 4.53 builds masks per implementation; ours get sdpa's (used only without `documents`)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return name
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def backend_of(llm) -> str | None:
    """The backend `llm` attends with: one of ATTENTION_BACKENDS, or None for another transformers implementation."""
    name = getattr(llm.config, "_attn_implementation", None)
    if name == "sdpa":
        return "sdpa"
    if name and name.startswith("merv_") and name[5:] in KERNELS:
        return name[5:]
    return None


def install_for_packing(llm) -> str | None:
    """Packed training: an `llm` on sdpa switches to `sdpa_packed` (the other backends take packed rows as they
    are). Returns the backend it attends with now."""
    if backend_of(llm) == "sdpa":
        install(llm, "sdpa_packed")
    return backend_of(llm)


def install(llm, backend: str) -> None:
    """Make `llm` (a transformers causal LM) attend with `backend`."""
    name = register(backend)
    if getattr(llm.config, "_attn_implementation", None) == name:
        return
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(name)
    else:  # transformers < 4.56
        llm.config._attn_implementation = name
