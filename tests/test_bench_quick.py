"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` runs every section and writes
well-formed JSON. No timing is asserted (timing belongs in the benchmarks, not in a test)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("roofline", "cross_attention", "fusion", "scaling", "patch_embed")
ROW_FIELDS = ("section", "device", "threads", "dtype", "versions", "timing")
TIMING_FIELDS = ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    # conftest sets TRITON_INTERPRET=1 for the kernel tests; the benchmarks must not time the
    # interpreter, and must not see a GPU-less Triton as a fast path
    env.pop("TRITON_INTERPRET", None)
    # one thread: the CI machine may be shared, and OpenMP regions stall when a core is taken
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, out


def test_quick_benchmark_writes_json(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, f"run.py --quick exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}" \
                                 f"\n--- stderr ---\n{proc.stderr[-4000:]}"
    path = out / "bench.json"
    assert path.is_file(), f"no bench.json in {out}: {sorted(os.listdir(out))}"
    data = json.loads(path.read_text())
    assert data["mode"] == "quick" and data["failed"] == []
    env = data["environment"]
    for key in ("device", "threads", "cpu", "versions"):
        assert env.get(key) is not None, f"environment lacks {key}"
    for key in ("crossvit_kernels", "torch", "timm"):
        assert env["versions"].get(key), f"versions lack {key}"
    assert (out / "summary.md").is_file()

    per = data["by_dtype"]["fp32"]
    for sec in SECTIONS:
        assert sec in per and "error" not in per[sec], f"section {sec} missing or failed: {per.get(sec)}"
    roof = per["roofline"]
    assert roof["bandwidth"]["copy_gb_per_s"] > 0 and roof["gemm_peak_gmacs_per_s"] > 0

    def check_rows(sec, rows, extra=()):
        assert rows, f"section {sec} has no rows"
        for r in rows:
            for f in ROW_FIELDS + tuple(extra):
                assert f in r, f"{sec} row lacks {f}: {sorted(r)}"
            for f in TIMING_FIELDS if "reps" in r["timing"] else ("median_ms",):
                assert r["timing"][f] >= 0, f"{sec} row has a bad {f}: {r['timing']}"

    ca = per["cross_attention"]["rows"]
    check_rows("cross_attention", ca, ("impl", "mode", "B", "N", "C", "H", "macs_textbook", "macs_absorbed",
                                       "bytes_model", "floor_bytes_once_ms", "frac_floor", "frac_roofline"))
    impls = {r["impl"] for r in ca}
    assert {"timm", "reference", "torch"} <= impls, impls
    assert {r["mode"] for r in ca} == {"fwd", "fwd+bwd"}
    for r in ca:
        assert r["macs_absorbed"] < r["macs_textbook"]

    fusion = per["fusion"]
    schemes = {s["fusion"] for s in fusion["static"]}
    assert schemes == {"cross_attention", "all_attention", "class_token", "pairwise", "none"}
    for s in fusion["static"]:
        assert s["params"] > 0 and s["macs_textbook"] >= s["macs_fused"] > 0
    check_rows("fusion", fusion["rows"], ("scope", "fusion", "backend", "mode"))
    assert {r["scope"] for r in fusion["rows"]} == {"fusion_stage", "model"}

    sc = per["scaling"]["rows"]
    check_rows("scaling", sc, ("impl", "N"))
    assert {"all_attention", "cross_attention/reference", "bytes_once"} <= {r["impl"] for r in sc}

    check_rows("patch_embed", per["patch_embed"]["rows"], ("impl", "mode", "macs", "bytes_model"))
    assert {"timm", "reference", "torch"} <= {r["impl"] for r in per["patch_embed"]["rows"]}


def test_profile_op_cpu_smoke(tmp_path):
    """benchmarks/profile_op.py runs on the CPU and writes its rows (on a GPU it lists kernels)."""
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_op.py"), "--device", "cpu",
                           "--batch", "2", "--iters", "2", "--mode", "fwd+bwd", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rows"] and data["wall_us"] > 0 and "cross_attention" in data["what"]
