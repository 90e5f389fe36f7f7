"""Time the video-encode stage (a CPU stage) at a model's default clip shape, for the planner's figures.

The capacity planner (:mod:`loadtest.capacity_cli`) needs the seconds a ``VideoEncoder`` replica
spends per clip, on the CPU the replicas run on. This runs the stage itself
(:class:`pipelines.stages.VideoEncodeStage`: H.264 encode and poster) on frames of the model's
default shape, a real-looking picture panning 4 px a frame, and prints the median and a record to
paste into ``loadtest/capacity_figures.yaml`` (``cpu_figures``). Random-weight models make
noise-like frames, which take several times longer to encode than real content
(docs/benchmarks.md, "Retiming at full size"): that is why the frames here are a picture.

    python -m loadtest.capacity_cpu --model svd-xt --repeat 7
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import sys
import time

from .capacity_data import load_figures

#: Pixels the picture moves per frame: camera motion, as a real clip has.
PAN_STEP = 4


def panning_frames(count: int, height: int, width: int):
    """``uint8 [count, height, width, 3]``: the project's sample landscape, panned ``PAN_STEP`` px a frame."""
    import numpy as np
    from PIL import Image

    from pipelines.sample_image import draw_sample_image

    wide = np.asarray(draw_sample_image().resize((width + PAN_STEP * (count - 1), height), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(np.stack([wide[:, PAN_STEP * i: PAN_STEP * i + width] for i in range(count)]))


def time_video_encode(*, frames: int, height: int, width: int, repeat: int) -> list[float]:
    """Seconds of one ``VideoEncodeStage`` call per round (mp4, the default output)."""
    from pipelines.params import GenerationParams
    from pipelines.payloads import DecodedFrames
    from pipelines.stages import VideoEncodeStage

    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    stage = VideoEncodeStage()
    params = GenerationParams(num_frames=frames, height=height, width=width)
    decoded = DecodedFrames(frames=panning_frames(frames, height, width))
    stage(decoded, params)  # warm-up: the first call also finds the ffmpeg binary
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        stage(decoded, params)
        runs.append(time.perf_counter() - start)
    return runs


def cpu_description() -> str:
    """The processor and the cores this process may use, as recorded beside a CPU figure."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} logical cores"


def figure_record(*, model: str, seconds: float, rounds: int, cpu: str, date: str) -> str:
    """The ``cpu_figures`` entry for ``loadtest/capacity_figures.yaml`` (YAML flow style, as the file's)."""
    return ("- {model: %s, stage: video_encode, seconds: %.3f, label: measured, date: \"%s\",\n"
            "   cpu: \"%s\",\n   source: \"python -m loadtest.capacity_cpu --model %s --repeat %d\"}"
            % (model, seconds, date, cpu, model, rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.capacity_cpu",
                                     description="Time the video-encode stage at a model's default shape.")
    parser.add_argument("--model", default="svd-xt", help="a model of the planner's figures (default: svd-xt)")
    parser.add_argument("--repeat", type=int, default=7, help="measured rounds after one warm-up (default 7)")
    args = parser.parse_args(argv)
    # transformers says once that torchvision is missing (the PIL image processor is what SVD uses).
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    try:
        figures = load_figures()
        name, model = figures.model(args.model)
        load_before = os.getloadavg()[0]
        runs = time_video_encode(frames=model.frames, height=model.height, width=model.width, repeat=args.repeat)
    except ValueError as error:
        print(f"capacity_cpu: {error}", file=sys.stderr)
        return 2
    median = statistics.median(runs)
    print(f"video_encode, {model.frames} frames {model.width}x{model.height}, median of {len(runs)}: {median:.3f} s "
          f"(min {min(runs):.3f}, max {max(runs):.3f}); 1-min load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(figure_record(model=name, seconds=median, rounds=len(runs), cpu=cpu_description(),
                        date=dt.date.today().isoformat()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
