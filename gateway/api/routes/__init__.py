"""The API's routers: ``vqa`` (POST /v1/vqa), ``chat`` (POST /v1/chat/completions, OpenAI's API),
``models`` (listing, edge bundle), ``health``."""

from .chat import router as chat_router
from .health import router as health_router
from .models import router as models_router
from .vqa import router as vqa_router

__all__ = ["chat_router", "health_router", "models_router", "vqa_router"]
