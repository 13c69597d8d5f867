"""The model worker: ``vqa-worker`` (``__main__``), its loop (``worker``), batching and the torch
side (``runner``). Importing this package does not import torch; ``runner`` does.
"""

from .batching import collect_batch, split_expired
from .worker import InProcessWorker, Worker, WorkerStats, worker_id

__all__ = ["InProcessWorker", "Worker", "WorkerStats", "collect_batch", "split_expired", "worker_id"]
