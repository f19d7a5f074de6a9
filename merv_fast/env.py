"""What this machine offers merv_fast: versions, devices, optional packages and why any of them is unusable.

`merv-fast env` prints `format_report(environment_report())`; the GPU suite stores the same report in its results
file, and `versions()` is the header every results file carries.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Optional packages that merv_fast uses when present: report name -> (import name, needs a CUDA device to be useful).
OPTIONAL_PACKAGES = {
    "DALI": ("nvidia.dali", True),
    "torchcodec": ("torchcodec", False),
    "PyAV": ("av", False),
    "flash-attn": ("flash_attn", True),
    "xformers": ("xformers", True),
    "transformers": ("transformers", False),
}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


def _version_of(module: Any, dist_name: str) -> str | None:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _no_cuda_why() -> str | None:
    if torch.cuda.is_available():
        return None
    return "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device visible"


def probe_package(import_name: str, needs_cuda: bool = False) -> dict[str, Any]:
    """{'available': imports?, 'usable': imports and has what it needs, 'version', 'why' (when not usable)}."""
    try:
        module = importlib.import_module(import_name)
    except Exception as err:  # optional GPU packages fail with OSError/RuntimeError too (missing .so, no driver)
        return {"available": False, "usable": False, "version": None, "why": _short(err)}
    info = {"available": True, "usable": True, "version": _version_of(module, import_name.split(".")[0]),
            "why": None}
    if needs_cuda and _no_cuda_why():
        info.update(usable=False, why=f"installed, but {_no_cuda_why()}")
    return info


def probe_apex() -> dict[str, Any]:
    """NVIDIA apex, told apart from the unrelated PyPI package also named `apex` by what the package contains."""
    spec = importlib.util.find_spec("apex")
    if spec is None:
        return {"available": False, "usable": False, "version": None, "why": "No module named 'apex'"}
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    if not any((Path(root) / part).exists() for root in roots for part in ("optimizers", "amp")):
        return {"available": False, "usable": False, "version": None,
                "why": f"unrelated package named apex at {roots[0]} (not NVIDIA apex: no apex.optimizers/apex.amp)"}
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception as err:
        return {"available": False, "usable": False, "version": None, "why": f"NVIDIA apex, broken: {_short(err)}"}
    info = {"available": True, "usable": True, "version": _version_of(sys.modules["apex"], "apex"), "why": None}
    if importlib.util.find_spec("amp_C") is None:  # the fused optimizers need apex's compiled CUDA extensions
        info.update(usable=False, why="NVIDIA apex installed without its CUDA extensions (no amp_C)")
    elif _no_cuda_why():
        info.update(usable=False, why=f"installed, but {_no_cuda_why()}")
    return info


def probe_triton() -> dict[str, Any]:
    from merv_fast.kernels.dispatch import interpreter_enabled, triton_available

    imports, reason = triton_available()
    if not imports:
        return {"available": False, "usable": False, "version": None, "interpreter": False, "why": reason}
    import triton

    info = {"available": True, "usable": True, "version": triton.__version__, "interpreter": interpreter_enabled(),
            "why": None}
    if _no_cuda_why() and not info["interpreter"]:
        info.update(usable=False, why=f"{_no_cuda_why()}; TRITON_INTERPRET=1 runs the kernels in the interpreter")
    return info


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def git_sha() -> str | None:
    """The commit of the source tree merv_fast runs from, '+dirty' when it has uncommitted changes."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """The `versions` header of a results file (see BENCH_RESULTS.md)."""
    import merv_fast

    triton = probe_triton()
    return {"merv_fast": git_sha() or merv_fast.__version__, "torch": torch.__version__,
            "triton": triton["version"], "cuda": torch.version.cuda, "driver": driver_version()}


def cuda_devices() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"name": props.name, "memory_bytes": props.total_memory,
                        "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"})
    return devices


def kernel_backend_report() -> dict[str, Any]:
    from merv_fast.kernels.dispatch import BackendError, requested_backend, resolve_backend, use_backend

    probe = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu")
    requested, source = requested_backend()
    with use_backend("auto"):
        auto = resolve_backend(probe)
    try:
        resolved, why = resolve_backend(probe), None
    except BackendError as err:
        resolved, why = None, str(err)
    return {"requested": requested, "source": source, "device": probe.device.type, "resolves_to": resolved,
            "auto_resolves_to": auto, "why": why}


def native_report() -> dict[str, Any]:
    from merv_fast import native

    return {"available": native.native_available(), "reason": native.native_reason(),
            "build_info": native.build_info()}


def decoder_report() -> dict[str, Any]:
    """Which video decoder `--decoder auto` picks here, and why."""
    try:
        from merv_fast.data.decode import choose_decoder

        name, why = choose_decoder("auto")
    except Exception as err:  # no decoder at all, or PyAV missing: say so rather than fail the report
        name, why = None, _short(err)
    return {"auto": name, "why": why}


def attention_report() -> dict[str, Any]:
    """Each LLM attention backend on this machine's training device, available or not and why; what `auto` picks."""
    from merv_fast.model.attention import availability, resolve_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None  # the trainer's activations on a GPU
    auto, why = resolve_attention("auto", device, dtype)
    backends = {name: {"available": ok, "why": reason} for name, (ok, reason) in availability(device, dtype).items()}
    return {"device": device.type, "backends": backends, "auto": auto, "why": why}


