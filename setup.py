"""Packaging for merv_fast, and the driver of its native build.

Layout: the Python package `merv_fast/` plus the top-level `kernels/` directory, which is installed as
`merv_fast.kernels` (never as a global `kernels`). The native library `merv_fast._C` is built from CMakeLists.txt
when CMake, a C++ compiler and torch are all there at build time; otherwise the build says why in one line and
carries on, and the package runs on its Python fallbacks. Either way the outcome is written to
`merv_fast/_native_status.json`, which `merv_fast.native.native_reason()` reports.

    pip install --no-build-isolation -e ".[test,video]"   # editable: _C lands in merv_fast/ in the source tree
    pip install --no-build-isolation .                    # regular install
    MERV_FAST_NO_NATIVE=1 pip install ...                 # skip the native library
    MERV_FAST_REQUIRE_NATIVE=1 pip install ...            # a failed native build fails the install
    MERV_FAST_CUDA=1 pip install ...                      # also compile kernels/csrc/*.cu (needs nvcc)

`--no-build-isolation` matters: the library must be compiled against the torch that will import it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE_NAME = "merv_fast._C"
STATUS_FILE = "_native_status.json"


def read_version() -> str:
    # Read, not imported: importing merv_fast at build time would need its dependencies installed already.
    text = (ROOT / "merv_fast" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def find_cmake() -> str | None:
    # pip does not put the build environment's bin/ on PATH, so a `pip install cmake` there is found by hand.
    beside_python = Path(sys.executable).parent / "cmake"
    return shutil.which("cmake") or (str(beside_python) if beside_python.exists() else None)


def find_cxx_compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def why_no_native_build() -> str | None:
    """None when the native library can be built, else the reason it cannot."""
    if os.environ.get("MERV_FAST_NO_NATIVE") == "1":
        return "MERV_FAST_NO_NATIVE=1 was set"
    if find_cmake() is None:
        return "no cmake"
    if find_cxx_compiler() is None:
        return "no C++ compiler"
    try:
        import torch  # noqa: F401
    except Exception as err:  # a broken torch install raises more than ImportError
        return f"torch not importable ({err})"
    return None


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only needs its name."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # setuptools' run() clears `inplace` while it builds, so the editable/in-place choice is read here, first.
        self.into_source_tree = bool(self.inplace or getattr(self, "editable_mode", False))
        blocker = why_no_native_build()
        if blocker is None:
            super().run()  # builds into build_lib, then copies into the source tree for editable installs
            return
        print(f"merv_fast: not building the native library {NATIVE_NAME} ({blocker}); "
              f"the package runs on its Python fallbacks", flush=True)
        self.record(built=False, reason=f"not built: {blocker} at install time")

    def remove_stale_libraries(self):
        # An earlier build left in the source tree would otherwise still be imported, contradicting the record.
        for package_dir in self.package_dirs():
            for stale in package_dir.glob("_C.*"):
                stale.unlink()

    def package_dirs(self) -> list[Path]:
        """Where merv_fast's files go: build_lib for a wheel, plus the source tree for an editable install."""
        dirs = [Path(self.build_lib) / "merv_fast"]
        if self.into_source_tree:
            dirs.append(ROOT / "merv_fast")
        return dirs

    def record(self, **status):
        if not status["built"]:
            self.remove_stale_libraries()
        for package_dir in self.package_dirs():
            package_dir.mkdir(parents=True, exist_ok=True)
            (package_dir / STATUS_FILE).write_text(json.dumps(status, indent=1) + "\n")

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = "Debug" if self.debug else "Release"
        configure = [find_cmake(), "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
                     f"-DPython_EXECUTABLE={sys.executable}", f"-DMERV_FAST_OUTPUT_DIR={output.parent}",
                     f"-DCMAKE_CXX_COMPILER={find_cxx_compiler()}"]
        if os.environ.get("MERV_FAST_CUDA") == "1":
            configure.append("-DMERV_FAST_CUDA=ON")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]  # faster; only on a fresh build dir, whose generator CMake then keeps
        jobs = str(self.parallel or os.cpu_count() or 1)
        compile_ = [find_cmake(), "--build", str(build_dir), "--config", build_type, "-j", jobs]

        log = build_dir / "build.log"
        start = time.perf_counter()
        with log.open("w") as sink:
            ok = all(subprocess.call(cmd, stdout=sink, stderr=subprocess.STDOUT) == 0 for cmd in (configure, compile_))
        seconds = round(time.perf_counter() - start, 1)
        if ok and output.exists():
            print(f"merv_fast: built {NATIVE_NAME} in {seconds} s ({output.name})", flush=True)
            self.record(built=True, reason="built", seconds=seconds)
            return

        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        if os.environ.get("MERV_FAST_REQUIRE_NATIVE") == "1":
            raise RuntimeError(f"building {NATIVE_NAME} failed (MERV_FAST_REQUIRE_NATIVE=1); log {log}:\n{tail}")
        print(f"merv_fast: building the native library {NATIVE_NAME} failed, continuing without it; "
              f"the end of its log:\n{tail}", flush=True)
        self.record(built=False, reason="not built: the CMake build failed at install time (pip install -v shows why)")
        # Nothing to copy or list as an output: an editable or in-place install would otherwise fail looking for it.
        self.extensions = [e for e in self.extensions if e is not ext]


def packages() -> list[str]:
    # kernels/ has subpackages of its own later (one per op family): they follow it under merv_fast.kernels.
    kernels = ["merv_fast.kernels"] + [f"merv_fast.kernels.{p}" for p in find_packages("kernels")]
    return find_packages(include=["merv_fast", "merv_fast.*"]) + kernels


setup(
    name="merv-fast",
    version=read_version(),
    description="A fast, exact reimplementation of MERV video-LLM training",
    python_requires=">=3.10",
    packages=packages(),
    package_dir={"merv_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension(NATIVE_NAME)],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["merv-fast = merv_fast.cli:main"]},
    install_requires=["torch>=2.11", "transformers>=5.9", "safetensors", "pyyaml", "numpy", "pillow", "matplotlib"],
    # decord: the release's decoder, only for the release-style baseline loader the benchmarks compare against.
    # kernels: Hugging Face's kernel hub, which transformers imports; the tests prove the checkout's kernels/ folder
    # never shadows it. DALI: GPU decoding (NVDEC) and its CPU decoder, where NVIDIA publishes wheels (Linux).
    # torchcodec is not listed: each release is built for one torch minor (0.13 for torch 2.13) and pip would pick
    # the newest; install the matching one by hand (README, Decoders).
    extras_require={"test": ["pytest", "pytest-benchmark", "triton", "decord", "kernels"],
                    "video": ["av", "nvidia-dali-cuda130; platform_system == 'Linux' and "
                                    "(platform_machine == 'x86_64' or platform_machine == 'aarch64')"],
                    "plots": []},  # matplotlib is a dependency now; the extra stays so that old install lines work
)
