// merv_fast::preprocess_frames: decoded uint8 frames [B, T, H, W, 3] -> every encoder's normalised input
// [B, T_e, 3, S, S] in one pass over the frames (the CPU half of the fused preprocessing; kernels/preprocess.py is
// the Python face and holds the torch reference this is tested against).
//
// Per encoder ("spec") the resize is separable: out = Wy * frame * Wx^T, where Wy and Wx are per-axis filter tables
// (start, taps, weights per output index) that depend only on the sizes, so they are built once per call. Each
// output row is made by a vertical pass over the source rows it needs (contiguous in memory, vectorisable, into a
// one-row float buffer that stays in L1), then a horizontal pass along that buffer. The tables reproduce torch's
// `interpolate` arithmetic (float scale, float source coordinates) so that fp32 results agree with the reference
// to ~1e-6; /255, mean and std are folded into one multiply-add per output.
//
// Parallelism: OpenMP over (frame, row chunk). A frame's specs are handled together by one thread so the frame is
// read from memory once; rows are split into chunks only when there are fewer frames than threads (images).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef MERV_FAST_OPENMP
#include <omp.h>
#endif

namespace merv_fast {
namespace {

// Codes shared with kernels/preprocess.py (_RESIZE_CODE, _INTERP_CODE, _DTYPE_CODE).
enum Resize : int64_t { kSquash = 0, kShortSideCrop = 1, kResizeCrop = 2 };
enum Interp : int64_t { kBilinear = 0, kBicubic = 1 };
enum OutDtype : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One axis of one resize: output index i reads input[start[i] .. start[i] + taps[i]) with weights w[i * max_taps + k].
struct AxisTable {
  std::vector<int64_t> start, taps;
  std::vector<float> w;
  int64_t max_taps = 0;
  int64_t lo = 0, hi = 0;  // the input range [lo, hi) any output reads
  // With a letterbox pad, per output: the sum of all its weights and of those on real (unpadded) samples. The pad's
  // constant contributes fill * (total_y * total_x - real_y * real_x) to an output pixel.
  std::vector<float> total, real;
};

// PIL's filters, as torch's antialiased resize uses them (bicubic with a = -0.5, unlike the non-antialiased -0.75).
float aa_triangle(float x) {
  x = std::fabs(x);
  return x < 1.0f ? 1.0f - x : 0.0f;
}

float aa_cubic(float x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0f) return static_cast<float>(((a + 2.0) * x - (a + 3.0)) * x * x + 1);
  if (x < 2.0f) return static_cast<float>((((x - 5) * x + 8) * x - 4) * a);
  return 0.0f;
}

// Cubic convolution with a = -0.75 (torch's non-antialiased bicubic): weights of taps -1, 0, 1, 2 at fraction t.
void cubic_coeffs(float t, float c[4]) {
  const float A = -0.75f;
  auto near = [&](float x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };
  auto far = [&](float x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };
  c[0] = far(t + 1.0f);
  c[1] = near(t);
  c[2] = near(1.0f - t);
  c[3] = far(2.0f - t);
}

// Resize an axis of `in` samples to `resized` samples and keep outputs [offset, offset + count) (the crop).
// The arithmetic mirrors torch's CPU upsample kernels for float tensors with align_corners=False and no scale factor:
// scale = float(in) / resized, and source coordinates computed in float, so the weights are torch's to the last bit
// or nearly (the sums are then ordered differently, a few ulp).
AxisTable make_axis(int64_t in, int64_t resized, int64_t offset, int64_t count, int64_t interp, bool antialias,
                    int64_t pad = -1) {
  // pad >= 0 (a letterbox): `in` counts the padded samples, the real ones are [pad, in - pad), and the weight sums
  // are recorded.
  AxisTable t;
  const float scale = static_cast<float>(in) / static_cast<float>(resized);
  std::vector<std::vector<std::pair<int64_t, float>>> taps(count);  // (input index, weight), indices ascending

  for (int64_t o = 0; o < count; ++o) {
    const int64_t i = o + offset;
    auto& tp = taps[o];
    if (antialias) {
      // PIL-style: the filter stretched by the downscale factor, weights normalised to sum 1.
      const int interp_size = interp == kBicubic ? 4 : 2;
      const float support = scale >= 1.0f ? static_cast<float>(interp_size * 0.5 * scale) : interp_size * 0.5f;
      const float center = static_cast<float>(scale * (i + 0.5));
      const float invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
      const int64_t xmin = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
      const int64_t xsize = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in) - xmin;
      float total = 0.0f;
      for (int64_t j = 0; j < xsize; ++j) {
        const float x = static_cast<float>((static_cast<float>(j + xmin) - center + 0.5) * invscale);
        const float w = interp == kBicubic ? aa_cubic(x) : aa_triangle(x);
        tp.emplace_back(xmin + j, w);
        total += w;
      }
      if (total != 0.0f)
        for (auto& p : tp) p.second /= total;
    } else if (interp == kBilinear) {
      // One rounding of scale * (i + 0.5) - 0.5, as torch's kernels get it (its CPU build contracts this to an FMA).
      float src = std::fma(scale, static_cast<float>(i) + 0.5f, -0.5f);
      src = std::max(src, 0.0f);  // torch clamps negative source coordinates for linear modes
      const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const float l1 = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
      tp.emplace_back(i0, 1.0f - l1);
      if (i0 < in - 1) tp.emplace_back(i0 + 1, l1);
      else tp[0].second += l1;  // past the edge torch reads the last sample twice
    } else {
      const float src = std::fma(scale, static_cast<float>(i) + 0.5f, -0.5f);  // not clamped for cubic
      const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const float frac = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
      float c[4];
      cubic_coeffs(frac, c);
      // Taps outside [0, in) read the edge sample: clamped indices are ascending, so merge equal neighbours.
      for (int k = 0; k < 4; ++k) {
        const int64_t idx = std::min(std::max<int64_t>(i0 - 1 + k, 0), in - 1);
        if (!tp.empty() && tp.back().first == idx) tp.back().second += c[k];
        else tp.emplace_back(idx, c[k]);
      }
    }
    if (pad >= 0) {  // keep the real samples' taps (shifted to real indices); record the pad's share
      float total = 0.0f, real = 0.0f;
      std::vector<std::pair<int64_t, float>> kept;
      for (const auto& p : tp) {
        total += p.second;
        if (p.first >= pad && p.first < in - pad) {
          kept.emplace_back(p.first - pad, p.second);
          real += p.second;
        }
      }
      tp.swap(kept);
      t.total.push_back(total);
      t.real.push_back(real);
    }
    t.max_taps = std::max<int64_t>(t.max_taps, static_cast<int64_t>(tp.size()));
  }

