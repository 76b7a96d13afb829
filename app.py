"""DUET-Viz entry point: load a checkpoint (LLaVA, Video-LLaVA or Qwen2.5-VL) once, build the UI, serve it (or, with
``--traces DIR``, serve the trace browser over a folder of traces, with no model)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from duet_viz.browser import Browser, build_browser
from duet_viz.limits import Limits, UploadSpace, launch_options
from duet_viz.page import CSS, build_demo
from duet_viz.traces import TraceError, scan_folder
from duet_viz.ui import App
from model.engine import DuetLlava

# Hub checkpoints a public deployment may load (LLaVA-1.5 family, Video-LLaVA; HF conversions;
# Qwen2.5-VL, stock transformers classes); any local folder is allowed too. Nothing is ever loaded
# with trust_remote_code.
ALLOWED_HUB_MODELS = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "LanguageBind/Video-LLaVA-7B-hf",
                      "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")


def resolve_model(name: str | None) -> str | None:
    """None (the shipped model), a local checkpoint folder, or an allow-listed hub id."""
    if name is None or (Path(name) / "config.json").is_file() or name in ALLOWED_HUB_MODELS:
        return name
    raise SystemExit(f"error: model {name!r} is neither a local checkpoint folder nor one of the allowed hub models: "
                     f"{', '.join(ALLOWED_HUB_MODELS)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DUET-Viz: see what DUET-VLM keeps, layer by layer")
    parser.add_argument("--model", default=os.environ.get("DUET_MODEL"),
                        help="checkpoint folder or allow-listed hub id (default: $DUET_MODEL or the shipped model)")
    parser.add_argument("--device", default=os.environ.get("DUET_DEVICE", "auto"), help="auto, cpu or cuda")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    # On ZeroGPU a GPU exists only inside a request, so examples cannot run at start-up there.
    zero_gpu = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
    parser.add_argument("--cache-examples", choices=("eager", "lazy"),
                        default=os.environ.get("DUET_CACHE_EXAMPLES", "lazy" if zero_gpu else "eager"),
                        help="run the examples at start-up in the background (eager) or on first click (lazy)")
    parser.add_argument("--traces", metavar="DIR", help="browse the trace files under DIR instead; no model is loaded")
    parser.add_argument("--compare", metavar="DIR_B", help="with --traces: a second run, side by side")
    args = parser.parse_args(argv)
    if args.compare and not args.traces:
        parser.error("--compare needs --traces")
    return args


def stop_on_sigterm() -> None:
    """SIGTERM (docker stop, a Space restarting), at any moment from start-up on, exits with status
    0 and no work folder left behind: every live ``ui.App`` is closed first (no model run starts,
    the one in flight, such as an example being cached, stops before its next method, the work
    folder is removed), the files the app put in Gradio's cache and their folders are deleted
    (``UploadSpace.clear``), then the interpreter exits normally. The default action would kill the
    process and leave the folder behind; exiting while a thread is still inside torch aborted the
    process ("terminate called without an active exception", status 134). A run that does not
    stop within ``App.close``'s wait ends the process at once (``os._exit(0)``), its folder removed.
    (Raising KeyboardInterrupt instead, Ctrl-C's way, was seen to end the process by SIGINT,
    status -2, when Gradio's handler did not catch it.)"""

    def stop(signum, frame):
        idle = all([app.close() for app in list(App.live)])
        for space in list(UploadSpace.live):
            space.clear()
        if not idle:
            os._exit(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)


def log_to_stderr() -> None:
    """The app's own log lines (example caching) on stderr, beside Gradio's."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("duet_viz")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def trace_browser(folder: str, compare: str | None, limits: Limits):
    """The browser of ``--traces`` over the given folders (read once, at start-up)."""
    try:
        runs = [scan_folder(f) for f in (folder, compare) if f]
    except TraceError as error:
        raise SystemExit(f"error: {error}") from None
    browser = Browser()
    return build_browser(browser, browser.serve(*runs), queue_size=limits.queue_size)


def main(argv=None) -> None:
    args = parse_args(argv)
    stop_on_sigterm()
    log_to_stderr()
    # On a Hugging Face Space the app is reachable only through the Space's proxy: each visitor's
    # address is the X-Forwarded-For entry that proxy wrote (duet_viz.limits.forwarded_client).
    limits = Limits(proxy_hops=1 if os.environ.get("SPACE_ID") else 0)
    if args.traces:
        demo = trace_browser(args.traces, args.compare, limits)
    else:
        hf_logging.disable_progress_bar()
        engine = DuetLlava.load(resolve_model(args.model), device=args.device)
        demo = build_demo(engine, cache_examples=args.cache_examples, limits=limits)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, show_error=True,
                **launch_options(demo, limits))


if __name__ == "__main__":
    main()
