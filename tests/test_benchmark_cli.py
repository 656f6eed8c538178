"""The end-to-end benchmark CLI (python -m crossvit_kernels.benchmark): arguments, the output check,
the result file. Tiny runs (batch 1, one timed round); no timing is asserted."""
import csv
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("timm")

from crossvit_kernels import benchmark  # noqa: E402

ROW_KEYS = {"model", "variant", "bench", "img_per_s", "step_ms_median", "step_ms_p25", "step_ms_p75", "step_ms_min",
            "speedup_vs_timm", "gmac_per_img", "gmac_per_s", "check_max_rel_diff", "check_ok", "device", "device_name",
            "dtype", "batch_size", "threads", "backend", "torch", "timm", "crossvit_kernels", "cpu_ms_median",
            "act_mem_mib", "onnx_exporter"}


def test_cli_inference_and_train_writes_csv(tmp_path, capsys):
    out = tmp_path / "res.csv"
    rc = benchmark.main(["--model", "crossvit_tiny_240", "--bench", "both", "--batch-size", "1", "--num-warm-iter",
                         "0", "--num-bench-iter", "1", "--device", "cpu", "--no-yardstick",
                         "--variants", "timm,patched,ours,ours+ckpt", "--results-file", str(out), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["bench"], r["variant"]) for r in rows] == [
        ("inference", "timm"), ("inference", "patched"), ("inference", "ours"),
        ("train", "timm"), ("train", "patched"), ("train", "ours"), ("train", "ours+ckpt")]
    assert ROW_KEYS <= set(rows[0])
    # the activation memory a training step keeps for the backward: ours keeps no keys and values
    # of the fusion; with every encoder block checkpointed, only the blocks' inputs remain
    act = {r["variant"]: float(r["act_mem_mib"]) for r in rows if r["bench"] == "train"}
    assert 0 < act["ours"] == act["patched"] < act["timm"]
    assert 0 < act["ours+ckpt"] < act["ours"] / 4
    assert all(math.isnan(float(r["act_mem_mib"])) for r in rows if r["bench"] == "inference")
    for r in rows:
        assert r["model"] == "crossvit_tiny_240" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert float(r["img_per_s"]) > 0 and float(r["step_ms_median"]) > 0
        assert float(r["gmac_per_img"]) > 0
        if r["variant"] == "timm":
            assert float(r["speedup_vs_timm"]) == 1.0 and r["check_ok"] == ""
        else:
            assert r["check_ok"] == "True" and float(r["check_max_rel_diff"]) < 1e-4
    inf = {r["variant"]: float(r["gmac_per_img"]) for r in rows if r["bench"] == "inference"}
    tr = {r["variant"]: float(r["gmac_per_img"]) for r in rows if r["bench"] == "train"}
    assert inf["ours"] == inf["timm"], "GMAC/img is timm's textbook count for every variant"
    assert math.isclose(tr["timm"], 3 * inf["timm"])
    printed = capsys.readouterr().out
    assert "crossvit_tiny_240" in printed and "speedup" in printed


def test_cli_mixed_precision(tmp_path):
    """--precision amp_bf16: float32 models under torch.autocast; outputs checked against timm's
    under the same autocast, at bfloat16's tolerance."""
    out = tmp_path / "res.csv"
    rc = benchmark.main(["--model", "crossvit_tiny_240", "--bench", "both", "--batch-size", "2", "--num-warm-iter",
                         "0", "--num-bench-iter", "1", "--device", "cpu", "--no-yardstick", "--precision", "amp_bf16",
                         "--variants", "timm,patched,ours", "--results-file", str(out), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6 and all(r["dtype"] == "float32+autocast(bfloat16)" for r in rows)
    assert all(r["check_ok"] == "True" for r in rows if r["variant"] != "timm")


def test_cli_subprocess_json_with_wildcard_and_yardstick(tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "crossvit_kernels.benchmark", "--model", "crossvit_tiny_*", "--batch-size", "1",
           "--num-warm-iter", "0", "--num-bench-iter", "2", "--device", "cpu", "--no-compile", "--variants",
           "timm,patched,deit_small", "--results-file", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["model"], r["variant"]) for r in rows} == {
        ("crossvit_tiny_240", "timm"), ("crossvit_tiny_240", "patched"), ("deit_small_patch16_224", "deit_small")}
    assert all(r["bench"] == "inference" and r["threads"] == 1 for r in rows)
    assert "round 2/2" in proc.stderr, "progress goes to stderr"
    deit = next(r for r in rows if r["variant"] == "deit_small")
    assert 4.0 < deit["gmac_per_img"] < 5.0      # timm's count for DeiT-S: 4.6 GMAC


def test_wildcards_expand_in_timm_order():
    assert benchmark._expand_models(["crossvit_9*", "crossvit_9_240"]) == ["crossvit_9_240", "crossvit_9_dagger_240"]
    with pytest.raises(SystemExit):
        benchmark._expand_models(["vit_*"])


@pytest.mark.parametrize("argv", [
    ["--results-file", "out.txt"],
    ["--batch-size", "0"],
    ["--variants", "timm,fastest"],
    ["--precision", "fp8"],
    ["--bench", "everything"],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(argv)
    assert exc.value.code == 2


def test_defaults_follow_timm():
    a = benchmark.parse_args([])
    assert a.batch_size == 64 and a.bench == "inference" and a.precision == "fp32" and a.compile is None
    assert benchmark.parse_args(["--compile"]).compile is True
    assert benchmark.parse_args(["--no-compile"]).compile is False


def test_cli_onnxruntime_variants(tmp_path):
    """timm's and our ONNX exports run by onnxruntime, checked against timm eager like the others."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime variants need onnxruntime (requirements-dev.txt)")
    out = tmp_path / "res.json"
    rc = benchmark.main(["--model", "crossvit_tiny_240", "--batch-size", "2", "--num-warm-iter", "0",
                         "--num-bench-iter", "1", "--device", "cpu", "--no-yardstick", "--threads", "1",
                         "--variants", "timm,timm+ort,ours,ours+ort", "--onnx-exporter", "torchscript",
                         "--results-file", str(out), "--quiet"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["timm", "timm+ort", "ours", "ours+ort"]
    for r in rows[1:]:
        assert r["check_ok"] is True and r["check_max_rel_diff"] < 1e-4
    assert [r["onnx_exporter"] for r in rows] == ["", "torchscript", "", "torchscript"]


@pytest.mark.parametrize("argv,skipped", [
    (["--precision", "bf16"], "skipping timm+ort, ours+ort: they run float32 models on the CPU"),
    (["--bench", "train"], "skipping timm+ort, ours+ort"),
], ids=["bf16", "train"])
def test_cli_onnxruntime_variants_skipped_where_they_do_not_apply(argv, skipped, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = benchmark.main(["--model", "crossvit_tiny_240", "--batch-size", "1", "--num-warm-iter", "0",
                         "--num-bench-iter", "1", "--device", "cpu", "--no-yardstick", "--threads", "1",
                         "--variants", "timm,timm+ort,ours+ort", "--results-file", str(out), *argv])
    assert rc == 0
    assert [r["variant"] for r in json.loads(out.read_text())] == ["timm"]
    assert skipped in capsys.readouterr().err
