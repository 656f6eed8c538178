"""ONNX export of our and patched models with both exporters, run in onnxruntime against timm.

* Both of torch's exporters (``dynamo=True``, ``dynamo=False``: the TorchScript-based one) export
  our and patched models with a dynamic batch, ordinary and dagger patch embeddings; onnxruntime
  gives "timm's numbers" (tests/helpers.py: ``assert_timm_logits``) at another batch size.
* The graph holds standard ONNX operators only (no custom domain, no local functions), and no
  fusion block projects the tokens with its key or value weight (:func:`token_projections`; timm's
  own export is the positive control). Real variants export too.

The fused ops run as standard operators under export (``crossvit_kernels.ops._common.traced_as_aten``);
``scale_image`` resizes by two matmuls there (``crossvit_kernels.models.crossvit.bicubic_weights``).
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import crossvit_kernels as ck
from crossvit_kernels.models.crossvit import bicubic_weights

from helpers import TINY_ARGS, assert_timm_logits, max_err, tiny_images, tiny_pair

timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (requirements-dev.txt)")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (requirements-dev.txt)")

EXPORTERS = ["dynamo", "torchscript"]
STANDARD_DOMAINS = ("", "ai.onnx")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def export(model, x, path, exporter, fold=True):
    """``model`` exported to ``path`` with a dynamic batch; ``fold=False`` keeps the weights as they
    are (no constant folding), so that initializers carry their state_dict names."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
        kw = dict(dynamo=True, optimize=fold, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        kw = dict(dynamo=False, do_constant_folding=fold, input_names=["images"], output_names=["logits"],
                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (x,), str(path), **kw)
    return onnx.load(str(path))


def session(path, outputs=()):
    """An onnxruntime session on ``path`` (one thread); ``outputs`` names intermediate float values
    to return as well."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if outputs:
        m = onnx.load(str(path))
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs)
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, x):
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def non_standard(model):
    """Every non-standard domain in the model (nodes, opset imports, local functions)."""
    bad = {f"node {n.name} ({n.op_type}): {n.domain}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS}
    bad |= {f"opset import {o.domain}" for o in model.opset_import if o.domain not in STANDARD_DOMAINS}
    bad |= {f"function {f.domain}::{f.name}" for f in model.functions}
    return sorted(bad)


def token_projections(model, path, x, weights, token_counts):
    """The nodes of the ONNX ``model`` (saved at ``path``, exported with ``fold=False``) that project tokens
    with one of ``weights`` (initializer names).

    A value is weight-derived when it is computed from constants alone with one of ``weights``
    among them (the weight itself, transposed, reshaped, scaled...). A node that takes a
    weight-derived value and an activation one dimension of which is a token count (the batch
    chosen apart from them) projects tokens with that weight: timm's ``k = wk(x)`` over all N
    tokens does, the absorbed formulation (which multiplies the weights with the query and the
    weighted sums, a few rows per batch row) does not. Dimensions are the activations' actual
    shapes, from onnxruntime on ``x``. Returns ["op_type(weight-derived input, activation shape)"]."""
    g = model.graph
    const = {i.name for i in g.initializer}
    derived = set(weights)
    for n in g.node:   # topological order
        if all(i in const or not i for i in n.input):
            const.update(n.output)
            if any(i in derived for i in n.input):
                derived.update(n.output)
    suspects = [(n, [i for i in n.input if i and i not in const]) for n in g.node
                if any(i in derived for i in n.input)]
    acts = sorted({a for _, ins in suspects for a in ins})
    if not acts:
        return []
    sess = session(path, acts)
    values = dict(zip([o.name for o in sess.get_outputs()], run(sess, x)))
    return [f"{n.op_type}({next(i for i in n.input if i in derived)}, activation {tuple(values[a].shape)})"
            for n, ins in suspects for a in ins if set(values[a].shape) & set(token_counts)]


# ---------------------------------------------------------------------------------------------
# numbers: ours and patched, both exporters, ordinary and dagger embeddings, dynamic batch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multi_conv", [False, True], ids=["linear", "dagger"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("which", ["ours", "patched"])
def test_export_runs_in_onnxruntime_with_timms_numbers(which, exporter, multi_conv, tmp_path):
    ref, model = tiny_pair(which, multi_conv=multi_conv)
    path = tmp_path / "model.onnx"
    assert non_standard(export(model, tiny_images(2), path, exporter)) == []
    sess = session(path)
    for b in (3, 1):   # the batch is dynamic
        x = tiny_images(b)
        (y,) = run(sess, x)
        assert y.shape == (b, TINY_ARGS["num_classes"])
        assert_timm_logits(y, ref.eval(), x, name=f"{which} {exporter} batch {b}")


# ---------------------------------------------------------------------------------------------
# structure: standard operators only, and no fusion block projects all tokens with wk or wv
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("which", ["ours", "patched", "timm"])
def test_fusion_never_projects_the_tokens(which, exporter, tmp_path):
    """The tiny model's fusion blocks attend to 4x4 = 16 and 3x3 = 9 patch tokens (17 and 10 with
    the CLS); its batch (2) and widths (24, 48, heads of 12) differ from these counts. timm's
    export, the positive control, projects them (one key and one value projection per block)."""
    ref, model = tiny_pair(which if which != "timm" else "ours")
    model = ref if which == "timm" else model
    x = tiny_images(2)
    path = tmp_path / "model.onnx"
    exported = export(model, x, path, exporter, fold=False)
    names = {i.name for i in exported.graph.initializer}
    weights = sorted(n for n in names if ".fusion." in n and n.endswith((".attn.wk.weight", ".attn.wv.weight")))
    assert len(weights) == 4, f"expected the key and value weights of two fusion blocks, found {weights}"
    found = token_projections(exported, path, x, weights, token_counts=(16, 17, 9, 10))
    if which == "timm":
        assert len(found) == 4, found
    else:
        assert found == [], f"{which} ({exporter}) projects the tokens with the fusion's key/value weights: {found}"
        assert non_standard(exported) == []


# ---------------------------------------------------------------------------------------------
# real variants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,exporter", [("crossvit_tiny_240", "dynamo"), ("crossvit_9_dagger_240", "torchscript")])
def test_real_variant_exports(name, exporter, tmp_path):
    torch.manual_seed(0)
    tm = timm.create_model(name).eval()
    model = ck.create_model(name).eval()
    model.load_state_dict(tm.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, *tm.img_size, generator=g)
    path = tmp_path / "model.onnx"
    exported = export(model, x[:2], path, exporter)
    assert non_standard(exported) == []
    assert not any(n.op_type == "Resize" for n in exported.graph.node), "the resize is two matmuls in the export"
    (y,) = run(session(path), x)
    with torch.no_grad():
        y32, y64 = tm(x), copy.deepcopy(tm).double()(x.double())
    e, e_timm = max_err(y, y64), max_err(y32, y64)
    assert e <= 2 * e_timm + 2e-6, f"{name}: onnxruntime error {e:.3g} vs timm's own float32 error {e_timm:.3g}"


# ---------------------------------------------------------------------------------------------
# the resize of the export
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(240, 224), (408, 384), (224, 240), (48, 32), (5, 3), (3, 7), (1, 4), (4, 1)])
def test_bicubic_weights_are_torchs_bicubic_resize(n_in, n_out):
    x = torch.randn(2, 3, n_in, 5, dtype=torch.float64)
    ref = F.interpolate(x, size=(n_out, 5), mode="bicubic", align_corners=False)
    got = torch.tensor(bicubic_weights(n_in, n_out), dtype=torch.float64) @ x
    assert max_err(got, ref) < 1e-12
