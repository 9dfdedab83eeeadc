"""``rahf serve``: load a checkpoint once and answer scoring requests over HTTP (JSON API).

    rahf serve --checkpoint runs/r/export [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--max-wait-ms 10]
               [--allow-dir DIR] [--api-key-env RAHF_API_KEY]

Endpoints: ``POST /v1/score``, ``GET /health``, ``GET /v1/info``, ``GET /docs`` (OpenAPI). The API
and its limits are described in docs/serving.md; :class:`rahf.client.RAHFClient` is the client.
"""

from __future__ import annotations

import logging
import os

from .._extras import MissingExtra, require
from .common import add_checkpoint, add_device, add_dtype, scorer_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP scoring server: JSON API, dynamic batching across requests",
                       description="Load a checkpoint once and answer scoring requests over HTTP: POST /v1/score, "
                                   "GET /health, GET /v1/info, GET /docs (see docs/serving.md).")
    add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    add_device(p)
    add_dtype(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=32, help="most items in one forward pass (default 32)")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the oldest queued item waits for others to fill its batch (default 10)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="most items waiting (default 256); a request that does not fit is answered 503 "
                        "with Retry-After")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-items", type=int, default=64, help="most items in one request (default 64)")
    lim.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    lim.add_argument("--max-pixels", type=int, default=4096 * 4096,
                     help="largest image in pixels, width × height, read from the file's header before "
                          "decoding (default 4096²)")
    lim.add_argument("--allow-dir", default=None,
                     help='accept {"path": ...} images, only for files inside this directory')
    lim.add_argument("--api-key-env", default=None, metavar="NAME",
                     help="require the key held in this environment variable "
                          "(Authorization: Bearer KEY or X-API-Key: KEY)")
    lim.add_argument("--graceful-timeout", type=float, default=None,
                     help="at shutdown, wait at most this many seconds for requests in flight (default: no limit)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    try:
        for module in ("fastapi", "uvicorn"):
            require(module, "serve", "rahf serve")
    except MissingExtra as e:
        raise SystemExit(str(e)) from None
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")

    from ..serve.app import ServeSettings, serve, settings_dict

    try:
        settings = ServeSettings(checkpoint=str(args.checkpoint), dtype=args.dtype, max_batch=args.max_batch,
                                 max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_items=args.max_items,
                                 max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                                 allow_dir=args.allow_dir, api_key=api_key)
    except ValueError as e:
        raise SystemExit(f"rahf serve: {e}") from None

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("rahf.serve").warning("listening on %s without an API key (--api-key-env)", args.host)
    try:
        scorer = scorer_from_args(args)
    except FileNotFoundError as e:
        raise SystemExit(f"rahf serve: {e}") from None
    logging.getLogger("rahf.serve").info("model loaded from %s (%d torch threads); settings %s", args.checkpoint,
                                         torch.get_num_threads(), settings_dict(settings))
    serve(scorer, settings, host=args.host, port=args.port, log_level=args.log_level,
          graceful_timeout=args.graceful_timeout)
    return 0
