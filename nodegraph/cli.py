"""The `nodegraph` command: run and validate workflows headless, list nodes, and start the other tools.

    nodegraph run WORKFLOW [WORKFLOW ...] [--set NODE.INPUT=VALUE ...]
    nodegraph validate FILE ...
    nodegraph nodes [--json]
    nodegraph serve | demo | lora-info
    nodegraph train-lora --checkpoint NAME --data DIR --output NAME [--steps N | --epochs N]

Every failure ends in one paragraph naming the file, node and input and what to do; the traceback
only with --verbose. Exit status: 0 success, 1 failure, 2 bad command line, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodegraph import cli_train
from nodegraph.cli_report import CliError, Reporter, describe_error, describe_validation, written_files
from nodegraph.engine import Engine, Settings, build_engine
from nodegraph.graph import LoadedWorkflow, WorkflowError, load_workflow
from nodegraph.node import Hidden, InputValueError, Socket
from nodegraph.validate import validate_prompt

# `serve` flags copied into Settings when given (other commands do not define them).
SERVE_SETTINGS = (
    "listen",
    "port",
    "auth_token",
    "api_auth",
    "enable_cors_header",
    "max_upload_size_mb",
    "max_queue_size",
    "front_end_root",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nodegraph` console script and `python -m nodegraph`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # the executor logs each node failure with its traceback; the CLI prints its own paragraph
        logging.getLogger("nodegraph.executor").setLevel(logging.CRITICAL)
    try:
        result: int = args.handler(args)
        return result
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodegraph", description="Run ComfyUI workflows on a node-graph engine."
    )
    parser.set_defaults(verbose=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _command(sub, "run", "run workflow files (API, UI or PNG) in one process", _cmd_run)
    run.add_argument("workflows", nargs="+", type=Path, metavar="WORKFLOW")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
        help="override a widget value before running (repeatable); typed by the node's schema",
    )  # fmt: skip
    check = _command(sub, "validate", "check workflow files without running them", _cmd_validate)
    check.add_argument("workflows", nargs="+", type=Path, metavar="FILE")
    nodes = _command(sub, "nodes", "list the available nodes", _cmd_nodes)
    nodes.add_argument("--json", action="store_true", help="print the full /object_info JSON")
    serve = _command(sub, "serve", "serve ComfyUI's API and canvas", _cmd_serve)
    serve.add_argument("--listen", default="127.0.0.1", help="address(es) to listen on, comma-separated")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--auth-token", default=None, help="require this bearer token from clients")
    serve.add_argument(
        "--api-auth", default=None, metavar="USER:PASSWORD[,...]",
        help="HTTP Basic auth for the A1111 (/sdapi/v1) and OpenAI (/v1/images) routes, as A1111's flag",
    )  # fmt: skip
    serve.add_argument("--enable-cors-header", nargs="?", const="*", default=None, metavar="ORIGIN")
    serve.add_argument("--max-upload-size", dest="max_upload_size_mb", type=float, default=None, metavar="MB")
    serve.add_argument(
        "--max-queue-size", type=int, default=None, metavar="N", help="refuse prompts past N queued"
    )
    serve.add_argument("--front-end-root", type=Path, default=None, help="serve this canvas build instead")
    serve.add_argument(
        "--workers", type=int, default=None, metavar="N", help="run prompts on N Ray workers (local Ray)"
    )
    serve.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="run the workers on this Ray cluster (host:port)"
    )
    demo = _command(sub, "demo", "write the small demo models into the models folders", _cmd_demo)
    demo.add_argument("--force", action="store_true", help="rewrite them even if present")
    demo.add_argument(
        "--sdxl",
        action="store_true",
        help="also write an SDXL-family demo checkpoint, a mini SDXL refiner and two SDXL LoRAs",
    )
    demo.add_argument(
        "--if-no-checkpoint", action="store_true", help="do nothing when models/checkpoints has a checkpoint"
    )
    info = _command(
        sub, "lora-info", "describe LoRA files: format, base model, rank, coverage", _cmd_lora_info
    )
    info.add_argument("files", nargs="+", metavar="FILE_OR_NAME")
    info.add_argument("--json", action="store_true")
    _train_parser(sub)
    return parser


def _command(sub: Any, name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    dirs = parser.add_argument_group("directories (ComfyUI's flags)")
    dirs.add_argument("--base-directory", type=Path, default=None, help="holds models/, input/, output/ ...")
    dirs.add_argument("--output-directory", type=Path, default=None)
    dirs.add_argument("--input-directory", type=Path, default=None)
    dirs.add_argument("--temp-directory", type=Path, default=None)
    dirs.add_argument("--user-directory", type=Path, default=None)
    dirs.add_argument(
        "--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML",
        help="an extra_model_paths.yaml (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--disable-metadata", action="store_true", help="save files without workflow metadata"
    )
    parser.add_argument(
        "--preview-method", choices=("auto", "latent2rgb", "taesd", "none"), default="none",
        help="sampler previews sent while sampling (ComfyUI's flag and default; taesd falls back to "
        "latent2rgb). A client may still ask for them per prompt: the canvas does",
    )  # fmt: skip
    hardware = parser.add_argument_group("device and precision")
    hardware.add_argument(
        "--device",
        default="auto",
        help="where models compute: auto (a GPU if torch has one), cpu, cuda, cuda:N, mps",
    )
    hardware.add_argument(
        "--cpu", action="store_const", const="cpu", dest="device", help="same as --device cpu"
    )
    hardware.add_argument(
        "--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
        help="UNet and text encoder precision: auto = fp16 on a GPU, fp32 on the CPU",
    )  # fmt: skip
    hardware.add_argument("--force-fp32", action="store_const", const="fp32", dest="precision")
    hardware.add_argument("--force-fp16", action="store_const", const="fp16", dest="precision")
    parser.add_argument("--verbose", action="store_true", help="log more, and show tracebacks")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments (flags a command lacks keep their defaults)."""
    settings = Settings(
        output_directory=args.output_directory,
        input_directory=args.input_directory,
        temp_directory=args.temp_directory,
        user_directory=args.user_directory,
        extra_model_paths_config=list(args.extra_model_paths_config),
        disable_metadata=args.disable_metadata,
        preview_method=args.preview_method,
        verbose=args.verbose,
        device=getattr(args, "device", "auto"),
        precision=getattr(args, "precision", "auto"),
    )
    if args.base_directory is not None:
        settings.base_directory = args.base_directory
    for name in SERVE_SETTINGS:
        if getattr(args, name, None) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def node_package() -> Any:
    """The `nodes` package's entry API (all_nodes, register_services, warm_up, device_problem, ...).

    The CLI is the composition root: this is the one arrow from `nodegraph` into `nodes`
    (`tests/engine/test_layers.py`). Imported by name, when a command needs it, because it imports
    torch (and so that `mypy --strict` on the engine does not follow it).
    """
    return importlib.import_module("nodes")


