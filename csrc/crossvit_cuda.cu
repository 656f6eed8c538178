// CUDA kernels of crossvit-kernels (backend "cuda", the fallback where Triton is missing),
// registered as the torch operators crossvit_kernels_cuda::*. Same operators and semantics as
// csrc/crossvit_cpu.cpp and crossvit_kernels/backends/pytorch.py.
//
// Cross-attention core: one thread block per (batch row, token split). The block walks its tokens
// in tiles of T held in shared memory: each warp normalises whole tokens (LayerNorm statistics by
// warp shuffles), warps compute the T x H scores (dot products reduced by shuffles), one thread
// per head updates the online softmax, and all threads update z (H x C in shared memory). Every
// token is read from global memory once forward, and once backward, which recomputes its
// statistics with the forward's code and writes its gradient once. A small kernel combines the
// splits of a row in split order.
//
// Patch embedding: one gather kernel (image -> patch matrix), at::mm, and one epilogue kernel that
// writes the CLS row, adds bias and position embedding and writes the token buffer (no cat).

#include "common.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace cvk_cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTargetBlocksPerSM = 2;

// Device attributes of the current device (cheap driver queries; no cuBLAS/cuSPARSE headers).
int device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}
int num_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return static_cast<float>(*p);
}

// One warp normalises one token: row = (x - mean) * rstd for the token at src (element stride sc);
// returns rstd (to every lane). The one home of the statistics: the forward and the backward both
// compute them here, so the backward's normalised tokens are the forward's bit for bit.
template <typename T>
__device__ __forceinline__ float ln_row(const T* src, int64_t sc, int64_t C, float eps, float* row, int lane) {
  float s = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float v = ld(src + c * sc);
    row[c] = v;
    s += v;
  }
  const float mean = warp_sum(s) / static_cast<float>(C);
  float q = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float d = row[c] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(warp_sum(q) / static_cast<float>(C) + eps);
  for (int64_t c = lane; c < C; c += 32) row[c] = (row[c] - mean) * rstd;
  return rstd;
}

// ------------------------------------------------------------------------------------------------
// cross-attention core: forward
// ------------------------------------------------------------------------------------------------
// x_cls (B, C) strides (cls_sb, cls_sc); x_tokens (B, M, C) strides (tok_sb, tok_sm, tok_sc);
// w (B, H, C) f32 contiguous; partial m/l (B, S, H), partial z (B, S, H, C).
template <typename T>
__global__ void xattn_fwd_kernel(const T* __restrict__ x_cls, const T* __restrict__ x_tokens,
                                 const float* __restrict__ w, float* __restrict__ part_m, float* __restrict__ part_l,
                                 float* __restrict__ part_z, int64_t N, int64_t C, int64_t H, int64_t chunk,
                                 int64_t tile, int64_t cls_sb, int64_t cls_sc, int64_t tok_sb, int64_t tok_sm,
                                 int64_t tok_sc, float eps) {
  extern __shared__ float smem[];
  const int64_t S = gridDim.x;
  const int64_t split = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* w_s = smem;                 // H * C
  float* z_s = w_s + H * C;          // H * C
  float* xh_s = z_s + H * C;         // tile * C
  float* p_s = xh_s + tile * C;      // tile * H
  float* m_s = p_s + tile * H;       // H
  float* l_s = m_s + H;              // H
  float* alpha_s = l_s + H;          // H

  const int64_t HC = H * C;
  for (int64_t k = tid; k < HC; k += kThreads) {
    w_s[k] = w[b * HC + k];
    z_s[k] = 0.f;
  }
  if (tid < H) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  const int64_t i0 = split * chunk;
  const int64_t i1 = min(N, i0 + chunk);
  __syncthreads();

  for (int64_t t0 = i0; t0 < i1; t0 += tile) {
    const int64_t nt = min(tile, i1 - t0);
    // 1. LayerNorm of each token of the tile, one warp per token
    for (int64_t j = warp; j < nt; j += kWarps) {
      const int64_t i = t0 + j;
      const T* src = (i == 0) ? x_cls + b * cls_sb : x_tokens + b * tok_sb + (i - 1) * tok_sm;
      const int64_t sc = (i == 0) ? cls_sc : tok_sc;
      ln_row(src, sc, C, eps, xh_s + j * C, lane);
    }
    __syncthreads();
    // 2. scores, one warp per (token, head)
    for (int64_t k = warp; k < nt * H; k += kWarps) {
      const int64_t j = k / H, h = k % H;
      const float* x = xh_s + j * C;
      const float* wh = w_s + h * C;
      float s = 0.f;
      for (int64_t c = lane; c < C; c += 32) s += wh[c] * x[c];
      s = warp_sum(s);
      if (lane == 0) p_s[j * H + h] = s;
    }
    __syncthreads();
    // 3. online softmax, one thread per head
    if (tid < H) {
      const int64_t h = tid;
      float mt = p_s[h];
      for (int64_t j = 1; j < nt; ++j) mt = fmaxf(mt, p_s[j * H + h]);
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, mt);
      const float alpha = (m_old == -INFINITY) ? 0.f : expf(m_old - m_new);
      float l = l_s[h] * alpha;
      for (int64_t j = 0; j < nt; ++j) {
        const float p = expf(p_s[j * H + h] - m_new);
        p_s[j * H + h] = p;
        l += p;
      }
      m_s[h] = m_new;
      l_s[h] = l;
      alpha_s[h] = alpha;
    }
    __syncthreads();
    // 4. z_h = alpha_h z_h + sum_j p_jh xh_j
    for (int64_t k = tid; k < HC; k += kThreads) {
      const int64_t h = k / C, c = k % C;
      float acc = z_s[k] * alpha_s[h];
      for (int64_t j = 0; j < nt; ++j) acc += p_s[j * H + h] * xh_s[j * C + c];
      z_s[k] = acc;
    }
    __syncthreads();
  }
  const int64_t item = b * S + split;
  for (int64_t k = tid; k < HC; k += kThreads) part_z[item * HC + k] = z_s[k];
  if (tid < H) {
    part_m[item * H + tid] = m_s[tid];
    part_l[item * H + tid] = l_s[tid];
  }
}

