// Input validation shared by the CPU (crossvit_cpu.cpp) and CUDA (crossvit_cuda.cu) extension
// modules. Every check raises a Python exception (TORCH_CHECK -> RuntimeError) whose message says
// what to fix; the device checks stay in each module, which knows its backend's name.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace crossvit_common {

using at::Tensor;

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes().equals(expected), name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_is_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32 (the saved statistics and the absorbed ",
              "query are float32), got ", dtype_name(t.scalar_type()), "; cast it with .float()");
}

// Shapes of the cross-attention core: x_cls (B, C), x_tokens (B, M, C), w (B, H, C); N = 1 + M.
struct XDims {
  int64_t B, M, N, C, H;
};

// Ranks, dtypes and sizes of the cross-attention core's inputs (devices checked by the caller).
inline XDims check_xattn_dims(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w, const char* backend) {
  check_is_f32(w, "w");
  TORCH_CHECK(x_cls.dim() == 2, "x_cls must have shape (B, C), got ", x_cls.sizes());
  TORCH_CHECK(x_tokens.dim() == 3, "x_tokens must have shape (B, M, C), got ", x_tokens.sizes());
  TORCH_CHECK(w.dim() == 3, "w must have shape (B, H, C), got ", w.sizes());
  const auto st = x_cls.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, "x_cls must be float32, bfloat16 or ",
              "float16 for the ", backend, " backend, got ", dtype_name(st), " (use backend='torch' for float64)");
  TORCH_CHECK(x_tokens.scalar_type() == st, "x_tokens must have the dtype of x_cls (", dtype_name(st), "), got ",
              dtype_name(x_tokens.scalar_type()));
  XDims s;
  s.B = x_cls.size(0);
  s.C = x_cls.size(1);
  s.M = x_tokens.size(1);
  s.N = s.M + 1;
  s.H = w.size(1);
  TORCH_CHECK(s.B >= 1 && s.C >= 1, "x_cls must have B >= 1 rows of width C >= 1, got ", x_cls.sizes());
  TORCH_CHECK(x_tokens.size(0) == s.B && x_tokens.size(2) == s.C, "x_tokens must have shape (", s.B, ", M, ", s.C,
              ") to match x_cls ", x_cls.sizes(), ", got ", x_tokens.sizes());
  TORCH_CHECK(w.size(0) == s.B && w.size(2) == s.C && s.H >= 1, "w must have shape (", s.B, ", H, ", s.C,
              ") with H >= 1, got ", w.sizes());
  return s;
}

// Shapes of the patch embedding: images (B, Cin, Hi, Wi), weight (C, Cin, ph, pw); a (gh, gw) grid
// of P patches of K = Cin * ph * pw values each.
struct PShape {
  int64_t B, Cin, Hi, Wi, C, ph, pw, gh, gw, P, K;
};

// Ranks, dtypes and sizes of the patch embedding's inputs (devices checked by the caller).
inline PShape check_patch_dims(const Tensor& images, const Tensor& weight) {
  TORCH_CHECK(images.dim() == 4, "images must have shape (B, Cin, H, W), got ", images.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must have shape (C, Cin, ph, pw), got ", weight.sizes());
  const auto st = images.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "images must be float32, float64, bfloat16 or float16, got ", dtype_name(st));
  TORCH_CHECK(weight.scalar_type() == st, "weight must have the dtype of images (", dtype_name(st), "), got ",
              dtype_name(weight.scalar_type()));
  PShape p;
  p.B = images.size(0);
  p.Cin = images.size(1);
  p.Hi = images.size(2);
  p.Wi = images.size(3);
  p.C = weight.size(0);
  p.ph = weight.size(2);
  p.pw = weight.size(3);
  TORCH_CHECK(weight.size(1) == p.Cin, "weight expects ", weight.size(1), " input channels but images have ", p.Cin);
  TORCH_CHECK(p.B >= 1 && p.C >= 1 && p.Cin >= 1 && p.ph >= 1 && p.pw >= 1, "empty input: images ",
              images.sizes(), ", weight ", weight.sizes());
  TORCH_CHECK(p.Hi >= p.ph && p.Wi >= p.pw && p.Hi % p.ph == 0 && p.Wi % p.pw == 0, "the patch size ", p.ph, "x",
              p.pw, " must divide the image size ", p.Hi, "x", p.Wi, ": resize or crop the images");
  p.gh = p.Hi / p.ph;
  p.gw = p.Wi / p.pw;
  p.P = p.gh * p.gw;
  p.K = p.Cin * p.ph * p.pw;
  return p;
}

}  // namespace crossvit_common
