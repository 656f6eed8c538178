"""Tables and plots from a results file (the compact format of harness.py).

    python benchmarks/report.py DIR                         # DIR/results.json -> DIR/summary.md + plots
    python benchmarks/report.py DIR --add-e2e e2e_*.json    # first merge end-to-end CLI rows into it

``run.py`` calls :func:`write` at the end of every run; this command re-renders a folder (after a
change of the tables, say) and merges the rows that ``python -m crossvit_kernels.benchmark
--results-file X.json`` writes into the same results file, so that one machine's numbers live in
one place. Derived numbers (speedups, fractions of the floor and of the roofline) are computed
here, never stored.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import harness  # noqa: E402

E2E_COLUMNS = ("model", "variant", "bench", "dtype", "batch_size", "img_per_s", "step_ms_median", "step_ms_p25",
               "step_ms_p75", "step_ms_min", "cpu_ms_median", "speedup_vs_timm", "gmac_per_img", "gmac_per_s",
               "check_max_rel_diff", "check_ok", "compiled", "backend", "threads")
E2E_ENV = ("device", "device_name", "torch", "timm", "crossvit_kernels", "python", "commit")


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    for limit, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f"), (0.01, ".3f")):
        if ms >= limit:
            return format(ms, spec)
    return format(ms, ".4f")


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(rows: List[List[str]], header: Sequence[str]) -> str:
    """A GitHub-markdown table, columns padded for reading in a terminal."""
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in cells[1:]])


def ms_of(r: dict) -> Optional[float]:
    """The time a table shows: the CUDA-graph replay's (device time) where measured, else the
    eager call's."""
    g = r.get("graph_median_ms")
    return g if g is not None else r.get("median_ms")


def _has_graph(rows: List[dict]) -> bool:
    return any(r.get("graph_median_ms") is not None for r in rows)


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


def _roofline(dname: str, roof: dict, env: dict) -> str:
    rows = [["copy (read+write)", f"{roof['copy_gbs']:.1f} GB/s", fmt_ms(roof["copy"].get("median_ms")) + " ms"],
            ["read (x.sum())", f"{roof['read_gbs']:.1f} GB/s", fmt_ms(roof["read"].get("median_ms")) + " ms"]]
    rows += [[f"torch.mm {g['M']}x{g['K']}x{g['N']}", f"{g['gmacs']:.1f} GMAC/s", fmt_ms(g["median_ms"]) + " ms"]
             for g in harness.records(roof["gemm"])]
    return (f"### Roofline ({dname}, {env['device']}, {env['threads']} threads)\n\n"
            + table(rows, ["measurement", "rate", "median"]))


def _elt(dname: str) -> int:
    return harness.DTYPES[dname].itemsize


def _fused_best(sel: Dict[str, dict]) -> Optional[dict]:
    cands = [sel[b] for b in harness.FUSED_BACKENDS if b in sel]
    return min(cands, key=ms_of) if cands else None


def _auto_cell(auto: Optional[str], sel: Dict[str, dict], best: Optional[dict]) -> str:
    """The backend ``auto`` picks, and how far it is behind the fastest fused backend of the row
    ("cpp (fastest)", "cpp (+12% vs torch)"); "-" where the run did not record or time it."""
    if auto is None or auto not in sel or best is None:
        return "-"
    if best["impl"] == auto:
        return f"{auto} (fastest)"
    return f"{auto} (+{ms_of(sel[auto]) / ms_of(best) - 1:.0%} vs {best['impl']})"