// z = sum_s z_s e^(m_s - M) / L and lse = M + log L, splits in order; one block per row.
__global__ void xattn_fwd_combine_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                         const float* __restrict__ part_z, float* __restrict__ z,
                                         float* __restrict__ lse, int64_t S, int64_t H, int64_t C) {
  const int64_t b = blockIdx.x;
  const int64_t HC = H * C;
  for (int64_t k = threadIdx.x; k < HC; k += blockDim.x) {
    const int64_t h = k / C, c = k % C;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) mx = fmaxf(mx, part_m[(b * S + s) * H + h]);
    float L = 0.f, acc = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t item = b * S + s;
      const float f = expf(part_m[item * H + h] - mx);
      L += part_l[item * H + h] * f;
      acc += part_z[item * HC + k] * f;
    }
    z[b * HC + k] = acc / L;
    if (c == 0) lse[b * H + h] = mx + logf(L);
  }
}

// ------------------------------------------------------------------------------------------------
// cross-attention core: backward
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void xattn_bwd_kernel(const T* __restrict__ x_cls, const T* __restrict__ x_tokens,
                                 const float* __restrict__ w, const float* __restrict__ z,
                                 const float* __restrict__ lse, const float* __restrict__ dz, T* __restrict__ dx_cls,
                                 T* __restrict__ dx_tokens, float* __restrict__ part_dw, int64_t N, int64_t C,
                                 int64_t H, int64_t chunk, int64_t tile, int64_t cls_sb, int64_t cls_sc,
                                 int64_t tok_sb, int64_t tok_sm, int64_t tok_sc, float eps) {
  extern __shared__ float smem[];
  const int64_t S = gridDim.x;
  const int64_t split = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t HC = H * C;
  const int64_t M = N - 1;
  float* w_s = smem;               // H * C
  float* dz_s = w_s + HC;          // H * C
  float* dw_s = dz_s + HC;         // H * C
  float* xh_s = dw_s + HC;         // tile * C
  float* g_s = xh_s + tile * C;    // tile * C
  float* a_s = g_s + tile * C;     // tile * H
  float* ds_s = a_s + tile * H;    // tile * H
  float* dzz_s = ds_s + tile * H;  // H
  float* lse_s = dzz_s + H;        // H
  float* rstd_s = lse_s + H;       // tile

  for (int64_t k = tid; k < HC; k += kThreads) {
    w_s[k] = w[b * HC + k];
    dz_s[k] = dz[b * HC + k];
    dw_s[k] = 0.f;
  }
  if (tid < H) lse_s[tid] = lse[b * H + tid];
  __syncthreads();
  for (int64_t h = warp; h < H; h += kWarps) {
    float s = 0.f;
    for (int64_t c = lane; c < C; c += 32) s += dz_s[h * C + c] * z[b * HC + h * C + c];
    s = warp_sum(s);
    if (lane == 0) dzz_s[h] = s;
  }
  const int64_t i0 = split * chunk;
  const int64_t i1 = min(N, i0 + chunk);
  __syncthreads();

  for (int64_t t0 = i0; t0 < i1; t0 += tile) {
    const int64_t nt = min(tile, i1 - t0);
    // 1. xh with the statistics recomputed as the forward computed them, one warp per token
    for (int64_t j = warp; j < nt; j += kWarps) {
      const int64_t i = t0 + j;
      const T* src = (i == 0) ? x_cls + b * cls_sb : x_tokens + b * tok_sb + (i - 1) * tok_sm;
      const int64_t sc = (i == 0) ? cls_sc : tok_sc;
      const float r = ln_row(src, sc, C, eps, xh_s + j * C, lane);
      if (lane == 0) rstd_s[j] = r;
    }
    __syncthreads();
    // 2. probabilities and score gradients, one warp per (token, head)
    for (int64_t k = warp; k < nt * H; k += kWarps) {
      const int64_t j = k / H, h = k % H;
      const float* x = xh_s + j * C;
      float s = 0.f, e = 0.f;
      for (int64_t c = lane; c < C; c += 32) {
        const float xv = x[c];
        s += w_s[h * C + c] * xv;
        e += dz_s[h * C + c] * xv;
      }
      s = warp_sum(s);
      e = warp_sum(e);
      if (lane == 0) {
        const float a = expf(s - lse_s[h]);
        a_s[j * H + h] = a;
        ds_s[j * H + h] = a * (e - dzz_s[h]);
      }
    }
    __syncthreads();
    // 3. token gradients (LayerNorm backward), one warp per token
    for (int64_t j = warp; j < nt; j += kWarps) {
      const int64_t i = t0 + j;
      const float* x = xh_s + j * C;
      float* g = g_s + j * C;
      float s1 = 0.f, s2 = 0.f;
      for (int64_t c = lane; c < C; c += 32) {
        float acc = 0.f;
        for (int64_t h = 0; h < H; ++h) acc += a_s[j * H + h] * dz_s[h * C + c] + ds_s[j * H + h] * w_s[h * C + c];
        g[c] = acc;
        s1 += acc;
        s2 += acc * x[c];
      }
      const float m1 = warp_sum(s1) / static_cast<float>(C);
      const float m2 = warp_sum(s2) / static_cast<float>(C);
      const float r = rstd_s[j];
      T* dst = (i == 0) ? dx_cls + b * C : dx_tokens + (b * M + (i - 1)) * C;
      for (int64_t c = lane; c < C; c += 32) dst[c] = static_cast<T>(r * (g[c] - m1 - x[c] * m2));
    }
    // 4. dw_h += sum_j ds_jh xh_j (reads xh and ds only: no barrier needed after step 3)
    for (int64_t k = tid; k < HC; k += kThreads) {
      const int64_t h = k / C, c = k % C;
      float acc = dw_s[k];
      for (int64_t j = 0; j < nt; ++j) acc += ds_s[j * H + h] * xh_s[j * C + c];
      dw_s[k] = acc;
    }
    __syncthreads();
  }
  const int64_t item = b * S + split;
  for (int64_t k = tid; k < HC; k += kThreads) part_dw[item * HC + k] = dw_s[k];
}

