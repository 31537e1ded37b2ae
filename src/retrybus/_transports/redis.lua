-- The Redis transport's scripts (src/retrybus/_transports/redis.py loads them).
-- Each script starts at a line '--! NAME'; 'helpers' is put before the scripts
-- that use it. Keys and arguments are described above each one.

--! helpers
local function covers(prefixes, word)
  local ok, list = pcall(cjson.decode, prefixes)
  if not ok or type(list) ~= 'table' then return false end
  for _, prefix in ipairs(list) do
    if prefix == '*' or string.match(prefix, '^[^.]*') == word then return true end
  end
  return false
end
local function create_group(stream, service, start)
  local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', stream, service, start, 'MKSTREAM')
  if not ok and not string.find(tostring(err.err or err), 'BUSYGROUP', 1, true) then
    error(err)
  end
end
-- every service whose prefixes cover word gets its group on stream
local function ensure_groups(groups_key, stream, word, start)
  local services = redis.call('HGETALL', groups_key)
  for i = 1, #services, 2 do
    if covers(services[i + 1], word) then create_group(stream, services[i], start) end
  end
end
-- service's group leaves stream; a stream no group reads any more goes
local function drop_group(streams_key, stream, word, service)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('SREM', streams_key, word)
    return
  end
  redis.call('XGROUP', 'DESTROY', stream, service)
  if #redis.call('XINFO', 'GROUPS', stream) == 0 then
    redis.call('DEL', stream)
    redis.call('SREM', streams_key, word)
  end
end

--! publish
-- KEYS: streams, groups, then a stream per word; ARGV: the words, their counts,
-- then the bodies word by word. Returns an entry id (or false: no group) per body.
local words = #KEYS - 2
local ids = {}
local at = 2 * words + 1
for j = 1, words do
  local stream, word, count = KEYS[j + 2], ARGV[j], tonumber(ARGV[words + j])
  if redis.call('EXISTS', stream) == 0 then ensure_groups(KEYS[2], stream, word, '0') end
  local live = redis.call('EXISTS', stream) == 1
  if live then redis.call('SADD', KEYS[1], word) end
  for i = 0, count - 1 do
    if live then
      ids[#ids + 1] = redis.call('XADD', stream, '*', 'e', ARGV[at + i])
    else
      ids[#ids + 1] = false
    end
  end
  at = at + count
end
return ids

--! declare
-- KEYS: streams, groups, forgotten; ARGV: service, prefixes (JSON), stream key
-- prefix, the words its prefixes name. The group starts at '$' where it is new.
local service, prefixes, head = ARGV[1], ARGV[2], ARGV[3]
redis.call('HSET', KEYS[2], service, prefixes)
redis.call('HDEL', KEYS[3], service)
local words = {}
for _, word in ipairs(redis.call('SMEMBERS', KEYS[1])) do words[word] = true end
for i = 4, #ARGV do words[ARGV[i]] = true end
for word in pairs(words) do
  local stream = head .. word
  if covers(prefixes, word) then
    create_group(stream, service, '$')
    redis.call('SADD', KEYS[1], word)
  elseif redis.call('EXISTS', stream) == 1 then
    local groups = redis.call('XINFO', 'GROUPS', stream)
    for _, group in ipairs(groups) do
      if group[2] == service then drop_group(KEYS[1], stream, word, service) end
    end
  end
end
return 1

--! forget
-- KEYS: streams, groups, forgotten; ARGV: service, stream key prefix
local service, head = ARGV[1], ARGV[2]
redis.call('HDEL', KEYS[2], service)
redis.call('HSET', KEYS[3], service, '1')
for _, word in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  drop_group(KEYS[1], head .. word, word, service)
end
return 1

--! repair
-- KEYS: streams, groups; ARGV: stream key prefix, words: the groups of every
-- service covering each word, made again at '$' (a stream or group that vanished)
for i = 2, #ARGV do
  ensure_groups(KEYS[2], ARGV[1] .. ARGV[i], ARGV[i], '$')
  redis.call('SADD', KEYS[1], ARGV[i])
end
return 1

--! settle
-- KEYS: streams; ARGV: group, consumer, mode (ack, extend, release), then per
-- stream its count and (id, deliveries) pairs. Only entries this consumer still
-- holds at that delivery count are touched (one another consumer took over is
-- theirs); returns per stream the ids touched.
local group, me, mode = ARGV[1], ARGV[2], ARGV[3]
local at, done = 4, {}
for k = 1, #KEYS do
  local count = tonumber(ARGV[at])
  local mine = {}
  for i = 0, count - 1 do
    local id = ARGV[at + 1 + 2 * i]
    local ok, p = pcall(redis.call, 'XPENDING', KEYS[k], group, id, id, 1)
    if ok and p[1] and p[1][2] == me and p[1][4] == tonumber(ARGV[at + 2 + 2 * i]) then
      mine[#mine + 1] = id
    end
  end
  at = at + 1 + 2 * count
  if #mine > 0 then
    if mode == 'ack' then
      redis.call('XACK', KEYS[k], group, unpack(mine))
    else
      -- XCLAIM <ids> JUSTID: idle reset (or IDLE: made idle), delivery count kept;
      -- unpack() must come last in a call, or Lua keeps only its first value
      local claim = {'XCLAIM', KEYS[k], group, me, 0}
      for _, id in ipairs(mine) do claim[#claim + 1] = id end
      if mode == 'release' then
        claim[#claim + 1] = 'IDLE'
        claim[#claim + 1] = ARGV[#ARGV]
      end
      claim[#claim + 1] = 'JUSTID'
      redis.call(unpack(claim))
    end
  end
  done[k] = mine
end
return done

--! claim
-- KEYS: streams; ARGV: group, consumer, min idle ms, count, then a cursor per
-- stream. Returns per stream {next cursor, {{id, fields, deliveries}}, deleted ids}.
local group, me, idle, left = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for k = 1, #KEYS do
  if left <= 0 then
    out[k] = {ARGV[4 + k], {}, {}}
  else
    local r = redis.call('XAUTOCLAIM', KEYS[k], group, me, idle, ARGV[4 + k], 'COUNT', left)
    local entries = {}
    for _, e in ipairs(r[2]) do
      local p = redis.call('XPENDING', KEYS[k], group, e[1], e[1], 1)
      entries[#entries + 1] = {e[1], e[2], p[1] and p[1][4] or 1}
    end
    left = left - #entries
    out[k] = {r[1], entries, r[3] or {}}
  end
end
return out

--! trim
-- KEYS: streams; ARGV: idle ms after which a consumer holding nothing is removed.
-- Each stream is cut before the oldest entry a group still needs: its oldest
-- pending entry, else its last delivered one (MINID keeps the entries at or after).
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local trimmed = 0
for k = 1, #KEYS do
  local stream = KEYS[k]
  if redis.call('EXISTS', stream) == 1 then
    local keep = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      local id = f['last-delivered-id']
      if f['pending'] > 0 then id = redis.call('XPENDING', stream, f['name'])[2] end
      if keep == nil or older(id, keep) then keep = id end
      for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, f['name'])) do
        local cf = {}
        for i = 1, #c, 2 do cf[c[i]] = c[i + 1] end
        if cf['pending'] == 0 and cf['idle'] > tonumber(ARGV[1]) then
          redis.call('XGROUP', 'DELCONSUMER', stream, f['name'], cf['name'])
        end
      end
    end
    if keep == nil then
      local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
      if #last > 0 then keep = last[1][1] end
    end
    if keep ~= nil then trimmed = trimmed + redis.call('XTRIM', stream, 'MINID', keep) end
  end
end
return trimmed