def _cross_attention(dname: str, sec: dict, roof: dict) -> str:
    rows = harness.records(sec["rows"])
    if not rows:
        return ""
    uses = {(s["N"], s["C"], s["H"]): s["uses"] for s in harness.records(sec["shapes"])}
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in ("read", "copy")]
    graph = _has_graph(rows)
    elt = _elt(dname)
    out = []
    cases = list(dict.fromkeys((r["N"], r["C"], r["H"], r["B"], r["mode"]) for r in rows))
    for N, C, H, B, mode in cases:
        sel = {r["impl"]: r for r in rows if (r["N"], r["C"], r["H"], r["B"], r["mode"]) == (N, C, H, B, mode)}
        fl = {r["impl"]: ms_of(r) for r in rows
              if (r["N"], r["C"], r["H"], r["B"], r["mode"]) == (N, C, H, B, "fwd") and r["impl"] in ("read", "copy")}
        floor = fl.get("read") if mode == "fwd" else (fl["read"] + fl["copy"] if len(fl) == 2 else None)
        best = _fused_best(sel)
        f = harness.mode_factor("cross_attention", mode)
        roof_ms = harness.roofline_ms(roof, harness.ca_bytes(B, N, C, elt, mode),
                                      harness.ca_macs_absorbed(B, N, C, H) * f, rw=mode != "fwd")
        line = [f"N={N} C={C} H={H}", harness.short_uses(uses.get((N, C, H), []))[:40], str(B), mode]
        line += [fmt_ms(ms_of(sel[i])) if i in sel else "-" for i in impls]
        line += [best["impl"] if best else "-", _auto_cell(sec.get("auto"), sel, best),
                 f"{ms_of(sel['timm']) / ms_of(best):.1f}x" if best and "timm" in sel else "-",
                 f"{harness.ca_macs_textbook(1, N, C) / harness.ca_macs_absorbed(1, N, C, H):.0f}x",
                 fmt_ms(floor), pct(floor / ms_of(best)) if best and floor else "-",
                 pct(roof_ms / ms_of(best)) if best else "-"]
        if graph:
            line.append(fmt_ms(best.get("median_ms")) if best else "-")
        out.append(line)
    head = (["shape", "variants", "B", "mode"] + [f"{i} ms" for i in impls]
            + ["best fused", "auto", "vs timm", "MAC ratio", "floor ms", "% of floor", "% of roofline"]
            + (["best eager ms"] if graph else []))
    what = ("CUDA-graph replay: device time" if graph else "median ms")
    return (f"### Cross-attention block ({dname}; {what}; timm = cat + timm's CrossAttentionBlock; floor = the "
            f"tokens read once (fwd) / read, read and written (fwd+bwd), measured at the shape; auto = the backend "
            f"`auto` dispatches to here, and its distance from the fastest; roofline = max(bytes "
            f"of the fused form / bandwidth, absorbed MACs / GEMM rate))\n\n" + table(out, head))


def _patch_embed(dname: str, sec: dict, roof: dict) -> str:
    rows = harness.records(sec["rows"])
    if not rows:
        return ""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    graph = _has_graph(rows)
    elt = _elt(dname)
    out = []
    for S, p, C, B, mode in dict.fromkeys((r["img"], r["patch"], r["C"], r["B"], r["mode"]) for r in rows):
        sel = {r["impl"]: r for r in rows if (r["img"], r["patch"], r["C"], r["B"], r["mode"]) == (S, p, C, B, mode)}
        best = _fused_best(sel)
        roof_ms = harness.roofline_ms(roof, harness.pe_bytes(B, S, p, C, elt, mode),
                                      harness.pe_macs(B, S, p, C) * harness.mode_factor("patch_embed", mode), rw=True)
        line = [f"{S}px p{p} C={C}", str(B), mode] + [fmt_ms(ms_of(sel[i])) if i in sel else "-" for i in impls]
        line += [best["impl"] if best else "-", _auto_cell(sec.get("auto"), sel, best),
                 f"{ms_of(sel['timm']) / ms_of(best):.2f}x" if best and "timm" in sel else "-",
                 pct(roof_ms / ms_of(best)) if best else "-"]
        if graph:
            line.append(fmt_ms(best.get("median_ms")) if best else "-")
        out.append(line)
    head = (["input", "B", "mode"] + [f"{i} ms" for i in impls] + ["best fused", "auto", "vs timm", "% of roofline"]
            + (["best eager ms"] if graph else []))
    return (f"### Patch embedding ({dname}; {'CUDA-graph replay: device time' if graph else 'median ms'}; timm = "
            f"PatchEmbed + cat + add; auto = the backend `auto` dispatches to here, and its distance from the fastest; "
            f"roofline = max(bytes / copy bandwidth, MACs / GEMM rate))\n\n" + table(out, head))


