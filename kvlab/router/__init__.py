"""The multi-model router: OpenAI endpoints routed by `model`, traffic statistics, and real sleep/wake."""
from kvlab.router.app import Router, serve_app
from kvlab.router.backends import Backend

__all__ = ["Backend", "Router", "serve_app"]
