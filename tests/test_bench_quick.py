"""Smoke tests of the benchmark harness: ``benchmarks/run.py --quick`` runs every section and writes
well-formed compact results, the fusion_stage section runs every variant at a tiny shape (the
triton ones under the interpreter), report.py renders and merges them, the load generator starts
and ends its workers, the profiler and the GPU script parse. No timing is asserted (timing belongs in
the benchmarks, not in a test)."""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
SECTIONS = ("roofline", "cross_attention", "patch_embed", "fusion_stage", "fusion", "scaling")
TIMING_FIELDS = ("median_ms", "q25_ms", "q75_ms", "reps")

sys.path.insert(0, BENCH)
import harness  # noqa: E402
import load  # noqa: E402
import report  # noqa: E402


def _env():
    env = dict(os.environ)
    # conftest sets TRITON_INTERPRET=1 for the kernel tests; the benchmarks must not time the
    # interpreter, and must not see a GPU-less Triton as a fast path
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


#: --min-reps of the quick run: more than the quick mode's 3 rounds at most
QUICK_MIN_REPS = 4


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: the CI machine may be shared, and OpenMP regions stall when a core is taken
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--min-reps", str(QUICK_MIN_REPS), "--out", str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=900)
    return proc, out


def test_quick_benchmark_writes_compact_results(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, f"run.py --quick exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}" \
                                 f"\n--- stderr ---\n{proc.stderr[-4000:]}"
    path = out / "results.json"
    assert path.is_file(), f"no results.json in {out}: {sorted(os.listdir(out))}"
    assert path.stat().st_size < 50_000, "results.json must stay compact (medians and spreads, no samples)"
    data = json.loads(path.read_text())
    assert data["mode"] == "quick" and data["failed"] == [] and data["errors"] == [] and "partial" not in data
    env = data["environment"]
    for key in ("device", "threads", "cpu", "versions", "platform"):
        assert env.get(key) is not None, f"environment lacks {key}"
    for key in ("crossvit_kernels", "torch", "timm"):
        assert env["versions"].get(key), f"versions lack {key}"
    assert "commit" in env
    for name in ("summary.md", "samples.json"):
        assert (out / name).is_file(), f"no {name}"
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert samples and all(len(s["samples_ms"]) >= 1 for s in samples), "raw samples go to samples.json"

    per = data["by_dtype"]["fp32"]
    for sec in SECTIONS:
        assert sec in per and "error" not in per[sec], f"section {sec} missing or failed: {per.get(sec)}"
        assert "partial" not in per[sec], f"section {sec} is marked partial at the end of the run"
    roof = per["roofline"]
    assert roof["copy_gbs"] > 0 and roof["read_gbs"] > 0 and roof["gemm_gmacs"] > 0

    def check_rows(sec, rows, extra=()):
        assert rows, f"section {sec} has no rows"
        for r in rows:
            for f in TIMING_FIELDS + tuple(extra):
                assert r.get(f) is not None, f"{sec} row lacks {f}: {r}"
            assert 0 <= r["q25_ms"] <= r["median_ms"] <= r["q75_ms"], f"{sec}: bad quartiles {r}"

    ca = harness.records(per["cross_attention"]["rows"])
    check_rows("cross_attention", ca, ("impl", "mode", "B", "N", "C", "H"))
    assert {r["reps"] for r in ca} == {QUICK_MIN_REPS}, "--min-reps sets the op sections' rounds"
    assert {"timm", "reference", "torch", "read", "copy"} <= {r["impl"] for r in ca}
    assert {r["mode"] for r in ca} == {"fwd", "fwd+bwd"}
    # the shapes are the tiny variant's fusion shapes, read off MODEL_CONFIGS
    assert {(r["N"], r["C"], r["H"]) for r in ca} == {
        (s["N"], s["C"], s["H"]) for s in harness.variant_geometry("crossvit_tiny_240")["fusion_shapes"]}

    fusion = per["fusion"]
    static = harness.records(fusion["static"])
    assert {s["fusion"] for s in static} == {"cross_attention", "all_attention", "class_token", "pairwise", "none"}
    for s in static:
        assert s["params"] > 0 and s["macs_textbook"] >= s["macs_fused"] > 0
    fr = harness.records(fusion["rows"])
    check_rows("fusion", fr, ("scope", "fusion", "backend", "mode"))
    assert {r["scope"] for r in fr} == {"fusion_stage", "model"}

    sc = harness.records(per["scaling"]["rows"])
    check_rows("scaling", sc, ("impl", "N"))
    assert {"all_attention", "cross_attention/reference", "read"} <= {r["impl"] for r in sc}

    pe = harness.records(per["patch_embed"]["rows"])
    check_rows("patch_embed", pe, ("impl", "mode", "img", "patch", "C"))
    assert {"timm", "reference", "torch"} <= {r["impl"] for r in pe}

    # no CPU backend declares the fusion stage: the package's rows are the per-piece fallback
    stage = per["fusion_stage"]
    check_rows("fusion_stage", harness.records(stage["rows"]), ("impl", "mode", "B") + harness.STAGE_KEYS)
    assert {"timm", "reference", "torch"} <= set(stage["paths"])
    assert {p for i, p in stage["paths"].items() if i != "timm"} == {"per piece"}
    assert {e["impl"] for e in harness.records(stage["errors"])} == set(stage["paths"])

    summary = (out / "summary.md").read_text()
    for title in ("Roofline", "Cross-attention block", "Patch embedding", "Fusion stage", "Fusion schemes",
                  "Scaling"):
        assert title in summary, f"summary.md lacks the {title} table"


def test_fusion_stage_section_at_a_tiny_shape():
    """run.py's fusion_stage section in-process at the quick config's tiny geometry, bfloat16, every
    variant that runs here (on the CPU the triton ones under the interpreter, knobs included): a row
    per variant and mode, the stage op for triton and the per-piece fallback for the CPU backends,
    each variant's errors against the float64 oracle, and the summary's tables."""
    import torch

    import run
    from crossvit_kernels.info import environment
    device, dtype = torch.device("cpu"), torch.bfloat16
    ctx = run.Ctx(run.parse_args(["--quick", "--device", "cpu", "--allow-interpreter"]), device,
                  run.make_config(True, "cpu"))
    ctx.dtype = dtype
    per = ctx.per = {"roofline": run.section_roofline(ctx)}
    per["fusion_stage"] = sec = run.section_fusion_stage(ctx)
    assert ctx.errors == [] and "partial" not in sec
    impls = harness.default_impls("fusion_stage", device, dtype, allow_interpreter=True)
    assert {"timm", "reference", "torch"} <= set(impls) and set(sec["paths"]) == set(impls)
    for impl, path in sec["paths"].items():
        assert path == harness.stage_path(impl, device, dtype)
        assert path == ("timm" if impl == "timm" else "stage op" if impl.startswith("triton") else "per piece")
    rows = harness.records(sec["rows"])
    for mode in ("fwd", "fwd+bwd"):
        assert {r["impl"] for r in rows if r["mode"] == mode} == {i for i in impls if mode in harness.stage_modes(i)}
    errors = {e["impl"]: e for e in harness.records(sec["errors"])}
    assert set(errors) == set(impls)
    for impl, e in errors.items():  # bfloat16's rounding, not a wrong result (the kernel tests hold the criterion)
        assert 0 < e["out_err"] < 0.05 and 0 < e["grad_err"] < 0.1, f"{impl}: {e}"
    text = report.render({"by_dtype": {"bf16": per}, "environment": environment(device)})
    assert "### Fusion stage (bf16" in text and "errors against the float64 oracle" in text


def test_report_merges_end_to_end_rows(quick_run, tmp_path):
    """report.py --add-e2e: the end-to-end CLI's rows join the results file; a later row of the same
    model, bench, dtype, batch and variant replaces the earlier one."""
    proc, out = quick_run
    assert proc.returncode == 0
    folder = tmp_path / "machine"
    folder.mkdir()
    (folder / "results.json").write_text((out / "results.json").read_text())
    row = {"model": "crossvit_tiny_240", "variant": "ours", "bench": "inference", "dtype": "float32",
           "batch_size": 1, "img_per_s": 10.0, "step_ms_median": 100.0, "step_ms_p25": 90.0, "step_ms_p75": 110.0,
           "step_ms_min": 80.0, "speedup_vs_timm": 1.2, "check_max_rel_diff": float("nan"), "check_ok": True,
           "device_name": "test CPU", "torch": "x"}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([row]))
    second.write_text(json.dumps([dict(row, step_ms_median=50.0)]))
    assert report.main([str(folder), "--add-e2e", str(first), str(second), "--no-plots"]) == 0
    doc = harness.read_results(str(folder / "results.json"))
    rows = harness.records(doc["e2e"]["rows"])
    assert len(rows) == 1 and rows[0]["step_ms_median"] == 50.0 and rows[0].get("check_max_rel_diff") is None
    assert "by_dtype" in doc and doc["by_dtype"]["fp32"]["roofline"]["copy_gbs"] > 0
    assert "End to end" in (folder / "summary.md").read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "rows"}))
    with pytest.raises(ValueError, match="list of rows"):
        report.merge_e2e(doc, [str(bad)])


