// CPU kernels of crossvit-kernels (backend "cpp"): the one-pass single-query cross-attention core
// (docs/design.md, section 2) and the linear patch embedding (section 3), registered as the torch
// operators crossvit_kernels_cpu::*. The math of every function is specified by
// crossvit_kernels/backends/pytorch.py; Python reaches them only through
// crossvit_kernels/backends/extension.py.
//
// Cross-attention core, per batch row b and token i = 0..N-1 (token 0 is x_cls[b], token i >= 1
// is x_tokens[b, i-1], any strides, never copied as a whole):
//   forward : each token is read once; its LayerNorm statistics, its H scores, an online softmax
//             per head and the weighted sums z_h are updated from a tile of tokens held in L1.
//   backward: each token is read once, its statistics recomputed by the forward's code, and its
//             gradient written once. Nothing of size B * N is kept between the two.
// Parallel over work items (batch row, token split). The number of splits depends on the shapes
// only, never on the thread count, and partial results are combined in split order, so the
// results are bitwise identical for any number of threads.
//
// Vectorisation: the hot loops are templates on the vector width W (GCC/Clang vector extensions):
// 16 floats where the CPU has AVX-512 (x86-64-v4), 8 elsewhere, chosen per call (vector_width).
// On x86-64 with GCC each is compiled three times (x86-64-v4, x86-64-v3 = AVX2+FMA, baseline) and
// the best clone for the running CPU is picked at load time, so the extension needs no -march
// flag.

