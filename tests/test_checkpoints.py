"""Checkpoint loading: weights_only, and every bad file gives an error that names the file and the
problem without leaving a partly loaded model."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import crossvit_kernels as ck
from crossvit_kernels.models import load_checkpoint

KW = dict(img_size=48, img_scale=(1.0, 1.0), num_classes=5)


def _model(name="crossvit_tiny_240", **kw):
    torch.manual_seed(0)
    return ck.create_model(name, **{**KW, **kw})


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"model": _model().state_dict()}, path)   # wrapped as training scripts save it
    return path


def test_good_checkpoint_loads_with_weights_only(good, monkeypatch):
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = ck.create_model("crossvit_tiny_240", pretrained=good, **KW)
    assert calls and all(k.get("weights_only") is True for k in calls)
    expected = torch.load(good, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"cannot read the checkpoint '{path}'.*truncated"):
        load_checkpoint(model, path)
    assert _unchanged(model, before)


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", b""], ids=["text", "empty"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read the checkpoint '{path}'"):
        ck.create_model("crossvit_tiny_240", pretrained=path, **KW)


def test_unsafe_pickle_is_refused(tmp_path):
    """A pickle that would run code on load is refused by weights_only, not executed."""
    path = tmp_path / "evil.pth"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ValueError, match=rf"cannot read the checkpoint '{path}'"):
        load_checkpoint(_model(), path)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match=rf"'{path}' holds a list, not a state dict"):
        load_checkpoint(_model(), path)


def test_other_architecture_lists_the_problems_and_loads_nothing(tmp_path):
    """A crossvit_small checkpoint into a crossvit_tiny model (other widths), and a model with
    other heads: every shape mismatch listed, nothing written."""
    path = tmp_path / "small.pth"
    torch.save(_model("crossvit_small_240").state_dict(), path)
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert str(path) in msg and "nothing was loaded" in msg and "shape mismatches" in msg
    assert "blocks.0.blocks.0.0.attn.proj.bias: checkpoint (192,), model (96,)" in msg and "more)" in msg
    assert _unchanged(model, before)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _model().state_dict()
    del state["head.0.weight"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert "1 missing keys: head.0.weight" in msg and "1 unexpected keys: extra.weight" in msg
    assert _unchanged(model, before)
    result = load_checkpoint(model, path, strict=False)   # non-strict: what fits loads, the rest is reported
    assert result.missing_keys == ["head.0.weight"] and result.unexpected_keys == ["extra.weight"]


def test_missing_file_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_checkpoint(_model(), tmp_path / "nope.pth")