def _stage_label(g: dict) -> str:
    """"401x224 + 197x448 H7,7": branch 0's tokens x width, branch 1's, the two directions' heads."""
    return f"{g['N0']}x{g['C0']} + {g['N1']}x{g['C1']} H{g['H0']},{g['H1']}"


def _fusion_stage(dname: str, sec: dict, roof: dict) -> str:
    rows = harness.records(sec["rows"])
    if not rows:
        return ""
    keys = harness.STAGE_KEYS
    uses = {tuple(g[k] for k in keys): g["uses"] for g in harness.records(sec["geometries"])}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    graph = _has_graph(rows)
    elt = _elt(dname)
    out = []
    for case in dict.fromkeys(tuple(r[k] for k in keys + ("B", "mode")) for r in rows):
        g, B, mode = dict(zip(keys, case)), case[-2], case[-1]
        sel = {r["impl"]: r for r in rows if tuple(r[k] for k in keys + ("B", "mode")) == case}
        best = _fused_best(sel)
        floor = harness.stage_floor_bytes(B, g, elt, mode) / (roof["copy_gbs"] * 1e6)
        line = [_stage_label(g), harness.short_uses(uses.get(case[:-2], []))[:40], str(B), mode]
        line += [fmt_ms(ms_of(sel[i])) if i in sel else "-" for i in impls]
        line += [best["impl"] if best else "-",
                 f"{ms_of(sel['timm']) / ms_of(best):.2f}x" if best and "timm" in sel else "-",
                 fmt_ms(floor), pct(floor / ms_of(best)) if best else "-"]
        if graph:
            line.append(fmt_ms(best.get("median_ms")) if best else "-")
        out.append(line)
    head = (["geometry", "variants", "B", "mode"] + [f"{i} ms" for i in impls]
            + ["best fused", "vs timm", "floor ms", "% of floor"] + (["best eager ms"] if graph else []))
    by_path: Dict[str, List[str]] = {}
    for i, path in sec.get("paths", {}).items():
        if i != "timm":
            by_path.setdefault(path, []).append(i)
    paths = "; ".join(f"{path}: {', '.join(i)}" for path, i in by_path.items())
    text = (f"### Fusion stage ({dname}; {'CUDA-graph replay: device time' if graph else 'median ms'}; geometry = "
            f"branch 0's tokens x width + branch 1's, the heads of direction 0 (branch 0's CLS over branch 1) and 1; "
            f"timm = timm's MultiScaleBlock fusion, encoder layers replaced by identities; {paths}; floor = the byte "
            f"model's bytes-once floor at the copy bandwidth)\n\n" + table(out, head))
    errors = harness.records(sec.get("errors"))
    if errors:
        eimpls = list(dict.fromkeys(e["impl"] for e in errors))
        erows = []
        for case in dict.fromkeys(tuple(e[k] for k in keys + ("B",)) for e in errors):
            sel = {e["impl"]: e for e in errors if tuple(e[k] for k in keys + ("B",)) == case}
            erows.append([_stage_label(dict(zip(keys, case))), str(case[-1])]
                         + [f"{sel[i]['out_err']:.1e} / {sel[i]['grad_err']:.1e}" if i in sel else "-" for i in eimpls])
        text += (f"\n\n### Fusion stage: errors against the float64 oracle ({dname}; outputs / gradients of both "
                 f"branches and every parameter but the key biases; max |x - oracle| / max |oracle| per tensor, the "
                 f"largest; timm's is the same-dtype reference's)\n\n" + table(erows, ["geometry", "B"] + eimpls))
    return text


