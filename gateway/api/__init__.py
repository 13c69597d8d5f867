"""The HTTP API of the gateway (FastAPI). Never imports torch or ``models``."""

from .main import create_app, run

__all__ = ["create_app", "run"]
