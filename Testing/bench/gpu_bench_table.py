"""The table ``gpu_bench.py`` prints from its result (the dict it writes to ``gpu_bench.json``)."""

from __future__ import annotations

from typing import Any


def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))


def print_table(r: dict[str, Any]) -> None:
    s1, s2, enc = r.get("stage1") or {}, r.get("stage2") or {}, r.get("encoder") or {}
    peak = (r.get("peak_bf16") or {}).get("tflops")
    goals = r.get("goals") or {}
    rows = [
        ("bf16 GEMM peak (measured)", f"{fmt(peak, '.1f')} TFLOP/s", f"n={fmt((r.get('peak_bf16') or {}).get('n'))}", ""),
        ("stage 1 step", f"{fmt(s1.get('step_s'), '.3f')} s", f"{fmt(s1.get('volumes_per_s'), '.2f')} volumes/s, batch {fmt(s1.get('batch_per_gpu'))}", ""),
        ("stage 1 MFU", f"{fmt(s1.get('mfu'), '.1%')}", f"{fmt(s1.get('tflops'), '.1f')} TFLOP/s", f"goal >= {fmt(goals.get('stage1_mfu'), '.0%')}: {_ok(s1.get('meets_goal'))}"),
        ("stage 1 loader", f"{fmt(s1.get('loader_volumes_per_s'), '.2f')} volumes/s", f"{fmt(s1.get('loader_workers'))} workers", f"keeps up: {_ok(s1.get('loader_keeps_up'))}"),
        ("stage 2 step", f"{fmt(s2.get('step_s'), '.3f')} s", f"{fmt(s2.get('pairs_per_s'), '.2f')} pairs/s, batch {fmt(s2.get('batch_per_gpu'))} in {fmt(s2.get('chunks'))} chunks", ""),
        ("encoder ours bf16", f"{fmt(enc.get('ours_bf16_ms'), '.2f')} ms", f"fp32 {fmt(enc.get('ours_fp32_ms'), '.2f')} ms", f"cos(bf16,fp32) {fmt(enc.get('cosine_ours_bf16_fp32'), '.5f')}"),
        ("encoder baseline bf16", f"{fmt(enc.get('baseline_bf16_ms'), '.2f')} ms", f"fp32 {fmt(enc.get('baseline_fp32_ms'), '.2f')} ms", str(enc.get("baseline", "-"))),
        ("encoder speed-up bf16", f"{fmt(enc.get('speedup_bf16'), '.2f')}x", f"vs baseline fp32 {fmt(enc.get('speedup_ours_bf16_vs_baseline_fp32'), '.2f')}x",
         f"goal >= {fmt(goals.get('encoder_speedup_bf16'), '.0f')}x: {_ok(enc.get('meets_goal'))}"),
        ("torchrun process group", str((r.get("process_group") or {}).get("backend", "-")),
         f"world {fmt((r.get('process_group') or {}).get('world_size'))}, all_reduce ok {_ok((r.get('process_group') or {}).get('all_reduce_ok'))}",
         f"trainer {_ok((r.get('trainer_smoke') or {}).get('ok'))}, align {_ok((r.get('align_smoke') or {}).get('ok'))}"),
    ]
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"\n== gpu_bench ({r['mode']}) on {r['device_name']}, torch {r['torch']}" +
          ("   [CPU smoke: figures are meaningless]" if r["mode"] == "cpu-smoke" else ""))
    for row in rows:
        print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip())
    if enc and not enc.get("monai_available"):
        print(f"  MONAI not installed here ({enc.get('monai_missing_reason')}): MONAI comparison skipped, "
              f"baseline = {enc.get('baseline')}")
    for k, v in (r.get("errors") or {}).items():
        print(f"  ERROR {k}: {v}")


def _ok(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "NO")