#include "common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace cvk {
namespace {

using at::Tensor;

// Whether the hot loops are compiled as target clones (x86-64 GCC on Linux, unless CVK_NO_CLONES).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(CVK_NO_CLONES)
#define CVK_TARGET_CLONES 1
#else
#define CVK_TARGET_CLONES 0
#endif

#if CVK_TARGET_CLONES
#define CVK_HOT __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CVK_HOT __attribute__((noinline))
#endif
#define CVK_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------------------------------
// float vectors of W = 8 or 16 lanes (the kernels' width: vector_width(), below)
// ------------------------------------------------------------------------------------------------
template <int W>
struct VecOf;
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<16> {
  typedef float type __attribute__((vector_size(64)));
};
template <int W>
using vec = typename VecOf<W>::type;
typedef vec<8> v8;
typedef int vi __attribute__((vector_size(32)));  // shuffle masks of v8

template <int W>
CVK_INLINE vec<W> vload(const float* p) {
  vec<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
CVK_INLINE void vstore(float* p, vec<W> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Broadcast. Written as a shuffle of lane 0: GCC expands the plain {x, x, ...} initializer into
// lane inserts inside target_clones functions, but the shuffle into one vbroadcastss.
template <int W>
CVK_INLINE vec<W> vset(float x) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  const vec<W> v = {x};
  if constexpr (W == 8) {
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
  } else {
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  }
#else
  vec<W> v;
  for (int k = 0; k < W; ++k) v[k] = x;
  return v;
#endif
}
// The 8-float sum of a vector's two halves (lane k + lane k + 8); the vector itself when W = 8.
template <int W>
CVK_INLINE v8 fold(vec<W> v) {
  if constexpr (W == 8) {
    return v;
  } else {
    v8 lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return lo + hi;
  }
}
// The sum of the lanes, in the order of hsum8 (below): a dot product reduced by either is bitwise
// the same (the backward's dz_h . xh of a token and its dz_h . z_h rely on it).
template <int W>
CVK_INLINE float hsum(vec<W> w) {
  const v8 v = fold<W>(w);
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
#if defined(__clang__)
#define CVK_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CVK_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif
// Lane k of the result is hsum(v_k): eight horizontal sums at once, by three rounds of pairwise
// shuffles and adds (7 vector adds instead of 56 scalar ones and their lane extracts) after the
// folds of 16-float vectors.
CVK_INLINE v8 hsum8_of_folds(v8 v0, v8 v1, v8 v2, v8 v3, v8 v4, v8 v5, v8 v6, v8 v7) {
  // pairs of lanes: t01 = [v0 01, v1 01, v0 23, v1 23, v0 45, v1 45, v0 67, v1 67]
  const v8 t01 = CVK_SHUFFLE(v0, v1, 0, 8, 2, 10, 4, 12, 6, 14) + CVK_SHUFFLE(v0, v1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 t23 = CVK_SHUFFLE(v2, v3, 0, 8, 2, 10, 4, 12, 6, 14) + CVK_SHUFFLE(v2, v3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 t45 = CVK_SHUFFLE(v4, v5, 0, 8, 2, 10, 4, 12, 6, 14) + CVK_SHUFFLE(v4, v5, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8 t67 = CVK_SHUFFLE(v6, v7, 0, 8, 2, 10, 4, 12, 6, 14) + CVK_SHUFFLE(v6, v7, 1, 9, 3, 11, 5, 13, 7, 15);
  // quads: u0 = [v0 0-3, v1 0-3, v2 0-3, v3 0-3, v0 4-7, v1 4-7, v2 4-7, v3 4-7]
  const v8 u0 = CVK_SHUFFLE(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) + CVK_SHUFFLE(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8 u1 = CVK_SHUFFLE(t45, t67, 0, 1, 8, 9, 4, 5, 12, 13) + CVK_SHUFFLE(t45, t67, 2, 3, 10, 11, 6, 7, 14, 15);
  // halves
  return CVK_SHUFFLE(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + CVK_SHUFFLE(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <int W>
CVK_INLINE v8 hsum8(vec<W> v0, vec<W> v1, vec<W> v2, vec<W> v3, vec<W> v4, vec<W> v5, vec<W> v6, vec<W> v7) {
  return hsum8_of_folds(fold<W>(v0), fold<W>(v1), fold<W>(v2), fold<W>(v3), fold<W>(v4), fold<W>(v5), fold<W>(v6),
                        fold<W>(v7));
}

constexpr int64_t kTile = 8;          // tokens per tile
constexpr int64_t kTargetItems = 64;  // work items aimed at when splitting tokens (fixed: determinism)
constexpr int64_t kPrefetch = 6;      // tokens read ahead (software prefetch distance)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------------
// hot loops, on W-float vectors; rows are padded to Cp (a multiple of W) with zeros
// ------------------------------------------------------------------------------------------------

// d = row - mean (the centred token, not yet scaled by rstd); returns rstd. The one home of a
// token's LayerNorm statistics: the backward recomputes them with it, bit for bit as the forward.
// row[C..Cp) must be 0; d[C..Cp) = 0. Two-pass statistics (mean, then the mean of squared
// deviations) as torch's var_mean; four accumulators per pass to hide the add latency.
template <int W>
CVK_HOT float ln_center_row(const float* row, int64_t C, int64_t Cp, float eps, float* d) {
  vec<W> a0 = vset<W>(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 4 * W <= Cp; c += 4 * W) {
    a0 += vload<W>(row + c);
    a1 += vload<W>(row + c + W);
    a2 += vload<W>(row + c + 2 * W);
    a3 += vload<W>(row + c + 3 * W);
  }
  for (; c < Cp; c += W) a0 += vload<W>(row + c);
  const float mean = hsum<W>((a0 + a1) + (a2 + a3)) / static_cast<float>(C);
  const vec<W> vm = vset<W>(mean);
  vec<W> q0 = vset<W>(0.f), q1 = q0, q2 = q0, q3 = q0;
  const int64_t Cf = C / W * W;  // the chunks without padding
  for (c = 0; c + 4 * W <= Cf; c += 4 * W) {
    const vec<W> d0 = vload<W>(row + c) - vm, d1 = vload<W>(row + c + W) - vm;
    const vec<W> d2 = vload<W>(row + c + 2 * W) - vm, d3 = vload<W>(row + c + 3 * W) - vm;
    vstore<W>(d + c, d0);
    vstore<W>(d + c + W, d1);
    vstore<W>(d + c + 2 * W, d2);
    vstore<W>(d + c + 3 * W, d3);
    q0 += d0 * d0;
    q1 += d1 * d1;
    q2 += d2 * d2;
    q3 += d3 * d3;
  }
  for (; c < Cf; c += W) {
    const vec<W> d0 = vload<W>(row + c) - vm;
    vstore<W>(d + c, d0);
    q0 += d0 * d0;
  }
  if (Cf < Cp) {  // the padded chunk: deviations of the padding are 0, not -mean
    vstore<W>(d + Cf, vload<W>(row + Cf) - vm);
    for (int64_t k = C; k < Cp; ++k) d[k] = 0.f;
    const vec<W> d0 = vload<W>(d + Cf);
    q1 += d0 * d0;
  }
  const float var = hsum<W>((q0 + q1) + (q2 + q3)) / static_cast<float>(C);
  return 1.f / std::sqrt(var + eps);
}

// Tokens per score block: 4 on 16-float vectors (32 registers hold 16 accumulators, 4 token
// chunks and a head's chunk), 2 on 8-float vectors (AVX2 has 16 registers).
template <int W>
constexpr int64_t kScoreTokens = W == 16 ? 4 : 2;

// Scores of NT tokens (rows x[0..NT)) against NH <= 4 heads: NT * NH independent accumulation
// chains; s[t*H + h] = w_h . x_t for the first nt <= NT tokens. Each score is reduced by hsum8,
// in the order of hsum, whatever the block it belongs to.
template <int W, int NT, int NH>
CVK_INLINE void scores_block(const float* const* x, int64_t nt, const float* w, int64_t Cp, int64_t H, float* s) {
  vec<W> a[NT * NH];
#pragma GCC unroll 16
  for (int k = 0; k < NT * NH; ++k) a[k] = vset<W>(0.f);
  for (int64_t c = 0; c < Cp; c += W) {
    vec<W> xv[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) xv[t] = vload<W>(x[t] + c);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const vec<W> v = vload<W>(w + h * Cp + c);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) a[t * NH + h] += xv[t] * v;
    }
  }
  constexpr int K = NT * NH;
#pragma GCC unroll 2
  for (int k0 = 0; k0 < K; k0 += 8) {
    const vec<W> zero = vset<W>(0.f);
    const v8 r = hsum8<W>(a[k0], k0 + 1 < K ? a[k0 + 1] : zero, k0 + 2 < K ? a[k0 + 2] : zero,
                          k0 + 3 < K ? a[k0 + 3] : zero, k0 + 4 < K ? a[k0 + 4] : zero,
                          k0 + 5 < K ? a[k0 + 5] : zero, k0 + 6 < K ? a[k0 + 6] : zero,
                          k0 + 7 < K ? a[k0 + 7] : zero);
    for (int k = k0; k < std::min(K, k0 + 8); ++k) {
      if (k / NH < nt) s[(k / NH) * H + k % NH] = r[k - k0];
    }
  }
}

// s[t*H + h] = w_h . xh_t for t < nt (blocks of kScoreTokens tokens x up to four heads).
template <int W>
CVK_HOT void tile_scores(const float* xh, int64_t nt, int64_t Cp, const float* w, int64_t H, float* s) {
  constexpr int NT = kScoreTokens<W>;
  for (int64_t t = 0; t < nt; t += NT) {
    const float* x[NT];
    for (int64_t k = 0; k < NT; ++k) x[k] = xh + std::min(t + k, nt - 1) * Cp;  // past nt: computed, not stored
    for (int64_t h = 0; h < H; h += 4) {
      const float* wh = w + h * Cp;
      float* sh = s + t * H + h;
      switch (std::min<int64_t>(4, H - h)) {
        case 4: scores_block<W, NT, 4>(x, nt - t, wh, Cp, H, sh); break;
        case 3: scores_block<W, NT, 3>(x, nt - t, wh, Cp, H, sh); break;
        case 2: scores_block<W, NT, 2>(x, nt - t, wh, Cp, H, sh); break;
        default: scores_block<W, NT, 1>(x, nt - t, wh, Cp, H, sh); break;
      }
    }
  }
}

// acc_h for h < NH (acc + h * Cp), columns [c, c + NV * W): += sum_t p[t*H + h] * xh_t, tokens in
// order, one chain per accumulator (NH * NV of them; a token's NV chunks serve NH heads).
template <int W, int NH, int NV>
CVK_INLINE void accumulate_block(const float* xh, int64_t nt, int64_t Cp, const float* p, int64_t H, float* acc,
                                 int64_t c) {
  vec<W> r[NH][NV];
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) r[h][v] = vload<W>(acc + h * Cp + c + v * W);
  for (int64_t t = 0; t < nt; ++t) {
    vec<W> xv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) xv[v] = vload<W>(xh + t * Cp + c + v * W);
#pragma GCC unroll 4
    for (int h = 0; h < NH; ++h) {
      const vec<W> k = vset<W>(p[t * H + h]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) r[h][v] += k * xv[v];
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < NH; ++h)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vstore<W>(acc + h * Cp + c + v * W, r[h][v]);
}

template <int W, int NH>
CVK_INLINE void accumulate_heads(const float* xh, int64_t nt, int64_t Cp, const float* p, int64_t H, float* acc) {
  int64_t c = 0;
  for (; c + 2 * W <= Cp; c += 2 * W) accumulate_block<W, NH, 2>(xh, nt, Cp, p, H, acc, c);
  if (c < Cp) accumulate_block<W, NH, 1>(xh, nt, Cp, p, H, acc, c);
}

// acc_h += sum_t p[t*H + h] * xh_t for every head h (blocks of up to four heads x two vectors).
template <int W>
CVK_HOT void tile_accumulate(const float* xh, int64_t nt, int64_t Cp, const float* p, int64_t H, float* acc) {
  for (int64_t h = 0; h < H; h += 4) {
    switch (std::min<int64_t>(4, H - h)) {
      case 4: accumulate_heads<W, 4>(xh, nt, Cp, p + h, H, acc + h * Cp); break;
      case 3: accumulate_heads<W, 3>(xh, nt, Cp, p + h, H, acc + h * Cp); break;
      case 2: accumulate_heads<W, 2>(xh, nt, Cp, p + h, H, acc + h * Cp); break;
      default: accumulate_heads<W, 1>(xh, nt, Cp, p + h, H, acc + h * Cp); break;
    }
  }
}

template <int W>
CVK_HOT void scale_row(float* a, int64_t Cp, float alpha) {
  const vec<W> va = vset<W>(alpha);
  for (int64_t c = 0; c < Cp; c += W) vstore<W>(a + c, vload<W>(a + c) * va);
}

template <int W>
CVK_HOT float dot_row(const float* a, const float* b, int64_t Cp) {
  vec<W> acc = vset<W>(0.f);
  for (int64_t c = 0; c < Cp; c += W) acc += vload<W>(a + c) * vload<W>(b + c);
  return hsum<W>(acc);
}

// Gradient of one token: dxh = sum_h a_h dz_h + ds_h w_h, then the LayerNorm backward
// dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)), written to dx (fp32, Cp wide).
template <int W>
CVK_HOT void token_grad(const float* xh, int64_t C, int64_t Cp, const float* a, const float* ds,
                        const float* dz, const float* w, int64_t H, float rstd, float* dx) {
  vec<W> s1 = vset<W>(0.f), s2 = vset<W>(0.f);
  int64_t c = 0;
  for (; c + 4 * W <= Cp; c += 4 * W) {  // 8 independent chains per head step
    vec<W> ga0 = vset<W>(0.f), ga1 = ga0, ga2 = ga0, ga3 = ga0, gs0 = ga0, gs1 = ga0, gs2 = ga0, gs3 = ga0;
    for (int64_t h = 0; h < H; ++h) {
      const vec<W> ah = vset<W>(a[h]), dh = vset<W>(ds[h]);
      const float* zr = dz + h * Cp + c;
      const float* wr = w + h * Cp + c;
      ga0 += ah * vload<W>(zr);
      ga1 += ah * vload<W>(zr + W);
      ga2 += ah * vload<W>(zr + 2 * W);
      ga3 += ah * vload<W>(zr + 3 * W);
      gs0 += dh * vload<W>(wr);
      gs1 += dh * vload<W>(wr + W);
      gs2 += dh * vload<W>(wr + 2 * W);
      gs3 += dh * vload<W>(wr + 3 * W);
    }
    const vec<W> g0 = ga0 + gs0, g1 = ga1 + gs1, g2 = ga2 + gs2, g3 = ga3 + gs3;
    vstore<W>(dx + c, g0);
    vstore<W>(dx + c + W, g1);
    vstore<W>(dx + c + 2 * W, g2);
    vstore<W>(dx + c + 3 * W, g3);
    s1 += (g0 + g1) + (g2 + g3);
    s2 += (g0 * vload<W>(xh + c) + g1 * vload<W>(xh + c + W)) + (g2 * vload<W>(xh + c + 2 * W) + g3 * vload<W>(xh + c + 3 * W));
  }
  for (; c < Cp; c += W) {
    vec<W> ga = vset<W>(0.f), gs = vset<W>(0.f);
    for (int64_t h = 0; h < H; ++h) {
      ga += vset<W>(a[h]) * vload<W>(dz + h * Cp + c);
      gs += vset<W>(ds[h]) * vload<W>(w + h * Cp + c);
    }
    const vec<W> g = ga + gs;
    vstore<W>(dx + c, g);
    s1 += g;
    s2 += g * vload<W>(xh + c);
  }
  const vec<W> m1 = vset<W>(hsum<W>(s1) / static_cast<float>(C));
  const vec<W> m2 = vset<W>(hsum<W>(s2) / static_cast<float>(C));
  const vec<W> vr = vset<W>(rstd);
  for (int64_t c = 0; c < Cp; c += W) vstore<W>(dx + c, vr * (vload<W>(dx + c) - m1 - vload<W>(xh + c) * m2));
}

// ------------------------------------------------------------------------------------------------
// dtype conversion at the edges (rows of C elements, any element stride)
// ------------------------------------------------------------------------------------------------
template <typename T>
inline void load_row(const T* src, int64_t stride, int64_t C, int64_t Cp, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      std::memcpy(dst, src, sizeof(float) * C);
    } else {
      for (int64_t c = 0; c < C; ++c) dst[c] = src[c * stride];
    }
  } else {
    if (stride == 1) {
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(src[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<float>(src[c * stride]);
    }
  }
  for (int64_t c = C; c < Cp; ++c) dst[c] = 0.f;
}

// The fp32 row of a token: the source itself when it is a contiguous float32 row of a multiple of
// 8 elements (no copy), else a converted, zero-padded copy in buf.
template <typename T>
inline const float* token_row(const T* src, int64_t stride, int64_t C, int64_t Cp, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && C == Cp) return src;
  }
  load_row(src, stride, C, Cp, buf);
  return buf;
}

// A prefetch the optimiser keeps: a loop of plain __builtin_prefetch calls has no side effect and
// C++'s forward-progress rule lets GCC delete it.
CVK_INLINE void prefetch_line(const char* p) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Ask for the rows of the next tile early (one prefetch per cache line of each row).
template <typename T>
inline void prefetch_rows(const T* first, int64_t row_stride, int64_t rows, int64_t C, int64_t stride) {
  if (stride != 1) return;
  const int64_t bytes = C * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < rows; ++j) {
    const char* p = reinterpret_cast<const char*>(first + j * row_stride);
    for (int64_t o = 0; o < bytes; o += 64) prefetch_line(p + o);
  }
}

template <typename T>
inline void store_row(const float* src, int64_t C, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * C);
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(src[c]);
  }
}

// ------------------------------------------------------------------------------------------------
// preconditions (crossvit_kernels.ops has validated the inputs; see common.h)
// ------------------------------------------------------------------------------------------------
using crossvit_common::acc_type;
using crossvit_common::PShape;

// The core's shapes, the kernels' vector width W and Cp, the width C padded to whole vectors.
struct XShape : crossvit_common::XDims {
  int64_t W, Cp;
};

// ------------------------------------------------------------------------------------------------
// vector width: 16 floats where the CPU runs the x86-64-v4 clones (AVX-512: twice the floats per
// multiply-add, and 32 vector registers), else 8. set_vector_width lets a test run the 8-float
// kernels on such a CPU too.
// ------------------------------------------------------------------------------------------------
int widest_vector() {
#if CVK_TARGET_CLONES
  static const int w = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v4")) ? 16 : 8;
  return w;
#else
  return 8;
#endif
}

std::atomic<int> g_vector_width{0};  // 0: widest_vector()

int64_t vector_width() {
  const int w = g_vector_width.load(std::memory_order_relaxed);
  return w != 0 ? w : widest_vector();
}

// width 8, widest_vector(), or 0 (back to the widest); returns the width the kernels now use.
int64_t set_vector_width(int64_t width) {
  CVK_EXPECT(width == 0 || width == 8 || width == widest_vector());
  g_vector_width.store(static_cast<int>(width), std::memory_order_relaxed);
  return vector_width();
}

XShape expect_core_inputs(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w) {
  crossvit_common::expect_device(at::kCPU, x_cls, {&x_tokens, &w});
  const crossvit_common::XDims d = crossvit_common::expect_core_inputs(x_cls, x_tokens, w);
  const int64_t W = vector_width();
  return XShape{d, W, round_up(d.C, W)};
}

// fn(std::integral_constant<int, W>{}) for the width s.W, read once per call.
template <typename F>
void with_width(const XShape& s, const F& fn) {
  if (s.W == 16) {
    fn(std::integral_constant<int, 16>{});
  } else {
    fn(std::integral_constant<int, 8>{});
  }
}

// ------------------------------------------------------------------------------------------------
// threads: one parallel region per kernel
// ------------------------------------------------------------------------------------------------
// Every parallel region wakes the pool and, at its end, waits for each of its threads. On a busy
// machine a thread whose core another process holds arrives up to a scheduler slice late
// (milliseconds), whatever the size of the work, so a call's time under load grows with the
// number of regions it opens, not with its work. Hence: each kernel opens at most one region in
// which work items are handed out dynamically. While the machine is busy (a region's end cost
// more waiting than it saved) the kernels run on the calling thread alone, and the small steps the
// cpp backend runs around them (the B x C x C projections, the CLS's LayerNorm:
// backends/extension.py) run on one thread inside a serial section, where ATen and MKL open no
// region at all. docs/design.md, section 10.

// MKL's per-thread thread count (the C function behind mkl_service.h's mkl_set_num_threads_local;
// the lowercase symbol is the Fortran interface), where torch's build has MKL: resolved at load
// time, else null.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// The calling thread's serial-section depth, whether its outermost section took effect, and the
// thread count its kernels use meanwhile.
thread_local int tl_serial_depth = 0;
thread_local bool tl_serial_on = false;
thread_local int tl_kernel_threads = 1;
thread_local int tl_mkl_saved = 0;

void set_intraop_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  (void)n;
}

bool machine_busy();
bool cores_shared();

// Enters (depth + 1) or leaves (depth - 1) the calling thread's serial section; nests. The
// outermost section takes effect only while the machine counts as busy, or, for a section of
// small steps (the cross-attention's B x C x C projections, not the patch embedding's GEMMs),
// while the kernels' threads found their cores shared: on an idle machine the steps around the
// kernels keep their threads (the projections' GEMMs and the backward's reductions gain from two).
void serial_section(bool enter, bool small_steps) {
  if (enter) {
    if (tl_serial_depth++ == 0 && (tl_serial_on = machine_busy() || (small_steps && cores_shared()))) {
      tl_kernel_threads = static_cast<int>(at::get_num_threads());  // also runs ATen's per-thread init first
      set_intraop_threads(1);
      tl_mkl_saved = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    }
  } else {
    CVK_EXPECT(tl_serial_depth > 0);
    if (--tl_serial_depth == 0 && tl_serial_on) {
      tl_serial_on = false;
      set_intraop_threads(tl_kernel_threads);
      if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(tl_mkl_saved);
    }
  }
}

// A kernel's parallel region runs with the thread count the caller had outside a serial section.
struct KernelThreads {
  KernelThreads() {
    if (tl_serial_on) set_intraop_threads(tl_kernel_threads);
  }
  ~KernelThreads() {
    if (tl_serial_on) set_intraop_threads(1);
  }
  KernelThreads(const KernelThreads&) = delete;
  KernelThreads& operator=(const KernelThreads&) = delete;
};

// While the machine is busy the kernels run on the calling thread alone (until this steady-clock
// time, in ns): shared by all threads, a heuristic only (a kernel's result never depends on it).
std::atomic<int64_t> g_serial_until_ns{0};
// Costly regions in a row (a region without either sign resets it). One alone is not taken for a
// busy machine: a virtual machine's host can hold a vCPU for milliseconds on an otherwise idle
// machine (on the development machine one or two regions in a run of the benchmark's patch
// embedding section, each of which made the next second of kernels run on one thread, up to 1.6x
// slower). After a busy spell the count stays up until a region runs well, so one more costly
// region starts the next spell.
std::atomic<int64_t> g_costly_regions{0};
constexpr int64_t kCostlyRegions = 2;
constexpr int64_t kSerialBackoffNs = 1'000'000'000;  // how long the machine counts as busy once it does
constexpr int64_t kMinWaitNs = 500'000;            // waits below this are never taken for contention
// Regions in a row in which a thread got less than kMinShare of its time on a core (its core is
// shared with another process), and until when the small steps run serially after such regions.
std::atomic<int64_t> g_shared_regions{0};
std::atomic<int64_t> g_shared_until_ns{0};
constexpr double kMinShare = 0.75;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Whether a kernel's region recently showed other processes on its cores (see for_each_thread).
bool machine_busy() { return now_ns() < g_serial_until_ns.load(std::memory_order_relaxed); }
bool cores_shared() { return now_ns() < g_shared_until_ns.load(std::memory_order_relaxed); }

// The calling thread's CPU time in ns, or -1 where the platform has no per-thread clock.
int64_t thread_cpu_ns() {
#if defined(__linux__) || defined(__APPLE__)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
#endif
  return -1;
}

// Counts a region that showed a sign (costly) or not; kCostlyRegions in a row set `until` to
// kSerialBackoffNs from now.
void count_region(bool sign, std::atomic<int64_t>& in_a_row, std::atomic<int64_t>& until) {
  if (!sign) {
    in_a_row.store(0, std::memory_order_relaxed);
  } else if (in_a_row.fetch_add(1, std::memory_order_relaxed) + 1 >= kCostlyRegions) {
    until.store(now_ns() + kSerialBackoffNs, std::memory_order_relaxed);
  }
}

// Runs fn once on each thread of ATen's pool: the kernel's one parallel region. The work items are
// handed out dynamically (an atomic counter) so a thread that the OS descheduled on a busy machine
// does not hold the others back; which thread runs an item never changes its result, and items are
// combined in order. The region still ends when its last thread is done: on an idle machine the
// threads start within microseconds and finish within about an item of each other. The machine
// counts as busy for the next kSerialBackoffNs (the kernels run fn on the calling thread alone,
// and the serial sections take effect) when kCostlyRegions regions in a row show either sign of
// other processes on their cores:
//   - a straggler: the first thread to finish waited for the last longer than half the region (two
//     threads can at best halve the time, so the region cost more than it saved);
//   - a late start: a thread began only after half the region. It found the items taken and
//     finished with the others, so no straggler shows, but the region ran on fewer threads and
//     waited for its wake-up. (Threads that all run, however slowly, while other processes share
//     their cores show neither sign: there a region with two threads still beats one thread.)
// Separately, a region in which a thread ran less than kMinShare of its time in the region (its
// CPU time against its wall time, over at least kMinWaitNs) found its core shared; kCostlyRegions
// such regions in a row make the small steps' serial sections take effect for kSerialBackoffNs.
// The kernels keep their threads (dynamic items make a slow thread cost little in a long region),
// but each of the small steps' short regions would wait up to a scheduler slice for such a thread.
template <typename F>
void for_each_thread(const F& fn) {
  const int64_t n = at::in_parallel_region() ? 1 : tl_serial_on ? tl_kernel_threads : at::get_num_threads();
  if (n == 1 || machine_busy()) {
    fn();  // on the calling thread, inside the serial section if any (then ATen and MKL open no region)
    return;
  }
  const KernelThreads threads;
  const int64_t t0 = now_ns();
  std::atomic<int64_t> first_done{std::numeric_limits<int64_t>::max()}, last_done{0}, last_start{0};
  std::atomic<bool> shared{false};
  const auto lower_to = [](std::atomic<int64_t>& a, int64_t x) {
    for (int64_t v = a.load(); x < v && !a.compare_exchange_weak(v, x);) {
    }
  };
  const auto raise_to = [](std::atomic<int64_t>& a, int64_t x) {
    for (int64_t v = a.load(); x > v && !a.compare_exchange_weak(v, x);) {
    }
  };
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t start = now_ns(), cpu0 = thread_cpu_ns();
    raise_to(last_start, start);
    for (int64_t t = begin; t < end; ++t) fn();
    const int64_t done = now_ns(), cpu1 = thread_cpu_ns();
    lower_to(first_done, done);
    raise_to(last_done, done);
    if (cpu0 >= 0 && cpu1 >= 0 && done - start > kMinWaitNs &&
        static_cast<double>(cpu1 - cpu0) < kMinShare * static_cast<double>(done - start)) {
      shared.store(true, std::memory_order_relaxed);
    }
  });
  const int64_t waited = last_done.load() - first_done.load(), took = now_ns() - t0;
  const bool straggler = waited > std::max(kMinWaitNs, took / 2);
  const bool late_start = last_start.load() - t0 > std::max(kMinWaitNs, took / 2);
  count_region(straggler || late_start, g_costly_regions, g_serial_until_ns);
  count_region(shared.load(), g_shared_regions, g_shared_until_ns);
}

