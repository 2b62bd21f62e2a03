-- GCRA over every counter of one rate-limit decision, atomically (Redis runs a script
-- alone). The same algorithm as src/gcra.rs and counter_store::decide_batch, in
-- microseconds: Lua numbers are doubles, exact up to 2^53, and Unix time in µs (~1.8e15)
-- fits where nanoseconds would not.
--
-- KEYS[i]   counter key (all in one Cluster slot: the caller groups them)
-- ARGV[4i-3] period in µs   ARGV[4i-2] requests per period
-- ARGV[4i-1] hits           ARGV[4i]   mode: e = enforce, s = shadow, r = refund, d = debit
-- Returns four integers per key: allowed (1/0), remaining, reset_after µs, retry_after µs.
--
-- The server's clock (TIME) is the only clock, so replicas of the service with skewed
-- clocks agree. A request with a denied enforced hit consumes nothing (refunds still
-- apply). Each written key expires when its counter is back to a full burst.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local MAX = 9007199254740991 -- keep replies exact integers

local counters = {}
local order = {}
local out = {}
local denied = false

for i = 1, #KEYS do
  local key = KEYS[i]
  local a = (i - 1) * 4
  local period = tonumber(ARGV[a + 1])
  local per = tonumber(ARGV[a + 2])
  local hits = tonumber(ARGV[a + 3])
  local mode = ARGV[a + 4]

  local c = counters[key]
  if not c then
    local v = redis.call('GET', key)
    local stored = v and tonumber(v) or 0
    c = { stored = stored, all = stored, refunds = stored }
    counters[key] = c
    order[#order + 1] = key
  end

  local interval = math.max(math.floor(period / math.max(per, 1)), 1)
  local allow_until = now + period

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
    out[#out + 1] = math.max(math.floor((allow_until - tat) / interval), 0)
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
    out[#out + 1] = math.floor((allow_until - tat) / interval)
    out[#out + 1] = tat - now
    out[#out + 1] = 0
  else
    local base = math.max(c.all, now)
    local new_tat = base + interval * hits
    if per == 0 or new_tat > allow_until then
      local retry = period
      if per > 0 then retry = new_tat - allow_until end
      out[#out + 1] = 0
      out[#out + 1] = math.max(math.floor((allow_until - base) / interval), 0)
      out[#out + 1] = base - now
      out[#out + 1] = math.min(retry, MAX)
      if mode == 'e' then denied = true end
    else
      out[#out + 1] = 1
      out[#out + 1] = math.floor((allow_until - new_tat) / interval)
      out[#out + 1] = new_tat - now
      out[#out + 1] = 0
      if hits > 0 then c.all = new_tat end
    end
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