def _fusion(dname: str, sec: dict) -> str:
    from crossvit_kernels.models import FUSIONS
    rows, static = harness.records(sec["rows"]), harness.records(sec["static"])
    name = sec["model"]

    def t(scope, fusion, backend, mode, model=name):
        for r in rows:
            if (r["scope"], r["fusion"], r["backend"], r["mode"], r["model"]) == (scope, fusion, backend, mode, model):
                return r["median_ms"]
        return None
    backends = {r["backend"] for r in rows if r["scope"] == "model"}
    fused = next((b for b in harness.FUSED_BACKENDS if b in backends), "reference")
    none_fwd = {b: t("model", "none", b, "fwd") for b in (fused, "reference")}
    none_fwd["timm"] = none_fwd["reference"]
    main = [s for s in static if s["model"] == name]
    trows = []
    for s in main:
        f = s["fusion"]
        lines = [(fused, "fused" if f == "cross_attention" else "-")]
        if f in ("cross_attention", "none") and fused != "reference":
            lines.append(("reference", "textbook"))
        for backend, label in lines:
            fwd = t("model", f, backend, "fwd")
            tb = backend == "reference"
            trows.append([f, label, f"{s['params'] / 1e6:.2f}", f"{s['params_fusion'] / 1e6:.2f}",
                          f"{(s['macs_textbook'] if tb else s['macs_fused']) / 1e9:.3f}",
                          f"{(s['macs_fusion_textbook'] if tb else s['macs_fusion_fused']) / 1e6:.1f}",
                          fmt_ms(t("fusion_stage", f, backend, "fwd")),
                          fmt_ms(t("fusion_stage", f, backend, "fwd+bwd")),
                          fmt_ms(fwd), fmt_ms(t("model", f, backend, "fwd+bwd")),
                          f"{100 * (fwd / none_fwd[backend] - 1):+.1f}%" if fwd and none_fwd[backend] else "-"])
    timm_fwd = t("model", "cross_attention", "timm", "fwd")
    if timm_fwd is not None and main:
        trows.append(["cross_attention", "timm model", f"{main[0]['params'] / 1e6:.2f}", "", "", "", "", "",
                      fmt_ms(timm_fwd), fmt_ms(t("model", "cross_attention", "timm", "fwd+bwd")),
                      f"{100 * (timm_fwd / none_fwd['timm'] - 1):+.1f}%" if none_fwd["timm"] else "-"])
    text = (f"### Fusion schemes at {name} ({dname}; fusion stage = one multi-scale block's fusion at "
            f"B={sec['fusion_batch']}; model at B={sec['model_batch']}; MACs per image; 'vs none' = model fwd "
            f"against no fusion, same backend; timm model against textbook none)\n\n"
            + table(trows, ["fusion", "form", "params M", "fusion params M", "model GMACs", "fusion MMACs",
                            "stage fwd ms", "stage fwd+bwd ms", "model fwd ms", "model fwd+bwd ms", "vs none"]))
    models = list(dict.fromkeys(s["model"] for s in static))
    if len(models) > 1:
        srows = []
        for v in models:
            per = {s["fusion"]: s for s in static if s["model"] == v}
            srows.append([v] + [f"{per[f]['params'] / 1e6:.1f} / {per[f]['macs_fused'] / 1e9:.2f}" if f in per else "-"
                                for f in FUSIONS])
        text += ("\n\n### Every variant: params M / GMACs (fused form) per fusion scheme\n\n"
                 + table(srows, ["model"] + list(FUSIONS)))
    sweep = [r for r in rows if r["scope"] == "fusion_stage" and r["model"] != name]
    if sweep:
        srows = []
        for v, B in dict.fromkeys((r["model"], r["B"]) for r in sweep):
            per = {(r["fusion"], r["backend"]): r["median_ms"] for r in sweep if r["model"] == v and r["mode"] == "fwd"}
            srows.append([v, str(B)] + [fmt_ms(per.get((f, fused)) or per.get((f, "reference"))) for f in FUSIONS]
                         + [fmt_ms(per.get(("cross_attention", "reference")))])
        text += (f"\n\n### Fusion stage of the other geometries (fwd, {fused} backend; ms)\n\n"
                 + table(srows, ["model", "B"] + list(FUSIONS) + ["cross_attention textbook"]))
    return text


