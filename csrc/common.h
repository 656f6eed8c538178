// What the CPU (crossvit_cpu.cpp) and CUDA (crossvit_cuda.cu) extension modules share: their empty
// Python module, the preconditions of their operators, and the shapes those imply.
//
// Each module registers its kernels as torch operators (TORCH_LIBRARY); Python calls them through
// torch.ops, so an error raised here (TORCH_CHECK -> c10::Error) unwinds into torch's dispatcher
// and is turned into a Python exception by torch itself. The modules contain no Python bindings.
//
// crossvit_kernels.ops validates every input (the package's one validation layer, with the
// messages that say what to fix) and the backends call the operators only with inputs that meet
// the contract of crossvit_kernels/backends/base.py. The operators assert that contract, as far
// as their memory accesses depend on it, so that a direct call that breaks it raises instead of
// reading or writing out of bounds.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

// The Python module `crossvit_kernels.<name>`: empty. Importing it loads the library, whose static
// initialisers register the operators with torch's dispatcher.
#define CVK_PYTHON_MODULE(name)                                                   \
  PyMODINIT_FUNC PyInit_##name(void) {                                            \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, #name, nullptr, 0, nullptr}; \
    return PyModule_Create(&module);                                             \
  }

// A precondition of an operator: RuntimeError naming the condition when it does not hold.
#define CVK_EXPECT(cond)                                                                                  \
  TORCH_CHECK((cond), "crossvit-kernels extension: an operator was called with arguments that break its " \
              "contract (", #cond, " is false); call it through crossvit_kernels.ops, which validates them")

namespace crossvit_common {

using at::Tensor;

// The schemas of the operators both modules implement: the core and patch-embedding contracts of
// crossvit_kernels/backends/base.py (crossvit_kernels/backends/extension.py lists them as OPS).
inline void define_operators(torch::Library& m) {
  m.def("cross_attention_core_forward(Tensor x_cls, Tensor x_tokens, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("cross_attention_core_backward(Tensor x_cls, Tensor x_tokens, Tensor w, Tensor z, Tensor lse, Tensor dz, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("patch_embed_forward(Tensor images, Tensor weight, Tensor? bias, Tensor pos_embed, Tensor cls_token) "
        "-> Tensor");
  m.def("patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, bool has_bias, bool needs_images_grad) "
        "-> (Tensor?, Tensor, Tensor?, Tensor, Tensor)");
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_half_or_single(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Every tensor on the device of `first`, which is of type `kind` (the dispatcher picks a module's
// kernel by the highest-priority device among the arguments, so the others may differ).
inline void expect_device(at::DeviceType kind, const Tensor& first, std::initializer_list<const Tensor*> others) {
  CVK_EXPECT(first.device().type() == kind);
  for (const Tensor* t : others) CVK_EXPECT(t->device() == first.device());
}

// Shapes of the cross-attention core: x_cls (B, C), x_tokens (B, M, C), w (B, H, C); N = 1 + M.
struct XDims {
  int64_t B, M, N, C, H;
};

// The core's inputs: x_cls and x_tokens of one dtype among float32, bfloat16 and float16 (any
// strides), w float32; devices asserted by the caller.
inline XDims expect_core_inputs(const Tensor& x_cls, const Tensor& x_tokens, const Tensor& w) {
  CVK_EXPECT(x_cls.dim() == 2 && x_tokens.dim() == 3 && w.dim() == 3);
  CVK_EXPECT(is_half_or_single(x_cls.scalar_type()) && x_tokens.scalar_type() == x_cls.scalar_type());
  CVK_EXPECT(w.scalar_type() == at::kFloat);
  const int64_t B = x_cls.size(0), C = x_cls.size(1), M = x_tokens.size(1), H = w.size(1);
  CVK_EXPECT(B >= 1 && C >= 1 && H >= 1);
  CVK_EXPECT(x_tokens.size(0) == B && x_tokens.size(2) == C);
  CVK_EXPECT(w.size(0) == B && w.size(2) == C);
  return XDims{B, M, M + 1, C, H};
}

// The core backward's saved tensors and incoming gradient: z and dz (B, H, C), lse (B, H), float32.
inline void expect_core_saved(const XDims& s, const Tensor& z, const Tensor& lse, const Tensor& dz) {
  CVK_EXPECT(z.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat && dz.scalar_type() == at::kFloat);
  const int64_t B = s.B, H = s.H, C = s.C;
  CVK_EXPECT(z.sizes().equals({B, H, C}) && dz.sizes().equals({B, H, C}));
  CVK_EXPECT(lse.sizes().equals({B, H}));
}

// Shapes of the patch embedding: images (B, Cin, Hi, Wi), weight (C, Cin, ph, pw); a (gh, gw) grid
// of P patches of K = Cin * ph * pw values each.
struct PShape {
  int64_t B, Cin, Hi, Wi, C, ph, pw, gh, gw, P, K;
};

// images and weight of one floating dtype (images any strides), the patch size dividing the image.
inline PShape expect_patch_inputs(const Tensor& images, const Tensor& weight) {
  CVK_EXPECT(images.dim() == 4 && weight.dim() == 4);
  const auto st = images.scalar_type();
  CVK_EXPECT((is_half_or_single(st) || st == at::kDouble) && weight.scalar_type() == st);
  const int64_t B = images.size(0), Cin = images.size(1), Hi = images.size(2), Wi = images.size(3);
  const int64_t C = weight.size(0), ph = weight.size(2), pw = weight.size(3);
  CVK_EXPECT(weight.size(1) == Cin);
  CVK_EXPECT(B >= 1 && Cin >= 1 && C >= 1 && ph >= 1 && pw >= 1);
  CVK_EXPECT(Hi >= ph && Wi >= pw && Hi % ph == 0 && Wi % pw == 0);
  const int64_t gh = Hi / ph, gw = Wi / pw;
  return PShape{B, Cin, Hi, Wi, C, ph, pw, gh, gw, gh * gw, Cin * ph * pw};
}

// The forward's other inputs: pos_embed (1 + P, C), cls_token (C,), bias (C,) when given; the
// images' dtype.
inline void expect_patch_extras(const PShape& p, at::ScalarType st, const Tensor& pos_embed, const Tensor& cls_token,
                                const Tensor& bias) {
  const int64_t P = p.P, C = p.C;
  CVK_EXPECT(pos_embed.scalar_type() == st && cls_token.scalar_type() == st);
  CVK_EXPECT(pos_embed.sizes().equals({1 + P, C}) && cls_token.sizes().equals({C}));
  CVK_EXPECT(!bias.defined() || (bias.scalar_type() == st && bias.sizes().equals({C})));
}

// The backward's incoming gradient: (B, 1 + P, C) in the images' dtype.
inline void expect_patch_grad(const PShape& p, at::ScalarType st, const Tensor& grad_out) {
  const int64_t B = p.B, P = p.P, C = p.C;
  CVK_EXPECT(grad_out.scalar_type() == st && grad_out.sizes().equals({B, 1 + P, C}));
}

}  // namespace crossvit_common
