#!lua name=ssegw
--[[
ssegw's Redis Function library: sequence + history append + fan-out in one atomic step, and
the matching read side for resume.  Loaded by every worker with FUNCTION LOAD REPLACE, so a
backend service can publish with FCALL without knowing any script SHA (README "Publishing
straight into Redis").

Key layout for a shard with hash tag S (a standalone Redis is one shard, S = ssegw:0; a
Redis Cluster has one shard per primary, their tags listed in the key `ssegw:shards`; the
hash tag keeps a shard's keys, and its sharded channels, in one slot):
  {ssegw:S}:seq        INCR counter: the shard's sequence, shared by all its topics
  {ssegw:S}:epoch      this incarnation of the sequence (created once; a Redis that lost
                       its data gets a new one, and old ids become unplaceable -> reset)
  {ssegw:S}:clock      ZSET member=seq score=ms, at most one sample per second (see "The
                       clock" below): used to trim by age and to place ids for expired topics
  {ssegw:S}:h:TOPIC    STREAM of the topic's history; entry id = SEQ-0,
                       fields b=body (event/data lines), t=ms, k=key (optional)
  {ssegw:S}:req:TOKEN  the ids a publish request got (2 min), so that a retry of a
                       request whose reply was lost returns them instead of publishing twice
  {ssegw:S}:ident      "REPLID OFFSET HEAD": the replication history (INFO replication of
                       the primary) the epoch's sequence was last checked against, by
                       ssegw_check (see "Epoch integrity" below)
Channel (sharded pub/sub, SSUBSCRIBE): {ssegw:S}:c:TOPIC, payload "SEQ:MS:KLEN:" .. key .. body (KLEN -1 = no key).
Channel {ssegw:S}:e: the new epoch, when ssegw_check gave the shard one.

Epoch integrity.  A failover to a replica that had not received the newest writes leaves a
primary whose sequence is below ids already handed out: the next publishes would reuse them.
Each gateway checks a shard's new primary on every (re)connect with ssegw_check, passing what
it has seen (the epoch, its watermark, the newest event it received) and what it found out
from INFO replication (ssegw/broker/redis_pubsub.py); if the primary may lack any of it, the
function gives the shard a new epoch -- only if the epoch is still the one the caller knew, so
the first gateway to notice decides and every other one sees the change -- and announces it
on {ssegw:S}:e.  Old ids then cannot be placed and resuming clients get ssegw.reset.

Coverage ("is every event of TOPIC after seq X still here?"): a stream's
max-deleted-entry-id is the highest trimmed seq; entries older than the topic's ttl count as
trimmed; a stream created anew gets MAXDELETEDID = the highest seq published at or before
(now - ttl), since anything an expired incarnation held was older than that (it expires ttl
+ 60 s after its last publish); a resume of a topic whose stream is gone is covered only if
its id is at or past that same seq.

The clock.  A sample (ms, seq) is written by the publish call running at `ms`, with `seq` its
last sequence, when the newest sample is a second old or more; the calls in between leave no
sample.  So a sample says two things, for ever after:
  - every seq up to `seq` was published at or before `ms`      -> seq_before: a lower bound
  - every seq published before `ms` is below `seq`              -> seq_by: an upper bound
Trimming by age wants the lower bound (never trim an event younger than ttl; trimming late is
harmless, replay checks each entry's age).  Coverage wants the upper bound: the highest seq
published at or before T is below the first sample *after* T, or at most the head if there
is none.  Coverage once used the lower bound, and a resume from an id in the second after a
sample, or from before the oldest sample retention kept, counted as covered: a silent gap.
The upper bound is conservative: a resume from an id published less than about a second
before the horizon may get a reset it did not need.  Both hold only while Redis's clock
(TIME) does not go back; a publish that finds samples in its future removes them (see
publish), so later samples never contradict earlier ones.
]]

-- Clock samples are at least this far apart (ms): see "The clock" above.
local CLOCK_STEP = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function b36(n)
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  local s = ''
  n = math.floor(n)
  repeat
    local d = n % 36
    s = string.sub(digits, d + 1, d + 1) .. s
    n = math.floor(n / 36)
  until n == 0
  return s
end

-- A seq such that every seq up to it was published at or before `at` (0 if the clock has no
-- sample that old): the newest sample at or before `at`.  For trimming by age.
local function seq_before(clock, at)
  local r = redis.call('ZREVRANGEBYSCORE', clock, at, '-inf', 'LIMIT', 0, 1)
  if r[1] then return tonumber(r[1]) end
  return 0
end

-- A seq at or above every seq published at or before `at`: one below the oldest sample after
-- `at` (that sample's call came later, and its seqs are higher), or `head` (the highest seq
-- published so far) if there is none.  For coverage.  Trimming the clock by retention cannot
-- make it low, only coarse.  Capped at `head`, which is always an upper bound (and keeps a
-- new stream's MAXDELETEDID below its first id, as XSETID requires).
local function seq_by(clock, at, head)
  local r = redis.call('ZRANGEBYSCORE', clock, '(' .. at, '+inf', 'LIMIT', 0, 1)
  if r[1] then return math.min(tonumber(r[1]) - 1, head) end
  return head
end

local function epoch_of(key, now)
  local e = redis.call('GET', key)
  if not e then
    local t = redis.call('TIME')
    e = b36(now) .. b36(tonumber(t[2]) % 1000)
    redis.call('SET', key, e)
  end
  return e
end

-- Trim a topic stream to `maxlen` entries and to entries newer than the clock's seq at
-- (now - ttl), and record the highest trimmed id as the stream's max-deleted-entry-id.
-- (Redis 7.0 raises that field on XDEL but not when XADD MAXLEN / XTRIM trims, so we set
-- it ourselves with XSETID; resume coverage depends on it.)
local function trim(skey, last_id, maxlen, old)
  local top = nil
  local len = redis.call('XLEN', skey)
  if len > maxlen then
    local n = len - maxlen
    local victims = redis.call('XRANGE', skey, '-', '+', 'COUNT', n)
    top = victims[#victims][1]
    redis.call('XTRIM', skey, 'MAXLEN', '=', maxlen)
  end
  if old > 0 then
    local v = redis.call('XREVRANGE', skey, old .. '-0', '-', 'COUNT', 1)
    if v[1] then
      if not top or tonumber(string.match(v[1][1], '^(%d+)')) > tonumber(string.match(top, '^(%d+)')) then
        top = v[1][1]
      end
      redis.call('XTRIM', skey, 'MINID', (old + 1) .. '-0')
    end
  end
  if top then redis.call('XSETID', skey, last_id, 'MAXDELETEDID', top) end
end

-- KEYS: seq, epoch, clock, request, then one stream key per message
-- ARGV: n, clock_retention_ms, then per message: channel, key, has_key, body, maxlen, ttl_ms
-- returns {epoch, seq1, ..., seqN}
-- `request` is a per-request token key: a retry of a publish whose reply was lost finds
-- it and gets the original ids instead of publishing twice.
local function publish(keys, args)
  local n = tonumber(args[1])
  local retention = tonumber(args[2])
  local done = redis.call('GET', keys[4])
  if done then return cjson.decode(done) end
  -- Check every key before the first write: a batch is all or nothing.
  for i = 1, n do
    local t = redis.call('TYPE', keys[4 + i])['ok']
    if t ~= 'none' and t ~= 'stream' then
      return redis.error_reply('WRONGTYPE history key ' .. keys[4 + i] .. ' is a ' .. t)
    end
  end
  local now = now_ms()
  local epoch = epoch_of(keys[2], now)
  local out = {epoch}
  local clock = keys[3]
  for i = 1, n do
    local base = 2 + (i - 1) * 6
    local channel, key, has_key, body = args[base + 1], args[base + 2], args[base + 3], args[base + 4]
    local maxlen, ttl = tonumber(args[base + 5]), tonumber(args[base + 6])
    local skey = keys[4 + i]
    local seq = redis.call('INCR', keys[1])
    local id = seq .. '-0'
    local fresh = redis.call('EXISTS', skey) == 0
    if has_key == '1' then
      redis.call('XADD', skey, id, 'b', body, 't', now, 'k', key)
    else
      redis.call('XADD', skey, id, 'b', body, 't', now)
    end
    local old, gone = 0, 0
    if ttl > 0 then
      old = seq_before(clock, now - ttl)
      -- Anything an expired earlier incarnation of this stream held is older than ttl, so
      -- it is at most seq_by(now - ttl).  (A ttl 0 stream does not expire: no earlier one.)
      -- The head to cap it with is the one before this call, seq - i (one INCR per message,
      -- nothing in between): this call's messages are not older than ttl, and a subscriber
      -- that has seen everything before them must find the new stream covered.
      if fresh then gone = seq_by(clock, now - ttl, seq - i) end
    end
    if fresh then
      redis.call('XSETID', skey, id, 'MAXDELETEDID', gone .. '-0')
    end
    trim(skey, id, maxlen, old)
    if ttl > 0 then
      redis.call('PEXPIRE', skey, ttl + 60000)
    end
    local klen = -1
    if has_key == '1' then klen = string.len(key) end
    local payload = seq .. ':' .. now .. ':' .. klen .. ':' .. (has_key == '1' and key or '') .. body
    if channel ~= '' then
      -- Sharded pub/sub: on a Redis Cluster the message stays on this shard's node (plain
      -- PUBLISH would be broadcast over the cluster bus to every node); a standalone Redis
      -- 7 treats it like PUBLISH.
      redis.call('SPUBLISH', channel, payload)
    end
    out[i + 1] = seq
  end
  -- One sample per second at most (CLOCK_STEP): the clock stays small (retention /
  -- 1 s samples) and most calls do not write it; the price is seq_by's ~1 s coarseness.
  local last = redis.call('ZREVRANGE', clock, 0, 0, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > now then
    -- Redis's clock went back (an NTP step, a failover to a replica whose clock is behind).
    -- Samples at or after `now` claim "everything published before me is below my seq",
    -- which this call's seqs now break: drop them (seq_by gets coarser, never low) and
    -- sample here.
    redis.call('ZREMRANGEBYSCORE', clock, now, '+inf')
    last = {}
  end
  if not last[2] or now - tonumber(last[2]) >= CLOCK_STEP then
    redis.call('ZADD', clock, now, out[n + 1])
    redis.call('ZREMRANGEBYSCORE', clock, '-inf', now - retention)
  end
  if keys[4] ~= '' then
    redis.call('SET', keys[4], cjson.encode(out), 'PX', 120000)
  end
  return out
end

local function max_deleted(skey)
  local info = redis.call('XINFO', 'STREAM', skey)
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then
      return tonumber(string.match(info[i + 1], '^(%d+)'))
    end
  end
  return 0
end

-- KEYS: seq, epoch, clock, then one stream key per topic
-- ARGV: mode ('after' | 'last' | 'earliest'), after_seq, then one ttl_ms per topic
-- returns {epoch, head, now, r1, ..., rN}; ri = {covered (1/0), seq, ms, key|false, body, ...}
local function replay(keys, args)
  local mode, after = args[1], tonumber(args[2])
  local now = now_ms()
  -- Read-only (runs on replicas too): no epoch yet means nothing was ever published.
  local epoch = redis.call('GET', keys[2]) or ''
  local head = tonumber(redis.call('GET', keys[1]) or '0')
  local out = {epoch, head, now}
  for i = 4, #keys do
    local skey, ttl = keys[i], tonumber(args[i - 1])
    local horizon = 0
    if ttl > 0 then horizon = now - ttl end
    local r = {1}
    if redis.call('EXISTS', skey) == 0 then
      -- Gone: expired (ttl + 60 s after its last publish), so everything it held is at most
      -- seq_by(horizon); or never published.  ttl 0 streams do not expire.
      if mode == 'after' and ttl > 0 and after < seq_by(keys[3], horizon, head) then r[1] = 0 end
    else
      local entries
      if mode == 'after' then
        if after < max_deleted(skey) then r[1] = 0 end
        entries = redis.call('XRANGE', skey, '(' .. after .. '-0', '+')
      elseif mode == 'last' then
        entries = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)
      else
        entries = redis.call('XRANGE', skey, '-', '+')
      end
      if r[1] == 1 then
        for _, e in ipairs(entries) do
          local f = e[2]
          local fields = {}
          for j = 1, #f, 2 do fields[f[j]] = f[j + 1] end
          local ms = tonumber(fields['t'])
          if ms < horizon then
            -- older than the topic's ttl: as good as trimmed
            if mode == 'after' then r = {0}; break end
          else
            local s = tonumber(string.match(e[1], '^(%d+)'))
            r[#r + 1] = s
            r[#r + 1] = ms
            r[#r + 1] = fields['k'] or false
            r[#r + 1] = fields['b']
          end
        end
      end
    end
    out[#out + 1] = r
  end
  return out
end

-- Sync (several shards): send the shard's current sequence to the caller's marker channel
-- and return it.  The marker reaches the caller's shard pub/sub connection after every
-- event published before it, so once it has arrived the caller has heard everything up to
-- that sequence on the channels it subscribed before the call (ssegw/broker/redis.py,
-- "Several shards").
-- KEYS: seq   ARGV: marker channel
local function sync(keys, args)
  local head = tonumber(redis.call('GET', keys[1]) or '0')
  redis.call('SPUBLISH', args[1], head)
  return head
end

-- KEYS: seq, epoch, ident, and the history stream of the newest event the caller received
--       (the epoch key again if none)
-- ARGV: the epoch the caller knows ('' if none), its watermark, the newest event's seq (0 if
--       none) and ms, this primary's replid and offset, an epoch to take if writes were lost,
--       a reason found by the caller ('' if none: see redis_pubsub.py, _lineage)
-- returns {epoch, head, reason}: reason '' if the primary has everything the caller has
-- seen (epoch kept), else why it may not (the epoch is then the new one, unless another
-- caller had changed it already: then reason is 'moved')
local function check(keys, args)
  local seen, wm, last, last_ms = args[1], tonumber(args[2]), tonumber(args[3]), args[4]
  local replid, offset, fresh, why = args[5], args[6], args[7], args[8]
  local epoch = redis.call('GET', keys[2])
  local head = tonumber(redis.call('GET', keys[1]) or '0')
  if not epoch or (seen ~= '' and epoch ~= seen) then
    return {epoch or '', head, 'moved'}
  end
  if seen ~= '' and why == '' then
    if head < wm then
      why = 'its sequence ' .. head .. ' is below the ' .. wm .. ' already received'
    elseif last > 0 and keys[4] ~= keys[2] then
      -- Replication is a prefix of the old primary's writes: if the newest event we got is
      -- here, as we got it, so is everything before it.
      local e = redis.call('XRANGE', keys[4], last .. '-0', last .. '-0')
      if e[1] then
        local f = e[1][2]
        for j = 1, #f, 2 do
          if f[j] == 't' and f[j + 1] ~= last_ms then
            why = 'event ' .. last .. ' is another event than the one received'
          end
        end
      elseif redis.call('EXISTS', keys[4]) == 1 and max_deleted(keys[4]) < last then
        why = 'event ' .. last .. ' is missing from its history'
      end
    end
  end
  if why ~= '' and seen ~= '' then
    epoch = fresh
    redis.call('SET', keys[2], epoch)
    redis.call('SPUBLISH', string.sub(keys[2], 1, -6) .. 'e', epoch)
  end
  redis.call('SET', keys[3], replid .. ' ' .. offset .. ' ' .. head)
  return {epoch, head, why}
end

redis.register_function('ssegw_publish', publish)
redis.register_function('ssegw_check', check)
redis.register_function{function_name = 'ssegw_replay', callback = replay, flags = {'no-writes'}}
redis.register_function('ssegw_sync', sync)
