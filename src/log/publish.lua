-- One publish to a stream of the Redis engine, atomically (SPEC §6): the
-- next seq, the epoch created if absent, the history append trimmed by
-- count and bytes, the view update, the publish to every node, and the
-- recipients counted over every other live node. Returns {epoch, seq,
-- recipients}.
--
-- KEYS: 1 the stream's log hash, 2 its history, 3 the set of streams,
--       4 the nodes' heartbeats, 5 the view index, 6 the view entry
--       (5 and 6 are unused placeholders when ARGV[13] is ''); the
--       audience indexes of the view are derived from 5 (see `audience`).
-- ARGV: 1 an epoch for a new log, 2 the stream id, 3 the message type,
--       4 the target line, 5 the frame up to its seq, 6 the frame after it,
--       7 HISTORY_SIZE, 8 HISTORY_BYTES, 9 now (Unix ms), 10 the presence
--       field to count, 11 the presence key prefix, 12 how long a node's
--       heartbeat counts (ms), 13 the view operation ('', 'task', 'agent',
--       'agent_delete'), 14 the entry id, 15 the user the message is for
--       ('' if not one user), 16 'admin' for a message to the admins,
--       17 status, 18 query, 19 progress, 20 name (18-20: '' absent, else
--       '=' and the value), 21 the message's data (JSON), 22 the pub/sub
--       channel, 23 the publishing node (which counts its own recipients
--       exactly: its presence in Redis is up to a second old), 24 for a
--       channel its CHANNEL_HISTORY_TTL in ms ('' for a tenant log): a
--       channel is not in the set of streams, and its log and history
--       expire that long after its last publish.
local log, hist = KEYS[1], KEYS[2]

local epoch = redis.call('HGET', log, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', log, 'epoch', epoch, 'seq', 0, 'bytes', 0)
  if ARGV[24] == '' then
    redis.call('SADD', KEYS[3], ARGV[2])
  end
end
local seq = redis.call('HINCRBY', log, 'seq', 1)

local frame = ARGV[5] .. seq .. ARGV[6]
local payload = seq .. '\n' .. epoch .. '\n' .. ARGV[9] .. '\n' .. ARGV[2] .. '\n'
  .. ARGV[3] .. '\n' .. ARGV[4] .. '\n' .. frame
redis.call('ZADD', hist, seq, payload)

-- Trim: never below the newest message, even if it alone is over the bytes.
local size, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local bytes = tonumber(redis.call('HINCRBY', log, 'bytes', #payload))
local count = redis.call('ZCARD', hist)
while count > 1 and (count > size or bytes > max_bytes) do
  local oldest = redis.call('ZPOPMIN', hist)
  bytes = bytes - #oldest[1]
  count = count - 1
end
redis.call('HSET', log, 'bytes', bytes)
if ARGV[24] ~= '' then
  redis.call('PEXPIRE', log, ARGV[24])
  redis.call('PEXPIRE', hist, ARGV[24])
end

-- The views (SPEC §5): an omitted field keeps its old value only when the
-- old entry's audience covers the new one's. Besides the index of every
-- entry (what admins read), each entry is in the index of its audience:
-- INDEX:b for a broadcast, INDEX:u:USER for a message to USER, none for a
-- message to the admins; a user's list merges INDEX:b and INDEX:u:USER
-- (src/redis/views.rs), so it reads no entry it may not see.
local function audience(index, to, role)
  if role ~= '' then
    return nil
  elseif to == '' then
    return index .. ':b'
  end
  return index .. ':u:' .. to
end

local op = ARGV[13]
if op ~= '' then
  local index, entry = KEYS[5], KEYS[6]
  local exists = redis.call('EXISTS', entry) == 1
  local old = redis.call('HMGET', entry, 'to', 'role')
  local old_to, old_role = old[1] or '', old[2] or ''
  if exists then
    local was = audience(index, old_to, old_role)
    if was then
      redis.call('ZREM', was, ARGV[14])
    end
  end
  if op == 'agent_delete' then
    redis.call('DEL', entry)
    redis.call('ZREM', index, ARGV[14])
  else
    local keep = exists
      and ((old_to == '' and old_role == '') or ARGV[16] ~= ''
           or (old_to ~= '' and old_to == ARGV[15]))
    local function field(name, given)
      if given ~= '' then
        redis.call('HSET', entry, name, string.sub(given, 2))
      elseif not keep then
        redis.call('HDEL', entry, name)
      end
    end
    if op == 'task' then
      redis.call('HSET', entry, 'status', ARGV[17])
      field('query', ARGV[18])
      field('progress', ARGV[19])
    else
      field('name', ARGV[20])
    end
    redis.call('HSET', entry, 'seq', seq, 'ts', ARGV[9], 'to', ARGV[15],
      'role', ARGV[16], 'data', ARGV[21])
    redis.call('ZADD', index, seq, ARGV[14])
    local now_for = audience(index, ARGV[15], ARGV[16])
    if now_for then
      redis.call('ZADD', now_for, seq, ARGV[14])
    end
  end
end

redis.call('PUBLISH', ARGV[22], payload)

local recipients = 0
local now, ttl = tonumber(ARGV[9]), tonumber(ARGV[12])
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], now - ttl, '+inf')) do
  if node ~= ARGV[23] then
    local n = redis.call('HGET', ARGV[11] .. node, ARGV[10])
    if n then
      recipients = recipients + tonumber(n)
    end
  end
end

return {epoch, seq, recipients}
