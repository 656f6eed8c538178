"""The 11 published CrossViT variants (timm's names and configurations), checkpoint loading, and
``create_model`` (timm's published weights and feature extractors through timm's builder when timm is
installed)."""
from __future__ import annotations

import fnmatch
import os
import warnings
from typing import Dict, List, Union

import torch

from .crossvit import CrossViT
from .fusion import check_fusion

__all__ = ["MODEL_CONFIGS", "create_model", "list_models", "load_checkpoint", "convert_checkpoint"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _cfg(name: str, input_size=(3, 240, 240), crop_pct=0.875, dagger=False) -> dict:
    return {
        "url": "", "hf_hub_id": f"timm/{name}.in1k", "architecture": name, "tag": "in1k", "custom_load": False,
        "input_size": input_size, "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": crop_pct,
        "crop_mode": "center", "mean": _MEAN, "std": _STD, "num_classes": 1000, "pool_size": None,
        "first_conv": ("patch_embed.0.proj.0", "patch_embed.1.proj.0") if dagger
        else ("patch_embed.0.proj", "patch_embed.1.proj"),
        "classifier": ("head.0", "head.1"), "license": "apache-2.0",
    }


def _arch(embed_dim, blocks, heads, mlp, dagger=False, px=240) -> dict:
    scale = 224 / 240 if px == 240 else 384 / 408
    return dict(img_size=px, img_scale=(1.0, scale), patch_size=(12, 16), embed_dim=embed_dim,
                depth=((1, blocks, 0),) * 3, num_heads=heads, mlp_ratio=(mlp, mlp, 1), multi_conv=dagger)


#: name -> constructor arguments of CrossViT (identical to timm 1.0.31's registrations).
MODEL_CONFIGS: Dict[str, dict] = {
    "crossvit_tiny_240": _arch((96, 192), 4, (3, 3), 4),
    "crossvit_small_240": _arch((192, 384), 4, (6, 6), 4),
    "crossvit_base_240": _arch((384, 768), 4, (12, 12), 4),
    "crossvit_9_240": _arch((128, 256), 3, (4, 4), 3),
    "crossvit_15_240": _arch((192, 384), 5, (6, 6), 3),
    "crossvit_18_240": _arch((224, 448), 6, (7, 7), 3),
    "crossvit_9_dagger_240": _arch((128, 256), 3, (4, 4), 3, dagger=True),
    "crossvit_15_dagger_240": _arch((192, 384), 5, (6, 6), 3, dagger=True),
    "crossvit_15_dagger_408": _arch((192, 384), 5, (6, 6), 3, dagger=True, px=408),
    "crossvit_18_dagger_240": _arch((224, 448), 6, (7, 7), 3, dagger=True),
    "crossvit_18_dagger_408": _arch((224, 448), 6, (7, 7), 3, dagger=True, px=408),
}

PRETRAINED_CFGS: Dict[str, dict] = {
    name: _cfg(name, input_size=(3, a["img_size"], a["img_size"]), crop_pct=0.875 if a["img_size"] == 240 else 1.0,
               dagger=a["multi_conv"])
    for name, a in MODEL_CONFIGS.items()
}


def list_models(pattern: str = "*") -> List[str]:
    """The variant names matching a shell-style wildcard, in timm's order (sorted naturally)."""
    def natural(name):
        import re
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
    return sorted(fnmatch.filter(MODEL_CONFIGS, pattern), key=natural)


def convert_checkpoint(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's format from either timm's or the original IBM release's (``pos_embed.0`` ->
    ``pos_embed_0``, ``cls_token.1`` -> ``cls_token_1``); unwraps ``{"model": ...}`` /
    ``{"state_dict": ...}`` and strips a DataParallel ``module.`` prefix."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k.startswith(("pos_embed.", "cls_token.")):
            k = k.replace(".", "_", 1)
        out[k] = v
    return out


def load_checkpoint(model: CrossViT, path: Union[str, os.PathLike], strict: bool = True):
    """Load a local checkpoint file into ``model`` (timm or IBM format; ``.pth``/``.pt``/``.bin``
    via ``torch.load(weights_only=True)``, or ``.safetensors``). Nothing is ever downloaded.

    The whole checkpoint is checked against the model before any parameter is written: a file that
    cannot be read (truncated, not a checkpoint, unsafe to unpickle), a file holding no state dict,
    missing or unexpected keys (with ``strict``) and shape mismatches raise a ValueError naming the
    file and listing the problems, and leave the model untouched. Returns the
    ``load_state_dict`` result (missing and unexpected keys)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r} (pretrained= takes a local file; "
                                f"nothing is downloaded)")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise ImportError("loading .safetensors files needs the 'safetensors' package") from exc
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:  # truncated zip, a text file, a pickle that weights_only refuses, ...
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read the checkpoint {path!r}: it is truncated, not a PyTorch checkpoint, or "
                         f"holds objects other than tensors ({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"the checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    state = convert_checkpoint(state)
    problems = _mismatches(model, state, strict)
    if problems:
        raise ValueError(f"the checkpoint {path!r} does not fit this model ({type(model).__name__}); nothing was "
                         f"loaded:\n  " + "\n  ".join(problems))
    return model.load_state_dict(state, strict=strict)


def _mismatches(model: torch.nn.Module, state: Dict[str, object], strict: bool) -> List[str]:
    """What keeps ``state`` from loading into ``model``, one line per kind of problem."""
    own = model.state_dict()
    problems = []
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        problems.append(f"{len(not_tensors)} entries are not tensors: {_listing(not_tensors)}")
    shapes = sorted(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape)
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_listing(shapes)}")
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing:
            problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    return problems


def _listing(items: List[str], most: int = 8) -> str:
    return ", ".join(items[:most]) + (f", ... ({len(items) - most} more)" if len(items) > most else "")


#: create_model arguments that only timm's builder understands (timm.create_model's): with any of
#: them, or pretrained=True, or a pretrained tag in the name, the model is built through timm.
_TIMM_ARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "pretrained_cfg", "pretrained_cfg_overlay",
              "cache_dir")


def _build(name: str, fusion: str, path, kwargs: dict) -> CrossViT:
    args = dict(MODEL_CONFIGS[name])
    args.update(kwargs)
    model = CrossViT(fusion=fusion, **args)
    cfg = dict(PRETRAINED_CFGS[name])
    if "num_classes" in kwargs:
        cfg["num_classes"] = kwargs["num_classes"]
    model.pretrained_cfg = cfg
    if path:
        if fusion == "cross_attention":
            load_checkpoint(model, path, strict=True)
        else:
            result = load_checkpoint(model, path, strict=False)
            warnings.warn(f"fusion={fusion!r}: {len(result.missing_keys)} parameters not in the checkpoint "
                          f"(freshly initialised) and {len(result.unexpected_keys)} checkpoint entries unused",
                          UserWarning, stacklevel=3)
    return model


def create_model(name: str, pretrained: Union[bool, str, os.PathLike, None] = None, fusion: str = "cross_attention",
                 **kwargs):
    """Build a published CrossViT variant by timm's name, as ``timm.create_model`` does.

    Args:
        name: one of :func:`list_models` (e.g. ``"crossvit_18_dagger_240"``), optionally with timm's
            pretrained tag (``"crossvit_9_240.in1k"``).
        pretrained: None / False: random initialisation (timm's). True: timm's published weights
            for ``name``, found and loaded exactly as ``timm.create_model(name, pretrained=True)``
            does (timm's pretrained_cfg, the Hugging Face hub and its cache, ``cache_dir=``,
            ``HF_HUB_OFFLINE``); needs timm. A path: a local checkpoint file in timm's or the
            original IBM format (nothing is downloaded). With a fusion other than
            ``"cross_attention"`` the checkpoint's fusion weights do not apply: everything else
            loads and the mismatch is reported.
        fusion: the fusion scheme of every multi-scale block (see ``crossvit_kernels.FUSIONS``).
        **kwargs: any CrossViT constructor argument (num_classes, in_chans, drop_path_rate, ...),
            overriding the variant's configuration as in timm; and timm's builder arguments
            ``features_only``, ``out_indices``, ``feature_cls`` (a feature extractor wrapping this
            model, as timm builds one for CrossVit: ``FeatureGetterNet`` by default, the last block
            of each branch by default), ``pretrained_cfg``, ``pretrained_cfg_overlay``,
            ``cache_dir``, which need timm. Arguments set to None are dropped, as timm does.

    Returns:
        a :class:`CrossViT`, or timm's feature wrapper around one with ``features_only=True``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch, _, tag = str(name).partition(".")
    if arch not in MODEL_CONFIGS:
        import difflib
        close = difflib.get_close_matches(str(arch), MODEL_CONFIGS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (list_models() gives the {len(MODEL_CONFIGS)} names)")
    if pretrained is False:
        pretrained = None
    if not (pretrained is None or pretrained is True or isinstance(pretrained, (str, os.PathLike))):
        raise TypeError(f"pretrained must be None, a bool or the path of a local checkpoint, got "
                        f"{type(pretrained).__name__}")
    fusion = check_fusion(fusion)
    timm_args = [k for k in _TIMM_ARGS if k in kwargs]
    if pretrained is not True and not tag and not timm_args:
        return _build(arch, fusion, pretrained, kwargs)

    what = ("pretrained=True" if pretrained is True else f"the pretrained tag {tag!r}" if tag
            else f"{timm_args[0]}=")
    try:
        from timm.models._builder import build_model_with_cfg
    except ImportError as exc:
        raise ImportError(f"create_model({name!r}, {what}...) goes through timm's model builder (timm's published "
                          f"weights, pretrained configs and feature extractors): pip install timm. Without timm, "
                          f"pass pretrained= the path of a local checkpoint file") from exc
    path = None if pretrained is True else pretrained
    # timm's _create_crossvit: by default the features are the last block's output of each branch
    depth = kwargs.get("depth", MODEL_CONFIGS[arch]["depth"])
    out_indices = kwargs.pop("out_indices", (len(depth) - 1, 2 * len(depth) - 1))
    pretrained_cfg = kwargs.pop("pretrained_cfg", None) or (tag or None)
    feature_cfg = dict(out_indices=out_indices, feature_cls="getter")
    feature_cfg.update(kwargs.pop("feature_cfg", {}))
    if pretrained is True and fusion != "cross_attention":
        warnings.warn(f"fusion={fusion!r}: the published fusion weights do not apply; the other weights load and the "
                      f"fusion stage is freshly initialised", UserWarning, stacklevel=2)

    def build(**model_kwargs) -> CrossViT:
        return _build(arch, fusion, path, model_kwargs)

    return build_model_with_cfg(
        build, arch, pretrained is True, pretrained_cfg=pretrained_cfg,
        pretrained_filter_fn=lambda state_dict, model=None: convert_checkpoint(state_dict),
        pretrained_strict=fusion == "cross_attention",
        feature_cfg=feature_cfg, **kwargs)
