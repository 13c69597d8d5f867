"""Every Redis name, key, TTL and status the gateway and its workers share, each with its reason.

All keys start with a configurable prefix (``VQA_KEY_PREFIX``, default ``vqa``) so that several
deployments, or test runs, can share one Redis without colliding.

=================================  ======  ===========================================================
key                                type    what it holds
=================================  ======  ===========================================================
``{p}:stream:{model}``             stream  queued + in-progress requests of one model (group ``workers``)
``{p}:dead:{model}``               stream  requests delivered more than ``VQA_MAX_DELIVERIES`` times
``{p}:result:{model}:{rid}``       string  the msgpack reply of a finished request (idempotent retries)
``{p}:request:{model}:{bid}``      string  digest of the request first sent under that id (409 on reuse)
``{p}:inflight:{model}:{rid}``     string  stream entry id of a queued request (``SET NX``: no double enqueue)
``{p}:waiters:{model}:{rid}``      set     reply lists of every gateway waiting on that request
``{p}:replies:{gateway}``          list    replies for one gateway process, popped by its reader task
``{p}:models``                     set     names of the models some worker has published
``{p}:model:{model}``              string  JSON :class:`~gateway.served_models.ModelInfo` of the served model
``{p}:bundle:{sha256}``            string  the edge bundle bytes (safetensors) named by their sha256
``{p}:workers:{model}``            zset    worker id -> heartbeat expiry (epoch ms): live-worker index
``{p}:heartbeat:{model}:{worker}`` string  JSON worker status, expires unless refreshed
``{p}:rate:{client}``              string  GCRA theoretical arrival time (us, Redis clock) of a client
``{p}:partial:{model}:{rid}``      stream  a streamed request's new text per step, then its reply
``{p}:img:{tenant}:{ref}``         string  a feature stream a client may name by ``image_ref``
``{p}:imgs:{tenant}``              zset    ref -> last use (ms, Redis clock): the tenant's LRU order
``{p}:imgsize:{tenant}``           hash    ref -> bytes, and ``total``: what the tenant holds
``{p}:busy:{tenant}``              zset    entry id -> deadline + grace (ms): the tenant's entries in flight
=================================  ======  ===========================================================

``{rid}`` is the queue's id of a request, a digest of (caller, request id, what was asked); ``{bid}``
is a digest of (caller, request id) alone (gateway.api.idempotency).

Stream entries are deleted (``XACK`` + ``XDEL`` in one script) as soon as they are answered, so the
stream holds exactly the unanswered requests and ``XLEN`` is the backlog. Streams are never trimmed
by length: ``MAXLEN`` would drop unacknowledged entries, i.e. requests someone is waiting for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEAD_LETTER_BODY_BYTES",
    "DEAD_LETTER_MAXLEN",
    "GROUP",
    "INFLIGHT_SLACK_MS",
    "IN_FLIGHT_GRACE_MS",
    "MODEL_INFO_TTL_S",
    "PARTIAL_MAXLEN",
    "PARTIAL_TTL_MS",
    "REPLY_LIST_TTL_MS",
    "STALE_WORKER_KEEP_MS",
    "Keys",
    "Status",
]

# One consumer group per model stream; every worker of that model joins it, so each entry is
# delivered to exactly one worker at a time.
GROUP = "workers"

# The in-flight marker (and waiter set) outlives the request's deadline by this much, so a worker
# that drops an expired entry still finds the waiters to tell; after it, a stale marker cannot block
# a later retry.
INFLIGHT_SLACK_MS = 5_000

# Heartbeat entries of departed workers stay in the live-worker index this long (scored with the
# moment they stopped), so the gateway can tell "a worker is restarting" (seen within
# VQA_NO_WORKER_GRACE_MS: queue the request) from "nobody serves this model" (503 no_worker).
STALE_WORKER_KEEP_MS = 3_600_000

# A gateway's reply list expires this long after the last reply pushed to it, so the lists of dead
# gateway processes do not accumulate. Live gateways pop replies within milliseconds.
REPLY_LIST_TTL_MS = 60_000

# Model info and edge bundles outlive their last worker by a day: a restarted worker finds them in
# place (edge clients keep downloading), a retired model disappears from the listing by itself.
MODEL_INFO_TTL_S = 24 * 3600

# The dead-letter stream is a record for operators, not work: approximate trimming is fine there.
# It keeps a request body only up to DEAD_LETTER_BODY_BYTES (feature streams of LLaVA-1.5 geometry
# are ~1 KB; a larger body, a cloud-only image above all, is recorded by size and sha256): 10,000
# images of 16 MB that crash workers would be 160 GB.
DEAD_LETTER_MAXLEN = 10_000
DEAD_LETTER_BODY_BYTES = 64 * 1024

# An entry holds its tenant's in-flight slot (VQA_MAX_IN_FLIGHT_PER_KEY) until FINISH, which every
# entry reaches (answered, failed, dropped as expired or dead-lettered) while workers run; this long
# past its deadline at most, so that a model nobody serves any more cannot hold slots for ever.
# Counting only to the deadline would let a key with tiny timeouts queue without limit.
IN_FLIGHT_GRACE_MS = 600_000

# A partial stream outlives its last write by this long: a client cut off mid-answer reconnects,
# through any gateway replica, within it and resumes from its Last-Event-ID; later, a retry of the
# finished request replays the stored answer (VQA_RESULT_TTL_S) as one event instead.
PARTIAL_TTL_MS = 60_000

# Longest partial stream (approximate trim): above the protocol's 512 new tokens plus the reply,
# so it never cuts a real answer; it bounds what a runaway writer could pile up.
PARTIAL_MAXLEN = 1_024

_PREFIX = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


class Status:
    """Outcomes of the enqueue script (see :mod:`gateway.queue.scripts`)."""

    DONE = b"done"  # a stored result exists: return it, enqueue nothing
    JOINED = b"joined"  # the same request id is in flight: wait for its reply
    QUEUED = b"queued"  # a new stream entry was added
    OVERLOADED = b"overloaded"  # the backlog is at VQA_MAX_BACKLOG: 429
    BUSY = b"busy"  # the tenant has VQA_MAX_IN_FLIGHT_PER_KEY requests in flight: 429


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix. Model names and request ids are validated by the wire format."""

    prefix: str = "vqa"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"key prefix must match {_PREFIX.pattern}, got {self.prefix!r}")

    def stream(self, model: str) -> str:
        return f"{self.prefix}:stream:{model}"

    def dead(self, model: str) -> str:
        return f"{self.prefix}:dead:{model}"

    def result(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:result:{model}:{request_id}"

    def request(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:request:{model}:{request_id}"

    def inflight(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:inflight:{model}:{request_id}"

    def waiters(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:waiters:{model}:{request_id}"

    def replies(self, gateway_id: str) -> str:
        return f"{self.prefix}:replies:{gateway_id}"

    def models(self) -> str:
        return f"{self.prefix}:models"

    def model(self, model: str) -> str:
        return f"{self.prefix}:model:{model}"

    def bundle(self, sha256: str) -> str:
        return f"{self.prefix}:bundle:{sha256}"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    def heartbeat(self, model: str, worker_id: str) -> str:
        return f"{self.prefix}:heartbeat:{model}:{worker_id}"

    def partial(self, model: str, request_id: str) -> str:
        return f"{self.prefix}:partial:{model}:{request_id}"

    def image(self, tenant: str, ref: str) -> str:
        return f"{self.prefix}:img:{tenant}:{ref}"

    def images(self, tenant: str) -> str:
        return f"{self.prefix}:imgs:{tenant}"

    def image_sizes(self, tenant: str) -> str:
        return f"{self.prefix}:imgsize:{tenant}"

    def busy(self, tenant: str) -> str:
        return f"{self.prefix}:busy:{tenant}"

    def rate(self, client_id: str) -> str:
        # TTL: until the client's bucket is full again (at most burst / rate seconds), set by the
        # RATE_LIMIT script: past it the key means nothing, so an idle client holds no key.
        return f"{self.prefix}:rate:{client_id}"
