// The merv_fast operator library: every op's schema is declared here, in the one TORCH_LIBRARY block a namespace
// may have. An op implemented in its own file (a .cu kernel, say) declares its schema below and registers its
// kernel there with TORCH_LIBRARY_IMPL(merv_fast, CUDA, m).
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifdef MERV_FAST_OPENMP
#include <omp.h>
#endif

namespace merv_fast {

static std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown compiler";
#endif
}

// What the library was built with, for `merv-fast env` and the benchmark files: a mismatch between the torch it
// was compiled against and the torch that loads it is the first thing to check when an op misbehaves.
std::string build_info() {
  std::string info = "compiler: " + compiler_name();
  info += "; C++ standard: C++" + std::to_string(MERV_FAST_CXX_STANDARD) +
          " (__cplusplus=" + std::to_string(__cplusplus) + ")";
#ifdef MERV_FAST_OPENMP
  info += "; OpenMP: yes, " + std::to_string(omp_get_max_threads()) + " threads";
#else
  info += "; OpenMP: no";
#endif
  info += "; CUDA sources: ";
  info += MERV_FAST_CUDA ? "yes" : "no";
  info += "; torch: " + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
          std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace merv_fast

TORCH_LIBRARY(merv_fast, m) {
  // No tensor arguments, so no dispatch key to pick a kernel by: a catch-all kernel serves every device.
  m.def("build_info() -> str", &merv_fast::build_info);
  // Fused per-encoder preprocessing (kernels/csrc/preprocess.cpp, CPU): uint8 frames [B, T, H, W, 3] -> per spec
  // [B, ceil(T / stride), 3, S, S]. One list entry per encoder; codes as kernels/preprocess.py's _RESIZE_CODE,
  // _INTERP_CODE, _DTYPE_CODE; mean and std hold 3 values per spec; short_side is resize_crop's short side; fill
  // holds 3 uint8 values per spec for a letterbox pad, or -1, -1, -1 for none.
  m.def("preprocess_frames(Tensor frames, int[] sizes, int[] resize, int[] interp, bool[] antialias, float[] mean, "
        "float[] std, int[] stride, bool[] random_flip, int[] dtype, int[] short_side, int[] fill, Tensor? flip) "
        "-> Tensor[]");
  m.def("preprocess_frames_out(Tensor frames, int[] sizes, int[] resize, int[] interp, bool[] antialias, "
        "float[] mean, float[] std, int[] stride, bool[] random_flip, int[] dtype, int[] short_side, int[] fill, "
        "Tensor? flip, Tensor(a!)[] out) -> ()");
}