  t.start.resize(count);
  t.taps.resize(count);
  t.w.assign(count * std::max<int64_t>(t.max_taps, 1), 0.0f);
  t.lo = in - 2 * std::max<int64_t>(pad, 0);
  t.hi = 0;
  for (int64_t o = 0; o < count; ++o) {
    const auto& tp = taps[o];
    t.start[o] = tp.empty() ? 0 : tp.front().first;
    t.taps[o] = static_cast<int64_t>(tp.size());
    for (size_t k = 0; k < tp.size(); ++k) t.w[o * t.max_taps + k] = tp[k].second;
    if (!tp.empty()) {
      t.lo = std::min(t.lo, tp.front().first);
      t.hi = std::max(t.hi, tp.back().first + 1);
    }
  }
  if (t.lo >= t.hi) t.lo = t.hi = 0;
  return t;
}

// The crop offset int(round(excess / 2.0)) with Python's round, i.e. half to even (kernels/preprocess.py).
int64_t round_half_even_half(int64_t excess) {
  const int64_t q = excess / 2;
  return (excess % 2 == 0 || q % 2 == 0) ? q : q + 1;
}

// kernels/preprocess.py `resize_geometry`, to the same double arithmetic: the resized size of the (padded) frame.
void resized_size(int64_t resize, int64_t h, int64_t w, int64_t size, int64_t short_side, int64_t* new_h,
                  int64_t* new_w) {
  if (resize == kShortSideCrop) {  // LanguageBind's ShortSideScale: floor((long / short) * size)
    if (w < h) {
      *new_h = static_cast<int64_t>(std::floor((static_cast<double>(h) / w) * size));
      *new_w = size;
    } else {
      *new_h = size;
      *new_w = static_cast<int64_t>(std::floor((static_cast<double>(w) / h) * size));
    }
  } else if (resize == kResizeCrop) {  // torchvision's Resize(int): int(short_side * long / short)
    const int64_t small = std::min(h, w), large = std::max(h, w);
    const int64_t long_side = static_cast<int64_t>(static_cast<double>(short_side * large) / small);
    *new_h = w <= h ? long_side : short_side;
    *new_w = w <= h ? short_side : long_side;
  } else {
    *new_h = size;
    *new_w = size;
  }
}

