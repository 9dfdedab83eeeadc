"""``rahf serve``: an HTTP scoring server (FastAPI + uvicorn) with dynamic batching.

* :mod:`rahf.serve.schemas` — the JSON API's request, response and error models (pydantic);
* :mod:`rahf.serve.batcher` — the bounded queue and the worker thread that runs the model on
  batches gathered across concurrent requests;
* :mod:`rahf.serve.app` — the app: validation, limits, authentication, /health, /v1/info, /v1/score.

The client side is :class:`rahf.client.RAHFClient`. The API is described in docs/serving.md.
"""

from .app import APIError, ServeSettings, create_app, serve
from .batcher import Batcher, Closed, QueueFull

__all__ = ["APIError", "Batcher", "Closed", "QueueFull", "ServeSettings", "create_app", "serve"]
