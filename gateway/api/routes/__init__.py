"""The API's routers: ``vqa`` (POST /v1/vqa), ``models`` (listing, edge bundle), ``health``."""

from .health import router as health_router
from .models import router as models_router
from .vqa import router as vqa_router

__all__ = ["health_router", "models_router", "vqa_router"]
