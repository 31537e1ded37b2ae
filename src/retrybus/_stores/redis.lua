-- All Lua of the Redis store, one named script per block. The store prepends the
-- `helpers` block to every other block before registering it (EVALSHA).
--
-- Every script gets the same KEYS (see KEY_NAMES in redis.py) and ARGV[1] = the key
-- prefix, from which the per-value dead letter index keys are built. Times are passed
-- in by the caller (never the server's TIME): scores are epoch seconds as floats; the
-- exact times (microseconds) live in the JSON records.
--
-- Keys (P = prefix):
--   P:retry:items     hash  id -> retry item JSON (everything but the lease)
--   P:retry:next      zset  id -> next_retry   (every item: listing, count_due)
--   P:retry:ready     zset  id -> next_retry   (items no one has leased: claim, next_due)
--   P:retry:leased    zset  id -> lease_until  (leased items; claimable again once <= now)
--   P:retry:created   zset  id -> created_at   (expiry)
--   P:retry:claims    hash  id -> time of the last claim (ISO text, always 32 characters:
--                           it is the item's updated_at) followed by the lease owner, if
--                           it still holds the item (fencing)
--   P:counters        hash  name -> running total
--   P:dead:items      hash  id -> dead letter JSON
--   P:dead:created    zset  id -> created_at   (newest first browsing, cleanup)
--   P:dead:index      hash  id -> JSON [event_type, handler_name, processed, created_at score]
--   P:dead:type:T, P:dead:handler:H, P:dead:processed:0|1
--                     zsets id -> created_at   (one per value: filtered browsing)
--   channel P:changes (PUBLISH when an item is added or made due)

-- name: helpers
local K_ITEMS, K_NEXT, K_READY, K_LEASED, K_CREATED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_CLAIMS, K_COUNTERS = KEYS[6], KEYS[7]
local K_DEAD, K_DEAD_CREATED, K_DEAD_INDEX = KEYS[8], KEYS[9], KEYS[10]
local STAMP = 32 -- characters of the claim time at the start of a K_CLAIMS value

-- the owner of an item's lease ('' when none)
local function owner_of(id)
    local claim = redis.call('HGET', K_CLAIMS, id)
    if not claim then
        return ''
    end
    return string.sub(claim, STAMP + 1)
end
local PREFIX = ARGV[1]
local CHANNEL = PREFIX .. ':changes'

local function drop_retry(id)
    local gone = redis.call('HDEL', K_ITEMS, id)
    redis.call('ZREM', K_NEXT, id)
    if redis.call('ZREM', K_LEASED, id) == 0 then -- an item is either leased or ready
        redis.call('ZREM', K_READY, id)
    end
    redis.call('ZREM', K_CREATED, id)
    redis.call('HDEL', K_CLAIMS, id)
    return gone == 1
end

-- store (or replace) an unleased item due at next_score
local function put_retry(id, json, next_score, created_score)
    redis.call('HSET', K_ITEMS, id, json)
    redis.call('ZADD', K_NEXT, next_score, id)
    redis.call('ZADD', K_READY, next_score, id)
    if created_score then
        redis.call('ZADD', K_CREATED, created_score, id)
    end
    redis.call('ZREM', K_LEASED, id)
    redis.call('HDEL', K_CLAIMS, id)
end

-- does the caller hold item `id`? with an owner: its lease is the owner's;
-- without (has_owner = '0'): no live lease holds it at `now`
-- (a K_CLAIMS entry exists only for a stored item)
local function held(id, has_owner, owner, now)
    if has_owner == '1' then
        return owner ~= '' and owner_of(id) == owner
    end
    if redis.call('HEXISTS', K_ITEMS, id) == 0 then
        return false
    end
    local lease = redis.call('ZSCORE', K_LEASED, id)
    return (not lease) or tonumber(lease) <= now
end

local function dead_value_keys(index)
    local ix = cjson.decode(index)
    return {
        PREFIX .. ':dead:type:' .. ix[1],
        PREFIX .. ':dead:handler:' .. ix[2],
        PREFIX .. ':dead:processed:' .. tostring(ix[3]),
    }, ix[4]
end

local function index_dead(id, index)
    local keys, created = dead_value_keys(index)
    redis.call('HSET', K_DEAD_INDEX, id, index)
    redis.call('ZADD', K_DEAD_CREATED, created, id)
    for _, key in ipairs(keys) do
        redis.call('ZADD', key, created, id)
    end
end

local function unindex_dead(id)
    local index = redis.call('HGET', K_DEAD_INDEX, id)
    redis.call('HDEL', K_DEAD_INDEX, id)
    redis.call('ZREM', K_DEAD_CREATED, id)
    if index then
        local keys = dead_value_keys(index)
        for _, key in ipairs(keys) do
            redis.call('ZREM', key, id)
        end
    end
end

-- add a dead letter unless one with its id exists (a repeated move is a no-op)
local function put_dead(id, json, index)
    if redis.call('HSETNX', K_DEAD, id, json) == 0 then
        return false
    end
    index_dead(id, index)
    return true
end

local function drop_dead(id)
    if redis.call('HDEL', K_DEAD, id) == 0 then
        return false
    end
    unindex_dead(id)
    return true
end

-- id, json, claim (time .. owner), lease_until score of each item (nil when absent)
local function fetch_retry(ids)
    local out = {}
    for _, id in ipairs(ids) do
        out[#out + 1] = id
        out[#out + 1] = redis.call('HGET', K_ITEMS, id)
        out[#out + 1] = redis.call('HGET', K_CLAIMS, id)
        out[#out + 1] = redis.call('ZSCORE', K_LEASED, id)
    end
    return out
end

-- name: record_failures
-- ARGV: prefix, n_retry, n_dead,
--       n_retry x (id, json, next, created, claim (time .. owner) or '', lease_until or ''),
--       n_dead x (id, json, index)
local n_retry, n_dead = tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for _ = 1, n_retry do
    local id = ARGV[i]
    put_retry(id, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    if ARGV[i + 5] ~= '' then
        redis.call('ZREM', K_READY, id)
        redis.call('ZADD', K_LEASED, ARGV[i + 5], id)
    end
    if ARGV[i + 4] ~= '' then
        redis.call('HSET', K_CLAIMS, id, ARGV[i + 4])
    end
    i = i + 6
end
for _ = 1, n_dead do
    put_dead(ARGV[i], ARGV[i + 1], ARGV[i + 2])
    i = i + 3
end
if n_retry > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_added', n_retry)
    redis.call('PUBLISH', CHANNEL, 'added')
end
return n_retry

-- name: claim_due
-- ARGV: prefix, now, limit, owner, lease_until, now (ISO text)
-- Due unleased items and items whose lease ran out, earliest next_retry first.
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local picked = {}
local ready = redis.call('ZRANGEBYSCORE', K_READY, '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0, limit)
for j = 1, #ready, 2 do
    picked[#picked + 1] = { ready[j], tonumber(ready[j + 1]) }
end
local expired = redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', ARGV[2], 'LIMIT', 0, limit)
if #expired > 0 then
    for _, id in ipairs(expired) do
        local due = redis.call('ZSCORE', K_NEXT, id)
        if due and tonumber(due) <= now then
            picked[#picked + 1] = { id, tonumber(due) }
        end
    end
    table.sort(picked, function(a, b)
        return a[2] < b[2] or (a[2] == b[2] and a[1] < b[1])
    end)
end
local out = {}
for j = 1, math.min(limit, #picked) do
    local id = picked[j][1]
    local json = redis.call('HGET', K_ITEMS, id)
    if json then
        redis.call('ZREM', K_READY, id)
        redis.call('ZADD', K_LEASED, ARGV[5], id)
        redis.call('HSET', K_CLAIMS, id, ARGV[6] .. ARGV[4])
        out[#out + 1] = id
        out[#out + 1] = json
    else
        drop_retry(id) -- an index entry without its record: nothing to deliver
    end
end
return out

-- name: extend_leases
-- ARGV: prefix, owner, lease_until, ids...
local n = 0
for j = 4, #ARGV do
    if ARGV[2] ~= '' and owner_of(ARGV[j]) == ARGV[2] then
        redis.call('ZADD', K_LEASED, ARGV[3], ARGV[j])
        n = n + 1
    end
end
return n

-- name: release
-- ARGV: prefix, owner, ids...
local n = 0
for j = 3, #ARGV do
    local id = ARGV[j]
    local claim = redis.call('HGET', K_CLAIMS, id)
    if claim and ARGV[2] ~= '' and string.sub(claim, STAMP + 1) == ARGV[2] then
        redis.call('HSET', K_CLAIMS, id, string.sub(claim, 1, STAMP)) -- keep updated_at
        redis.call('ZREM', K_LEASED, id)
        local due = redis.call('ZSCORE', K_NEXT, id)
        if due then
            redis.call('ZADD', K_READY, due, id)
        end
        n = n + 1
    end
end
if n > 0 then
    redis.call('PUBLISH', CHANNEL, 'released')
end
return n

-- name: complete
-- ARGV: prefix, has_owner ('1'/'0'), owner, now, n_succeeded, n_rescheduled, n_dead,
--       n_succeeded x (id, attempt),
--       n_rescheduled x (id, json, next_retry),
--       n_dead x (id, dead id, dead json, dead index)
-- Returns the ids the outcomes were applied to.
local has_owner, owner, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local n_ok, n_again, n_dead = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local applied = {}
local done, attempts, moved, again = 0, 0, 0, 0
local i = 8
for _ = 1, n_ok do
    local id = ARGV[i]
    if held(id, has_owner, owner, now) then
        -- an owner's item is as it claimed it; otherwise read the stored attempt
        local attempt = tonumber(ARGV[i + 1]) or 0
        if has_owner ~= '1' then
            local json = redis.call('HGET', K_ITEMS, id)
            attempt = tonumber(string.match(json, '^{"attempt":(%-?%d+)') or attempt) or 0
        end
        drop_retry(id)
        applied[#applied + 1] = id
        done = done + 1
        attempts = attempts + attempt
    end
    i = i + 2
end
for _ = 1, n_again do
    local id = ARGV[i]
    if held(id, has_owner, owner, now) then
        put_retry(id, ARGV[i + 1], ARGV[i + 2], nil)
        applied[#applied + 1] = id
        again = again + 1
    end
    i = i + 3
end
for _ = 1, n_dead do
    local id = ARGV[i]
    if held(id, has_owner, owner, now) then
        drop_retry(id)
        put_dead(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
        applied[#applied + 1] = id
        moved = moved + 1
    end
    i = i + 4
end
if done > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_succeeded', done)
    redis.call('HINCRBY', K_COUNTERS, 'retry_succeeded_attempts', attempts)
end
if moved > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_dead_lettered', moved)
end
if again > 0 then
    redis.call('PUBLISH', CHANNEL, 'rescheduled')
end
return applied

-- name: next_due
-- ARGV: prefix. The earliest next_retry of an unleased item or lease end of a leased
-- one (a claim's next_retry is never after its lease end), as the stored score text
-- (exact); nil when the queue is empty.
local best, best_text = nil, nil
local ready = redis.call('ZRANGE', K_READY, 0, 0, 'WITHSCORES')
if #ready > 0 then
    best, best_text = tonumber(ready[2]), ready[2]
end
local leased = redis.call('ZRANGE', K_LEASED, 0, 0, 'WITHSCORES')
if #leased > 0 then
    local at_text = leased[2]
    local due_text = redis.call('ZSCORE', K_NEXT, leased[1])
    if due_text and tonumber(due_text) > tonumber(at_text) then
        at_text = due_text
    end
    if best == nil or tonumber(at_text) < best then
        best, best_text = tonumber(at_text), at_text
    end
end
return best_text

-- name: fetch_retry
-- ARGV: prefix, ids...
local ids = {}
for j = 2, #ARGV do
    ids[#ids + 1] = ARGV[j]
end
return fetch_retry(ids)

-- name: page_retry
-- ARGV: prefix, start, stop (ranks in next_retry, id order)
return fetch_retry(redis.call('ZRANGE', K_NEXT, ARGV[2], ARGV[3]))

-- name: delete_retry
-- ARGV: prefix, id
if drop_retry(ARGV[2]) then
    return 1
end
return 0

-- name: expire_candidates
-- ARGV: prefix, before, now, offset, count. Read only: of `count` items created before
-- `before` (from rank `offset`), the id and JSON of those no live lease holds.
-- Returns {scanned, id, json, id, json, ...}.
local now = tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', K_CREATED, '-inf', '(' .. ARGV[2], 'LIMIT', ARGV[4], ARGV[5])
local out = { #ids }
for _, id in ipairs(ids) do
    local lease = redis.call('ZSCORE', K_LEASED, id)
    if (not lease) or tonumber(lease) <= now then
        out[#out + 1] = id
        out[#out + 1] = redis.call('HGET', K_ITEMS, id) or ''
    end
end
return out

-- name: expire_move
-- ARGV: prefix, now, n x (id, JSON as read, dead id, dead json, dead index).
-- Moves each item still as it was read and held by no live lease; returns their ids.
local now = tonumber(ARGV[2])
local moved = {}
for i = 3, #ARGV, 5 do
    local id = ARGV[i]
    if (redis.call('HGET', K_ITEMS, id) or '') == ARGV[i + 1] and held(id, '0', '', now) then
        drop_retry(id)
        put_dead(ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
        moved[#moved + 1] = id
    end
end
if #moved > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_dead_lettered', #moved)
end
return moved

-- name: list_dead
-- ARGV: prefix, offset, limit, filter keys... Newest first (created_at, then id, descending).
-- With filters, walks the smallest of their sets and checks the others by ZSCORE, so the
-- cost is bounded by the size of the most selective filter, not by the whole DLQ.
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local base, others = K_DEAD_CREATED, {}
if #ARGV > 3 then
    local smallest = nil
    for j = 4, #ARGV do
        local size = redis.call('ZCARD', ARGV[j])
        if smallest == nil or size < smallest then
            smallest, base = size, ARGV[j]
        end
    end
    for j = 4, #ARGV do
        if ARGV[j] ~= base then
            others[#others + 1] = ARGV[j]
        end
    end
end
local ids
if #others == 0 then
    ids = redis.call('ZREVRANGE', base, offset, offset + limit - 1)
else
    ids = {}
    local skipped, pos, chunk = 0, 0, 500
    while #ids < limit do
        local page = redis.call('ZREVRANGE', base, pos, pos + chunk - 1)
        if #page == 0 then
            break
        end
        for _, id in ipairs(page) do
            local match = true
            for _, key in ipairs(others) do
                if not redis.call('ZSCORE', key, id) then
                    match = false
                    break
                end
            end
            if match then
                if skipped < offset then
                    skipped = skipped + 1
                elseif #ids < limit then
                    ids[#ids + 1] = id
                end
            end
        end
        pos = pos + chunk
    end
end
local out = {}
for _, id in ipairs(ids) do
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', K_DEAD, id)
end
return out

-- name: update_dead
-- ARGV: prefix, id, json, index
if redis.call('HEXISTS', K_DEAD, ARGV[2]) == 0 then
    return 0
end
unindex_dead(ARGV[2])
redis.call('HSET', K_DEAD, ARGV[2], ARGV[3])
index_dead(ARGV[2], ARGV[4])
return 1

-- name: requeue_dead
-- ARGV: prefix, dead id, retry id, retry json, next_retry, created_at
if not drop_dead(ARGV[2]) then
    return 0
end
put_retry(ARGV[3], ARGV[4], ARGV[5], ARGV[6])
redis.call('HINCRBY', K_COUNTERS, 'retry_added', 1)
redis.call('PUBLISH', CHANNEL, 'requeued')
return 1

-- name: delete_dead
-- ARGV: prefix, id
if drop_dead(ARGV[2]) then
    return 1
end
return 0

-- name: cleanup_dead
-- ARGV: prefix, before, count. Deletes up to `count` dead letters created before `before`.
local ids = redis.call('ZRANGEBYSCORE', K_DEAD_CREATED, '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
    redis.call('HDEL', K_DEAD, id)
    unindex_dead(id)
end
return #ids