// Number of token splits per batch row: a function of the shapes only (never of the thread count).
int64_t num_splits(int64_t B, int64_t N) {
  const int64_t want = (kTargetItems + B - 1) / B;
  const int64_t most = std::max<int64_t>(1, N / (4 * kTile));
  return std::max<int64_t>(1, std::min(want, most));
}

Tensor padded_f32(const Tensor& t, int64_t C, int64_t Cp) {
  Tensor f = t.to(at::kFloat).contiguous();
  if (Cp != C) f = at::constant_pad_nd(f, {0, Cp - C}, 0).contiguous();
  return f;
}

// ------------------------------------------------------------------------------------------------
// cross-attention core: forward
// ------------------------------------------------------------------------------------------------
template <int W, typename T>
void xattn_forward_impl(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& wp, float eps, const XShape& s,
                        Tensor& z, Tensor& lse) {
  const int64_t B = s.B, N = s.N, C = s.C, Cp = s.Cp, H = s.H;
  const int64_t S = num_splits(B, N);
  const int64_t chunk = (N + S - 1) / S;
  const T* cls = x_cls.data_ptr<T>();
  const T* tok = x_tokens.data_ptr<T>();
  const int64_t cls_sb = x_cls.stride(0), cls_sc = x_cls.stride(1);
  const int64_t tok_sb = x_tokens.stride(0), tok_sm = x_tokens.stride(1), tok_sc = x_tokens.stride(2);
  const float* w = wp.data_ptr<float>();
  float* z_out = z.data_ptr<float>();
  float* lse_out = lse.data_ptr<float>();
  // partial results of the splits (only when a row is split)
  std::vector<float> part_m, part_l, part_z;
  if (S > 1) {
    part_m.resize(B * S * H);
    part_l.resize(B * S * H);
    part_z.resize(B * S * H * Cp);
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<std::atomic<int64_t>> splits_done(S > 1 ? B : 0);
  for (auto& d : splits_done) d.store(0, std::memory_order_relaxed);
  // combines the S splits of row b (zacc: Cp floats of scratch)
  const auto combine_row = [&](int64_t b, float* zacc) {
    for (int64_t h = 0; h < H; ++h) {
      float mx = ninf;
      for (int64_t sp = 0; sp < S; ++sp) mx = std::max(mx, part_m[(b * S + sp) * H + h]);
      float L = 0.f;
      std::fill(zacc, zacc + Cp, 0.f);
      for (int64_t sp = 0; sp < S; ++sp) {
        const int64_t k = (b * S + sp) * H + h;
        const float f = std::exp(part_m[k] - mx);
        L += part_l[k] * f;
        const float* pz = part_z.data() + k * Cp;
        for (int64_t c = 0; c < C; ++c) zacc[c] += pz[c] * f;
      }
      lse_out[b * H + h] = mx + std::log(L);
      const float inv = 1.f / L;
      float* zr = z_out + (b * H + h) * C;
      for (int64_t c = 0; c < C; ++c) zr[c] = zacc[c] * inv;
    }
  };

  std::atomic<int64_t> next_item{0};
  for_each_thread([&]() {
    std::vector<float> row(Cp), xh(kTile * Cp), acc(H * Cp), sc(kTile * H), m(H), l(H), zacc(S > 1 ? Cp : 0);
    float rs[kTile];
    for (int64_t item = next_item++; item < B * S; item = next_item++) {
      const int64_t b = item / S, split = item % S;
      const int64_t i0 = split * chunk, i1 = std::min(N, i0 + chunk);
      const float* wb = w + b * H * Cp;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t nt = std::min(kTile, i1 - t0);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t i = t0 + j;
          if (i + kPrefetch < i1) prefetch_rows(tok + b * tok_sb + (i + kPrefetch - 1) * tok_sm, tok_sm, 1, C, tok_sc);
          const float* r = (i == 0) ? token_row(cls + b * cls_sb, cls_sc, C, Cp, row.data())
                                    : token_row(tok + b * tok_sb + (i - 1) * tok_sm, tok_sc, C, Cp, row.data());
          rs[j] = ln_center_row<W>(r, C, Cp, eps, xh.data() + j * Cp);
        }
        // scores of the centred rows, scaled by rstd: w_h . xh = rstd * (w_h . (x - mean))
        tile_scores<W>(xh.data(), nt, Cp, wb, H, sc.data());
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t h = 0; h < H; ++h) sc[j * H + h] *= rs[j];
        // online softmax per head: rescale the running sums only when the running max grows;
        // z accumulates the centred rows with coefficients p * rstd
        for (int64_t h = 0; h < H; ++h) {
          float mt = sc[h];
          for (int64_t j = 1; j < nt; ++j) mt = std::max(mt, sc[j * H + h]);
          if (mt > m[h]) {
            if (m[h] != ninf) {
              const float alpha = std::exp(m[h] - mt);
              l[h] *= alpha;
              scale_row<W>(acc.data() + h * Cp, Cp, alpha);
            }
            m[h] = mt;
          }
          for (int64_t j = 0; j < nt; ++j) {
            const float p = std::exp(sc[j * H + h] - m[h]);
            sc[j * H + h] = p * rs[j];
            l[h] += p;
          }
        }
        tile_accumulate<W>(xh.data(), nt, Cp, sc.data(), H, acc.data());
      }
      if (S == 1) {
        for (int64_t h = 0; h < H; ++h) {
          lse_out[b * H + h] = m[h] + std::log(l[h]);
          const float inv = 1.f / l[h];
          float* zr = z_out + (b * H + h) * C;
          const float* ar = acc.data() + h * Cp;
          for (int64_t c = 0; c < C; ++c) zr[c] = ar[c] * inv;
        }
      } else {
        std::copy(m.begin(), m.end(), part_m.begin() + item * H);
        std::copy(l.begin(), l.end(), part_l.begin() + item * H);
        std::copy(acc.begin(), acc.end(), part_z.begin() + item * H * Cp);
        // the thread that finishes a row's last split combines the row, in split order
        if (splits_done[b].fetch_add(1, std::memory_order_acq_rel) == S - 1) combine_row(b, zacc.data());
      }
    }
  });
}