def _scaling(dname: str, sec: dict) -> str:
    rows = harness.records(sec["rows"])
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    trows = []
    for N in dict.fromkeys(r["N"] for r in rows):
        sel = {r["impl"]: ms_of(r) for r in rows if r["N"] == N}
        trows.append([str(N)] + [fmt_ms(sel.get(i)) for i in impls])
    return (f"### Scaling with the token count (forward, {dname}, B={sec['B']}, C={sec['C']}, H={sec['H']}; "
            f"{'device ms' if _has_graph(rows) else 'median ms'}; all_attention = the all-attention scheme's "
            f"transformer layer of {sec['model']} over N tokens; read = x.sum() of the (B, N, C) tokens)\n\n"
            + table(trows, ["N"] + impls))


def _e2e(e2e: dict) -> str:
    rows = harness.records(e2e["rows"])
    if not rows:
        return ""
    trows = []
    for r in rows:
        sp = r.get("speedup_vs_timm")
        chk = r.get("check_max_rel_diff")
        trows.append([r["model"], r["bench"], r["dtype"], str(r["batch_size"]), r["variant"],
                      f"{r['img_per_s']:.1f}", fmt_ms(r["step_ms_median"]),
                      f"{fmt_ms(r['step_ms_p25'])}-{fmt_ms(r['step_ms_p75'])}",
                      "-" if sp is None else f"{sp:.3f}x",
                      "-" if chk is None else f"{chk:.1e}" + ("" if r.get("check_ok") in (True, None, "") else " !")])
    env = e2e.get("environment", {})
    return (f"### End to end (python -m crossvit_kernels.benchmark; {env.get('device_name', '?')}, torch "
            f"{env.get('torch', '?')}, timm {env.get('timm', '?')}; step ms median and 25-75 %; speedup against timm "
            f"eager in the same run; check = max |logits - timm's| / scale)\n\n"
            + table(trows, ["model", "bench", "dtype", "B", "variant", "img/s", "step ms", "p25-p75", "vs timm",
                            "check"]))


def render(doc: dict) -> str:
    """The summary of a results file, in markdown."""
    env = doc.get("environment", {})
    v = env.get("versions", {})
    lines = [f"# crossvit-kernels benchmarks ({doc.get('mode', '?')}, {doc.get('tag', '?')})", ""]
    if env:
        lines.append(f"- device: {env.get('device')} ({env.get('device_type')}), {env.get('threads')} threads, "
                     f"dtypes {list(doc.get('by_dtype', {}))}")
        lines.append("- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x)
                     + f"; commit {env.get('commit')}")
    if "runtime_s" in doc:
        lines.append(f"- runtime {doc['runtime_s']} s; background load {doc.get('load', 'none')}; other processes used "
                     f"{doc.get('other_processes_cores')} cores on average; load average {env.get('load_average')} -> "
                     f"{doc.get('load_average_end')}")
    for n in doc.get("notes", []):
        lines.append(f"- note: {n}")
    if doc.get("partial"):
        lines.append("- PARTIAL: the run stopped before its end (a time limit); the tables hold what it measured")
    if doc.get("failed"):
        lines.append(f"- FAILED: {', '.join(doc['failed'])}")
    parts = ["\n".join(lines)]
    for dname, per in doc.get("by_dtype", {}).items():
        roof = per.get("roofline", {})
        if "copy_gbs" not in roof:
            parts.append(f"### {dname}: no roofline ({roof.get('error', 'not measured')})")
            continue
        parts.append(_roofline(dname, roof, env))
        for sec, fn in (("cross_attention", lambda s: _cross_attention(dname, s, roof)),
                        ("patch_embed", lambda s: _patch_embed(dname, s, roof)),
                        ("fusion_stage", lambda s: _fusion_stage(dname, s, roof)),
                        ("fusion", lambda s: _fusion(dname, s)), ("scaling", lambda s: _scaling(dname, s))):
            if sec in per and "error" in per[sec]:
                parts.append(f"### {sec} ({dname}): FAILED: {per[sec]['error']}")
            elif sec in per:
                parts.append(fn(per[sec]) + ("\n\n(partial: the run stopped inside this section)"
                                             if per[sec].get("partial") else ""))
    if doc.get("e2e"):
        parts.append(_e2e(doc["e2e"]))
    if doc.get("errors"):
        parts.append("### Failures\n\n" + "\n".join(
            f"- {e.get('dtype')} {e.get('section')} {e.get('impl')} "
            f"{ {k: x for k, x in e.items() if k not in ('dtype', 'section', 'impl', 'error')} }: {e['error']}"
            for e in doc["errors"]))
    return "\n\n".join(p for p in parts if p) + "\n"


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------