struct SpecPlan {
  int64_t size, stride, t_out, dtype;
  bool flips, letterbox = false;
  AxisTable rows, cols;
  float mul[3], add[3];  // (v / 255 - mean) / std = v * mul + add
  float fill[3] = {0.0f, 0.0f, 0.0f};  // the letterbox pad's colour, uint8 units
};

template <typename T>
inline void store(T* p, float v) {
  *p = static_cast<T>(v);
}

// One output row oy of one spec's resize for one frame, before normalisation: acc[ox * 3 + c]. `src` points at the
// frame's first byte; sh, sw, sc are its strides.
void resize_row(const SpecPlan& sp, const uint8_t* src, int64_t sh, int64_t sw, int64_t sc, bool contiguous_px,
                int64_t oy, float* rowbuf, float* acc) {
  const AxisTable& R = sp.rows;
  const AxisTable& C = sp.cols;
  const int64_t x_lo = C.lo, width = C.hi - C.lo;
  const int64_t y0 = R.start[oy], ny = R.taps[oy];
  const float* wy = &R.w[oy * R.max_taps];

  // Vertical pass: rowbuf[(x - x_lo) * 3 + c] = sum_k wy[k] * frame[y0 + k, x, c], over the columns any output needs.
  if (contiguous_px) {
    const int64_t n = width * 3;
    for (int64_t k = 0; k < ny; ++k) {
      const uint8_t* s = src + (y0 + k) * sh + x_lo * 3;
      const float w = wy[k];
      if (k == 0) {
        for (int64_t j = 0; j < n; ++j) rowbuf[j] = w * static_cast<float>(s[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) rowbuf[j] += w * static_cast<float>(s[j]);
      }
    }
    if (ny == 0) std::fill(rowbuf, rowbuf + n, 0.0f);
  } else {
    for (int64_t x = 0; x < width; ++x)
      for (int64_t c = 0; c < 3; ++c) {
        float a = 0.0f;
        for (int64_t k = 0; k < ny; ++k) a += wy[k] * static_cast<float>(src[(y0 + k) * sh + (x_lo + x) * sw + c * sc]);
        rowbuf[x * 3 + c] = a;
      }
  }

  // Horizontal pass.
  for (int64_t ox = 0; ox < sp.size; ++ox) {
    const float* b = rowbuf + (C.start[ox] - x_lo) * 3;
    const float* wx = &C.w[ox * C.max_taps];
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
    for (int64_t k = 0, n = C.taps[ox]; k < n; ++k) {
      a0 += wx[k] * b[3 * k];
      a1 += wx[k] * b[3 * k + 1];
      a2 += wx[k] * b[3 * k + 2];
    }
    if (sp.letterbox) {  // the pad's constant, weighted by the filter's share outside the real frame
      const float share = R.total[oy] * C.total[ox] - R.real[oy] * C.real[ox];
      a0 += sp.fill[0] * share;
      a1 += sp.fill[1] * share;
      a2 += sp.fill[2] * share;
    }
    acc[ox * 3] = a0;
    acc[ox * 3 + 1] = a1;
    acc[ox * 3 + 2] = a2;
  }
}

// Normalise one resized row, mirror if asked, convert on store into the three planes of output row oy.
template <typename OutT>
void store_row(const SpecPlan& sp, const float* acc, int64_t oy, bool flip, OutT* out) {
  const int64_t S = sp.size, plane = S * S;
  OutT* o0 = out + oy * S;
  for (int64_t ox = 0; ox < S; ++ox) {
    const int64_t dx = flip ? S - 1 - ox : ox;
    store(o0 + dx, acc[ox * 3] * sp.mul[0] + sp.add[0]);
    store(o0 + plane + dx, acc[ox * 3 + 1] * sp.mul[1] + sp.add[1]);
    store(o0 + 2 * plane + dx, acc[ox * 3 + 2] * sp.mul[2] + sp.add[2]);
  }
}

void check_specs(const at::Tensor& frames, c10::IntArrayRef sizes, c10::IntArrayRef resize, c10::IntArrayRef interp,
                 const c10::List<bool>& antialias, c10::ArrayRef<double> mean, c10::ArrayRef<double> std_,
                 c10::IntArrayRef stride, const c10::List<bool>& random_flip, c10::IntArrayRef dtype,
                 c10::IntArrayRef short_side, c10::IntArrayRef fill, const std::optional<at::Tensor>& flip) {
  TORCH_CHECK(frames.device().is_cpu() && frames.scalar_type() == at::kByte && frames.dim() == 5 &&
                  frames.size(4) == 3,
              "preprocess_frames: frames must be CPU uint8 [B, T, H, W, 3], got ", frames.scalar_type(), " ",
              frames.sizes());
  TORCH_CHECK(frames.size(2) > 0 && frames.size(3) > 0, "preprocess_frames: empty frames ", frames.sizes());
  const size_t n = sizes.size();
  TORCH_CHECK(n > 0 && resize.size() == n && interp.size() == n && antialias.size() == n && mean.size() == 3 * n &&
                  std_.size() == 3 * n && stride.size() == n && random_flip.size() == n && dtype.size() == n &&
                  short_side.size() == n && fill.size() == 3 * n,
              "preprocess_frames: the per-spec lists disagree in length");
  for (size_t s = 0; s < n; ++s) {
    TORCH_CHECK(sizes[s] > 0 && stride[s] > 0, "preprocess_frames: size and stride must be positive");
    TORCH_CHECK(resize[s] == kSquash || resize[s] == kShortSideCrop || resize[s] == kResizeCrop,
                "preprocess_frames: bad resize code ", resize[s]);
    TORCH_CHECK(short_side[s] >= sizes[s], "preprocess_frames: short_side below the size");
    TORCH_CHECK(fill[3 * s] < 0 || resize[s] != kSquash, "preprocess_frames: a letterbox needs a cropping resize");
    TORCH_CHECK(interp[s] == kBilinear || interp[s] == kBicubic, "preprocess_frames: bad interpolation code ",
                interp[s]);
    TORCH_CHECK(dtype[s] >= kFloat32 && dtype[s] <= kFloat16, "preprocess_frames: bad dtype code ", dtype[s]);
  }
  if (flip.has_value()) {
    TORCH_CHECK(flip->device().is_cpu() && flip->scalar_type() == at::kBool && flip->dim() == 1 &&
                    flip->size(0) == frames.size(0),
                "preprocess_frames: flip must be CPU bool [B]");
  }
}

at::ScalarType out_scalar_type(int64_t code) {
  return code == kBFloat16 ? at::kBFloat16 : code == kFloat16 ? at::kHalf : at::kFloat;
}

void preprocess_frames_out(const at::Tensor& frames, c10::IntArrayRef sizes, c10::IntArrayRef resize,
                           c10::IntArrayRef interp, const c10::List<bool>& antialias, c10::ArrayRef<double> mean,
                           c10::ArrayRef<double> std_, c10::IntArrayRef stride, const c10::List<bool>& random_flip,
                           c10::IntArrayRef dtype, c10::IntArrayRef short_side, c10::IntArrayRef fill,
                           const std::optional<at::Tensor>& flip, at::TensorList out) {
  check_specs(frames, sizes, resize, interp, antialias, mean, std_, stride, random_flip, dtype, short_side, fill, flip);
  const int64_t B = frames.size(0), T = frames.size(1), H = frames.size(2), W = frames.size(3);
  const size_t n = sizes.size();
  TORCH_CHECK(out.size() == n, "preprocess_frames_out: ", n, " specs but ", out.size(), " outputs");

  std::vector<SpecPlan> plans(n);
  int64_t max_width = 1, max_rows = 1;
  for (size_t s = 0; s < n; ++s) {
    SpecPlan& p = plans[s];
    p.size = sizes[s];
    p.stride = stride[s];
    p.t_out = (T + p.stride - 1) / p.stride;
    p.dtype = dtype[s];
    p.flips = random_flip.get(s) && flip.has_value();
    // Letterbox (kernels/preprocess.py `letterbox_padding`): int((max - side) / 2) on each side.
    p.letterbox = fill[3 * s] >= 0;
    int64_t pad_h = 0, pad_w = 0;
    if (p.letterbox) {
      const int64_t side = std::max(H, W);
      pad_h = (side - H) / 2;
      pad_w = (side - W) / 2;
      for (int c = 0; c < 3; ++c) p.fill[c] = static_cast<float>(fill[3 * s + c]);
    }
    const int64_t hp = H + 2 * pad_h, wp = W + 2 * pad_w;
    int64_t new_h = p.size, new_w = p.size, top = 0, left = 0;
    resized_size(resize[s], hp, wp, p.size, short_side[s], &new_h, &new_w);
    if (resize[s] != kSquash) {
      top = round_half_even_half(new_h - p.size);
      left = round_half_even_half(new_w - p.size);
    }
    p.rows = make_axis(hp, new_h, top, p.size, interp[s], antialias.get(s), p.letterbox ? pad_h : -1);
    p.cols = make_axis(wp, new_w, left, p.size, interp[s], antialias.get(s), p.letterbox ? pad_w : -1);
    for (int c = 0; c < 3; ++c) {
      const float sd = static_cast<float>(std_[3 * s + c]);
      p.mul[c] = 1.0f / (255.0f * sd);
      p.add[c] = -static_cast<float>(mean[3 * s + c]) / sd;
    }
    max_width = std::max(max_width, p.cols.hi - p.cols.lo);
    max_rows = std::max(max_rows, p.size);

    const at::Tensor& o = out[s];
    TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == out_scalar_type(p.dtype) && o.is_contiguous() &&
                    o.sizes() == c10::IntArrayRef({B, p.t_out, 3, p.size, p.size}),
                "preprocess_frames_out: output ", s, " must be a contiguous CPU ", out_scalar_type(p.dtype),
                " tensor [", B, ", ", p.t_out, ", 3, ", p.size, ", ", p.size, "], got ", o.scalar_type(), " ",
                o.sizes());
  }

  // Specs that resize identically (same size, mode, filter, antialias and frame stride; DINOv2 and SigLIP at
  // merv-7b) share one resize per row and differ only in the normalisation written on store.
  std::vector<std::vector<size_t>> members(n);
  for (size_t s = 0; s < n; ++s) {
    size_t leader = s;
    for (size_t r = 0; r < s; ++r)
      if (sizes[r] == sizes[s] && resize[r] == resize[s] && interp[r] == interp[s] &&
          antialias.get(r) == antialias.get(s) && stride[r] == stride[s] && short_side[r] == short_side[s] &&
          fill[3 * r] == fill[3 * s] && fill[3 * r + 1] == fill[3 * s + 1] && fill[3 * r + 2] == fill[3 * s + 2]) {
        leader = r;
        break;
      }
    members[leader].push_back(s);
  }

  const uint8_t* base = frames.data_ptr<uint8_t>();
  const int64_t sb = frames.stride(0), st = frames.stride(1), sh = frames.stride(2), sw = frames.stride(3),
                sc = frames.stride(4);
  const bool contiguous_px = sw == 3 && sc == 1;  // a pixel row is one run of bytes: the vectorised vertical pass
  std::vector<bool> flip_b(B, false);
  if (flip.has_value()) {
    const at::Tensor f = flip->contiguous();
    for (int64_t b = 0; b < B; ++b) flip_b[b] = f.data_ptr<bool>()[b];
  }
  std::vector<void*> out_ptr(n);
  for (size_t s = 0; s < n; ++s) out_ptr[s] = out[s].data_ptr();

  int threads = 1;
#ifdef MERV_FAST_OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t frames_n = B * T;
  // Fewer frames than threads (an image batch): split each frame's rows so every thread has work.
  const int64_t chunks = std::min<int64_t>(max_rows, std::max<int64_t>(1, (2 * threads + frames_n - 1) / frames_n));
  const int64_t items = frames_n * chunks;

#ifdef MERV_FAST_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<float> rowbuf(max_width * 3), accrow(max_rows * 3);
#ifdef MERV_FAST_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) {
      const int64_t f = item / chunks, chunk = item % chunks;
      const int64_t b = f / T, t = f % T;
      const uint8_t* src = base + b * sb + t * st;
      for (size_t s = 0; s < n; ++s) {  // every spec that takes this frame, while it is in cache
        if (members[s].empty()) continue;  // resized with its group's first spec
        const SpecPlan& p = plans[s];
        if (t % p.stride != 0) continue;
        const int64_t S = p.size;
        const int64_t r0 = chunk * S / chunks, r1 = (chunk + 1) * S / chunks;
        for (int64_t oy = r0; oy < r1; ++oy) {
          resize_row(p, src, sh, sw, sc, contiguous_px, oy, rowbuf.data(), accrow.data());
          for (size_t m : members[s]) {
            const SpecPlan& q = plans[m];
            const int64_t offset = ((b * q.t_out + t / q.stride) * 3) * S * S;
            const bool fl = q.flips && flip_b[b];
            switch (q.dtype) {
              case kBFloat16:
                store_row(q, accrow.data(), oy, fl, static_cast<c10::BFloat16*>(out_ptr[m]) + offset);
                break;
              case kFloat16:
                store_row(q, accrow.data(), oy, fl, static_cast<c10::Half*>(out_ptr[m]) + offset);
                break;
              default:
                store_row(q, accrow.data(), oy, fl, static_cast<float*>(out_ptr[m]) + offset);
            }
          }
        }
      }
    }
  }
}

