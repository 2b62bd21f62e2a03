-- GCRA over every counter of one rate-limit decision, atomically (Redis runs a script
-- alone). The same algorithm as src/gcra.rs and counter_store::decide_batch, in
-- microseconds: Lua numbers are doubles, exact up to 2^53, and Unix time in µs (~1.8e15)
-- fits where nanoseconds would not.
--
-- KEYS[i]   counter key (all in one Cluster slot: the caller groups them)
-- ARGV[4i-3] period in µs   ARGV[4i-2] requests per period
-- ARGV[4i-1] hits           ARGV[4i]   mode: e = enforce, s = shadow, r = refund, d = debit
-- Concurrency leases (KEYS[i] a sorted set: member request id, score expiry in µs):
-- ARGV[4i-3] lease TTL in µs  ARGV[4i-2] max concurrent
-- ARGV[4i-1] request id       ARGV[4i]   mode: l = lease (acquire), u = release
-- Returns four integers per key: allowed (1/0), remaining, reset_after µs, retry_after µs.
--
-- The server's clock (TIME) is the only clock, so replicas of the service with skewed
-- clocks agree. A request with a denied enforced hit or lease consumes nothing and takes
-- no slot (refunds and releases still apply). Each written key expires when its counter
-- is back to a full burst, a lease set with its last lease.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local MAX = 9007199254740991 -- keep replies exact integers

local counters = {}
local order = {}
local sets = {}
local set_order = {}
local out = {}
local denied = false
local LEASE_RETRY = 1000000

for i = 1, #KEYS do
  local key = KEYS[i]
  local a = (i - 1) * 4
  local mode = ARGV[a + 4]
  if mode == 'l' or mode == 'u' then
    local ttl = tonumber(ARGV[a + 1])
    local per = tonumber(ARGV[a + 2])
    local id = ARGV[a + 3]
    local s = sets[key]
    if not s then
      -- Expired leases (a stream whose release never came) free their slots here.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now))
      s = { live = redis.call('ZCARD', key), ids = {}, order = {}, ttl = 0 }
      sets[key] = s
      set_order[#set_order + 1] = key
    end
    local st = s.ids[id]
    if not st then
      local held = id ~= '' and redis.call('ZSCORE', key, id) ~= false
      st = { before = held, now = held }
      s.ids[id] = st
      s.order[#s.order + 1] = id
    end
    if mode == 'u' then
      if st.now then
        s.live = s.live - 1
        st.now = false
      end
      out[#out + 1] = 1
      out[#out + 1] = math.max(per - s.live, 0)
      out[#out + 1] = 0
      out[#out + 1] = 0
    elseif id == '' or st.now or s.live >= per then
      -- No request id, a request id already holding a slot, or no slot left.
      denied = true
      out[#out + 1] = 0
      out[#out + 1] = math.max(per - s.live, 0)
      out[#out + 1] = 0
      out[#out + 1] = LEASE_RETRY
    else
      s.live = s.live + 1
      st.now = true
      s.ttl = ttl
      out[#out + 1] = 1
      out[#out + 1] = per - s.live
      out[#out + 1] = 0
      out[#out + 1] = 0
    end
  else
    local period = tonumber(ARGV[a + 1])
    local per = tonumber(ARGV[a + 2])
    local hits = tonumber(ARGV[a + 3])

    local c = counters[key]
    if not c then
      local v = redis.call('GET', key)
      local stored = v and tonumber(v) or 0
      c = { stored = stored, all = stored, refunds = stored }
      counters[key] = c
      order[#order + 1] = key
    end

    -- As src/gcra.rs: the interval rounded up, the burst window `per × interval`, so a
    -- burst is exactly `per` whatever the period (rounded down, 10406 a minute let 10407
    -- through). At 1 µs per hit, more than 10^6 a second is refused beyond 10^6.
    local per1 = math.max(per, 1)
    local interval = math.max(math.ceil(period / per1), 1)
    local allow_until = now + interval * per1
    local function left(tat)
      if per == 0 then return 0 end
      return math.min(math.max(math.floor((allow_until - tat) / interval), 0), per)
    end

    if mode == 'd' then
      -- Tokens already used: consumed even past the limit, and even when another hit of
      -- the request is denied.
      local function debit(tat)
        if hits == 0 then return tat end
        return math.max(tat, now) + interval * hits
      end
      c.all = debit(c.all)
      c.refunds = debit(c.refunds)
      local tat = math.max(c.all, now)
      out[#out + 1] = 1
      out[#out + 1] = left(tat)
      out[#out + 1] = tat - now
      out[#out + 1] = 0
    elseif mode == 'r' then
      local function give_back(tat)
        if tat <= now then return tat end
        return math.max(tat - interval * hits, now)
      end
      c.all = give_back(c.all)
      c.refunds = give_back(c.refunds)
      local tat = math.max(c.all, now)
      out[#out + 1] = 1
      out[#out + 1] = left(tat)
      out[#out + 1] = tat - now
      out[#out + 1] = 0
    else
      local base = math.max(c.all, now)
      local new_tat = base + interval * hits
      if per == 0 or new_tat > allow_until then
        local retry = interval * per1
        if per > 0 then retry = new_tat - allow_until end
        out[#out + 1] = 0
        out[#out + 1] = left(base)
        out[#out + 1] = base - now
        out[#out + 1] = math.min(retry, MAX)
        if mode == 'e' then denied = true end
      else
        out[#out + 1] = 1
        out[#out + 1] = left(new_tat)
        out[#out + 1] = new_tat - now
        out[#out + 1] = 0
        if hits > 0 then c.all = new_tat end
      end
    end
  end
end

for _, key in ipairs(set_order) do
  local s = sets[key]
  local added = false
  for _, id in ipairs(s.order) do
    local st = s.ids[id]
    if st.now and not st.before and not denied then
      redis.call('ZADD', key, string.format('%.0f', now + s.ttl), id)
      added = true
    elseif st.before and not st.now then
      redis.call('ZREM', key, id)
    end
  end
  if added then
    -- The set lives as long as its longest lease (an emptied set is deleted by Redis).
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', key, string.format('%.0f', math.ceil(tonumber(last[2]) / 1000)))
  end
end

for _, key in ipairs(order) do
  local c = counters[key]
  local tat = c.all
  if denied then tat = c.refunds end
  if tat ~= c.stored then
    if tat > now then
      -- '%.0f': tostring() would print 1.7e+15 and lose digits.
      redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
    else
      redis.call('DEL', key)
    end
  end
end

return out