def make_plots(doc: dict, out: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plots are optional; the results file is the result
        print(f"plots skipped: matplotlib unavailable ({exc})", file=sys.stderr)
        return []
    written = []
    dev = doc.get("environment", {}).get("device", "")

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for dname, per in doc.get("by_dtype", {}).items():
        sc = harness.records(per.get("scaling", {}).get("rows"))
        if sc:
            fig, ax = plt.subplots(figsize=(7, 5))
            for impl in dict.fromkeys(r["impl"] for r in sc):
                pts = sorted((r["N"], ms_of(r)) for r in sc if r["impl"] == impl)
                style = dict(ls="--", color="k") if impl == "read" else dict(marker="o")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl.replace("read", "bytes once (x.sum())"),
                        **style)
            s = per["scaling"]
            ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="forward time (ms)")
            ax.set_title(f"Fusion cost vs tokens (B={s['B']}, C={s['C']}, H={s['H']}, {dname})\n{dev}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, f"scaling_{dname}.png")
        for op, key, label in (("cross_attention", ("N", "C", "H"), lambda s: f"N{s[0]}\nC{s[1]}"),
                               ("patch_embed", ("img", "patch", "C"), lambda s: f"{s[0]}px p{s[1]}\nC{s[2]}")):
            rows = harness.records(per.get(op, {}).get("rows"))
            rows = [r for r in rows if r["impl"] not in ("read", "copy")]
            if not rows or not any(r["impl"] == "timm" for r in rows):
                continue
            # per shape, the largest batch measured
            bmax = {}
            for r in rows:
                k = tuple(r[c] for c in key)
                bmax[k] = max(bmax.get(k, 0), r["B"])
            rows = [r for r in rows if r["B"] == bmax[tuple(r[c] for c in key)]]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
            shapes = list(bmax)
            impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "timm"]
            width = 0.8 / max(1, len(impls))
            for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
                for k, impl in enumerate(impls):
                    ys = []
                    for s in shapes:
                        sel = {r["impl"]: ms_of(r) for r in rows if tuple(r[c] for c in key) == s and r["mode"] == mode}
                        ys.append(sel["timm"] / sel[impl] if impl in sel and "timm" in sel else 0)
                    ax.bar([i + k * width for i in range(len(shapes))], ys, width, label=impl)
                ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
                ax.set_xticklabels([label(s) for s in shapes], fontsize=6)
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.8)
                ax.set_title(f"{op} {mode}: speed-up over timm ({dname}, largest batch)", fontsize=9)
                ax.grid(True, axis="y", which="both", alpha=0.3)
            axes[0].legend(fontsize=7)
            fig.suptitle(dev, fontsize=9)
            save(fig, f"{op}_{dname}.png")
        fu = per.get("fusion", {})
        model_rows = [r for r in harness.records(fu.get("rows")) if r["scope"] == "model"]
        if model_rows:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
            labels, fwd, fb = [], [], []
            for f, b in dict.fromkeys((r["fusion"], r["backend"]) for r in model_rows):
                sel = {r["mode"]: r["median_ms"] for r in model_rows if (r["fusion"], r["backend"]) == (f, b)}
                labels.append(f"{f}\n({b})")
                fwd.append(sel.get("fwd", 0))
                fb.append(sel.get("fwd+bwd", 0))
            xs = range(len(labels))
            axes[0].bar([x - 0.2 for x in xs], fwd, 0.4, label="fwd")
            axes[0].bar([x + 0.2 for x in xs], fb, 0.4, label="fwd+bwd")
            axes[0].set_xticks(list(xs))
            axes[0].set_xticklabels(labels, fontsize=6, rotation=30)
            axes[0].set_ylabel("ms")
            axes[0].legend(fontsize=8)
            axes[0].set_title(f"whole model {fu['model']} B={fu['model_batch']} ({dname})", fontsize=9)
            main = [s for s in harness.records(fu["static"]) if s["model"] == fu["model"]]
            axes[1].bar([s["fusion"] for s in main], [s["macs_fused"] / 1e9 for s in main])
            axes[1].set_ylabel("GMACs per image (fused form)")
            axes[1].tick_params(axis="x", labelsize=7, rotation=20)
            axes[1].set_title("multiply-adds", fontsize=9)
            fig.suptitle(dev, fontsize=9)
            save(fig, f"fusion_{dname}.png")
    return written


