"""The Lua scripts that make enqueue, finish and rate limiting atomic (Redis runs each as one step).

Atomicity is what makes the idempotency rules hold without polling:

- ENQUEUE checks for a stored result, joins an in-flight request (``SET NX`` semantics on the
  in-flight marker) or checks the backlog and adds the entry: a request id is never queued twice,
  and a joining gateway is registered as a waiter before the entry can finish.
- FINISH stores the results of a batch, pushes each reply to every waiter, clears the in-flight
  markers and acknowledges + deletes the entries: no waiter can register between a reply and the
  cleanup.

- RATE_LIMIT reads, checks and advances one client's GCRA timestamp, on Redis's own clock, so
  every gateway replica enforces one shared limit without trusting its own clock.

ENQUEUE and FINISH write reply lists named in ARGV or read from a set, so they assume one Redis (or a
Redis Cluster with every key of a prefix in one hash slot), not a sharded keyspace.
"""

from __future__ import annotations

__all__ = ["ENQUEUE", "FINISH", "RATE_LIMIT"]

# KEYS: result, inflight, waiters, stream
# ARGV: reply_to, deadline_ms, marker_ttl_ms, max_backlog, request_id, enqueued_ms, body, model
# -> {status, value}: {'done', reply} | {'joined', ''} | {'overloaded', ''} | {'queued', entry_id}
ENQUEUE = """
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
local ttl = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SADD', KEYS[3], ARGV[1])
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  return {'joined', ''}
end
if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[4]) then return {'overloaded', ''} end
local id = redis.call('XADD', KEYS[4], '*', 'request_id', ARGV[5], 'model', ARGV[8],
  'reply_to', ARGV[1], 'deadline_ms', ARGV[2], 'enqueued_ms', ARGV[6], 'request', ARGV[7])
redis.call('SET', KEYS[2], id, 'PX', ttl)
redis.call('DEL', KEYS[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ttl)
return {'queued', id}
"""

# One call finishes a whole batch: one round trip, and one RPUSH per reply list for all its replies.
# KEYS: stream, then per entry: result, inflight, waiters
# ARGV: group, reply_list_ttl_ms, then per entry: entry_id, reply, result_ttl_ms (0: do not store),
#       reply_to
# -> number of replies pushed
FINISH = """
local group, list_ttl = ARGV[1], ARGV[2]
local pushes, targets, ids = {}, {}, {}
for i = 0, (#ARGV - 2) / 4 - 1 do
  local result, inflight, waiters = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  local entry, reply, ttl = ARGV[3 + 4 * i], ARGV[4 + 4 * i], tonumber(ARGV[5 + 4 * i])
  if ttl > 0 then redis.call('SET', result, reply, 'PX', ttl) end
  local seen = {}
  local members = redis.call('SMEMBERS', waiters)
  table.insert(members, ARGV[6 + 4 * i])
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
