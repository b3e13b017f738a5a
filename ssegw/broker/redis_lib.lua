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
  {ssegw:S}:kz:TOPIC   ZSET of the topic's keyed state: member = 'k' .. key (or 'n' for the
                       events without a key), score = the seq of that key's newest event
  {ssegw:S}:kv:TOPIC   HASH: the same members -> "SEQ:MS:" .. body; field 'f' = the keyed
                       floor (the highest seq evicted by max_keys or expired by ttl)
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

Keyed state (since=snapshot, compacted resume).  ssegw_publish updates it in the same call as
the stream, so history, keyed state and the sequence never disagree.  Its keys are derived
from the stream key (same hash tag, so the same slot on a cluster), which keeps the call's
documented KEYS unchanged for backends publishing with FCALL.  At most max_keys members (the
lowest score, i.e. the least recently updated key, is evicted first), and members older than
the ttl are removed as the stream is trimmed; either raises the floor.  max_keys 0 keeps no
keyed state at all (the keys are deleted).  A resume after X is
covered by keyed state when X >= floor and no member above X is older than the ttl; a keyed
state that is gone (expired with its stream) or was never written while its stream exists
(written by an older library) covers as little as a gone stream does.

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

-- The keyed state's ZSET and HASH keys of a topic, from its stream key PREFIX:h:TOPIC.
local function keyed_keys(skey)
  local p = string.find(skey, '}:h:', 1, true)
  local prefix, topic = string.sub(skey, 1, p), string.sub(skey, p + 4)
  return prefix .. ':kz:' .. topic, prefix .. ':kv:' .. topic
end

-- Record an event as its key's newest (see "Keyed state" above).  `st` is the topic's state
-- within this call (keyed_begin): the floor and the expiry are read and written once per
-- topic and call (keyed_end), so a batch costs two commands per message (HSET, ZADD).
-- `old`: entries at or under this seq are older than the ttl.
local function keyed_put(st, seq, now, has_key, key, body, old)
  if st.maxkeys <= 0 then return end
  local zkey, hkey = st.zkey, st.hkey
  local member = 'n'
  if has_key == '1' then member = 'k' .. key end
  redis.call('HSET', hkey, member, seq .. ':' .. now .. ':' .. body)
  -- Only a new key can take the count past max_keys (an update replaces its entry).
  local n = 0
  if redis.call('ZADD', zkey, seq, member) == 1 then n = redis.call('ZCARD', zkey) end
  if n > st.maxkeys then
    local gone = redis.call('ZPOPMIN', zkey, n - st.maxkeys)
    for j = 1, #gone, 2 do
      redis.call('HDEL', hkey, gone[j])
      st.top = math.max(st.top, tonumber(gone[j + 1]))
    end
  end
  if old > st.aged then
    st.aged = old
    local aged = redis.call('ZRANGEBYSCORE', zkey, '-inf', old, 'WITHSCORES')
    if aged[1] then
      for j = 1, #aged, 2 do
        redis.call('HDEL', hkey, aged[j])
        st.top = math.max(st.top, tonumber(aged[j + 1]))
      end
      redis.call('ZREMRANGEBYSCORE', zkey, '-inf', old)
    end
  end
end

-- A topic's keyed state at its first message in this call.  `floor0`: the floor of a keyed
-- state created now.  max_keys 0: no keyed state; what an earlier max_keys left is dropped,
-- so that a stale state never claims to cover changes it did not see (a stream without a
-- keyed state is not covered by one: keyed_after).
local function keyed_begin(skey, maxkeys, ttl, floor0)
  local zkey, hkey = keyed_keys(skey)
  local st = {zkey = zkey, hkey = hkey, maxkeys = maxkeys, ttl = ttl, aged = 0}
  if maxkeys <= 0 then
    redis.call('DEL', zkey, hkey)
    return st
  end
  st.stored = redis.call('HGET', hkey, 'f')
  st.floor = tonumber(st.stored or floor0)
  st.top = st.floor
  return st
end

local function keyed_end(st)
  if st.maxkeys <= 0 then return end
  if not st.stored or st.top > st.floor then redis.call('HSET', st.hkey, 'f', st.top) end
  if st.ttl > 0 then
    redis.call('PEXPIRE', st.zkey, st.ttl + 60000)
    redis.call('PEXPIRE', st.hkey, st.ttl + 60000)
  end
end

