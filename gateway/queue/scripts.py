"""The Lua scripts that make enqueue, finish and rate limiting atomic (Redis runs each as one step).

Atomicity is what makes the idempotency rules hold without polling:

- ENQUEUE checks for a stored result, joins an in-flight request (``SET NX`` semantics on the
  in-flight marker) or checks the backlog and adds the entry: a request id is never queued twice,
  and a joining gateway is registered as a waiter before the entry can finish.
- FINISH stores the results of a batch, pushes each reply to every waiter, ends the partial
  streams of streamed requests with their reply, clears the in-flight markers and acknowledges +
  deletes the entries: no waiter can register between a reply and the cleanup.

- RATE_LIMIT reads, checks and advances one client's GCRA timestamp, on Redis's own clock, so
  every gateway replica enforces one shared limit without trusting its own clock.

- IMAGE_PUT and IMAGE_GET keep one tenant's image cache (:mod:`gateway.api.image_cache`): the
  stream, its place in the tenant's LRU order and the tenant's byte total change together, so
  concurrent requests of one API key never push it over ``VQA_IMAGE_CACHE_BYTES``.

ENQUEUE and FINISH write reply lists named in ARGV or read from a set, and IMAGE_PUT deletes the
evicted streams by name, so they assume one Redis (or a Redis Cluster with every key of a prefix in
one hash slot), not a sharded keyspace.
"""

from __future__ import annotations

__all__ = ["ENQUEUE", "FINISH", "IMAGE_GET", "IMAGE_PUT", "RATE_LIMIT"]

# A streamed request (ARGV[9] == '1') is queued with the entry field stream=1, so its worker
# publishes partial text. One that joins a request queued without it adds an empty 'open' entry,
# so that the partial stream exists and FINISH ends it with the reply. A new entry deletes the
# partial stream an earlier, failed attempt of the same request id may have left.
# A new entry counts against its tenant's in-flight cap (ARGV[11], 0: none) until FINISH removes it,
# IN_FLIGHT_GRACE_MS (ARGV[12]) past its deadline at most.
# KEYS: result, inflight, waiters, stream, partial, the tenant's busy zset
# ARGV: reply_to, deadline_ms, marker_ttl_ms, max_backlog, request_id, enqueued_ms, body, model,
#       streamed ('1' or '0'), scope, max_in_flight, in_flight_grace_ms
# -> {status, value}: {'done', reply} | {'joined', ''} | {'overloaded', ''} | {'busy', ''} |
#    {'queued', entry_id}
ENQUEUE = """
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
local ttl = tonumber(ARGV[3])
local streamed = ARGV[9] == '1'
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SADD', KEYS[3], ARGV[1])
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  if streamed and redis.call('EXISTS', KEYS[5]) == 0 then
    redis.call('XADD', KEYS[5], '*', 'open', '')
    redis.call('PEXPIRE', KEYS[5], ttl)
  end
  return {'joined', ''}
end
if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[4]) then return {'overloaded', ''} end
local cap = tonumber(ARGV[11])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[6])
  if redis.call('ZCARD', KEYS[6]) >= cap then return {'busy', ''} end
end
local id
if streamed then
  id = redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[5], 'model', ARGV[8],
    'reply_to', ARGV[1], 'deadline_ms', ARGV[2], 'enqueued_ms', ARGV[6], 'request', ARGV[7],
    'scope', ARGV[10], 'stream', '1')
else
  id = redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[5], 'model', ARGV[8],
    'reply_to', ARGV[1], 'deadline_ms', ARGV[2], 'enqueued_ms', ARGV[6], 'request', ARGV[7],
    'scope', ARGV[10])
end
redis.call('DEL', KEYS[5])
if cap > 0 then
  local grace = tonumber(ARGV[12])
  redis.call('ZADD', KEYS[6], tonumber(ARGV[2]) + grace, id)
  if redis.call('PTTL', KEYS[6]) < ttl + grace then redis.call('PEXPIRE', KEYS[6], ttl + grace) end
end
redis.call('SET', KEYS[2], id, 'PX', ttl)
redis.call('DEL', KEYS[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ttl)
return {'queued', id}
"""