__global__ void xattn_bwd_combine_kernel(const float* __restrict__ part_dw, float* __restrict__ dw, int64_t S,
                                         int64_t HC) {
  const int64_t b = blockIdx.x;
  for (int64_t k = threadIdx.x; k < HC; k += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s) acc += part_dw[(b * S + s) * HC + k];
    dw[b * HC + k] = acc;
  }
}

// ------------------------------------------------------------------------------------------------
// host side: preconditions (crossvit_kernels.ops has validated the inputs; see common.h), limits
// of these kernels, launches
// ------------------------------------------------------------------------------------------------
using crossvit_common::acc_type;
using crossvit_common::PShape;
using XShape = crossvit_common::XDims;

XShape expect_core_inputs(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w) {
  crossvit_common::expect_device(at::kCUDA, x_cls, {&x_tokens, &w});
  const XShape s = crossvit_common::expect_core_inputs(x_cls, x_tokens, w);
  TORCH_CHECK(s.B <= 65535, "batch size ", s.B, " exceeds the CUDA grid limit 65535; split the batch");
  TORCH_CHECK(s.H <= kThreads, "the cuda backend supports at most ", kThreads, " heads, got H = ", s.H,
              "; use backend='triton' or 'torch'");
  return s;
}

// Token splits per row: enough blocks to fill the GPU, at least 32 tokens per split.
int64_t num_splits(int64_t B, int64_t N) {
  const int64_t sms = num_sms();
  const int64_t want = (kTargetBlocksPerSM * sms + B - 1) / B;
  const int64_t most = std::max<int64_t>(1, N / 32);
  return std::max<int64_t>(1, std::min(want, most));
}