std::tuple<Tensor, Tensor> cross_attention_core_forward(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w,
                                                        double eps) {
  const XShape s = expect_core_inputs(x_cls, x_tokens, w);
  auto f32 = x_cls.options().dtype(at::kFloat);
  Tensor z = at::empty({s.B, s.H, s.C}, f32);
  Tensor lse = at::empty({s.B, s.H}, f32);
  Tensor wp = padded_f32(w, s.C, s.Cp);
  const float e = static_cast<float>(eps);
  with_width(s, [&](auto width) {
    constexpr int W = decltype(width)::value;
    switch (x_cls.scalar_type()) {
      case at::kFloat: xattn_forward_impl<W, float>(x_cls, x_tokens, wp, e, s, z, lse); break;
      case at::kBFloat16: xattn_forward_impl<W, c10::BFloat16>(x_cls, x_tokens, wp, e, s, z, lse); break;
      default: xattn_forward_impl<W, c10::Half>(x_cls, x_tokens, wp, e, s, z, lse); break;  // kHalf
    }
  });
  return {z, lse};
}

// ------------------------------------------------------------------------------------------------
// cross-attention core: backward
// ------------------------------------------------------------------------------------------------
template <int W, typename T>
void xattn_backward_impl(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& wp, const Tensor& zp,
                         const Tensor& lse, const Tensor& dzp, float eps, const XShape& s, Tensor& dx_cls,
                         Tensor& dx_tokens, Tensor& dw) {
  const int64_t B = s.B, N = s.N, C = s.C, Cp = s.Cp, H = s.H, M = s.M;
  const int64_t S = num_splits(B, N);
  const int64_t chunk = (N + S - 1) / S;
  const T* cls = x_cls.data_ptr<T>();
  const T* tok = x_tokens.data_ptr<T>();
  const int64_t cls_sb = x_cls.stride(0), cls_sc = x_cls.stride(1);
  const int64_t tok_sb = x_tokens.stride(0), tok_sm = x_tokens.stride(1), tok_sc = x_tokens.stride(2);
  const float* w = wp.data_ptr<float>();
  const float* zz = zp.data_ptr<float>();
  const float* dz = dzp.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  T* dcls = dx_cls.data_ptr<T>();
  T* dtok = dx_tokens.data_ptr<T>();
  float* dw_out = dw.data_ptr<float>();
  std::vector<float> part_dw;
  if (S > 1) part_dw.resize(B * S * H * Cp);
  std::vector<std::atomic<int64_t>> splits_done(S > 1 ? B : 0);
  for (auto& d : splits_done) d.store(0, std::memory_order_relaxed);

  std::atomic<int64_t> next_item{0};
  for_each_thread([&]() {
    std::vector<float> row(Cp), xh(kTile * Cp), acc(H * Cp), sc(kTile * H), e(kTile * H), ds(kTile * H),
        dzz(H), dxr(Cp);
    float rs[kTile];
    for (int64_t item = next_item++; item < B * S; item = next_item++) {
      const int64_t b = item / S, split = item % S;
      const int64_t i0 = split * chunk, i1 = std::min(N, i0 + chunk);
      const float* wb = w + b * H * Cp;
      const float* dzb = dz + b * H * Cp;
      for (int64_t h = 0; h < H; ++h) dzz[h] = dot_row<W>(dzb + h * Cp, zz + (b * H + h) * Cp, Cp);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
        const int64_t nt = std::min(kTile, i1 - t0);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t i = t0 + j;
          if (i + kPrefetch < i1) prefetch_rows(tok + b * tok_sb + (i + kPrefetch - 1) * tok_sm, tok_sm, 1, C, tok_sc);
          const float* r = (i == 0) ? token_row(cls + b * cls_sb, cls_sc, C, Cp, row.data())
                                    : token_row(tok + b * tok_sb + (i - 1) * tok_sm, tok_sc, C, Cp, row.data());
          // xh = (row - mean) * rstd with the statistics recomputed as the forward computed them
          rs[j] = ln_center_row<W>(r, C, Cp, eps, xh.data() + j * Cp);
          scale_row<W>(xh.data() + j * Cp, Cp, rs[j]);
        }
        tile_scores<W>(xh.data(), nt, Cp, wb, H, sc.data());
        tile_scores<W>(xh.data(), nt, Cp, dzb, H, e.data());
        for (int64_t j = 0; j < nt; ++j) {
          for (int64_t h = 0; h < H; ++h) {
            const float a = std::exp(sc[j * H + h] - lse_p[b * H + h]);
            sc[j * H + h] = a;
            ds[j * H + h] = a * (e[j * H + h] - dzz[h]);
          }
        }
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t i = t0 + j;
          T* out = (i == 0) ? dcls + b * C : dtok + (b * M + (i - 1)) * C;
          // a float32 row of whole vectors is written in place, any other row through dxr
          bool in_place = false;
          if constexpr (std::is_same_v<T, float>) in_place = C == Cp;
          float* dx = in_place ? reinterpret_cast<float*>(out) : dxr.data();
          token_grad<W>(xh.data() + j * Cp, C, Cp, sc.data() + j * H, ds.data() + j * H, dzb, wb, H, rs[j], dx);
          if (!in_place) store_row(dx, C, out);
        }
        tile_accumulate<W>(xh.data(), nt, Cp, ds.data(), H, acc.data());
      }
      if (S == 1) {
        for (int64_t h = 0; h < H; ++h) std::memcpy(dw_out + (b * H + h) * C, acc.data() + h * Cp, sizeof(float) * C);
      } else {
        std::copy(acc.begin(), acc.end(), part_dw.begin() + item * H * Cp);
        // the thread that finishes a row's last split sums the row's partials, in split order
        if (splits_done[b].fetch_add(1, std::memory_order_acq_rel) == S - 1) {
          for (int64_t h = 0; h < H; ++h) {
            float* out = dw_out + (b * H + h) * C;
            std::fill(out, out + C, 0.f);
            for (int64_t sp = 0; sp < S; ++sp) {
              const float* p = part_dw.data() + ((b * S + sp) * H + h) * Cp;
              for (int64_t c = 0; c < C; ++c) out[c] += p[c];
            }
          }
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> cross_attention_core_backward(const Tensor& x_cls, const Tensor& x_tokens,
                                                                 const Tensor& w, const Tensor& z, const Tensor& lse,
                                                                 const Tensor& dz, double eps) {
  crossvit_common::expect_device(at::kCPU, x_cls, {&z, &lse, &dz});
  const XShape s = expect_core_inputs(x_cls, x_tokens, w);
  crossvit_common::expect_core_saved(s, z, lse, dz);
  Tensor dx_cls = at::empty({s.B, s.C}, x_cls.options());
  Tensor dx_tokens = at::empty({s.B, s.M, s.C}, x_tokens.options());
  Tensor dw = at::empty({s.B, s.H, s.C}, x_cls.options().dtype(at::kFloat));
  Tensor wp = padded_f32(w, s.C, s.Cp);
  Tensor zp = padded_f32(z, s.C, s.Cp);
  Tensor dzp = padded_f32(dz, s.C, s.Cp);
  Tensor lse_c = lse.contiguous();
  const float e = static_cast<float>(eps);
  with_width(s, [&](auto width) {
    constexpr int W = decltype(width)::value;
    switch (x_cls.scalar_type()) {
      case at::kFloat:
        xattn_backward_impl<W, float>(x_cls, x_tokens, wp, zp, lse_c, dzp, e, s, dx_cls, dx_tokens, dw);
        break;
      case at::kBFloat16:
        xattn_backward_impl<W, c10::BFloat16>(x_cls, x_tokens, wp, zp, lse_c, dzp, e, s, dx_cls, dx_tokens, dw);
        break;
      default:  // kHalf
        xattn_backward_impl<W, c10::Half>(x_cls, x_tokens, wp, zp, lse_c, dzp, e, s, dx_cls, dx_tokens, dw);
        break;
    }
  });
  return {dx_cls, dx_tokens, dw};
}

// ------------------------------------------------------------------------------------------------
// patch embedding
// ------------------------------------------------------------------------------------------------

// Work items are parts of the batch's B * gh rows of the patch grid (row r is grid row r % gh of
// image r / gh): with n parts, part i holds the rows [i * B*gh / n, (i + 1) * B*gh / n), in runs
// of one image each; a part may start and end inside an image (whole images split CrossViT-B's 5
// over 2 threads 3/2). n depends on the shapes only, never on the thread count, so no result does;
// it is a power of two, so that the parts, equal to a grid row, split evenly over 2, 4 or 8
// threads. With one part, the kernel runs on the calling thread and its GEMMs use the threads.
//
// Forward: a part gathers its patches into one buffer and multiplies them in one GEMM, as a
// single-threaded GEMM gets faster with its rows (at C = K = 768 on the development machine: 68
// GMAC/s for 98 rows, 74 for 196, 79 for 490): the fewest parts of at most kPartPatches patches.
constexpr int64_t kPartPatches = 768;

int64_t forward_parts(const PShape& p) {
  int64_t n = 1;
  while ((p.B * p.gh + n - 1) / n * p.gw > kPartPatches && 2 * n <= p.B * p.gh) n *= 2;
  return n;
}

// Backward: a part is a weight-gradient partial, up to kPartials. The thread that finishes last
// adds the n - 1 partials of C x K alone, so each partial after the first needs more than
// kPartPatches patches of work: (n - 1) * kPartPatches < B * P (on the development machine, 8
// partials instead of these 4 made the backward 8-10 % slower at 224 px, 16-px patches, C = 256,
// B = 16 and C = 192, B = 22). One part, as in the forward, means at most kPartPatches patches.
constexpr int64_t kPartials = 8;

int64_t backward_parts(const PShape& p) {
  int64_t n = 1;
  while (2 * n <= kPartials && 2 * n <= p.B * p.gh && (2 * n - 1) * kPartPatches < p.B * p.P) n *= 2;
  return n;
}

// Calls fn(b, gy0, gy1, row) for the runs of part i of n in order: image b's grid rows [gy0, gy1),
// from patch row `row` of the part.
template <typename F>
void for_each_run(const PShape& p, int64_t n, int64_t i, const F& fn) {
  const int64_t begin = i * p.B * p.gh / n, end = (i + 1) * p.B * p.gh / n;
  for (int64_t r = begin; r < end;) {
    const int64_t b = r / p.gh, gy0 = r % p.gh, gy1 = std::min(p.gh, gy0 + end - r);
    fn(b, gy0, gy1, (r - begin) * p.gw);
    r += gy1 - gy0;
  }
}

// The most patches of a part: ceil(B*gh / n) grid rows; of a run, at most gh of them.
int64_t max_part_patches(const PShape& p, int64_t n) { return (p.B * p.gh + n - 1) / n * p.gw; }

// patches[(gy - gy0) * gw + gx, (ci, ky, kx)] = img[ci, gy*ph + ky, gx*pw + kx] for the grid rows
// gy0 <= gy < gy1 of one image (any strides), in A.
template <typename T, typename A>
void gather_patches_range(const T* img, const int64_t* st, const PShape& p, int64_t gy0, int64_t gy1, A* out) {
  for (int64_t r = gy0 * p.Cin; r < gy1 * p.Cin; ++r) {
    const int64_t gy = r / p.Cin, ci = r % p.Cin;
    for (int64_t ky = 0; ky < p.ph; ++ky) {
      const T* src = img + ci * st[0] + (gy * p.ph + ky) * st[1];
      for (int64_t gx = 0; gx < p.gw; ++gx) {
        A* dst = out + ((gy - gy0) * p.gw + gx) * p.K + (ci * p.ph + ky) * p.pw;
        const T* s0 = src + gx * p.pw * st[2];
        if (st[2] == 1) {
          for (int64_t kx = 0; kx < p.pw; ++kx) dst[kx] = static_cast<A>(s0[kx]);
        } else {
          for (int64_t kx = 0; kx < p.pw; ++kx) dst[kx] = static_cast<A>(s0[kx * st[2]]);
        }
      }
    }
  }
}

// The inverse: img[ci, gy*ph + ky, gx*pw + kx] = patches[(gy - gy0) * gw + gx, (ci, ky, kx)] for the
// grid rows gy0 <= gy < gy1 of one image (img contiguous).
template <typename T, typename A>
void scatter_patches_range(const A* patches, const PShape& p, int64_t gy0, int64_t gy1, T* img) {
  for (int64_t r = gy0 * p.Cin; r < gy1 * p.Cin; ++r) {
    const int64_t gy = r / p.Cin, ci = r % p.Cin;
    for (int64_t ky = 0; ky < p.ph; ++ky) {
      T* dst = img + (ci * p.Hi + gy * p.ph + ky) * p.Wi;
      for (int64_t gx = 0; gx < p.gw; ++gx) {
        const A* src = patches + ((gy - gy0) * p.gw + gx) * p.K + (ci * p.ph + ky) * p.pw;
        for (int64_t kx = 0; kx < p.pw; ++kx) dst[gx * p.pw + kx] = static_cast<T>(src[kx]);
      }
    }
  }
}

// Runs fn with the caller's grad and inference modes on each thread of the kernel's one parallel
// region (for_each_thread): worker threads inherit neither, and writing into an inference-mode
// tensor from a worker outside inference mode fails. With one part, fn runs on the calling thread
// alone, and its GEMMs may use the threads themselves.
template <typename F>
void for_each_thread_in_caller_modes(int64_t parts, const F& fn) {
  const bool inference = c10::InferenceMode::is_enabled();
  const auto run = [&]() {
    const c10::InferenceMode inference_guard(inference);
    const c10::NoGradGuard no_grad;
    fn();
  };
  if (parts == 1) {
    run();
  } else {
    for_each_thread(run);
  }
}

template <typename T, typename A>
void patch_embed_forward_impl(const Tensor& images, const Tensor& wt, const Tensor& posb, const Tensor& cls_row,
                              const PShape& p, Tensor& out) {
  const T* img = images.data_ptr<T>();
  const int64_t st[3] = {images.stride(1), images.stride(2), images.stride(3)};
  const auto aopt = images.options().dtype(acc_type(images.scalar_type()));
  const int64_t n = forward_parts(p), rows = max_part_patches(p, n);
  // Parts handed out one at a time. A part gathers its patches, multiplies them by W^T, then
  // writes each run's rows + (bias + pos[1 + p]) (added in A, rounded once to T) into the output
  // behind its image's CLS row; an image's first run writes the CLS row too.
  std::atomic<int64_t> next{0};
  for_each_thread_in_caller_modes(n, [&]() {
    Tensor patches = at::empty({rows, p.K}, aopt);
    Tensor prod = at::empty({rows, p.C}, aopt);
    for (int64_t i = next++; i < n; i = next++) {
      int64_t m = 0;
      for_each_run(p, n, i, [&](int64_t b, int64_t gy0, int64_t gy1, int64_t row) {
        gather_patches_range<T, A>(img + b * images.stride(0), st, p, gy0, gy1, patches.data_ptr<A>() + row * p.K);
        m = row + (gy1 - gy0) * p.gw;
      });
      Tensor pr = prod.narrow(0, 0, m);
      at::mm_out(pr, patches.narrow(0, 0, m), wt);
      for_each_run(p, n, i, [&](int64_t b, int64_t gy0, int64_t gy1, int64_t row) {
        const int64_t p0 = gy0 * p.gw, k = (gy1 - gy0) * p.gw;
        Tensor ob = out.select(0, b);
        Tensor rows_out = ob.narrow(0, 1 + p0, k);
        at::add_out(rows_out, pr.narrow(0, row, k), posb.narrow(0, p0, k));
        if (gy0 == 0) ob.select(0, 0).copy_(cls_row);
      });
    }
  });
}

Tensor patch_embed_forward(const Tensor& images, const Tensor& weight, const std::optional<Tensor>& bias_opt,
                           const Tensor& pos_embed, const Tensor& cls_token) {
  const Tensor bias = bias_opt.value_or(Tensor());
  crossvit_common::expect_device(at::kCPU, images, {&weight, &pos_embed, &cls_token});
  if (bias.defined()) crossvit_common::expect_device(at::kCPU, images, {&bias});
  const PShape p = crossvit_common::expect_patch_inputs(images, weight);
  const auto st = images.scalar_type();
  crossvit_common::expect_patch_extras(p, st, pos_embed, cls_token, bias);
  const auto acc = acc_type(st);
  Tensor wt = weight.detach().reshape({p.C, p.K}).to(acc).t();  // (K, C)
  Tensor posb = pos_embed.detach().narrow(0, 1, p.P).to(acc);
  if (bias.defined()) posb = posb + bias.detach().to(acc);
  posb = posb.contiguous();
  Tensor cls_row = (cls_token.detach().to(acc) + pos_embed.detach().select(0, 0).to(acc)).to(st);
  Tensor out = at::empty({p.B, 1 + p.P, p.C}, images.options());
  switch (st) {
    case at::kFloat: patch_embed_forward_impl<float, float>(images, wt, posb, cls_row, p, out); break;
    case at::kDouble: patch_embed_forward_impl<double, double>(images, wt, posb, cls_row, p, out); break;
    case at::kBFloat16: patch_embed_forward_impl<c10::BFloat16, float>(images, wt, posb, cls_row, p, out); break;
    default: patch_embed_forward_impl<c10::Half, float>(images, wt, posb, cls_row, p, out); break;  // kHalf
  }
  return out;
}

template <typename T, typename A>
void patch_embed_backward_impl(const Tensor& g, const Tensor& images, const Tensor& wmat, const PShape& p,
                               bool needs_images_grad, Tensor& dW, Tensor& d_images) {
  const T* img = images.data_ptr<T>();
  const int64_t st[3] = {images.stride(1), images.stride(2), images.stride(3)};
  const auto aopt = images.options().dtype(acc_type(images.scalar_type()));
  const int64_t n = backward_parts(p), rows = std::min(p.P, max_part_patches(p, n));
  // Parts handed out one at a time. Part i sums g_run^T @ patches_run over its runs, in order,
  // into its own partial (part 0 into dW), and writes the runs' image gradients (g_run @ W
  // scattered back); the thread that finishes the last part adds the partials to dW in part order.
  Tensor partial = at::empty({n - 1, p.C, p.K}, aopt);
  std::atomic<int64_t> next{0}, done{0};
  for_each_thread_in_caller_modes(n, [&]() {
    Tensor patches = at::empty({rows, p.K}, aopt);
    Tensor dpatch = needs_images_grad ? at::empty({rows, p.K}, aopt) : Tensor();
    for (int64_t i = next++; i < n; i = next++) {
      Tensor dWi = i == 0 ? dW : partial.select(0, i - 1);
      for_each_run(p, n, i, [&](int64_t b, int64_t gy0, int64_t gy1, int64_t row) {
        const int64_t m = (gy1 - gy0) * p.gw;
        Tensor gb = g.select(0, b).narrow(0, 1 + gy0 * p.gw, m);  // (m, C)
        if (gb.scalar_type() != patches.scalar_type()) gb = gb.to(patches.scalar_type());
        Tensor pt = patches.narrow(0, 0, m);
        gather_patches_range<T, A>(img + b * images.stride(0), st, p, gy0, gy1, pt.data_ptr<A>());
        if (row == 0) {
          at::mm_out(dWi, gb.t(), pt);
        } else {
          dWi.addmm_(gb.t(), pt);
        }
        if (needs_images_grad) {
          Tensor dp = dpatch.narrow(0, 0, m);
          at::mm_out(dp, gb, wmat);
          scatter_patches_range<T, A>(dp.data_ptr<A>(), p, gy0, gy1, d_images.data_ptr<T>() + b * p.Cin * p.Hi * p.Wi);
        }
      });
      if (done.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
        for (int64_t k = 0; k < n - 1; ++k) dW.add_(partial.select(0, k));
      }
    }
  });
}

std::tuple<std::optional<Tensor>, Tensor, std::optional<Tensor>, Tensor, Tensor> patch_embed_backward(
    const Tensor& grad_out, const Tensor& images, const Tensor& weight, bool has_bias, bool needs_images_grad) {
  crossvit_common::expect_device(at::kCPU, images, {&weight, &grad_out});
  const PShape p = crossvit_common::expect_patch_inputs(images, weight);
  const auto st = images.scalar_type();
  crossvit_common::expect_patch_grad(p, st, grad_out);
  const auto acc = acc_type(st);
  Tensor g = grad_out.contiguous();
  // sums over the batch (the reduction runs over dim 0 for each output element: fixed order)
  Tensor d_pos = at::sum(g, {0}, false, acc);  // (1+P, C)
  Tensor d_cls = d_pos.select(0, 0).clone();
  std::optional<Tensor> d_bias;
  if (has_bias) d_bias = d_pos.narrow(0, 1, p.P).sum(0).to(weight.scalar_type());
  Tensor dW = at::empty({p.C, p.K}, images.options().dtype(acc));
  Tensor wmat = weight.reshape({p.C, p.K}).to(acc).contiguous();
  std::optional<Tensor> d_images;
  Tensor di;
  if (needs_images_grad) di = at::empty({p.B, p.Cin, p.Hi, p.Wi}, images.options());
  switch (st) {
    case at::kFloat: patch_embed_backward_impl<float, float>(g, images, wmat, p, needs_images_grad, dW, di); break;
    case at::kDouble: patch_embed_backward_impl<double, double>(g, images, wmat, p, needs_images_grad, dW, di); break;
    case at::kBFloat16:
      patch_embed_backward_impl<c10::BFloat16, float>(g, images, wmat, p, needs_images_grad, dW, di);
      break;
    default:  // kHalf
      patch_embed_backward_impl<c10::Half, float>(g, images, wmat, p, needs_images_grad, dW, di);
      break;
  }
  if (needs_images_grad) d_images = di;
  const auto wt = weight.scalar_type();
  return {d_images, dW.reshape({p.C, p.Cin, p.ph, p.pw}).to(wt), d_bias, d_pos.to(wt), d_cls.to(wt)};
}

// Which vector clone the running CPU uses (x86-64 GCC builds only); the CPU benchmark records it.
std::string cpu_capability() {
#if CVK_TARGET_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";  // the 16-float kernels unless set_vector_width(8)
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64 (baseline)";
#else
  return "portable (no target clones)";
#endif
}

}  // namespace
}  // namespace cvk

// The operators, in a namespace of this module's own: the CUDA module registers its own
// (crossvit_kernels_cuda), so that each library is complete without the other.
TORCH_LIBRARY(crossvit_kernels_cpu, m) {
  crossvit_common::define_operators(m);
  m.def("cpu_capability() -> str", &cvk::cpu_capability);
  m.def("serial_section(bool enter, bool small_steps=False) -> ()", &cvk::serial_section);
  m.def("set_vector_width(int width) -> int", &cvk::set_vector_width);
}

TORCH_LIBRARY_IMPL(crossvit_kernels_cpu, CPU, m) {
  m.impl("cross_attention_core_forward", &cvk::cross_attention_core_forward);
  m.impl("cross_attention_core_backward", &cvk::cross_attention_core_backward);
  m.impl("patch_embed_forward", &cvk::patch_embed_forward);
  m.impl("patch_embed_backward", &cvk::patch_embed_backward);
}

CVK_PYTHON_MODULE(_C_cpu)
