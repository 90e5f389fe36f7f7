"""Text-to-video and long-clip parts of ``bench_pipeline.py`` (imported by it; not a script).

* The SDXL base 1.0 architecture with random weights (``--text-to-video`` at full size), and the
  tiny SDXL of ``pipelines.tiny_t2i`` (``--tiny --text-to-video``).
* The split of the video-encode stage into retiming (frame interpolation), H.264 encoding and the
  rest (joining segments, the poster JPEG), measured inside the stage.
* ``--retime``: ``pipelines.interpolate.retime`` (blend and mci) and the encode of its output on
  frames of a given shape, with no model.
* The side-by-side table of the runs of one invocation, with their ratios.

No torch import at module level: ``bench_pipeline.py --boundaries`` stays light.
"""

from __future__ import annotations

import contextlib
import statistics
import time

# -- SDXL base 1.0, as configured on the Hub ------------------------------------------------------
#
# These dicts mirror the config.json files of stabilityai/stable-diffusion-xl-base-1.0
# (unet/config.json, vae/config.json, text_encoder/config.json, text_encoder_2/config.json), with
# only the bookkeeping keys (_class_name, _diffusers_version, architectures, torch_dtype,
# transformers_version) and the keys equal to the class defaults of the libraries left out. The
# scheduler is pipelines.tiny_t2i.SDXL_BASE_SCHEDULER_CONFIG (the repository's
# scheduler/scheduler_config.json); model_index.json sets force_zeros_for_empty_prompt true.
# tests/test_bench_smoke.py checks the parameter counts they give against the published ones.