def environment_report() -> dict[str, Any]:
    packages = {"triton": probe_triton()}
    packages.update({name: probe_package(module, needs_cuda) for name, (module, needs_cuda)
                     in OPTIONAL_PACKAGES.items()})
    packages["NVIDIA apex"] = probe_apex()
    from merv_fast.dependencies import requirement_versions

    return {
        "requirements": requirement_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": {"torch_built_with": torch.version.cuda, "available": torch.cuda.is_available(),
                 "why": _no_cuda_why(), "driver": driver_version()},
        "devices": cuda_devices(),
        "packages": packages,
        "native": native_report(),
        "kernels": kernel_backend_report(),
        "attention": attention_report(),
        "decoder": decoder_report(),
        "merv_fast": versions()["merv_fast"],
    }


def missing_packages(report: dict[str, Any]) -> dict[str, str]:
    """Optional packages that are not usable here, with why: the list a benchmark reader needs first."""
    return {name: info["why"] for name, info in report["packages"].items() if not info["usable"]}


def _package_line(info: dict[str, Any]) -> str:
    if info["usable"]:
        extra = " (Triton interpreter, TRITON_INTERPRET=1)" if info.get("interpreter") else ""
        return f"{info['version'] or 'available'}{extra}"
    prefix = f"{info['version']}, not usable" if info["available"] else "not available"
    return f"{prefix}: {info['why']}"


def format_report(report: dict[str, Any]) -> str:
    from merv_fast.dependencies import format_versions

    cuda = report["cuda"]
    lines = [("merv_fast", report["merv_fast"]), ("requirements", format_versions(report["requirements"])),
             ("python", f"{report['python']} ({report['platform']})"), ("torch", report["torch"])]
    if cuda["available"]:
        lines.append(("CUDA", f"{cuda['torch_built_with']}, driver {cuda['driver'] or 'unknown'}"))
    else:
        lines.append(("CUDA", f"not available: {cuda['why']}"))
    for index, dev in enumerate(report["devices"]):
        lines.append((f"cuda:{index}", f"{dev['name']}, {dev['memory_bytes'] / 2**30:.1f} GiB, "
                                       f"{dev['sm_count']} SMs, sm_{dev['capability'].replace('.', '')}"))
    for name, info in report["packages"].items():
        lines.append((name, _package_line(info)))
    native = report["native"]
    lines.append(("native _C", f"built: {native['build_info']}" if native["available"] else native["reason"]))
    kernels = report["kernels"]
    resolved = kernels["resolves_to"] or f"error: {kernels['why']}"
    lines.append(("kernels", f"{kernels['requested']} (from {kernels['source']}) -> {resolved} on "
                             f"{kernels['device']}; auto -> {kernels['auto_resolves_to']}"))
    attention = report.get("attention")
    if attention:
        for name, info in attention["backends"].items():
            state = "available" if info["available"] else "not available"
            lines.append((f"attention {name}", f"{state}: {info['why']}"))
        lines.append(("attention auto", f"{attention['auto']} on {attention['device']} ({attention['why']})"))
    decoder = report.get("decoder")
    if decoder:
        lines.append(("decoder", f"{decoder['auto'] or 'none'} ({decoder['why']})"))
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {text}" for label, text in lines)
