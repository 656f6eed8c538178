"""Drop-in speed for an existing timm CrossViT: :func:`patch_timm` and :func:`unpatch_timm`.

``patch_timm(model)`` converts one ``timm.models.crossvit.CrossVit`` instance in place so that

* its patch embeddings run on :func:`crossvit_kernels.ops.patch_embed` (linear embedding: one op
  writes the CLS row, the patch tokens and the position embedding into the token buffer), or for
  the dagger models on timm's own convolutions followed by one epilogue that adds the position
  embedding while writing the token buffer (no ``torch.cat`` followed by an add);
* its cross-attention blocks run on the fused single-query op
  (:func:`crossvit_kernels.ops.cross_attention`: no K/V projection of every token, no concat);
* at CPU inference, the encoder blocks' linears run on oneDNN's fused linear + bias (+ GELU)
  kernel (``encoder=True``, the default; measured faster than the bias-copy + GEMM + GELU of the
  default CPU path);
* the fusion stage of every ``MultiScaleBlock`` projects only the CLS rows and reads the other
  branch's patch tokens in place as a strided view (no concatenation of the fusion's input); the
  encoders' outputs are never written to (:func:`crossvit_kernels.models.fusion.fuse_cross_attention`).

Nothing else changes: no parameter or buffer is added, renamed or moved, so ``state_dict()`` keys,
optimizers, checkpoints, hooks on the encoder blocks and ``train()``/``eval()`` behave as before;
the logits and every gradient equal the unpatched model's to float32 rounding.

How: each patched module's ``__class__`` is replaced by a subclass of its own class that overrides
only the methods above (one subclass per original class, made on first use). timm's classes and
every other instance are untouched; :func:`unpatch_timm` restores the original classes.
Submodules whose class overrides the patched method (a user's subclass) or whose configuration
the fused op does not cover (a non-LayerNorm norm, a hand-set attention scale, a patch embedding
that is not a plain stride-p convolution) keep timm's code.

Routes that cannot follow the fused path get timm's code: under ``torch.jit.script`` every patched
method compiles to timm's own forward (written out below, as TorchScript cannot call the parent
class's method); ``torch.fx`` records the fused ops as leaf calls (see :mod:`crossvit_kernels.modules`);
modules folded by a fused path that carry forward hooks are called, so their hooks fire.
"""

import types
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import backends as _backends
from .models.crossvit import scale_image
from .models.fusion import fuse_cross_attention
from .modules import embed_tokens, encoder_fast_path, fused_cross_attention_block, fused_encoder_block

Tensor = torch.Tensor

__all__ = ["patch_timm", "unpatch_timm", "is_patched"]

_ORIG = "_crossvit_kernels_orig_class"      # the class an instance had before patching
_BACKEND = "_crossvit_kernels_backend"      # backend of the fused ops (None: the current default)
_FUSED = "_crossvit_kernels_fused"          # False: this block keeps timm's math (see _fusable_*)
_ATTRS = (_ORIG, _BACKEND, _FUSED)

_PATCHED_CLASSES: Dict[tuple, type] = {}   # (timm class, replaced methods) -> patched class

torch.fx.wrap("scale_image")   # a torch.fx leaf here too, as in timm (see crossvit_kernels.modules)


def _timm_crossvit():
    try:
        from timm.models import crossvit as tc
    except ImportError as exc:  # pragma: no cover - timm is a test requirement
        raise ImportError("patch_timm needs timm (pip install timm); it converts a timm CrossVit model") from exc
    return tc


# ---------------------------------------------------------------------------------------------
# patched methods
# ---------------------------------------------------------------------------------------------

def _crossvit_embed(self, x: Tensor) -> List[Tensor]:
    if torch.jit.is_scripting():   # timm's CrossVit._embed
        B = x.shape[0]
        xs: List[Tensor] = []
        for i, patch_embed in enumerate(self.patch_embed):
            x_ = patch_embed(scale_image(x, self.img_size_scaled[i], self.crop_scale))
            cls_tokens = self.cls_token_0 if i == 0 else self.cls_token_1
            x_ = torch.cat((cls_tokens.expand(B, -1, -1), x_), dim=1)
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
            xs.append(self.pos_drop(x_ + pos_embed))
        return xs
    backend = getattr(self, _BACKEND, None)
    xs = []
    for i, pe in enumerate(self.patch_embed):
        x_ = scale_image(x, self.img_size_scaled[i], self.crop_scale)   # timm's function, a torch.fx leaf
        linear = getattr(pe, _FUSED, False)
        tokens = embed_tokens(pe, x_, getattr(self, f"cls_token_{i}"), getattr(self, f"pos_embed_{i}"), backend,
                              linear)
        xs.append(self.pos_drop(tokens))
    return xs


