"""A tiny random-weight SDXL text-to-image pipeline, built offline from the real classes.

It has the shape of ``stabilityai/stable-diffusion-xl-base-1.0``, so it exercises every code path
of the real model: two CLIP text encoders (the first's penultimate hidden states, the second's
hidden states plus its pooled projection), a U-Net with ``addition_embed_type="text_time"`` whose
cross-attention width is the sum of both encoders' widths, a four-level VAE with 8x downsampling
and SDXL's ``force_upcast``/``scaling_factor``, and SDXL-base's own Euler scheduler config. A 64x64
image with 4 steps takes a few tens of milliseconds on a CPU; the saved model is about 4 MB. It is
generated on demand and never committed.

The tokenizers are built here, with no download: a byte-level BPE like CLIP's, whose vocabulary
is the 256 byte symbols and their end-of-word ("</w>") forms, so any Unicode prompt tokenizes,
plus merges learned from :data:`_COMMON_WORDS` so that ordinary prompts take a few tokens per
word rather than one per letter (a long prompt then really does exceed the 77-token context).
transformers 5 builds ``CLIPTokenizer`` (a fast tokenizer) straight from the vocabulary and merge
list, and ``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

#: The scheduler_config.json shipped with stabilityai/stable-diffusion-xl-base-1.0.
SDXL_BASE_SCHEDULER_CONFIG: dict = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words the merges are learned from: the vocabulary of typical text-to-video prompts.
_COMMON_WORDS = """
a an the of and or in on at to from with without over under above below into through by for as is
are its this that it his her their very
cat cats dog dogs bird birds horse fish fox wolf bear lion tiger rabbit deer whale dolphin butterfly
man woman person people child girl boy astronaut robot dragon knight car train boat ship plane
rocket bicycle city street road bridge house castle tower forest tree trees flower flowers garden
field grass mountain mountains hill river lake ocean sea beach wave waves island desert snow rain
storm cloud clouds sky sun sunset sunrise moon star stars night day morning evening light lights
fire water smoke fog mist ice space planet galaxy
red orange yellow green blue purple pink white black golden silver dark bright colorful
beautiful detailed realistic cinematic photo photograph portrait landscape painting illustration
style art digital render lighting shot camera close wide aerial view slow motion high quality
resolution masterpiece sharp focus blurry blur ugly low bad deformed lowres watermark text
walking running flying swimming dancing sitting standing falling moving floating burning glowing
old young small big large tall little long vintage modern futuristic ancient epic magical
""".split()
_MAX_MERGES = 600


def bytes_to_unicode() -> list[str]:
    """The printable symbol of each byte 0..255, as in GPT-2 and CLIP's byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, int] = {byte: byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = 256 + shifted  # unprintable bytes move to unused code points
            shifted += 1
    return [chr(symbols[byte]) for byte in range(256)]


def build_bpe_vocabulary(
    words=_COMMON_WORDS, max_merges: int = _MAX_MERGES
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary and merge list, learned from ``words``.

    Ids: the 256 byte symbols, their 256 end-of-word forms, one token per merge, then the start
    and end tokens (last, as in CLIP). Deterministic: ties between pairs are broken by the pair.
    """
    symbols = bytes_to_unicode()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    # Words are ASCII, so their characters are their own byte symbols; the last one ends the word.
    split = Counter(tuple([*word[:-1], word[-1] + "</w>"]) for word in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter = Counter()
        for parts, count in split.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        split = Counter({_merge(parts, best): count for parts, count in split.items()})
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def _merge(parts: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(parts):
        if index + 1 < len(parts) and (parts[index], parts[index + 1]) == pair:
            merged.append(parts[index] + parts[index + 1])
            index += 2
        else:
            merged.append(parts[index])
            index += 1
    return tuple(merged)


def build_tiny_tokenizer(*, pad_token: str = EOS_TOKEN):
    """A ``CLIPTokenizer`` over :func:`build_bpe_vocabulary` (SDXL's second tokenizer pads with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH)


def build_tiny_text_to_image_pipeline(seed: int = 0):
    """Return a ``StableDiffusionXLPipeline`` with small random weights (fp32, CPU)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")
    # 1. Two text encoders of different widths, so a mix-up of the two would fail loudly.
    widths, projection_dim = (32, 64), 32
    text_configs = [
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,  # SDXL reads the penultimate layer's hidden states
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act=act,  # SDXL: CLIP ViT-L (quick_gelu), then OpenCLIP bigG (gelu)
            projection_dim=projection_dim,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,  # the pooled output is taken at the first EOS token
            pad_token_id=tok.pad_token_id,
        )
        for tok, width, act in ((tokenizer, widths[0], "quick_gelu"), (tokenizer_2, widths[1], "gelu"))
    ]
    text_encoder = CLIPTextModel(text_configs[0])
    text_encoder_2 = CLIPTextModelWithProjection(text_configs[1])

    # 2. The U-Net: SDXL's block layout on two levels, conditioned on both encoders (cross-attention
    # width = sum of their widths) and on the added "text_time" embedding (6 time ids + pooled text).
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,  # default 64x64 image
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),  # a tuple, as SDXL's (1, 2, 10)
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(widths),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
    )
    # 3. Four levels, as SDXL's VAE: the latent is 1/8 of the image (fewer levels is far slower).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        norm_num_groups=8,
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's VAE
        force_upcast=True,  # as SDXL's: its fp16 VAE overflows, diffusers decodes it in fp32
    )
    scheduler = EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as SDXL base
    )


def write_tiny_text_to_image_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny SDXL pipeline in diffusers' ``save_pretrained`` layout (safetensors); return the path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_text_to_image_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