def test_compact_table_round_trip():
    t = harness.make_table(("a", "b", "unused"), [{"a": 1, "b": 0.123456789}, {"a": 2, "b": 12345.678}])
    assert t["columns"] == ["a", "b"], "a column no row has is left out"
    assert harness.records(t) == [{"a": 1, "b": 0.1235}, {"a": 2, "b": 12346.0}]


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["busy2", "bursty1"])
def test_load_generator_starts_and_ends_its_workers(kind):
    with load.generate(kind, log=lambda msg: None) as pids:
        assert len(pids) == int(kind[-1])
        time.sleep(1.5)
        used = [_cpu_seconds(p) for p in pids]
        assert all(u > 0.05 for u in used), f"{kind} workers used no CPU: {used}"
    for p in pids:
        assert not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split()[2] == "Z", \
            f"worker {p} outlived the load"


def test_load_kinds_and_min_reps_are_checked():
    assert load.parse_kind("none") is None and load.parse_kind("bursty2") == ("bursty", 2)
    for bad in ("busy", "busy0", "heavy1"):
        with pytest.raises(ValueError, match="unknown load"):
            load.parse_kind(bad)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--load", "busy"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown load" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--min-reps", "0"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--min-reps must be at least 1" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_load_workers_exit_when_their_parent_dies(tmp_path):
    """A worker whose parent is killed (no clean-up possible) ends by itself."""
    code = ("import sys, time; sys.path.insert(0, %r); import load\n"
            "with load.generate('busy1', log=lambda m: None) as pids:\n"
            "    print(pids[0], flush=True); time.sleep(60)\n") % BENCH
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} still runs 10 s after its parent died"


def test_profile_op_cpu_smoke(tmp_path):
    """tools/profile_op.py runs on the CPU, under a background load, and writes its rows, the
    extension's ops among them (on a GPU it lists kernels); an unknown load is a usage error."""
    out = tmp_path / "profile.json"
    tool = os.path.join(REPO, "tools", "profile_op.py")
    proc = subprocess.run([sys.executable, tool, "--device", "cpu", "--batch", "2", "--iters", "2", "--mode",
                           "fwd+bwd", "--load", "busy1", "--json", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["rows"] and data["wall_us"] > 0 and data["cpu_us"] > 0 and "cross_attention" in data["what"]
    assert any(r["name"].startswith("crossvit_kernels_cpu::cross_attention_core") for r in data["rows"])
    assert "load busy1: workers ended" in proc.stderr
    bad = subprocess.run([sys.executable, tool, "--device", "cpu", "--load", "busy"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown load 'busy'" in bad.stderr, bad.stderr[-2000:]


def test_gpu_script_parses():
    """tools/gpu_run.sh is valid bash (its dry run, GPU_RUN_DRY=1, takes minutes: run by hand)."""
    proc = subprocess.run(["bash", "-n", os.path.join(REPO, "tools", "gpu_run.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