def _crossvit_forward_features(self, x: Tensor) -> List[Tensor]:
    """``CrossVit.forward_features`` of timm releases without ``_embed`` (1.0.29 and older), where
    the embedding is written inline: the same steps, with the embedding above."""
    if torch.jit.is_scripting():   # timm's CrossVit.forward_features
        B = x.shape[0]
        xs: List[Tensor] = []
        for i, patch_embed in enumerate(self.patch_embed):
            x_ = patch_embed(scale_image(x, self.img_size_scaled[i], self.crop_scale))
            cls_tokens = self.cls_token_0 if i == 0 else self.cls_token_1
            x_ = torch.cat((cls_tokens.expand(B, -1, -1), x_), dim=1)
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
            xs.append(self.pos_drop(x_ + pos_embed))
        for blk in self.blocks:
            xs = blk(xs)
        return [norm(xs[i]) for i, norm in enumerate(self.norm)]
    xs = _crossvit_embed(self, x)
    for blk in self.blocks:
        xs = blk(xs)
    return [norm(xs[i]) for i, norm in enumerate(self.norm)]


def _msb_forward(self, x: List[Tensor]) -> List[Tensor]:
    if torch.jit.is_scripting():   # timm's MultiScaleBlock.forward
        outs_b: List[Tensor] = []
        for i, block in enumerate(self.blocks):
            outs_b.append(block(x[i]))
        proj_cls_token: List[Tensor] = []
        for i, proj in enumerate(self.projs):
            proj_cls_token.append(proj(outs_b[i][:, 0:1, ...]))
        outs: List[Tensor] = []
        for i, (fusion, revert_proj) in enumerate(zip(self.fusion, self.revert_projs)):
            tmp = torch.cat((proj_cls_token[i], outs_b[(i + 1) % self.num_branches][:, 1:, ...]), dim=1)
            tmp = fusion(tmp)
            outs.append(torch.cat((revert_proj(tmp[:, 0:1, ...]), outs_b[i][:, 1:, ...]), dim=1))
        return outs
    outs_b = list(x) if self.blocks is None else [block(x[i]) for i, block in enumerate(self.blocks)]
    return fuse_cross_attention(self.projs, self.fusion, self.revert_projs, outs_b)


def _cab_forward_cls(self, x_cls: Tensor, x_tokens: Tensor) -> Tensor:
    """(B, C) query, (B, M, C) patch tokens -> (B, C) new CLS (timm's block on [x_cls; x_tokens])."""
    if not getattr(self, _FUSED, False):
        out = self.__dict__[_ORIG].forward(self, torch.cat([x_cls.unsqueeze(1), x_tokens], dim=1))
        return out[:, 0]
    return fused_cross_attention_block(self, x_cls, x_tokens, getattr(self, _BACKEND, None))


def _cab_forward(self, x: Tensor, x_tokens: Optional[Tensor] = None) -> Tensor:
    """timm's ``forward(x)`` ((B, N, C), token 0 the query -> (B, 1, C)), or the query (B, 1, C)
    and the tokens (B, M, C) apart, as the fusion stage calls it."""
    if torch.jit.is_scripting():   # timm's CrossAttentionBlock.forward
        if x_tokens is not None:
            x = torch.cat((x, x_tokens), dim=1)
        return x[:, 0:1, ...] + self.drop_path(self.attn(self.norm1(x)))
    if x_tokens is None:
        return _cab_forward_cls(self, x[:, 0], x[:, 1:]).unsqueeze(1)
    return _cab_forward_cls(self, x[:, 0], x_tokens).unsqueeze(1)