// The largest tile (<= max_tile tokens) whose shared-memory footprint fits the device; sets the
// kernel's dynamic shared-memory limit when it exceeds the default 48 KiB.
template <typename Kernel>
std::pair<int64_t, size_t> pick_tile(Kernel kernel, int64_t max_tile, int64_t fixed_floats, int64_t per_tile_floats) {
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  int64_t tile = max_tile;
  auto bytes = [&](int64_t t) { return static_cast<size_t>(fixed_floats + t * per_tile_floats) * sizeof(float); };
  while (tile > 1 && bytes(tile) > 48 * 1024) tile /= 2;
  TORCH_CHECK(bytes(tile) <= limit, "cross-attention width C and heads H need ", bytes(tile),
              " bytes of shared memory per block, more than this GPU's ", limit,
              "; use backend='triton' or 'torch' for such shapes");
  if (bytes(tile) > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes(tile))));
  }
  return {tile, bytes(tile)};
}

template <typename T>
void launch_xattn_forward(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w, float eps, const XShape& s,
                          Tensor& z, Tensor& lse) {
  const int64_t S = num_splits(s.B, s.N);
  const int64_t chunk = (s.N + S - 1) / S;
  auto f32 = x_cls.options().dtype(at::kFloat);
  Tensor part_m = at::empty({s.B, S, s.H}, f32);
  Tensor part_l = at::empty({s.B, S, s.H}, f32);
  Tensor part_z = at::empty({s.B, S, s.H, s.C}, f32);
  auto kernel = xattn_fwd_kernel<T>;
  auto [tile, smem] = pick_tile(kernel, 32, 2 * s.H * s.C + 3 * s.H, s.C + s.H);
  cudaStream_t stream = current_stream();
  dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(s.B));
  kernel<<<grid, kThreads, smem, stream>>>(
      x_cls.data_ptr<T>(), x_tokens.data_ptr<T>(), w.data_ptr<float>(), part_m.data_ptr<float>(),
      part_l.data_ptr<float>(), part_z.data_ptr<float>(), s.N, s.C, s.H, chunk, tile, x_cls.stride(0),
      x_cls.stride(1), x_tokens.stride(0), x_tokens.stride(1), x_tokens.stride(2), eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  xattn_fwd_combine_kernel<<<static_cast<unsigned>(s.B), kThreads, 0, stream>>>(
      part_m.data_ptr<float>(), part_l.data_ptr<float>(), part_z.data_ptr<float>(), z.data_ptr<float>(),
      lse.data_ptr<float>(), S, s.H, s.C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> cross_attention_core_forward(const Tensor& x_cls, const Tensor& x_tokens,
                                                        const Tensor& w_in, double eps) {
  const XShape s = expect_core_inputs(x_cls, x_tokens, w_in);
  const c10::cuda::CUDAGuard guard(x_cls.device());
  Tensor w = w_in.contiguous();
  auto f32 = x_cls.options().dtype(at::kFloat);
  Tensor z = at::empty({s.B, s.H, s.C}, f32);
  Tensor lse = at::empty({s.B, s.H}, f32);
  const float e = static_cast<float>(eps);
  switch (x_cls.scalar_type()) {
    case at::kFloat: launch_xattn_forward<float>(x_cls, x_tokens, w, e, s, z, lse); break;
    case at::kBFloat16: launch_xattn_forward<c10::BFloat16>(x_cls, x_tokens, w, e, s, z, lse); break;
    default: launch_xattn_forward<c10::Half>(x_cls, x_tokens, w, e, s, z, lse); break;  // kHalf
  }
  return {z, lse};
}

template <typename T>
void launch_xattn_backward(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w, const Tensor& z,
                           const Tensor& lse, const Tensor& dz, float eps, const XShape& s, Tensor& dx_cls,
                           Tensor& dx_tokens, Tensor& dw) {
  const int64_t S = num_splits(s.B, s.N);
  const int64_t chunk = (s.N + S - 1) / S;
  Tensor part_dw = at::empty({s.B, S, s.H, s.C}, x_cls.options().dtype(at::kFloat));
  auto kernel = xattn_bwd_kernel<T>;
  auto [tile, smem] = pick_tile(kernel, 16, 3 * s.H * s.C + 2 * s.H, 2 * s.C + 2 * s.H + 1);
  cudaStream_t stream = current_stream();
  dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(s.B));
  kernel<<<grid, kThreads, smem, stream>>>(
      x_cls.data_ptr<T>(), x_tokens.data_ptr<T>(), w.data_ptr<float>(), z.data_ptr<float>(), lse.data_ptr<float>(),
      dz.data_ptr<float>(), dx_cls.data_ptr<T>(), dx_tokens.data_ptr<T>(), part_dw.data_ptr<float>(), s.N, s.C, s.H,
      chunk, tile, x_cls.stride(0), x_cls.stride(1), x_tokens.stride(0), x_tokens.stride(1), x_tokens.stride(2), eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  xattn_bwd_combine_kernel<<<static_cast<unsigned>(s.B), kThreads, 0, stream>>>(part_dw.data_ptr<float>(),
                                                                                dw.data_ptr<float>(), S, s.H * s.C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> cross_attention_core_backward(const Tensor& x_cls, const Tensor& x_tokens,
                                                                 const Tensor& w_in, const Tensor& z_in,
                                                                 const Tensor& lse_in, const Tensor& dz_in,
                                                                 double eps) {
  crossvit_common::expect_device(at::kCUDA, x_cls, {&z_in, &lse_in, &dz_in});
  const XShape s = expect_core_inputs(x_cls, x_tokens, w_in);
  crossvit_common::expect_core_saved(s, z_in, lse_in, dz_in);
  const c10::cuda::CUDAGuard guard(x_cls.device());
  Tensor w = w_in.contiguous(), z = z_in.contiguous(), lse = lse_in.contiguous(), dz = dz_in.contiguous();
  Tensor dx_cls = at::empty({s.B, s.C}, x_cls.options());
  Tensor dx_tokens = at::empty({s.B, s.M, s.C}, x_tokens.options());
  Tensor dw = at::empty({s.B, s.H, s.C}, x_cls.options().dtype(at::kFloat));
  const float e = static_cast<float>(eps);
  switch (x_cls.scalar_type()) {
    case at::kFloat: launch_xattn_backward<float>(x_cls, x_tokens, w, z, lse, dz, e, s, dx_cls, dx_tokens, dw); break;
    case at::kBFloat16:
      launch_xattn_backward<c10::BFloat16>(x_cls, x_tokens, w, z, lse, dz, e, s, dx_cls, dx_tokens, dw);
      break;
    default:  // kHalf
      launch_xattn_backward<c10::Half>(x_cls, x_tokens, w, z, lse, dz, e, s, dx_cls, dx_tokens, dw);
      break;
  }
  return {dx_cls, dx_tokens, dw};
}

// ------------------------------------------------------------------------------------------------
// patch embedding
// ------------------------------------------------------------------------------------------------

// patches[b*P + p, (ci, ky, kx)] = img[b, ci, gy*ph + ky, gx*pw + kx]; one thread per element.
template <typename T, typename A>
__global__ void gather_patches_kernel(const T* __restrict__ img, A* __restrict__ patches, int64_t total, int64_t P,
                                      int64_t K, int64_t ph, int64_t pw, int64_t gw, int64_t sb, int64_t sc,
                                      int64_t sy, int64_t sx) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / K, k = idx % K;
    const int64_t b = r / P, p = r % P;
    const int64_t gy = p / gw, gx = p % gw;
    const int64_t ci = k / (ph * pw), rem = k % (ph * pw);
    const int64_t ky = rem / pw, kx = rem % pw;
    patches[idx] = static_cast<A>(img[b * sb + ci * sc + (gy * ph + ky) * sy + (gx * pw + kx) * sx]);
  }
}

// out[b, 0] = cls + pos[0];  out[b, 1 + p] = tokens[b*P + p] + bias + pos[1 + p]
template <typename T, typename A>
__global__ void patch_epilogue_kernel(const A* __restrict__ tokens, const T* __restrict__ bias,
                                      const T* __restrict__ pos, const T* __restrict__ cls, T* __restrict__ out,
                                      int64_t total, int64_t P, int64_t C) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C;
    const int64_t row = (idx / C) % (P + 1);
    const int64_t b = idx / (C * (P + 1));
    A v;
    if (row == 0) {
      v = static_cast<A>(cls[c]) + static_cast<A>(pos[c]);
    } else {
      v = tokens[(b * P + row - 1) * C + c] + static_cast<A>(pos[row * C + c]);
      if (bias != nullptr) v += static_cast<A>(bias[c]);
    }
    out[idx] = static_cast<T>(v);
  }
}