-- KEYS: seq, epoch, clock, request, then one stream key per message
-- ARGV: n, clock_retention_ms, then per message: channel, key, has_key, body, maxlen, ttl_ms,
--       then optionally one max_keys per message (default 10000)
-- returns {epoch, seq1, ..., seqN}
-- `request` is a per-request token key: a retry of a publish whose reply was lost finds
-- it and gets the original ids instead of publishing twice.
local function publish(keys, args)
  local n = tonumber(args[1])
  local retention = tonumber(args[2])
  local done = redis.call('GET', keys[4])
  if done then return cjson.decode(done) end
  -- Check every key before the first write: a batch is all or nothing.  (Once per topic:
  -- a batch often holds many messages of a few topics.)
  local checked = {}
  for i = 1, n do
    local skey = keys[4 + i]
    if not checked[skey] then
      checked[skey] = true
      local t = redis.call('TYPE', skey)['ok']
      if t ~= 'none' and t ~= 'stream' then
        return redis.error_reply('WRONGTYPE history key ' .. skey .. ' is a ' .. t)
      end
      local zkey, hkey = keyed_keys(skey)
      local tz, th = redis.call('TYPE', zkey)['ok'], redis.call('TYPE', hkey)['ok']
      if (tz ~= 'none' and tz ~= 'zset') or (th ~= 'none' and th ~= 'hash') then
        return redis.error_reply('WRONGTYPE keyed state of ' .. skey .. ' is a ' .. tz .. '/' .. th)
      end
    end
  end
  local now = now_ms()
  local epoch = epoch_of(keys[2], now)
  local out = {epoch}
  local kstate, korder = {}, {}  -- keyed state per stream key of this call, in first-use order
  local clock = keys[3]
  for i = 1, n do
    local base = 2 + (i - 1) * 6
    local channel, key, has_key, body = args[base + 1], args[base + 2], args[base + 3], args[base + 4]
    local maxlen, ttl = tonumber(args[base + 5]), tonumber(args[base + 6])
    local skey = keys[4 + i]
    local maxkeys = tonumber(args[2 + n * 6 + i] or '10000')
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
    local st = kstate[skey]
    if not st then
      -- A keyed state created now starts where a fresh stream does (`gone`), or, beside a
      -- stream that already held events (written before keyed state existed), past them all.
      local floor0 = gone
      if not fresh then floor0 = seq - i end
      st = keyed_begin(skey, maxkeys, ttl, floor0)
      kstate[skey] = st
      korder[#korder + 1] = skey
    end
    keyed_put(st, seq, now, has_key, key, body, old)
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
  for _, skey in ipairs(korder) do keyed_end(kstate[skey]) end
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

-- The keyed state of a stream key's topic above `after`, oldest first, as {seq, ms,
-- key|false, body, ...}; nil if it does not cover a resume after `after` (strict), i.e. a key
-- changed after it was evicted or expired.  Not strict (a snapshot): expired members are
-- skipped.  `gone_floor`: what a keyed state that is gone covers (see "Coverage").
local function keyed_after(skey, after, horizon, strict, gone_floor)
  local zkey, hkey = keyed_keys(skey)
  if redis.call('EXISTS', hkey) == 0 then
    if strict and (after < gone_floor or redis.call('EXISTS', skey) == 1) then return nil end
    return {}
  end
  if strict and after < tonumber(redis.call('HGET', hkey, 'f') or '0') then return nil end
  local out = {}
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', zkey, '(' .. after, '+inf')) do
    local v = redis.call('HGET', hkey, m)
    local s, ms, rest = string.match(v, '^(%d+):(%d+):()')
    if tonumber(ms) < horizon then
      if strict then return nil end
    else
      out[#out + 1] = tonumber(s)
      out[#out + 1] = tonumber(ms)
      if string.sub(m, 1, 1) == 'k' then out[#out + 1] = string.sub(m, 2) else out[#out + 1] = false end
      out[#out + 1] = string.sub(v, rest)
    end
  end
  return out
end

-- KEYS: seq, epoch, clock, then one stream key per topic
-- ARGV: mode, after_seq, then one ttl_ms per topic, then optionally one flag per topic: '1' =
--       resume compacted whenever that is shorter (slow_consumer conflate).  Modes: 'after'
--       (history only: a gap fill), 'resume' ('after', else the keyed state), 'last',
--       'earliest', 'snapshot'.
-- returns {epoch, head, now, r1, ..., rN}; ri = {status, seq, ms, key|false, body, ...} with
-- status 1 = history covers, 0 = neither covers (reset), 2 = compacted (keyed state)
local function replay(keys, args)
  local mode, after = args[1], tonumber(args[2])
  local resume = mode == 'resume'
  if resume then mode = 'after' end
  local nt = #keys - 3
  local now = now_ms()
  -- Read-only (runs on replicas too): no epoch yet means nothing was ever published.
  local epoch = redis.call('GET', keys[2]) or ''
  local head = tonumber(redis.call('GET', keys[1]) or '0')
  local out = {epoch, head, now}
  for i = 4, #keys do
    local skey, ttl = keys[i], tonumber(args[i - 1])
    local horizon = 0
    if ttl > 0 then horizon = now - ttl end
    local gone_floor = 0
    if ttl > 0 and mode == 'after' then gone_floor = seq_by(keys[3], horizon, head) end
    local r = {1}
    if mode == 'snapshot' then
      local k = keyed_after(skey, -1, horizon, false, 0)
      for j = 1, #k do r[j + 1] = k[j] end
    elseif redis.call('EXISTS', skey) == 0 then
      -- Gone: expired (ttl + 60 s after its last publish), so everything it held is at most
      -- seq_by(horizon); or never published.  ttl 0 streams do not expire.
      if mode == 'after' and ttl > 0 and after < gone_floor then r[1] = 0 end
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
    if resume and (r[1] == 0 or (args[2 + nt + i - 3] == '1' and #r > 5)) then
      -- History does not cover (or the topic prefers compacting): the keyed state may.
      local k = keyed_after(skey, after, horizon, true, gone_floor)
      if k and (r[1] == 0 or #k < #r - 1) then
        r = {2}
        for j = 1, #k do r[j + 1] = k[j] end
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