def _block_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm's pre-norm encoder block; at CPU inference its four linears run on oneDNN with the
    bias (and fc1's GELU) fused. Training, other devices, torch.compile and tracers use timm's code."""
    if torch.jit.is_scripting():   # timm's Block.forward, for the plain blocks patch_timm converts
        torch._assert(attn_mask is None and not is_causal, "a patched block takes no attention mask")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
    if attn_mask is not None or is_causal:
        return self.__dict__[_ORIG].forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    if self.training or self.__dict__.get(_BACKEND) == "reference" or not encoder_fast_path(self, x):
        return self.__dict__[_ORIG].forward(self, x)
    return fused_encoder_block(self, x)


# ---------------------------------------------------------------------------------------------
# which submodules can be patched
# ---------------------------------------------------------------------------------------------

def _plain_encoder_block(blk: nn.Module) -> bool:
    """timm's ViT block exactly as CrossViT builds it: no layer scale, gate, q/k norm, output norm
    or MLP norm; exact GELU; fused attention; linears with the default layout."""
    try:
        from timm.layers import Attention, Mlp
    except ImportError:  # pragma: no cover - older timm
        return False
    a, m = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    if type(a) is not Attention or type(m) is not Mlp:
        return False
    identities = (blk.ls1, blk.ls2, a.q_norm, a.k_norm, getattr(a, "norm", nn.Identity()), m.norm)
    return (all(type(t) is nn.Identity for t in identities) and getattr(a, "gate", None) is None
            and bool(getattr(a, "fused_attn", False)) and type(m.act) is nn.GELU and m.act.approximate == "none"
            and all(type(lin) is nn.Linear for lin in (a.qkv, a.proj, m.fc1, m.fc2))
            and a.num_heads * a.head_dim == a.proj.in_features)


def _fusable_cross_attention(blk: nn.Module) -> bool:
    a, n = blk.attn, blk.norm1
    if type(n) is not nn.LayerNorm or len(n.normalized_shape) != 1:
        return False
    C = a.wq.in_features
    if any(getattr(a, k).weight.shape != (C, C) for k in ("wq", "wk", "wv", "proj")) or C % a.num_heads:
        return False
    return float(a.scale) == float((C // a.num_heads) ** -0.5)   # timm lets users set the scale by hand


def _linear_patch_embed(pe: nn.Module) -> bool:
    p = pe.proj
    return (type(p) is nn.Conv2d and tuple(p.kernel_size) == tuple(p.stride) == tuple(pe.patch_size)
            and tuple(p.padding) == (0, 0) and tuple(p.dilation) == (1, 1) and p.groups == 1
            and p.padding_mode == "zeros")


def _patched_class(cls: type, methods: Dict[str, object]) -> type:
    key = (cls, tuple(sorted(methods.items())))   # one class per (timm class, set of replaced methods)
    if key not in _PATCHED_CLASSES:
        names = tuple(sorted((attr, fn.__name__) for attr, fn in methods.items()))

        def __reduce_ex__(self, protocol):
            # The class is made here at run time, so pickle cannot find it by name: pickle the
            # instance as (timm's class, the names of the replaced methods) and its state, and
            # rebuild the same patched class on load (torch.save(model), copy.deepcopy).
            return _rebuild_patched, (self.__dict__[_ORIG], names), self.__dict__.copy()

        _PATCHED_CLASSES[key] = type(f"Fused{cls.__name__}", (cls,),
                                     dict({attr: _as_method(fn, attr) for attr, fn in methods.items()},
                                          __module__=__name__, __doc__=cls.__doc__, __reduce_ex__=__reduce_ex__))
    return _PATCHED_CLASSES[key]


def _as_method(fn, name: str):
    """``fn`` under the attribute's name: TorchScript compiles a method called from ``forward``
    under its function's ``__name__`` and must find it again by the attribute's."""
    method = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    method.__qualname__, method.__doc__, method.__kwdefaults__ = name, fn.__doc__, fn.__kwdefaults__
    method.__annotations__ = dict(fn.__annotations__)
    return method


def _rebuild_patched(orig: type, names) -> nn.Module:
    """Unpickling: an empty instance of the patched class of ``orig`` (pickle then restores its
    state through nn.Module.__setstate__)."""
    cls = _patched_class(orig, {attr: globals()[fn] for attr, fn in names})
    return cls.__new__(cls)


def _swap(module: nn.Module, methods: Dict[str, object], backend: Optional[str]) -> None:
    if _ORIG not in module.__dict__:
        module.__dict__[_ORIG] = type(module)
        module.__class__ = _patched_class(type(module), methods)
    module.__dict__[_BACKEND] = backend


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch_timm` converted ``model`` (and :func:`unpatch_timm` has not undone it)."""
    return isinstance(model, nn.Module) and _ORIG in model.__dict__


def _crossvits(model, what: str):
    """timm's crossvit module and the timm CrossVit instances in ``model`` (itself, or any module
    containing them, such as the wrapper ``timm.create_model(..., features_only=True)`` returns)."""
    tc = _timm_crossvit()
    if isinstance(model, nn.Module) and hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        raise TypeError(f"{what} got a torch.compile'd module: {what} the model first, then compile it "
                        f"(pass model._orig_mod, or call it before torch.compile)")
    found = [m for m in model.modules() if isinstance(m, tc.CrossVit)] if isinstance(model, nn.Module) else []
    if not found:
        from .models.crossvit import CrossViT
        if isinstance(model, nn.Module) and any(isinstance(m, CrossViT) for m in model.modules()):
            raise TypeError(f"{what} expects a timm CrossVit; crossvit_kernels' own CrossViT already runs on the "
                            f"fused ops")
        raise TypeError(f"{what} expects a timm.models.crossvit.CrossVit instance (e.g. "
                        f"timm.create_model('crossvit_9_240')) or a module containing one, got "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    return tc, found


def patch_timm(model: nn.Module, backend: Optional[str] = None, encoder: bool = True) -> nn.Module:
    """Make a timm ``CrossVit`` run on crossvit_kernels' fused ops, in place; returns ``model``.

    Args:
        model: a ``timm.models.crossvit.CrossVit`` instance (any variant, any device or dtype), or
            any module containing such instances, e.g. the feature extractor that
            ``timm.create_model(name, features_only=True)`` returns: every CrossVit in it is
            patched. Only these instances change; timm's classes and other models are untouched.
        backend: the backend of the fused ops (None: the current default, normally ``"auto"``;
            see :mod:`crossvit_kernels.backends`). Patching an already patched model only changes it.
        encoder: also run the encoder blocks' linears on oneDNN's fused linear(+bias, +GELU) CPU
            kernel at inference (no gradient recorded, eval mode, float32/bfloat16 CPU tensors, not
            under torch.compile); everywhere else they keep timm's code.

    The state_dict keys, parameters and buffers are unchanged; logits and gradients equal the
    unpatched model's to float32 rounding. Patch before ``torch.compile``; :func:`unpatch_timm`
    undoes the patch.

    Example::

        model = timm.create_model("crossvit_18_dagger_240", pretrained=True)
        crossvit_kernels.patch_timm(model)
        logits = model(images)
    """
    tc, found = _crossvits(model, "patch_timm")
    if backend is not None:
        _backends.check_name(backend)
    for cv in found:
        _patch_crossvit(tc, cv, backend, encoder)
    return model


def _patch_crossvit(tc, model: nn.Module, backend: Optional[str], encoder: bool) -> None:
    if hasattr(tc.CrossVit, "_embed"):     # timm >= 1.0.30: forward_features and forward_intermediates use it
        embed_name, embed = "_embed", {"_embed": _crossvit_embed}
    else:                                  # older timm: the embedding is inline in forward_features
        embed_name, embed = "forward_features", {"forward_features": _crossvit_forward_features}
    msb = {"forward": _msb_forward}
    cab = {"forward": _cab_forward, "forward_cls": _cab_forward_cls}
    # the fusion of every block first: a block whose cross-attention cannot be fused keeps it
    for m in model.modules():
        if isinstance(m, tc.CrossAttentionBlock) and (type(m).forward is tc.CrossAttentionBlock.forward
                                                      or is_patched(m)):
            _swap(m, cab, backend)
            m.__dict__[_FUSED] = _fusable_cross_attention(m)
    for m in model.modules():
        if isinstance(m, tc.MultiScaleBlock) and (type(m).forward is tc.MultiScaleBlock.forward or is_patched(m)):
            if all(is_patched(b) for f in m.fusion for b in (f.modules() if isinstance(f, nn.Sequential) else [f])
                   if isinstance(b, tc.CrossAttentionBlock)):
                _swap(m, msb, backend)
    from timm.models.vision_transformer import Block
    for m in model.modules():
        if isinstance(m, Block) and (type(m).forward is Block.forward or is_patched(m)) and _plain_encoder_block(m):
            if encoder:
                _swap(m, {"forward": _block_forward}, backend)
            elif is_patched(m):   # patched before with encoder=True
                _unswap(m)
    if getattr(type(model), embed_name) is getattr(tc.CrossVit, embed_name) or is_patched(model):
        _swap(model, embed, backend)
        for pe in model.patch_embed:
            pe.__dict__[_FUSED] = isinstance(pe, tc.PatchEmbed) and _linear_patch_embed(pe)


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm` on ``model`` (a timm CrossVit or a module containing them) in place
    (a no-op for a model that is not patched); returns ``model``."""
    _, found = _crossvits(model, "unpatch_timm")
    for cv in found:
        for m in cv.modules():
            _unswap(m)
    return model


def _unswap(module: nn.Module) -> None:
    if _ORIG in module.__dict__:
        module.__class__ = module.__dict__[_ORIG]
    for attr in _ATTRS:
        module.__dict__.pop(attr, None)
