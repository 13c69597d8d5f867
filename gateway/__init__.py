"""The serving side: the FastAPI gateway (``gateway.api``), the request queue (``gateway.queue``)
and the model worker (``gateway.worker``).

Dependency direction (docs/design.md, "Layers"): ``gateway.api``, ``gateway.queue``,
``gateway.served_models`` and ``gateway.validation`` import ``edge_client`` only, never torch or
``models``; ``gateway.worker.runner`` is the one module that imports the model code.
"""

from .config import GatewaySettings, WorkerSettings
from .errors import HTTP_STATUS, ServerError, http_status

__all__ = ["HTTP_STATUS", "GatewaySettings", "ServerError", "WorkerSettings", "http_status"]