def _engine(args: argparse.Namespace, *, with_nodes: bool = True) -> Engine:
    if with_nodes:
        _check_device(args)
    try:
        if not with_nodes:
            return build_engine(settings_from(args), ())
        package = node_package()
        return build_engine(
            settings_from(args),
            package.all_nodes(),
            services=package.register_services,
            warm_up=package.warm_up,
        )
    except ValueError as exc:  # an unreadable extra_model_paths.yaml
        raise CliError(str(exc)) from exc
    except ImportError as exc:
        if args.verbose:
            raise
        raise CliError(f"the node packages failed to load ({exc}); --verbose shows the traceback") from exc


def _check_device(args: argparse.Namespace) -> None:
    """A device or precision that cannot be had is a startup error, not a failed first prompt."""
    device, precision = getattr(args, "device", "auto"), getattr(args, "precision", "auto")
    if (device, precision) == ("auto", "auto"):
        return
    try:
        package = node_package()
    except ImportError:
        return  # the node packages' own import error is reported when the engine is built
    problem = package.device_problem(device, precision)
    if problem is not None:
        raise CliError(problem)


# --------------------------------------------------------------------------------------------
# run / validate


def _cmd_run(args: argparse.Namespace) -> int:
    engine = _engine(args)
    failures = 0
    for path in args.workflows:
        try:
            _run_one(engine, path, args.overrides, args.verbose)
        except CliError as exc:
            # every error names its file: with several files, "node 3 failed" alone is ambiguous
            message = str(exc)
            print(
                f"error: {message if message.startswith(str(path)) else f'{path}: {message}'}",
                file=sys.stderr,
            )
            failures += 1
    if failures and len(args.workflows) > 1:
        print(f"{failures} of {len(args.workflows)} workflows failed", file=sys.stderr)
    return 1 if failures else 0


