"""The OpenAI-compatible local server: `app` (routes, errors, limits), `worker` (one model thread and a
bounded queue), `schemas` (request validation), `process` (uvicorn with a shutdown that stops generations), as llama-cpp-python's and llama.cpp's servers are laid out."""

from pymorph_edge.server.app import ServedApp, create_app
from pymorph_edge.server.process import serve

__all__ = ["create_app", "serve", "ServedApp"]
