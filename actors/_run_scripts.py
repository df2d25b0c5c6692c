"""The Lua scripts of the run queue (``actors.run_queue``, ``actors.run_replies``), each one
step in Redis.

Each script's comment names its KEYS and ARGV, in the order the Python side passes them; the
keys themselves are described in ``actors.run_streams``. The scripts name the consumer group
and its consumer literally ('workers', 'worker'; ``GROUP`` there).
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE",
    "CANCEL",
    "FINISH",
    "NOT_DELIVERED",
    "PIECES_SENT",
    "READ",
    "RELEASE",
    "RENEW",
    "REPLY_DONE",
    "SENT_AS",
    "START",
    "SUBMIT",
]

# KEYS: queue, record, the thread's open runs, the last position. ARGV: thread key, message
# id, message JSON, now, cap, reply_to JSON or '', the message's fingerprint. Returns the
# status and the record's fields, read in the same step.
SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local queued = redis.call('XLEN', KEYS[1])
  if queued >= tonumber(ARGV[5]) then
    return {'full', queued}
  end
  local entry
  if ARGV[6] ~= '' then
    entry = redis.call('XADD', KEYS[1], '*', 'thread', ARGV[1], 'message', ARGV[3],
                       'reply_to', ARGV[6])
  else
    entry = redis.call('XADD', KEYS[1], '*', 'thread', ARGV[1], 'message', ARGV[3])
  end
  -- The order the runs will run in: by the entry's id (Redis's clock, then its sequence;
  -- _position in actors/run_queue.py), moved past the last run's place when it is not
  -- past it.
  local ms, seq = string.match(entry, '^(%d+)-(%d+)$')
  local position = tonumber(ms) * 1000 + math.min(tonumber(seq), 999)
  local last = tonumber(redis.call('GET', KEYS[4]) or '0')
  if position <= last then position = last + 1 end
  redis.call('SET', KEYS[4], string.format('%d', position))
  redis.call('HSET', KEYS[2], 'status', 'queued', 'created_at', ARGV[4], 'attempts', 0,
             'entry', entry, 'fingerprint', ARGV[7], 'position', string.format('%d', position))
  redis.call('ZADD', KEYS[3], string.format('%d', position), ARGV[2])
  return {'queued', redis.call('HGETALL', KEYS[2])}
end
return {'exists', redis.call('HGETALL', KEYS[2])}
"""

# KEYS: queue, record, the thread's open runs. ARGV: now, ttl, message id. A queued run
# leaves the queue, once: the entry goes with its record's status, so a worker holding it
# already finds it gone when it starts. A record without the entry's id (queued by an
# earlier release) stays until ``START`` drops the entry when it comes to it.
# Returns the outcome and the record's fields, read in the same step.
CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then
  return {'missing', {}}
end
if status ~= 'queued' then
  return {'unchanged', redis.call('HGETALL', KEYS[2])}
end
local entry = redis.call('HGET', KEYS[2], 'entry')
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[2], 'status', 'cancelled', 'finished_at', ARGV[1])
if entry then
  redis.call('XACK', KEYS[1], 'workers', entry)
  redis.call('XDEL', KEYS[1], entry)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return {'cancelled', redis.call('HGETALL', KEYS[2])}
"""

# Every script below that acts for a worker starts here: KEYS[1] is the lease, ARGV[1] the
# worker's token. A worker that lost the lease (it stalled; another took over) is refused.
_LEASED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'lost'}
end
"""

# KEYS: lease, queue. ARGV: token, count, '>' or an entry id, the newest id the worker has
# read. Non-blocking. For '>': when the group has delivered past the worker's newest id, a
# read's reply was lost (Redis ran it, the worker never got it): those runs, still pending,
# come back first and in order, all newer than any run in the worker's hands. Also returns
# the group's last delivered id.
READ = (
    _LEASED
    + """
local delivered = '0-0'
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
  local name, id
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then id = group[i + 1] end
  end
  if name == 'workers' then delivered = id end
end
local from = ARGV[3]
if from == '>' and ARGV[4] ~= delivered then
  from = ARGV[4]
end
return {'ok', delivered, redis.call('XREADGROUP', 'GROUP', 'workers', 'worker',
                                    'COUNT', ARGV[2], 'STREAMS', KEYS[2], from)}
"""
)

# And a step on one run goes on here: KEYS[2] is the queue, ARGV[2] the run's entry id. An
# entry no longer in the stream was finished already (by a worker that took over).
_PRESENT = """
if #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 0 then
  return {'gone'}
end
"""

# KEYS: lease, queue, record. ARGV: token, entry id, now, entry time, ttl. A run cancelled
# while its entry stayed (queued by a release that did not record entry ids) leaves now.
START = (
    _LEASED
    + _PRESENT
    + """
if redis.call('HGET', KEYS[3], 'status') == 'cancelled' then
  redis.call('XACK', KEYS[2], 'workers', ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  return {'gone'}
end
redis.call('HSETNX', KEYS[3], 'created_at', ARGV[4])
redis.call('HSET', KEYS[3], 'status', 'running', 'started_at', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'attempts', 1)
redis.call('PERSIST', KEYS[3])
return {'started'}
"""
)

# KEYS: lease, queue, record, outbox, the thread's open runs. ARGV: token, entry id,
# status, now, result JSON or '', error or '', ttl, entry time, reply JSON or '', message
# id. Once per entry: the entry is deleted with it, and its reply (if any) is in the outbox.
FINISH = (
    _LEASED
    + _PRESENT
    + """
redis.call('HSETNX', KEYS[3], 'created_at', ARGV[8])
redis.call('HSET', KEYS[3], 'status', ARGV[3], 'finished_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'result', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'error', ARGV[6]) end
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('XACK', KEYS[2], 'workers', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[10])
if ARGV[9] ~= '' then
  redis.call('XADD', KEYS[4], '*', 'reply', ARGV[9], 'record', KEYS[3])
  redis.call('HSET', KEYS[3], 'reply', 'pending')
end
return {'finished'}
"""
)

# KEYS: lease, outbox, record, progress. ARGV: token, entry id, 'sent' or 'failed', error
# or ''.
REPLY_DONE = (
    _LEASED
    + """
redis.call('XACK', KEYS[2], 'workers', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
-- A platform may report a piece undelivered (``NOT_DELIVERED``) before this: that stands.
if redis.call('EXISTS', KEYS[3]) == 1 and redis.call('HGET', KEYS[3], 'reply') ~= 'failed' then
  redis.call('HSET', KEYS[3], 'reply', ARGV[3])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], 'reply_error', ARGV[4]) end
end
return {'done'}
"""
)

# KEYS: record, the platform id's key. Maps the id to the run for as long as its record
# lasts (a finished run's record has its expiry); a record already gone maps nothing.
SENT_AS = """
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('SET', KEYS[2], KEYS[1], 'EX', ttl) end
return ttl
"""

# KEYS: record. ARGV: why. Notes that the platform did not deliver the run's reply after
# all; 1 if the record was there to note it on.
NOT_DELIVERED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'reply', 'failed', 'reply_error', ARGV[1])
return 1
"""

# KEYS: lease, outbox, progress. ARGV: token, entry id, pieces sent. Only while the reply is
# in the outbox: a reply done already leaves nothing behind.
PIECES_SENT = (
    _LEASED
    + """
if #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
end
return {'ok'}
"""
)

# KEYS: lease. ARGV: token, ttl in ms. Takes a free lease or extends the token's own (also
# when the reply to an earlier take was lost); 0 while another worker holds it.
ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token, ttl in ms. Extends the lease while ``token`` holds it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