def _run_one(engine: Engine, path: Path, overrides: list[str], verbose: bool) -> None:
    loaded = _load(engine, path)
    apply_overrides(engine, loaded.prompt, overrides)
    checked = validate_prompt(loaded.prompt, engine.registry, engine.env)
    problems = describe_validation(checked, loaded.prompt)
    if problems:
        raise CliError(f"{path} is not valid:\n" + "\n".join(f"  {line}" for line in problems))
    assert checked.graph is not None  # no problems: some output is valid
    extra = {"extra_pnginfo": {"workflow": loaded.workflow}} if loaded.workflow is not None else {}
    reporter = Reporter(verbose, source=path.name)
    started = time.perf_counter()
    try:
        outcome = engine.executor.execute(
            checked.graph, path.name, reporter, extra_data=extra, outputs=checked.outputs
        )
    finally:
        reporter.close()
    if outcome.error is not None:
        raise CliError(f"{path}: {describe_error(outcome.error, verbose)}")
    ran = {n: ui for n, ui in outcome.outputs.items() if n in outcome.executed}
    for written in written_files(ran, engine.env.folders):
        print(written)
    elapsed = time.perf_counter() - started
    note = "" if ran else " (outputs unchanged since an earlier run: nothing new written)"
    summary = f"{len(outcome.executed)} node(s) ran, {len(outcome.cached)} cached, {elapsed:.1f} s"
    print(f"{path.name}: {summary}{note}", file=sys.stderr)


def _load(engine: Engine, path: Path) -> LoadedWorkflow:
    try:
        return load_workflow(path, engine.registry)
    except WorkflowError as exc:
        raise CliError(str(exc)) from exc


def apply_overrides(engine: Engine, prompt: dict[str, Any], overrides: list[str]) -> None:
    """Apply `--set NODE_ID.INPUT=VALUE` overrides, typing each value by the node's input schema."""
    for spec in overrides:
        target, eq, raw = spec.partition("=")
        node_id, dot, name = target.rpartition(".")
        if not eq or not dot:
            raise CliError(f"--set {spec!r}: write NODE_ID.INPUT=VALUE, e.g. --set 3.seed=42")
        node = prompt.get(node_id)
        if node is None:
            raise CliError(
                f"--set {spec!r}: the workflow has no node '{node_id}' (its nodes: {', '.join(prompt)})"
            )
        cls = engine.registry.get(node.get("class_type", ""))
        inp = cls.input(name) if cls is not None else None
        if cls is None or inp is None or isinstance(inp, Hidden):
            known = ", ".join(i.name for i in cls.INPUTS if not isinstance(i, Hidden)) if cls else "none"
            raise CliError(f"--set {spec!r}: node '{node_id}' has no input '{name}' (its inputs: {known})")
        if isinstance(inp, Socket):
            raise CliError(f"--set {spec!r}: '{name}' of node '{node_id}' is a {inp.type} link, not a value")
        try:
            node.setdefault("inputs", {})[name] = inp.coerce(raw, engine.env)
        except InputValueError as exc:
            raise CliError(f"--set {spec!r}: {exc}") from exc


def _cmd_validate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    failures = 0
    for path in args.workflows:
        try:
            loaded = _load(engine, path)
        except CliError as exc:
            print(f"{path}: {exc}")
            failures += 1
            continue
        checked = validate_prompt(loaded.prompt, engine.registry, engine.env)
        problems = describe_validation(checked, loaded.prompt)
        if problems:
            failures += 1
            print(f"{path}: {len(problems)} error(s)")
            print("\n".join(f"  {line}" for line in problems))
        else:
            print(f"{path}: ok ({loaded.format} format, {len(checked.outputs)} output node(s))")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# nodes / serve / demo / lora-info


