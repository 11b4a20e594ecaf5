"""The command: ``python -m braintumor.serving.app``.

    python -m braintumor.serving.app                                  # the registry's champion
    python -m braintumor.serving.app --model models/bundle --port 7860
    python -m braintumor.serving.app --host 0.0.0.0 --auth-file /etc/braintumor/users

Checks the options (a non-loopback address needs a login file, private to its owner)
and claims the app's locked upload folder before anything loads; then loads the model,
builds the page and serves it until Ctrl-C or SIGTERM, deleting the upload folder on the
way out. The package's other modules say what each part guards: ``login``, ``uploads``,
``server``, ``handlers``, ``page``, ``examples``, ``memory`` (``__main__`` caps malloc's
arenas before anything starts a thread).

Serving layer: imports ``serving`` and the core, never a stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from braintumor.serving.app.examples import find_examples, usable_examples
from braintumor.serving.app.login import AUTH_ENV, resolve_auth
from braintumor.serving.app.page import build_app
from braintumor.serving.app.server import serve
from braintumor.serving.app.uploads import TEMP_ENV, claim_upload_folder, default_temp_root
from braintumor.serving.bundle import RUNTIME_CHOICES
from braintumor.serving.predictor import Predictor, SetupError, open_model

LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m braintumor.serving.app", description="Serve the classifier as a web app."
    )
    parser.add_argument(
        "--model",
        help="a bundle folder or models:/<name>@<alias> (default: the registry's champion)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; any but loopback needs --auth-file",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--examples", type=Path, nargs="*", help="example images (default: test images)"
    )
    parser.add_argument("--no-warm-up", action="store_true", help="skip tracing at start")
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="auto",
        help="auto: the bundle's exported model (LiteRT) when it has one, else Keras",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=Path(os.environ[AUTH_ENV]) if os.environ.get(AUTH_ENV) else None,
        help=f"require a login: a file of user:password lines, mode 600 (default: ${AUTH_ENV})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="analyses that may wait in the queue; more are refused (queue full)",
    )
    parser.add_argument(
        "--temp-dir",
        type=Path,
        help=f"folder for the runs' upload folders (default: ${TEMP_ENV} or "
        "<tmp>/braintumor-app-<uid>)",
    )
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.max_queue < 1:
            raise SetupError(f"--max-queue {args.max_queue}: must be at least 1")
        logins = resolve_auth(args.host, args.auth_file)
        folder = claim_upload_folder(args.temp_dir or default_temp_root())
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # SIGTERM ends the app like Ctrl-C, so the upload folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _serve_until_stopped(args, logins, folder.path)
    except KeyboardInterrupt:
        return 0
    finally:
        folder.remove()


def _serve_until_stopped(
    args: argparse.Namespace, logins: Callable[[str, str], bool] | None, folder: Path
) -> int:
    """Load the model, build and launch the app with ``folder`` as gradio's temp folder,
    and block until interrupted."""
    # Gradio reads these when it makes components: set before building the app.
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    # Offline: no analytics, no version check, no Hugging Face telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config, bundle = open_model(args.params, args.model, args.runtime)
    except SetupError as error:
        LOGGER.error("error: %s", error)
        return 1
    predictor = Predictor(bundle, config.settings)
    if not args.no_warm_up:
        predictor.warm_up()
    if args.examples is not None:
        candidates = list(args.examples)
    else:
        candidates = find_examples(
            4 * config.settings.examples + 8, predictor.classes, params=config.params
        )
    examples = usable_examples(predictor, candidates, config.settings.examples)
    page = build_app(predictor, examples=examples, upload_folder=folder)
    local_url = serve(
        page,
        host=args.host,
        port=args.port,
        logins=logins,
        max_queue=args.max_queue,
        max_file_size=2 * config.settings.max_upload_bytes,
    )
    LOGGER.info("model: %s; uploads kept in %s", predictor.describe(), folder)
    LOGGER.info(
        "login %s; queue: 1 analysis at a time, at most %d waiting",
        "required" if logins else "not required (loopback)",
        args.max_queue,
    )
    print(f"Running on local URL: {local_url}", flush=True)
    try:
        page.blocks.block_thread()
    finally:
        page.blocks.close()
    return 0
