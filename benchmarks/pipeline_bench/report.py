"""The printed report: boundary sizes, the figures of a run, and the published anchors."""

from __future__ import annotations

import bench_text_to_video as t2v  # benchmarks/ (light: no torch)
from pipelines.registry import STAGES as REGISTRY  # light: no torch

from .common import STAGES
from .reference import PUBLISHED_ANCHORS

LABEL = t2v.LABELS


def _human(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB ({n / 2**20:.2f} MiB)"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB ({n / 2**10:.1f} KiB)"
    return f"{n} B"


def print_boundaries(sizes: dict, measured: dict | None = None) -> None:
    s = sizes["shape"]
    print(f"bytes crossing each stage boundary, {s['frames']} frames {s['width']}x{s['height']}, {s['dtype']}"
          + ("" if measured else " (from the shapes; no model run)"))
    for boundary, tensors in sizes["parts"].items():
        for i, t in enumerate(tensors):
            label = boundary if i == 0 else ""
            shape = "[" + ", ".join(str(d) for d in t["shape"]) + "]"
            print(f"  {label:<27} {t['name']:<17} {shape:<20} {t['dtype']:<5} {t['bytes']:>12,} B")
        total = sizes["bytes"][boundary]
        extra = ""
        if measured is not None:
            extra = "  (measured: same)" if measured.get(boundary) == total else f"  (measured: {measured.get(boundary)})"
        print(f"  {'':<27} {'total':<17} {'':<20} {'':<5} {total:>12,} B = {_human(total)}{extra}")


def print_report(r: dict) -> None:
    c = r["config"]
    title = "tiny random-weight SVD (CI smoke)" if r["mode"] == "tiny" else "SVD-XT architecture, random weights"
    print(f"{title} on {r['device']}: {r['device_name']}")
    print(f"  torch {r['versions']['torch']}, diffusers {r['versions']['diffusers']}, "
          f"transformers {r['versions']['transformers']}, {r['date']}")
    print(f"  {c['frames']} frames {c['width']}x{c['height']}, {c['steps']} steps, {c['dtype']}, "
          f"attention {c['attention']}, channels_last {'on' if c['channels_last'] else 'off'}, "
          f"compile {'on' if c['compile'] else 'off'}, decode_chunk_size {c['decode_chunk_size']}, "
          f"{'CFG (U-Net batch 2)' if c['guided'] else 'no CFG'}")
    if c["text_to_video"]:
        params = r["runs"]["text_to_video"]["params"]
        print(f"  text-to-image: {r['text_to_image_model']}, {c['width']}x{c['height']}, {c['t2i_steps']} steps, "
              f"guidance {c['t2i_guidance']:g}; prompt {params['prompt']!r}")
    if c["duration"] is not None:
        long = r["runs"]["long_clip"]
        print(f"  long clip: {c['duration']:g} s, {long['plan']}, output {long['output_frames']} frames at "
              f"{long['output_fps']} fps ({long['interpolation']})")
    warm = "; ".join(f"{LABEL.get(name, name)} " + ", ".join(f"{s:.2f}" for s in values)
                     for name, values in r["warmup_seconds_by_run"].items()) or "none"
    builds = ", ".join(f"{name} {s:.2f}" for name, s in r["build_seconds_by_model"].items())
    print(f"  build {r['build_seconds']:.2f} s ({builds}), warm-up (<= 2 steps) {warm} s, measured runs {c['repeat']}"
          + (" (median)" if c["repeat"] > 1 else ""))
    print(("image-to-video, " if len(r["runs"]) > 1 else "") + "seconds per stage:")
    for stage in STAGES:
        values = [t[stage] for t in r["stage_seconds_runs"]]
        spread = f"  (min {min(values):.3f}, max {max(values):.3f})" if len(values) > 1 else ""
        extra = f"  = {r['sampling_seconds_per_step']:.3f} s/step" if stage == "sampling" else ""
        print(f"  {stage:<14} {r['stage_seconds'][stage]:9.3f}{extra}{spread}")
    print(f"  {'total':<14} {r['total_seconds']:9.3f} s/video")
    if not r["device"].startswith("cuda"):
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["stage_cpu_seconds"].items())
        load = r["load_average_1min"]
        print(f"  process CPU seconds per stage: {cpu}; 1-min load average {load['before']:.1f} -> {load['after']:.1f}")
    f = r["flops"]
    if f:
        mfu = f"MFU {f['unet_mfu']:.1%} of {f['peak_tflops']:g} TFLOP/s ({f['peak_source']})" if f["unet_mfu"] else (
            "MFU n/a: unknown GPU, pass --peak-tflops" if r["device"].startswith("cuda") else "MFU n/a on CPU")
        print(f"U-Net: {f['unet_tflop_per_step']:.4g} TFLOP/step x {c['steps']} = {f['unet_tflop']:.4g} TFLOP "
              f"-> {f['unet_tflops_per_s']:.4g} TFLOP/s, {mfu}")
        dmfu = f", MFU {f['decode_mfu']:.1%}" if f["decode_mfu"] else ""
        print(f"decode: {f['decode_tflop']:.4g} TFLOP -> {f['decode_tflops_per_s']:.4g} TFLOP/s{dmfu}")
        print(f"  (FLOPs {f['rule']})")
    if r["peak_gpu_memory_bytes"] is not None:
        print(f"peak GPU memory (torch.cuda.max_memory_allocated, measured runs): "
              f"{r['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    print(f"peak process RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    print_boundaries(r["_boundary_parts"], measured=r["bytes_between_stages"])
    print(f"  {'video_encode->storage':<27} {'mp4':<17} {'(random weights)':<20} {'':<5} {r['video_bytes']:>12,} B")
    print(f"last run: {r['summary']}")
    extra = {name: run for name, run in r["runs"].items() if name != "image_to_video"}
    for name, run in extra.items():
        print(f"last {LABEL[name]} run: {run['summary']}")
        if "text_to_image_seconds_per_step" in run:
            print(f"  text_to_image {run['text_to_image_seconds_per_step']:.3f} s/step")
        measured, expected = run["bytes_between_stages"], run["bytes_between_stages_expected"]
        print("  bytes between stages (first segment): " + ", ".join(
            f"{b} {measured[b]:,}" + ("" if measured[b] == expected.get(b) else f" (expected {expected.get(b):,})")
            if b in measured else f"{b} {expected[b]:,} (expected; not recorded by StagedPipeline)"
            for b in expected))
    if extra:
        t2v.print_side_by_side(r["runs"], r["comparisons"], order=REGISTRY.names())
    print_anchors()


def print_anchors() -> None:
    print("published figures for comparison (NOT measured here):")
    for a in PUBLISHED_ANCHORS:
        stages = ", ".join(f"{k} {v:g} s" for k, v in a["stages"].items())
        print(f"  {a['what']}: {a['seconds_per_video']:g} s/video" + (f" ({stages})" if stages else "")
              + f"  [{a['source']}]")