def _cmd_nodes(args: argparse.Namespace) -> int:
    engine = _engine(args)
    if args.json:
        print(json.dumps(engine.registry.object_info(engine.env), indent=2))
        return 0
    for cls in sorted(engine.registry, key=lambda c: (c.CATEGORY, c.NODE_ID)):
        print(f"{cls.NODE_ID:32} {cls.DISPLAY_NAME or cls.NODE_ID:36} [{cls.CATEGORY}]")
    return 0


def _missing(module: str, exc: ModuleNotFoundError, what: str) -> CliError:
    if exc.name and module.startswith(exc.name):
        return CliError(f"{what} is not available in this installation ({module} is missing)")
    raise exc  # a dependency of that module is missing: show the real import error


def _cmd_serve(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        serve = importlib.import_module("nodegraph.server").serve
    except ModuleNotFoundError as exc:
        raise _missing("nodegraph.server", exc, "the server") from exc
    workers = None
    if args.workers is not None or args.ray_address is not None:
        workers = _ray_workers(engine, args.workers, args.ray_address)
    serve(engine, workers)
    return 0


def worker_engine(settings: Settings) -> Engine:
    """The engine each Ray worker builds for itself (every node nodegraph ships)."""
    package = node_package()
    return build_engine(
        settings, package.all_nodes(), services=package.register_services, warm_up=package.warm_up
    )


def _ray_workers(engine: Engine, count: int | None, address: str | None) -> Any:
    """Start or join Ray and return the worker factory for the server (imports Ray only here)."""
    if count is not None and count < 1:
        raise CliError("--workers must be at least 1")
    try:
        pool = importlib.import_module("nodegraph.server.ray_pool")
    except ModuleNotFoundError as exc:
        raise CliError(f"--workers needs Ray: pip install 'nodegraph[ray]' ({exc})") from exc
    try:
        pool.start_ray(address, count or 1)
    except pool.RayStartError as exc:
        raise CliError(str(exc)) from exc
    if count is None:  # on a cluster: one worker per GPU it has, else one
        count = max(1, int(pool.ray.cluster_resources().get("GPU", 0)))
    return pool.worker_factory(engine, worker_engine, count)


def _cmd_demo(args: argparse.Namespace) -> int:
    engine = _engine(args, with_nodes=False)
    try:
        write_demo_models = node_package().write_demo_models
    except ModuleNotFoundError as exc:
        raise _missing("nodes", exc, "the demo model writer") from exc
    checkpoints = engine.env.folders.list("checkpoints")
    if args.if_no_checkpoint and checkpoints and not args.force:
        print(f"nodegraph demo: {len(checkpoints)} checkpoint(s) present, demo models not written")
        return 0
    write_demo_models(engine.env.folders, force=args.force, sdxl=args.sdxl)
    return 0


def _cmd_lora_info(args: argparse.Namespace) -> int:
    engine = _engine(args, with_nodes=False)
    try:
        describe = node_package().describe_lora_files
    except ModuleNotFoundError as exc:
        raise _missing("nodes", exc, "lora-info") from exc
    return int(describe(args.files, engine.env.folders, args.json))


# --------------------------------------------------------------------------------------------
# train-lora


def _train_parser(sub: Any) -> None:
    train = _command(
        sub, "train-lora", "train an SD1.x or SDXL LoRA on a kohya folder (10_name/ with images + .txt)",
        _cmd_train_lora,
    )  # fmt: skip
    cli_train.add_arguments(train)


def _cmd_train_lora(args: argparse.Namespace) -> int:
    """Bad input (a missing file, a bad folder, an existing output) is one paragraph, exit 1."""
    if getattr(args, "precision", "auto") not in ("auto", "fp32"):
        raise CliError(
            f"train-lora keeps the model in fp32; --precision {args.precision} is not supported "
            "(use --mixed_precision fp16 or bf16 to compute in half precision)"
        )
    _check_device(args)
    try:
        written = cli_train.train_lora(args, _engine(args, with_nodes=False), node_package().training())
    except ModuleNotFoundError as exc:
        raise _missing("nodes.train", exc, "train-lora") from exc
    for path in written:
        print(path)
    return 0
