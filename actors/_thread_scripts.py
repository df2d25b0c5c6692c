"""The Lua scripts of the thread store (``actors.redis_store``), each one step in Redis.

Each script's comment names its ARGV; every one takes the thread's seven keys, in the order
``PARTS`` lists them, which ``actors.redis_store`` describes.
"""

from __future__ import annotations

__all__ = ["ACCEPT", "COMMIT", "OPEN", "PARTS", "RESET"]

PARTS = ("epoch", "checkpoint", "pending", "turns", "msgs", "msgidx", "msgfp")


# Every write (opening included) gives all the thread's keys the same expiry, ARGV[t], so they
# go together: a message accepted just before its checkpoint expired would otherwise be run
# again without the state it was accepted on, and the epoch is the state's (see OPEN).
def _expire_all(t: int) -> str:
    return f"""
for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ARGV[{t}]) end
"""


# ARGV[1]: ttl, ARGV[2]: '1' to count an attempt of a pending turn,
# ARGV[3]: the open's token. An epoch key that is missing (a new thread, or one whose keys
# expired while an old incarnation may still hold it open) starts from Redis's clock, in
# seconds times a million: an epoch is then the time its thread's state began and how many
# opens it has had since. It is never handed out twice: the keys expire at least an hour
# (checkpoint_ttl_s) after the last open, so a new start is past every epoch of the state
# before, unless that one had a million opens a second. (Under 2^53 until the year 2255:
# exact as a Lua number.) The same token as the last open's, with the epoch it took still
# current, is that open sent again by the client after its answer was lost: it takes no new
# epoch and counts no attempt.
OPEN = (
    """
local epoch = redis.call('GET', KEYS[1])
if not (epoch and redis.call('HGET', KEYS[2], 'opened') == ARGV[3] .. ' ' .. epoch) then
  if not epoch then
    redis.call('SET', KEYS[1], redis.call('TIME')[1] .. '000000')
  end
  redis.call('INCR', KEYS[1])
  epoch = redis.call('GET', KEYS[1])
  redis.call('HSET', KEYS[2], 'opened', ARGV[3] .. ' ' .. epoch)
  if redis.call('EXISTS', KEYS[3]) == 1 and ARGV[2] == '1' then
    redis.call('HINCRBY', KEYS[3], 'attempts', 1)
  end
end
"""
    + _expire_all(1)
    + """
return {epoch, redis.call('HGET', KEYS[2], 'data') or false,
        redis.call('HMGET', KEYS[3], 'seq', 'message', 'attempts')}
"""
)

# Every write starts here: ARGV[1] is the writer's epoch, refused unless it is current.
_FENCE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then
  return {'fenced'}
end
"""

# And a checkpoint write goes on here: ARGV[2] is the new version, which must follow the stored one.
_CAS = """
local found = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if found ~= tonumber(ARGV[2]) - 1 then
  return {'conflict', found}
end
"""


# A message id answered (or accepted) before is not answered again: the stored value stands,
# unless the id came with another message. ARGV[n] is the message id ('' = none), ARGV[f]
# the new message's fingerprint ('' = unknown).
def _seen(n: int, f: int) -> str:
    return f"""
if ARGV[{n}] ~= '' then
  local seen = redis.call('HGET', KEYS[5], ARGV[{n}])
  if seen then
    local stamped = redis.call('HGET', KEYS[7], ARGV[{n}])
    if stamped and ARGV[{f}] ~= '' then
      local at, fingerprint = string.match(stamped, '^(%S+) (%x+)$')
      local score = redis.call('ZSCORE', KEYS[6], ARGV[{n}])
      if fingerprint and score and tonumber(score) == tonumber(at)
         and fingerprint ~= ARGV[{f}] then
        return {{'reused'}}
      end
    end
    return {{'seen', seen}}
  end
end
"""


# The fingerprint ARGV[f] of message id ARGV[n], stamped with its acceptance time ARGV[t].
def _stamp(n: int, t: int, f: int) -> str:
    return f"""
if ARGV[{f}] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[{n}], ARGV[{t}] .. ' ' .. ARGV[{f}])
end
"""


# ARGV: epoch, message id, message JSON, now, message-id ttl, ttl, fingerprint.
ACCEPT = (
    _FENCE
    + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[4] - ARGV[5], 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('HDEL', KEYS[5], unpack(expired))
  redis.call('HDEL', KEYS[7], unpack(expired))
  redis.call('ZREM', KEYS[6], unpack(expired))
end
"""
    + _seen(2, 7)
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'busy', redis.call('HGET', KEYS[3], 'seq')}
end
local seq = tonumber(redis.call('HGET', KEYS[2], 'turn') or '0') + 1
redis.call('HSET', KEYS[3], 'seq', seq, 'message', ARGV[3], 'attempts', 1)
redis.call('HSET', KEYS[5], ARGV[2], seq)
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[2])
"""
    + _stamp(2, 4, 7)
    + _expire_all(6)
    + """
return {'accepted', seq}
"""
)


# ARGV: epoch, new version, turn, checkpoint JSON, ttl, message id ('' = none), result JSON,
# kind ('turn' or 'command'), now, a command's fingerprint. A turn's result resolves the
# pending turn and joins the history; a command's is only remembered under its message id.
COMMIT = (
    _FENCE
    + """
if ARGV[8] == 'command' then
"""
    + _seen(6, 10)
    + """
end
"""
    + _CAS
    + """
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'turn', ARGV[3], 'data', ARGV[4])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
  if ARGV[8] == 'command' then
    redis.call('ZADD', KEYS[6], ARGV[9], ARGV[6])
"""
    + _stamp(6, 9, 10)
    + """
  else
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[7])
    redis.call('DEL', KEYS[3])
  end
end
"""
    + _expire_all(5)
    + """
return {'ok'}
"""
)

# ARGV: epoch, new version, checkpoint JSON, ttl, message id ('' = none), result JSON, now,
# fingerprint, then the fingerprints to keep. The reset forgets every message id but its own
# and those answered (not pending) whose current fingerprint is one to keep: the commands'.
RESET = (
    _FENCE
    + _seen(5, 8)
    + _CAS
    + """
local kept = {}
if #ARGV > 8 then
  local keep = {}
  for i = 9, #ARGV do keep[ARGV[i]] = true end
  local stamps = redis.call('HGETALL', KEYS[7])
  for i = 1, #stamps, 2 do
    local at, fingerprint = string.match(stamps[i + 1], '^(%S+) (%x+)$')
    if fingerprint and keep[fingerprint] then
      local score = redis.call('ZSCORE', KEYS[6], stamps[i])
      local seen = redis.call('HGET', KEYS[5], stamps[i])
      if score and tonumber(score) == tonumber(at) and seen and string.sub(seen, 1, 1) == '{' then
        table.insert(kept, {stamps[i], seen, score, stamps[i + 1]})
      end
    end
  end
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'turn', 0, 'data', ARGV[3])
for _, id in ipairs(kept) do
  redis.call('HSET', KEYS[5], id[1], id[2])
  redis.call('ZADD', KEYS[6], id[3], id[1])
  redis.call('HSET', KEYS[7], id[1], id[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
  redis.call('ZADD', KEYS[6], ARGV[7], ARGV[5])
"""
    + _stamp(5, 7, 8)
    + """
end
"""
    + _expire_all(4)
    + """
return {'ok'}
"""
)
