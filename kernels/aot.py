"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here: what a GPU's JIT would build.

Every Triton launch in kernels/ goes through `launch(kernel, grid, *args, **kwargs)`. Normally it launches. Inside
`recording()` it launches nothing and records the call instead: the JIT function, the arguments exactly as the
launcher computed them (tensors on the meta device carry dtypes and strides, no data), and every config an autotuner
may pick. Each kernel module says which launches the model makes with a function

    aot_launches(model: ModelShapes) -> None      # calls the module's own launchers on meta tensors

so the recorded arguments are the launchers' own (strides, block sizes, flags), not a copy of them. Launches are
recorded per target (`recording(arch)` pins `dispatch.target_arch`): a launcher may pick another variant for sm_90
than for sm_80 (TMA loads), and each target compiles what it would run.

`compile_launch` then builds one recorded launch for a target (sm_90 or sm_80) the way the JIT does: the same
argument specialization (`create_function_from_signature` and `_pack_args`, the JIT's binder: ints equal to 1 become
constants, multiples of 16 and aligned pointers get their divisibility attributes), `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and the ptxas that ships in the triton wheel. No GPU and no CUDA driver are
needed. From the result: registers and spill bytes (ptxas's own report), shared memory, the tensor-core instruction
(wgmma / mma) and TMA (cp.async.bulk.tensor) from the PTX.

This file imports nothing from merv_fast: the model's shapes come in as a `ModelShapes`.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import dataclasses
import io
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .dispatch import interpreter_compat, interpreter_enabled, use_target
from .preprocess import EncoderInputSpec

# The CUDA limits the check holds each compiled kernel to: the largest shared memory one block may opt in to, and
# the register file of one SM (a block's warps * 32 threads * registers per thread must fit in it).
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes: H100 227 KiB, A100 163 KiB
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255
TARGETS = (90, 80)

# Modules of kernels/ that hold Triton kernels are found by reading their source (`discover_kernels`); each must
# define `aot_launches`. A launcher module may keep its kernels in a sibling file (project_fuse -> _triton).
LAUNCH_SPEC = "aot_launches"


@dataclasses.dataclass(frozen=True)
class EncoderShape:
    """One encoder's features as the pooling sees them: [B, time_steps, grid_h * grid_w, channels]."""

    time_steps: int
    grid: tuple[int, int]
    channels: int


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """What the kernels' launch specs need to know of a model configuration (merv_fast builds it from a preset)."""

    name: str  # the preset, for the table
    dtype: torch.dtype  # activations and visual path (bf16 or fp16)
    batch: int
    encoders: tuple[EncoderShape, ...]
    pool_size: tuple[int, int, int]
    llm_hidden: int
    llm_intermediate: int
    llm_heads: int
    llm_kv_heads: int
    sequence: int  # tokens per sample in the LLM: visual tokens + text
    input_specs: tuple[EncoderInputSpec, ...]  # every encoder's preprocessing
    frames_sampled: int
    frame_size: tuple[int, int]  # decoded video frames, H x W

    def empty(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A meta tensor: strides and dtype, no memory."""
        return torch.empty(shape, dtype=dtype or self.dtype, device="meta")


@dataclasses.dataclass
class RecordedLaunch:
    kernel: str  # "<module>.<function>"
    fn: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    configs: list[dict]  # the autotuner's configs (Config.all_kwargs()), or [{}] for a kernel launched as is


_recording: contextvars.ContextVar[list | None] = contextvars.ContextVar("merv_fast_aot_recording", default=None)


def launch(kernel, grid, *args, **kwargs):
    """Launch a Triton kernel (a JITFunction or an autotuner) on `grid`; inside `recording()`, record it instead."""
    sink = _recording.get()
    if sink is None:
        if interpreter_enabled():
            interpreter_compat()
        else:
            ensure_scratch_allocator()
        return kernel[grid](*args, **kwargs)
    configs = getattr(kernel, "configs", None)
    fn = getattr(kernel, "fn", kernel) if configs is not None else kernel
    sink.append(RecordedLaunch(kernel_name(fn), fn, args, dict(kwargs),
                               [c.all_kwargs() for c in configs] if configs is not None else [{}]))
    return None


def kernel_name(fn) -> str:
    python_fn = getattr(fn, "fn", fn)
    return f"{python_fn.__module__.rsplit('.', 1)[-1]}.{python_fn.__name__}"


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # torch's caching allocator, on the current device and stream (the ones triton launches on); its blocks are
    # 512-byte aligned, more than any alignment triton asks for (128 for a TMA descriptor).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give triton an allocator for kernels that need global scratch memory at launch (a TMA descriptor made in the
    kernel lives there) where none is set. triton keeps it in a ContextVar (`triton.set_allocator`), so a thread that
    never set one has none, e.g. the autograd engine's thread that runs the backward on CUDA: checked per launch, in
    the launching thread. An allocator the caller set stays."""
    import triton
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None or isinstance(current.get(), null):
        triton.set_allocator(_torch_scratch)


@contextlib.contextmanager
def recording(target: int) -> Iterator[list[RecordedLaunch]]:
    """Collect the launches made in the block (nothing runs), built as for sm_<target>. Launchers must see the GPU
    path, not the interpreter's."""
    if interpreter_enabled():
        raise RuntimeError("recording launches for AOT compilation needs TRITON_INTERPRET unset: the interpreter "
                           "path launches other block sizes than a GPU")
    sink: list[RecordedLaunch] = []
    token = _recording.set(sink)
    try:
        with use_target(target):
            yield sink
    finally:
        _recording.reset(token)


def record_module(module, model: ModelShapes, target: int) -> list[RecordedLaunch]:
    """The launches `module.aot_launches(model)` makes on sm_<target>."""
    spec = getattr(module, LAUNCH_SPEC, None)
    if spec is None:
        raise LookupError(f"{module.__name__} holds Triton kernels but defines no `{LAUNCH_SPEC}(model)` launch spec")
    with recording(target) as launches:
        spec(model)
    return launches


# ---------------------------------------------------------------------------------------------------------------------
# Which kernels exist: every function that kernels/*.py hands to triton.jit, as a decorator or as a call.
# ---------------------------------------------------------------------------------------------------------------------


def _is_triton_jit(node: ast.AST) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Attribute) and target.attr == "jit"
            and isinstance(target.value, ast.Name) and target.value.id == "triton")


def discover_kernels(folder: str | Path | None = None) -> dict[str, str]:
    """{"<module>.<function>": module file name} for every Triton kernel defined in kernels/*.py."""
    folder = Path(folder or Path(__file__).parent)
    found = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        defined = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        jitted = {name for name, n in defined.items() if any(_is_triton_jit(d) for d in n.decorator_list)}
        for node in ast.walk(tree):  # triton.jit(_kernel): bodies compiled lazily, on first launch
            if isinstance(node, ast.Call) and _is_triton_jit(node) and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Name) and arg.id in defined:
                    jitted.add(arg.id)
        for name in jitted:
            found[f"{path.stem}.{name}"] = path.name
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Compiling one recorded launch for one target, as the JIT would.
# ---------------------------------------------------------------------------------------------------------------------


def _jit_inputs(fn, args: tuple, kwargs: dict, arch: int):
    """(backend, target, signature, constexprs, attrs, options): the JIT's own specialization of these arguments."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    # What JITFunction.run adds before binding (the knobs present in this triton version).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return target, signature, constexprs, attrs, options


def _describe(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(getattr(value, "value", value))


def compile_key(fn, args: tuple, kwargs: dict, arch: int) -> str:
    """A string naming what would be compiled: equal keys give the same binary (used to compile each once)."""
    _, signature, constexprs, attrs, options = _jit_inputs(fn, args, kwargs, arch)
    consts = sorted((str(k), _describe(v)) for k, v in constexprs.items())
    # fn.cache_key: triton's hash of the kernel's source and of the jit functions it calls.
    return repr((kernel_name(fn), fn.cache_key, arch, sorted(signature.items()), consts, sorted(map(repr, attrs.items())),
                 sorted((k, repr(v)) for k, v in vars(options).items())))


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass
class CompiledInfo:
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int
    tensor_core: str  # "wgmma" | "mma" | "" (no tensor-core instruction)
    tma: bool


def compile_launch(fn, args: tuple, kwargs: dict, arch: int) -> CompiledInfo:
    """Compile for sm_<arch> with the wheel's ptxas (no GPU needed) and read what the binary uses."""
    import triton
    from triton import knobs
    from triton.compiler.compiler import ASTSource

    target, signature, constexprs, attrs, options = _jit_inputs(fn, args, kwargs, arch)
    log = io.StringIO()
    # ptxas's -v report is printed only when asked for, and only when ptxas runs: no cache hit.
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=vars(options))
    report = log.getvalue()
    usage, spills = _PTXAS_USAGE.findall(report), _PTXAS_SPILLS.findall(report)
    if not usage or not spills:
        raise RuntimeError(f"no ptxas resource report for {kernel_name(fn)} on sm_{arch}: {report[-500:]!r}")
    ptx = compiled.asm["ptx"]
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    return CompiledInfo(registers=max(int(n) for n in usage),
                        spill_stores=max(int(s) for s, _ in spills), spill_loads=max(int(s) for _, s in spills),
                        shared_bytes=int(compiled.metadata.shared), num_warps=int(compiled.metadata.num_warps),
                        tensor_core=tensor_core, tma="cp.async.bulk.tensor" in ptx)


def limit_problems(info: CompiledInfo, arch: int) -> list[str]:
    """Why this binary would fail or slow down on the target: spills, shared memory, the register file."""
    problems = []
    if info.spill_stores or info.spill_loads:
        problems.append(f"spills {info.spill_stores} B stored / {info.spill_loads} B loaded")
    if info.shared_bytes > SHARED_MEMORY_LIMIT[arch]:
        problems.append(f"shared memory {info.shared_bytes} B > sm_{arch}'s {SHARED_MEMORY_LIMIT[arch]} B")
    if info.registers * info.num_warps * 32 > REGISTERS_PER_SM:
        problems.append(f"{info.registers} registers x {info.num_warps * 32} threads > {REGISTERS_PER_SM}")
    return problems


def config_label(config: dict) -> str:
    """`BLOCK_L=128 BLOCK_D=64 w4 s3` for an autotune config; `-` for a kernel launched with its call's values."""
    if not config:
        return "-"
    parts = [f"{k}={v}" for k, v in config.items() if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg")]
    if "num_warps" in config:
        parts.append(f"w{config['num_warps']}")
    if "num_stages" in config:
        parts.append(f"s{config['num_stages']}")
    return " ".join(parts)