std::vector<at::Tensor> preprocess_frames(const at::Tensor& frames, c10::IntArrayRef sizes, c10::IntArrayRef resize,
                                          c10::IntArrayRef interp, const c10::List<bool>& antialias,
                                          c10::ArrayRef<double> mean, c10::ArrayRef<double> std_,
                                          c10::IntArrayRef stride, const c10::List<bool>& random_flip,
                                          c10::IntArrayRef dtype, c10::IntArrayRef short_side, c10::IntArrayRef fill,
                                          const std::optional<at::Tensor>& flip) {
  check_specs(frames, sizes, resize, interp, antialias, mean, std_, stride, random_flip, dtype, short_side, fill, flip);
  const int64_t B = frames.size(0), T = frames.size(1);
  std::vector<at::Tensor> out;
  for (size_t s = 0; s < sizes.size(); ++s) {
    const int64_t t_out = (T + stride[s] - 1) / stride[s];
    out.push_back(at::empty({B, t_out, 3, sizes[s], sizes[s]}, frames.options().dtype(out_scalar_type(dtype[s]))));
  }
  preprocess_frames_out(frames, sizes, resize, interp, antialias, mean, std_, stride, random_flip, dtype, short_side,
                        fill, flip, out);
  return out;
}

}  // namespace
}  // namespace merv_fast

TORCH_LIBRARY_IMPL(merv_fast, CPU, m) {
  m.impl("preprocess_frames", &merv_fast::preprocess_frames);
  m.impl("preprocess_frames_out", &merv_fast::preprocess_frames_out);
}