def write(out: str, doc: dict, plots: bool = True) -> List[str]:
    """summary.md and the plots of ``doc`` into folder ``out``; returns the paths written."""
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write(render(doc))
    return [path] + (make_plots(doc, out) if plots else [])


# ------------------------------------------------------------------------------------------------
# end-to-end rows
# ------------------------------------------------------------------------------------------------


def merge_e2e(doc: dict, files: Sequence[str]) -> int:
    """Adds the rows of the end-to-end CLI's JSON result files to ``doc["e2e"]``; a row replaces an
    earlier one of the same model, bench, dtype, batch size and variant. Returns the rows added."""
    e2e = doc.setdefault("e2e", {"environment": {}, "rows": harness.make_table(E2E_COLUMNS, [])})
    key = lambda r: (r["model"], r["bench"], r["dtype"], r["batch_size"], r["variant"])  # noqa: E731
    rows = {key(r): r for r in harness.records(e2e["rows"])}
    added = 0
    for path in files:
        with open(path) as f:
            new = json.load(f)
        if not isinstance(new, list):
            raise ValueError(f"{path}: expected the JSON list of rows that --results-file writes")
        for r in new:
            missing = [c for c in ("model", "variant", "bench", "dtype", "batch_size") if c not in r]
            if missing:
                raise ValueError(f"{path}: a row lacks {missing}; is it a crossvit_kernels.benchmark result file?")
            r = {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in r.items()}
            rows[key(r)] = r
            e2e["environment"].update({k: r[k] for k in E2E_ENV if k in r})
            added += 1
    e2e["rows"] = harness.make_table(E2E_COLUMNS, rows.values())
    return added


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a folder with results.json (created with --add-e2e when absent)")
    p.add_argument("--add-e2e", nargs="+", default=[], metavar="FILE",
                   help="JSON files of python -m crossvit_kernels.benchmark --results-file to merge in")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    path = os.path.join(args.dir, "results.json")
    if os.path.exists(path):
        doc = harness.read_results(path)
    elif args.add_e2e:
        doc = {"schema": 2, "mode": "e2e", "tag": os.path.basename(os.path.abspath(args.dir)), "by_dtype": {}}
    else:
        p.error(f"{path} does not exist")
    if args.add_e2e:
        print(f"merged {merge_e2e(doc, args.add_e2e)} end-to-end rows into {path}")
        harness.write_results(path, doc)
    written = write(args.dir, doc, plots=not args.no_plots)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
