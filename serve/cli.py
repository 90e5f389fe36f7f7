"""``svd-serve``: the command line.

Subcommands import what they need lazily, so ``svd-serve generate`` never starts Ray and a typo
in the arguments answers at once. Every expected failure prints one line to stderr and exits
non-zero; only bugs produce a traceback.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

EXIT_FAILED = 1


class CLIError(Exception):
    """An expected failure: printed as one line, exit status EXIT_FAILED."""


# -- generation parameters as options, derived from the one pydantic model ------------------------


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    from pipelines.params import GenerationParams

    group = parser.add_argument_group("generation parameters")
    for name, field in GenerationParams.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if field.alias:
            flags.append(f"--{field.alias.replace('_', '-')}")
        annotation = field.annotation
        choices = None
        args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        base = args[0]
        if typing.get_origin(base) is typing.Literal:
            choices, kind = list(typing.get_args(base)), str
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            choices, kind = [member.value for member in base], str
        else:
            kind = base if base in (int, float) else str
        default = "" if field.default is None else f" (default: {getattr(field.default, 'value', field.default)})"
        group.add_argument(*flags, dest=name, type=kind, choices=choices, default=None,
                           help=f"{field.description}{default}")


def _params_from_args(args: argparse.Namespace, **overrides: Any):
    from pydantic import ValidationError

    from pipelines.params import GenerationParams, describe_validation_error

    values = {
        name: getattr(args, name) for name in GenerationParams.model_fields if getattr(args, name, None) is not None
    }
    values.update({k: v for k, v in overrides.items() if k not in values})
    try:
        return GenerationParams.model_validate(values)
    except ValidationError as error:
        raise CLIError(describe_validation_error(error)) from None


# -- subcommands ---------------------------------------------------------------------------------


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipelines.tiny import write_tiny_model

    start = time.perf_counter()
    if args.text_to_image:
        from pipelines.tiny_t2i import write_tiny_text_to_image_model

        path = write_tiny_text_to_image_model(args.directory, seed=args.seed)
        print(f"wrote tiny random-weight SDXL-shaped text-to-image model to {path} in "
              f"{time.perf_counter() - start:.1f}s")
        return 0
    if args.lora_for:
        from pipelines.adapters import write_tiny_lora
        from pipelines.loader import ModelSpec, load_components

        base = load_components(ModelSpec(source=args.lora_for, dtype="fp32", device="cpu"), ("unet",))["unet"]
        path = write_tiny_lora(base, args.directory, seed=args.seed)
        print(f"wrote a random LoRA adapter for the U-Net of {args.lora_for} to {path} (register it with: svd-serve "
              f"models add NAME --base MODEL --lora {path})")
        return 0
    path = write_tiny_model(args.directory, seed=args.seed)
    print(f"wrote tiny random-weight SVD to {path} in {time.perf_counter() - start:.1f}s")
    return 0


def _infer_format(out: Path) -> str | None:
    suffix = out.suffix.lower().lstrip(".")
    return suffix if suffix in {"mp4", "webm", "gif"} else None


def _prepare_out(out: Path) -> None:
    """Fail before the model loads, not after minutes of sampling, when --out cannot be written."""
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file name such as {out / 'clip.mp4'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CLIError(f"--out {out}: cannot create the folder {out.parent}: {error.strerror or error}") from None


def _default_dtype(device: str) -> str:
    """fp16 on a GPU; fp32 on CPU, which the loader would otherwise fall back to with a warning line."""
    if device == "cpu":
        return "fp32"
    if device == "auto":
        import torch

        return "fp16" if torch.cuda.is_available() else "fp32"
    return "fp16"


def _model_spec(args: argparse.Namespace, *, source: str | None = None):
    from pydantic import ValidationError

    from pipelines.loader import ModelSpec  # light: torch and diffusers are imported only when loading

    try:
        dtype = args.dtype or _default_dtype(args.device)
        return ModelSpec(source=source or args.model, dtype=dtype, device=args.device)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            field = str(item["loc"][-1]) if item.get("loc") else ""
            if field == "device":
                problems.append(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
            else:
                option = "--model" if field == "source" else f"--{field.replace('_', '-')}"
                problems.append(f"{option}: {str(item['msg']).removeprefix('Value error, ')}")
        raise CLIError("; ".join(problems)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.images import load_image_source

    out = Path(args.out)
    fmt = _infer_format(out)
    if fmt is None and args.output_format is None:
        raise CLIError(f"--out {out}: use a .mp4, .webm or .gif file name (or pass --output-format)")
    params = _params_from_args(args, output_format=fmt)
    if fmt is not None and params.output_format.value != fmt:
        raise CLIError(f"--out {out} does not match --output-format {params.output_format.value}")
    if (args.image is None) == (params.prompt is None):
        raise CLIError("give --image (image-to-video) or --prompt (text-to-video), exactly one")
    image = load_image_source(args.image) if args.image is not None else None  # fails fast, before loading
    spec = _model_spec(args)
    text_spec = _model_spec(args, source=args.text_to_image_model) if params.prompt is not None else None
    _prepare_out(out)

    # Heavy imports (torch, diffusers, transformers) only once the inputs are known to be good.
    from pipelines.loader import load_pipeline
    from pipelines.staged import StagedPipeline
    from pipelines.text_to_image import load_text_to_image

    start = time.perf_counter()
    text_to_image = load_text_to_image(text_spec) if text_spec is not None else None
    pipeline = StagedPipeline(load_pipeline(spec), text_to_image=text_to_image)
    load_seconds = time.perf_counter() - start

    progress = _progress_bar(enabled=not args.quiet)
    try:
        result = pipeline(image, params, on_step=progress.update)
    finally:
        progress.close()
    try:
        out.write_bytes(result.video.data)
    except OSError as error:
        raise CLIError(f"--out {out}: cannot write the clip: {error.strerror or error}") from None
    print(f"{out}: {result.summary()}, model load {load_seconds:.1f}s")
    return 0


class _progress_bar:
    def __init__(self, *, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_up(args: argparse.Namespace) -> int:
    from .up import up

    return up(model=args.model, config_file=args.config, host=args.host, port=args.port, data_dir=args.data_dir,
              num_cpus=args.num_cpus, num_gpus=args.num_gpus, dashboard=args.dashboard,
              dashboard_port=args.dashboard_port, metrics_port=args.metrics_port)


def cmd_deploy(args: argparse.Namespace) -> int:
    from .deploy import deploy, show

    if args.show:
        if args.config is not None or args.address:
            raise CLIError("--show prints the config a local svd-serve up runs: give no CONFIG and no --address")
        return show(data_dir=args.data_dir)
    if args.config is None:
        raise CLIError("give the CONFIG to apply (an app config or a Serve config), or --show")
    if args.timeout <= 0:
        raise CLIError(f"--timeout must be positive, not {args.timeout:g}")
    return deploy(args.config, data_dir=args.data_dir, address=args.address, app_name=args.app, wait=not args.no_wait,
                  timeout_s=args.timeout, force=args.force)


# -- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-serve", description="Stable Video Diffusion serving on Ray Serve.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write a tiny random-weight SVD for offline tests and demos")
    tiny.add_argument("directory", help="output directory (diffusers save_pretrained layout)")
    tiny.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument("--text-to-image", action="store_true",
                      help="write the tiny SDXL-shaped text-to-image model instead (text-to-video's first frame)")
    kind.add_argument("--lora-for", metavar="MODEL_DIR", default=None,
                      help="write a random PEFT LoRA adapter for that model's U-Net instead (the model zoo's demo)")
    tiny.set_defaults(handler=cmd_tiny_model)

    generate = commands.add_parser("generate", help="generate one clip in this process (no Ray)")
    generate.add_argument("--model", default=None,
                          help="Hugging Face repo id, local directory or s3://bucket/prefix "
                               "(default: stabilityai/stable-video-diffusion-img2vid-xt-1-1)")
    generate.add_argument("--image", default=None, help="conditioning image: a file path or an http(s) URL "
                          "(or --prompt without an image: text-to-video)")
    from pipelines.loader.spec import DEFAULT_TEXT_TO_IMAGE_MODEL_ID

    generate.add_argument("--text-to-image-model", default=DEFAULT_TEXT_TO_IMAGE_MODEL_ID,
                          help="text-to-video's first frame: a diffusers text-to-image pipeline, as --model "
                               f"(default: {DEFAULT_TEXT_TO_IMAGE_MODEL_ID})")
    generate.add_argument("--out", required=True, help="output file: .mp4, .webm or .gif")
    generate.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                          help="model dtype (default: fp16 on a GPU, fp32 on CPU)")
    generate.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_generation_options(generate)
    generate.set_defaults(handler=cmd_generate)

    run = commands.add_parser("up", help="start a local single-node deployment and wait until it is ready")
    run.add_argument("--model", default=None,
                     help="Hugging Face repo id, local directory or s3://bucket/prefix (default: the tiny offline model)")
    run.add_argument("--config", default=None, help="application config YAML (serve.config.AppConfig fields)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    run.add_argument("--data-dir", default="data", help="outputs, job store and tenants file (default: ./data)")
    run.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for Ray (default: max(8, cores))")
    run.add_argument("--num-gpus", type=int, default=None, help="GPUs for Ray (default: detected)")
    run.add_argument("--dashboard", action="store_true",
                     help="also start Ray's dashboard (about 900 MB more), so Ray's `serve deploy` and `serve status` "
                          "work against it; svd-serve deploy works without it")
    run.add_argument("--dashboard-port", type=int, default=8265, help="the dashboard's port (default: 8265)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics on this port (a fixed scrape target; default: a port Ray picks)")
    run.set_defaults(handler=cmd_up)

    from .deploy import DEFAULT_TIMEOUT_S

    deploy = commands.add_parser(
        "deploy", help="apply a changed config to the running deployment in place (no restart of Ray)",
        description="Apply CONFIG (an app config, as `svd-serve up --config` takes, or a Serve config with "
                    "applications:) to the running application, the way Ray's `serve deploy` does, then wait "
                    "until it is RUNNING again. Replicas are replaced batch by batch; each stopping replica finishes "
                    "its work first (docs/operations.md#upgrades-that-fail-no-job).")
    deploy.add_argument("config", nargs="?", default=None, help="the YAML to apply")
    deploy.add_argument("--data-dir", default="data",
                        help="the data dir of the svd-serve up to change (default: ./data)")
    deploy.add_argument("--address", default=None,
                        help="a Ray cluster's address (host:port of its GCS) instead of a local svd-serve up")
    deploy.add_argument("--app", default=None,
                        help="the Serve application to change (default: the one svd-serve up runs, 'svd')")
    deploy.add_argument("--no-wait", action="store_true", help="return once the controller took the config")
    deploy.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"most seconds to wait for the application to be RUNNING (default: {DEFAULT_TIMEOUT_S:g})")
    deploy.add_argument("--force", action="store_true",
                        help="apply even if the config moves the job store, the outputs or the tenants file")
    deploy.add_argument("--show", action="store_true",
                        help="print the app config the local deployment runs (to edit and apply), and exit")
    deploy.set_defaults(handler=cmd_deploy)
    from .tenants.admin import register as register_tenants  # svd-serve tenants ...
    register_tenants(commands)
    from .zoo.admin import register as register_models  # svd-serve models ...
    register_models(commands)
    from .client.cli import register as register_client  # svd-serve client ...
    register_client(commands)
    from loadtest.capacity_cli import register as register_capacity  # svd-serve capacity ...
    register_capacity(commands)
    from .warm_cache import register as register_warm_cache  # svd-serve warm-cache ...
    register_warm_cache(commands)

    # Listed here for --help; main() hands its arguments to the load tester, which parses its own.
    commands.add_parser("loadtest", add_help=False, help="run a Locust load profile headless against a URL")
    return parser


def cmd_loadtest(argv: Sequence[str]) -> int:
    from loadtest.run import run  # imported lazily: Locust patches the process with gevent

    return run(list(argv), prog="svd-serve loadtest")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        return cmd_loadtest(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.model is None:
        from pipelines.loader import DEFAULT_MODEL_ID

        args.model = DEFAULT_MODEL_ID
    from pipelines.errors import SVDServeError

    # transformers logs, once per process, that torchvision is missing and it falls back to the PIL
    # CLIPImageProcessor (the one SVD uses anyway); that line would turn every one-line error into two.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except (CLIError, SVDServeError) as error:
        print(f"svd-serve {args.command}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"svd-serve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