# One call finishes a whole batch: one round trip, and one RPUSH per reply list for all its replies.
# The partial stream of a streamed entry (or of one a streamed request joined: it exists) ends with
# the reply.
# KEYS: stream, then per entry: result, inflight, waiters, partial, the tenant's busy zset
# ARGV: group, reply_list_ttl_ms, partial_ttl_ms, partial_maxlen, then per entry: entry_id, reply,
#       result_ttl_ms (0: do not store), reply_to, streamed ('1' or '0')
# -> number of replies pushed
FINISH = """
local group, list_ttl, partial_ttl, partial_maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local pushes, targets, ids = {}, {}, {}
for i = 0, (#ARGV - 4) / 5 - 1 do
  local result, inflight = KEYS[2 + 5 * i], KEYS[3 + 5 * i]
  local waiters, partial = KEYS[4 + 5 * i], KEYS[5 + 5 * i]
  local entry, reply, ttl = ARGV[5 + 5 * i], ARGV[6 + 5 * i], tonumber(ARGV[7 + 5 * i])
  if ttl > 0 then redis.call('SET', result, reply, 'PX', ttl) end
  redis.call('ZREM', KEYS[6 + 5 * i], entry)
  if ARGV[9 + 5 * i] == '1' or redis.call('EXISTS', partial) == 1 then
    redis.call('XADD', partial, 'MAXLEN', '~', partial_maxlen, '*', 'reply', reply)
    redis.call('PEXPIRE', partial, partial_ttl)
  end
  local seen = {}
  local members = redis.call('SMEMBERS', waiters)
  table.insert(members, ARGV[8 + 5 * i])
  for _, target in ipairs(members) do
    if not seen[target] then
      seen[target] = true
      if not pushes[target] then
        pushes[target] = {}
        table.insert(targets, target)
      end
      table.insert(pushes[target], reply)
    end
  end
  if redis.call('GET', inflight) == entry then redis.call('DEL', inflight, waiters) end
  table.insert(ids, entry)
end
local pushed = 0
for _, target in ipairs(targets) do
  redis.call('RPUSH', target, unpack(pushes[target]))
  redis.call('PEXPIRE', target, list_ttl)
  pushed = pushed + #pushes[target]
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return pushed
"""

# GCRA (the generic cell rate algorithm, ITU-T I.371; a token bucket kept as one timestamp): the
# stored value is the client's theoretical arrival time (TAT). A request is allowed while
# TAT + interval - burst * interval <= now, and then moves TAT one interval on. Integers in
# microseconds, formatted with %.0f: Lua's tostring would print a 16-digit time as 1.7e+15.
# KEYS: rate key
# ARGV: interval_us (1e6 / rate, an integer >= 1), burst (>= 1)
# -> {1, 0} allowed | {0, wait_us} refused: the request would be allowed wait_us from now
RATE_LIMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then tat = math.max(tonumber(stored), now) end
local next_tat = tat + interval
local allow_at = next_tat - tonumber(ARGV[2]) * interval
if allow_at > now then return {0, allow_at - now} end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return {1, 0}
"""

# The LRU order's scores: Redis's clock in microseconds, and always above the last use (two uses in
# one microsecond, or a clock step back, must still order). Doubles hold them exactly (< 2^53).
_USE_SCORE = """
local function now_us()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local function use_score(lru)
  local last = redis.call('ZRANGE', lru, -1, -1, 'WITHSCORES')[2]
  return math.max(now_us(), last and tonumber(last) + 1 or 0)
end
"""

# Stores one stream in a tenant's cache, then evicts the tenant's least recently used streams
# until its total is within the cap. A stream larger than the whole cap is not kept. Index entries
# unused for a whole TTL belong to streams Redis has already expired: their bytes are released
# first (a few per call, so one call stays short).
# KEYS: image, lru zset, sizes hash (its 'total' field holds the tenant's bytes)
# ARGV: ref, stream, ttl_ms, cap_bytes, image key prefix (the image key without the ref)
# -> number of streams evicted, or -1 when the stream is larger than the cap
IMAGE_PUT = (
    _USE_SCORE
    + """
local ref, ttl, cap, base = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local size = string.len(ARGV[2])
local function forget(r)
  local bytes = redis.call('HGET', KEYS[3], r)
  if bytes then
    redis.call('HINCRBY', KEYS[3], 'total', -tonumber(bytes))
    redis.call('HDEL', KEYS[3], r)
  end
  redis.call('ZREM', KEYS[2], r)
  redis.call('DEL', base .. r)
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_us() - ttl * 1000, 'LIMIT', 0, 16)
for _, r in ipairs(stale) do forget(r) end
forget(ref)
if size > cap then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], use_score(KEYS[2]), ref)
redis.call('HSET', KEYS[3], ref, size)
local total = redis.call('HINCRBY', KEYS[3], 'total', size)
local evicted = 0
while total > cap do
  forget(redis.call('ZRANGE', KEYS[2], 0, 0)[1])
  evicted = evicted + 1
  total = tonumber(redis.call('HGET', KEYS[3], 'total'))
end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
return evicted
"""
)

# Reads one stream of a tenant's cache and marks it used (its TTL and the index's restart); a
# stream that has expired loses its index entry and bytes.
# KEYS: image, lru zset, sizes hash
# ARGV: ref, ttl_ms
# -> the stream, or nil
IMAGE_GET = (
    _USE_SCORE
    + """
local data = redis.call('GET', KEYS[1])
if not data then
  local bytes = redis.call('HGET', KEYS[3], ARGV[1])
  if bytes then
    redis.call('HINCRBY', KEYS[3], 'total', -tonumber(bytes))
    redis.call('HDEL', KEYS[3], ARGV[1])
  end
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', use_score(KEYS[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return data
"""
)