// d_images[b, ci, y, x] = d_patches[b*P + p, k] (patches do not overlap); d_images contiguous.
template <typename T, typename A>
__global__ void scatter_patches_kernel(const A* __restrict__ dpatches, T* __restrict__ dimg, int64_t total,
                                       int64_t Cin, int64_t Hi, int64_t Wi, int64_t ph, int64_t pw, int64_t gw,
                                       int64_t P, int64_t K) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = idx % Wi;
    const int64_t y = (idx / Wi) % Hi;
    const int64_t ci = (idx / (Wi * Hi)) % Cin;
    const int64_t b = idx / (Wi * Hi * Cin);
    const int64_t p = (y / ph) * gw + x / pw;
    const int64_t k = (ci * ph + y % ph) * pw + x % pw;
    dimg[idx] = static_cast<T>(dpatches[(b * P + p) * K + k]);
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(num_sms()) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

template <typename T, typename A>
Tensor gather(const Tensor& images, const PShape& p) {
  Tensor patches = at::empty({p.B * p.P, p.K}, images.options().dtype(acc_type(images.scalar_type())));
  const int64_t total = patches.numel();
  gather_patches_kernel<T, A><<<grid_for(total), kThreads, 0, current_stream()>>>(
      images.data_ptr<T>(), patches.data_ptr<A>(), total, p.P, p.K, p.ph, p.pw, p.gw, images.stride(0),
      images.stride(1), images.stride(2), images.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return patches;
}

template <typename T, typename A>
void patch_forward_typed(const Tensor& images, const Tensor& weight, const Tensor& bias, const Tensor& pos,
                         const Tensor& cls, const PShape& p, Tensor& out) {
  Tensor patches = gather<T, A>(images, p);
  Tensor tokens = at::mm(patches, weight.reshape({p.C, p.K}).to(acc_type(images.scalar_type())).t());
  const int64_t total = out.numel();
  patch_epilogue_kernel<T, A><<<grid_for(total), kThreads, 0, current_stream()>>>(
      tokens.data_ptr<A>(), bias.defined() ? bias.data_ptr<T>() : nullptr, pos.data_ptr<T>(), cls.data_ptr<T>(),
      out.data_ptr<T>(), total, p.P, p.C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor patch_embed_forward(const Tensor& images, const Tensor& weight, const std::optional<Tensor>& bias_opt,
                           const Tensor& pos_embed, const Tensor& cls_token) {
  Tensor bias = bias_opt.value_or(Tensor());
  crossvit_common::expect_device(at::kCUDA, images, {&weight, &pos_embed, &cls_token});
  if (bias.defined()) crossvit_common::expect_device(at::kCUDA, images, {&bias});
  const PShape p = crossvit_common::expect_patch_inputs(images, weight);
  const auto st = images.scalar_type();
  crossvit_common::expect_patch_extras(p, st, pos_embed, cls_token, bias);
  if (bias.defined()) bias = bias.contiguous();
  const c10::cuda::CUDAGuard guard(images.device());
  Tensor pos = pos_embed.contiguous(), cls = cls_token.contiguous();
  Tensor out = at::empty({p.B, 1 + p.P, p.C}, images.options());
  switch (st) {
    case at::kFloat: patch_forward_typed<float, float>(images, weight, bias, pos, cls, p, out); break;
    case at::kDouble: patch_forward_typed<double, double>(images, weight, bias, pos, cls, p, out); break;
    case at::kBFloat16: patch_forward_typed<c10::BFloat16, float>(images, weight, bias, pos, cls, p, out); break;
    default: patch_forward_typed<c10::Half, float>(images, weight, bias, pos, cls, p, out); break;  // kHalf
  }
  return out;
}

template <typename T, typename A>
void patch_backward_typed(const Tensor& g_tok, const Tensor& images, const Tensor& wmat, const PShape& p,
                          bool needs_images_grad, Tensor& dW, Tensor& d_images) {
  Tensor patches = gather<T, A>(images, p);
  dW = at::mm(g_tok.t(), patches);  // (C, K)
  if (needs_images_grad) {
    Tensor dpatches = at::mm(g_tok, wmat);  // (B*P, K)
    d_images = at::empty({p.B, p.Cin, p.Hi, p.Wi}, images.options());
    const int64_t total = d_images.numel();
    scatter_patches_kernel<T, A><<<grid_for(total), kThreads, 0, current_stream()>>>(
        dpatches.data_ptr<A>(), d_images.data_ptr<T>(), total, p.Cin, p.Hi, p.Wi, p.ph, p.pw, p.gw, p.P, p.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<std::optional<Tensor>, Tensor, std::optional<Tensor>, Tensor, Tensor> patch_embed_backward(
    const Tensor& grad_out, const Tensor& images, const Tensor& weight, bool has_bias, bool needs_images_grad) {
  crossvit_common::expect_device(at::kCUDA, images, {&weight, &grad_out});
  const PShape p = crossvit_common::expect_patch_inputs(images, weight);
  const auto st = images.scalar_type();
  crossvit_common::expect_patch_grad(p, st, grad_out);
  const c10::cuda::CUDAGuard guard(images.device());
  const auto acc = acc_type(st);
  Tensor d_pos = at::sum(grad_out, {0}, false, acc);  // (1+P, C)
  Tensor d_cls = d_pos.select(0, 0).clone();
  std::optional<Tensor> d_bias;
  if (has_bias) d_bias = d_pos.narrow(0, 1, p.P).sum(0).to(weight.scalar_type());
  Tensor g_tok = grad_out.narrow(1, 1, p.P).to(acc).reshape({p.B * p.P, p.C});
  Tensor wmat = weight.reshape({p.C, p.K}).to(acc).contiguous();
  Tensor dW, di;
  switch (st) {
    case at::kFloat: patch_backward_typed<float, float>(g_tok, images, wmat, p, needs_images_grad, dW, di); break;
    case at::kDouble: patch_backward_typed<double, double>(g_tok, images, wmat, p, needs_images_grad, dW, di); break;
    case at::kBFloat16:
      patch_backward_typed<c10::BFloat16, float>(g_tok, images, wmat, p, needs_images_grad, dW, di);
      break;
    default:  // kHalf
      patch_backward_typed<c10::Half, float>(g_tok, images, wmat, p, needs_images_grad, dW, di);
      break;
  }
  std::optional<Tensor> d_images;
  if (needs_images_grad) d_images = di;
  const auto wt = weight.scalar_type();
  return {d_images, dW.reshape({p.C, p.Cin, p.ph, p.pw}).to(wt), d_bias, d_pos.to(wt), d_cls.to(wt)};
}

}  // namespace
}  // namespace cvk_cuda

// The operators, in a namespace of this module's own (the CPU module has crossvit_kernels_cpu), so
// that each library is complete without the other.
TORCH_LIBRARY(crossvit_kernels_cuda, m) {
  crossvit_common::define_operators(m);
}

TORCH_LIBRARY_IMPL(crossvit_kernels_cuda, CUDA, m) {
  m.impl("cross_attention_core_forward", &cvk_cuda::cross_attention_core_forward);
  m.impl("cross_attention_core_backward", &cvk_cuda::cross_attention_core_backward);
  m.impl("patch_embed_forward", &cvk_cuda::patch_embed_forward);
  m.impl("patch_embed_backward", &cvk_cuda::patch_embed_backward);
}

CVK_PYTHON_MODULE(_C_cuda)