SDXL_UNET_CONFIG: dict = {  # UNet2DConditionModel
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280-wide pooled text
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE_CONFIG: dict = {  # AutoencoderKL
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_TEXT_ENCODER_CONFIG: dict = {  # CLIPTextModel: OpenAI CLIP ViT-L/14's text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2_CONFIG: dict = {  # CLIPTextModelWithProjection: OpenCLIP ViT-bigG/14's text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
#: Parameters of the released SDXL base 1.0 components (vocabulary 49408), for the config check.
SDXL_PUBLISHED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def build_sdxl_base_models(device, dtype, *, attention: str = "sdpa", tokenizers=None) -> dict:
    """SDXL base 1.0's U-Net, VAE and two text encoders with random weights on ``device`` in ``dtype``.

    ``tokenizers``: the pair the pipeline will use (their sizes become the text encoders'
    ``vocab_size``, and their special tokens the encoders' ids); None keeps the real vocabulary of
    49408 and its ids (for the parameter count). The token table's size costs no time: it is a
    lookup of 77 rows. Built model by model in fp32 (as the libraries initialise weights) directly
    on the device, each cast before the next is built (the U-Net is 10.3 GB in fp32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def finish(module):
        return module.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def text_config(base: dict, tokenizer) -> "CLIPTextConfig":
        config = dict(base)
        if tokenizer is not None:
            config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return CLIPTextConfig(**config, attn_implementation="sdpa" if attention == "sdpa" else "eager")

    first, second = tokenizers if tokenizers is not None else (None, None)
    models = {}
    with torch.device(device):
        models["unet"] = finish(UNet2DConditionModel(**SDXL_UNET_CONFIG))
        models["vae"] = finish(AutoencoderKL(**SDXL_VAE_CONFIG))
        models["text_encoder"] = finish(CLIPTextModel(text_config(SDXL_TEXT_ENCODER_CONFIG, first)))
        models["text_encoder_2"] = finish(CLIPTextModelWithProjection(text_config(SDXL_TEXT_ENCODER_2_CONFIG, second)))
    return models


def sdxl_parameter_counts() -> dict:
    """Parameters of each component as configured here, counted on the meta device (nothing allocated)."""
    import torch

    models = build_sdxl_base_models(torch.device("meta"), torch.bfloat16)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def build_text_to_image(*, tiny: bool, device: str, dtype, attention: str, channels_last: bool, compile: bool):
    """The text-to-image pipeline the benchmark runs: the tiny SDXL (``--tiny``) or SDXL base 1.0's
    architecture with random weights, with the same attention, memory-format and compile settings
    as the video model."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from pipelines.tiny_t2i import (
        SDXL_BASE_SCHEDULER_CONFIG,
        build_tiny_text_to_image_pipeline,
        build_tiny_tokenizer,
    )

    if tiny:
        pipe = build_tiny_text_to_image_pipeline(seed=0)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            getattr(pipe, name).to(device=device, dtype=dtype).requires_grad_(False)
        if attention == "default":
            pipe.text_encoder.set_attn_implementation("eager")
            pipe.text_encoder_2.set_attn_implementation("eager")
    else:
        # No download: CLIP-style byte-level BPE tokenizers built offline (pipelines/tiny_t2i.py);
        # SDXL's second tokenizer pads with "!", as the released one does.
        tokenizers = (build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!"))
        models = build_sdxl_base_models(device, dtype, attention=attention, tokenizers=tokenizers)
        pipe = StableDiffusionXLPipeline(
            **models, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
            scheduler=EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,  # as model_index.json of SDXL base 1.0
        )
    if attention == "default":
        pipe.unet.set_default_attn_processor()
        pipe.vae.set_default_attn_processor()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        import torch

        pipe.unet.to(memory_format=torch.channels_last)  # 2-D convolutions only
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile()
    return pipe


# -- inside the video-encode stage -----------------------------------------------------------------


@contextlib.contextmanager
def video_encode_split(record: dict):
    """Time ``retime`` and ``encode_video`` as VideoEncodeStage calls them (module globals of
    pipelines.stages), adding seconds to ``record["retime"]`` / ``record["encode"]`` and keeping
    the retime input (the stitched generated frames) in ``record["retime_input"]``."""
    import pipelines.stages as stages_module

    names = [name for name in ("retime", "encode_video") if hasattr(stages_module, name)]
    originals = {name: getattr(stages_module, name) for name in names}

    def timed(name, function):
        key = "encode" if name == "encode_video" else name

        def wrapper(frames, *args, **kwargs):
            start = time.perf_counter()
            try:
                return function(frames, *args, **kwargs)
            finally:
                record[key] = record.get(key, 0.0) + time.perf_counter() - start
                if key == "retime":
                    record["retime_input"] = frames

        return wrapper

    for name in names:
        setattr(stages_module, name, timed(name, originals[name]))
    try:
        yield record
    finally:
        for name, function in originals.items():
            setattr(stages_module, name, function)


def ffmpeg_version() -> str:
    """The first line of ``ffmpeg -version`` of the ffmpeg the pipeline runs."""
    import subprocess

    from pipelines.video import ffmpeg_exe

    try:
        out = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    return out.splitlines()[0] if out else "unknown"


# -- retiming on frames of a given shape (--retime, and the long clip's micro-figure) ------------


def synthetic_frames(count: int, height: int, width: int, content: str = "pan"):
    """``uint8 [count, height, width, 3]``: ``pan``, the sample landscape (pipelines.sample_image)
    scaled to the height and panned 4 px a frame (camera motion, as a real clip has); ``noise``,
    uniform random pixels (minterpolate's motion search finds nothing to follow)."""
    import numpy as np

    if content == "noise":
        return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    from PIL import Image

    from pipelines.sample_image import draw_sample_image

    step = 4
    wide = np.asarray(draw_sample_image().resize((width + step * (count - 1), height), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(np.stack([wide[:, step * i: step * i + width] for i in range(count)]))


def time_retime(frames, *, duration_s: float, output_fps: int, modes=("blend", "mci"), repeat: int = 1) -> dict:
    """Seconds of ``retime`` per mode on these frames (median of ``repeat``; modes interleaved)."""
    from pipelines.interpolate import retime

    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    output_frames, made = None, True
    for _ in range(repeat):
        for mode in modes:
            start = time.perf_counter()
            out = retime(frames, duration_s=duration_s, output_fps=output_fps, mode=mode)
            runs[mode].append(time.perf_counter() - start)
            output_frames, made = len(out), out is not frames  # the input itself: already at that rate
    count, height, width, _ = frames.shape
    seconds = {mode: statistics.median(values) for mode, values in runs.items()}
    return {
        "input": {"frames": count, "height": height, "width": width},
        "duration_s": duration_s, "output_fps": output_fps, "output_frames": output_frames,
        "frames_made": made, "seconds": seconds, "seconds_runs": runs,
        "mci_over_blend": seconds["mci"] / seconds["blend"] if made and {"mci", "blend"} <= set(seconds) else None,
    }


def retime_benchmark(args) -> dict:
    """``--retime``: retime blend and mci, then the H.264 encode of the output, no model."""
    from pipelines.video import encode_video

    frames = synthetic_frames(args.frames, args.height, args.width, args.retime_content)
    figures = time_retime(frames, duration_s=args.duration, output_fps=args.output_fps, repeat=args.repeat)
    from pipelines.interpolate import retime

    out = retime(frames, duration_s=args.duration, output_fps=args.output_fps, mode="blend")
    encode_runs, size = [], 0
    for _ in range(args.repeat):
        start = time.perf_counter()
        size = len(encode_video(out, fps=args.output_fps, output_format="mp4"))
        encode_runs.append(time.perf_counter() - start)
    figures.update(content=args.retime_content, encode_seconds=statistics.median(encode_runs),
                   encode_seconds_runs=encode_runs, encode_bytes=size, repeat=args.repeat)
    return figures


def print_retime(r: dict) -> None:
    i = r["input"]
    content = {"pan": "the sample landscape panning 4 px/frame", "noise": "uniform noise"}[r["content"]]
    print(f"retime (pipelines.interpolate.retime, ffmpeg minterpolate) on {r['device_name']}")
    print(f"  {i['frames']} frames {i['width']}x{i['height']} ({content}) spanning {r['duration_s']:g} s "
          f"-> {r['output_frames']} frames at {r['output_fps']} fps; median of {r['repeat']}, {r['date']}")
    for mode, seconds in r["seconds"].items():
        values = r["seconds_runs"][mode]
        spread = f"  (min {min(values):.3f}, max {max(values):.3f})" if len(values) > 1 else ""
        print(f"  {mode:<6} {seconds:9.3f} s{spread}")
    if r["mci_over_blend"]:
        print(f"  mci / blend: {r['mci_over_blend']:.1f}x")
    print(f"  then H.264 encode of the {r['output_frames']} (blend) frames (pipelines.video.encode_video, mp4): "
          f"{r['encode_seconds']:.3f} s, {r['encode_bytes']:,} B")


# -- the runs of one invocation side by side ---------------------------------------------------------

LABELS = {"image_to_video": "image-to-video", "text_to_video": "text-to-video", "long_clip": "long clip"}


def comparisons(runs: dict, one_pass: str) -> dict:
    """Ratios between the runs of one invocation (None where a run is missing)."""
    i2v, t2v, long = runs.get("image_to_video"), runs.get("text_to_video"), runs.get("long_clip")
    out: dict = {}
    if t2v is not None:
        t2i = t2v["stage_seconds"].get("text_to_image", 0.0)
        out["text_to_video_over_image_to_video"] = t2v["total_seconds"] / i2v["total_seconds"]
        out["text_to_image_share_of_text_to_video"] = t2i / t2v["total_seconds"]
    if long is not None:
        base = runs[one_pass]
        out["long_clip_one_pass"] = one_pass
        out["long_clip_over_one_pass"] = long["total_seconds"] / base["total_seconds"]
        out["long_clip_over_one_pass_per_stage"] = {
            stage: long["stage_seconds"][stage] / base["stage_seconds"][stage]
            for stage in long["stage_seconds"] if base["stage_seconds"].get(stage)
        }
        micro = long.get("retime_modes")
        if micro:
            out["retime_mci_over_blend"] = micro["mci_over_blend"]  # None when no frame was made
    return out


def print_side_by_side(runs: dict, ratios: dict, order=()) -> None:
    names = list(runs)
    stages = []
    for name in names:
        stages += [s for s in runs[name]["stage_seconds"] if s not in stages]
    stages.sort(key=lambda stage: list(order).index(stage) if stage in order else len(order))
    print("side by side (median seconds per stage, runs interleaved in one process):")
    header = "".join(f"{LABELS.get(n, n):>16}" for n in names)
    print(f"  {'stage':<16}{header}")
    for stage in stages:
        cells = "".join(f"{runs[n]['stage_seconds'][stage]:16.3f}" if stage in runs[n]['stage_seconds']
                        else f"{'-':>16}" for n in names)
        print(f"  {stage:<16}{cells}")
    print(f"  {'total':<16}" + "".join(f"{runs[n]['total_seconds']:16.3f}" for n in names))
    print(f"  {'segments':<16}" + "".join(f"{runs[n]['num_segments']:16d}" for n in names))
    print(f"  {'frames gen/out':<16}" + "".join(
        f"{str(runs[n]['generated_frames']) + '/' + str(runs[n]['output_frames']):>16}" for n in names))
    if "text_to_video_over_image_to_video" in ratios:
        t2v = runs["text_to_video"]
        print(f"  text-to-video / image-to-video, total: {ratios['text_to_video_over_image_to_video']:.2f}x "
              f"(text_to_image {t2v['stage_seconds']['text_to_image']:.3f} s = "
              f"{ratios['text_to_image_share_of_text_to_video']:.0%} of text-to-video)")
    if "long_clip_over_one_pass" in ratios:
        long = runs["long_clip"]
        per_stage = ", ".join(f"{stage} {value:.2f}x"
                              for stage, value in ratios["long_clip_over_one_pass_per_stage"].items())
        print(f"  long clip / one pass ({LABELS[ratios['long_clip_one_pass']]}), total: "
              f"{ratios['long_clip_over_one_pass']:.2f}x ({per_stage})")
        print(f"  long clip: {long['plan']}; {long['output_frames']} frames at {long['output_fps']} fps "
              f"({long['interpolation']})")
        split = long["video_encode_split"]
        if split["retime_seconds"] is not None:
            print(f"  long clip video_encode {long['stage_seconds']['video_encode']:.3f} s = retime "
                  f"({long['interpolation']}) {split['retime_seconds']:.3f} + H.264 encode "
                  f"{split['encode_seconds']:.3f} + join/poster {split['other_seconds']:.3f}")
        micro = long.get("retime_modes")
        if micro and not micro["frames_made"]:
            print("  retime: no frames to make (the generated frames already are at the output rate)")
        elif micro:
            i = micro["input"]
            print(f"  retime of those {i['frames']} frames {i['width']}x{i['height']} -> {micro['output_frames']}: "
                  + ", ".join(f"{mode} {s:.3f} s" for mode, s in micro["seconds"].items())
                  + (f"; mci / blend {micro['mci_over_blend']:.1f}x" if micro["mci_over_blend"] else ""))
