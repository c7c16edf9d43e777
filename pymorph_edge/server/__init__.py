"""The OpenAI-compatible local server: `app` (routes, errors, limits), `worker` (one model thread and a
bounded queue), `schemas` (request validation), as llama-cpp-python's and llama.cpp's servers are laid out."""

from .app import create_app

__all__ = ["create_app"]
