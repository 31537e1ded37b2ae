-- All Lua of the Redis store, one named script per block. The store prepends the
-- `helpers` block to every other block before registering it (EVALSHA), and the
-- `subscription_helpers` block after it to the scripts that keep subscriptions.
--
-- Every script gets the same KEYS (see KEY_NAMES in store.py) and ARGV[1] = the key
-- prefix, from which the per-value dead letter index keys and the per-lane due sets
-- are built. Times are passed in by the caller (never the server's TIME): scores are
-- epoch seconds as floats; the exact times (microseconds) live in the JSON records.
--
-- A lane is a (service, handler) pair as one string: the handler name H for the
-- default service (the key layouts before services had no other), S NUL H for
-- service S (a handler name holds no NUL, so the two never collide).
--
-- Keys (P = prefix):
--   P:retry:items     hash  id -> retry item JSON (everything but the lease and the
--                           claims count; it starts with attempt, id, handler_name,
--                           event_type, and ends with service when it is not the
--                           default: see codec.py)
--   P:retry:next      zset  id -> next_retry   (every item: listing, count_due)
--   P:retry:due:L     zset  id -> when the item can be claimed: its next_retry, or
--                           while it is leased, the later of next_retry and the lease's
--                           end (the items of lane L: claim, next_due; since layout 3,
--                           lanes of other services than the default since layout 4)
--   P:retry:handler_of hash id -> the lane L of the item's due set (layout 3)
--   P:retry:handlers  set   the lanes whose due set is not empty (a claim or next_due
--                           for every handler or every handler of a service; layout 3)
--   P:retry:ready     zset  id -> next_retry: until layout 3, every unleased item; now
--                           only items a process of an older layout made due (or
--                           damaged ones the upgrade could not read a handler from),
--                           which every claim looks at and moves to their due set
--   P:retry:leased    zset  id -> lease_until  (leased items; fencing, expiry)
--   P:retry:created   zset  id -> created_at   (expiry)
--   P:retry:claims    hash  id -> time of the last claim (ISO text, always 32 characters:
--                           it is the item's updated_at) followed by the lease owner, if
--                           it still holds the item (fencing)
--   P:retry:claim_count hash id -> the item's claims since its last outcome, when not 0
--                           (layout 3; RetryItem.claims)
--   P:retry:order:G   zset  id -> sequence number: the queued records of ordering group
--                           G (a lane and an ordering key: #lane ':' lane ':' key), in
--                           the order they were written (since ordering keys; no layout change: records written before are unkeyed). Only the first
--                           member (the group's head) is in its lane's due set; the
--                           others are parked (no due set, no P:retry:handler_of entry)
--                           until every record before them has left the queue
--   P:retry:order_of  hash  id -> G, for each keyed record (no layout change: a
--                           record written before ordering keys is unkeyed)
--   P:retry:order_seq string  the last sequence number given (INCR)
--   P:counters        hash  name -> running total
--   P:dead:items      hash  id -> dead letter JSON
--   P:dead:created    zset  id -> created_at   (newest first browsing, cleanup)
--   P:dead:index      hash  id -> JSON [event_type, handler_name, processed, created_at
--                           score, reason, failure_group, event_id, service] (reason,
--                           group and event id since layout 2, service since layout 4;
--                           see migrate.py)
--   P:dead:type:T, P:dead:handler:H, P:dead:processed:0|1, P:dead:reason:R,
--   P:dead:group:G, P:dead:service:S
--                     zsets id -> created_at   (one per value: filtering, counting)
--   P:dead:values:type|handler|reason|group|service
--                     sets  the values that have a non-empty per-value zset (grouping)
--   P:dead:events     zset  event_id NUL id, all scored 0 (by event id, ZRANGEBYLEX)
--   P:subs            hash  S NUL H -> a stored subscription (layout 4): JSON
--                           {registered_at, updated_at, removed_at, removed_by,
--                           revision, terms}, terms last (the canonical JSON of its
--                           patterns, policy, max_retries, handler_timeout, details)
--   P:subs:revision   string  the revision of the last subscription write (INCR)
--   P:workers         hash  worker name -> its last heartbeat (JSON; layout 4)
--   P:workers:seen    zset  worker name -> last_seen  (pruning)
--   P:schema          string  the key layout version (migrate.py: LAYOUT_VERSION)
--   P:dead_indexed_to string  a created_at score: the dead letters created until then
--                           are indexed by service (layout 4; see migrate.py)
--   P:control:rec:K   hash  version, value (JSON): control record K
--   P:control:index   zset  K, all scored 0 (list_control by prefix, ZRANGEBYLEX)
--   channel P:changes (PUBLISH when a retry item, or a pending delivery no one leases,
--                     is added, or an item is made due again)

-- name: helpers
local K_ITEMS, K_NEXT, K_LEGACY, K_LEASED, K_CREATED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_CLAIMS, K_COUNTERS = KEYS[6], KEYS[7]
local K_DEAD, K_DEAD_CREATED, K_DEAD_INDEX = KEYS[8], KEYS[9], KEYS[10]
local K_HANDLER_OF, K_HANDLERS, K_CLAIM_COUNT = KEYS[12], KEYS[13], KEYS[14]
local K_SUBS, K_SUBS_REVISION, K_WORKERS, K_WORKERS_SEEN = KEYS[15], KEYS[16], KEYS[17], KEYS[18]
local DEFAULT_SERVICE = 'default'
local STAMP = 32 -- characters of the claim time at the start of a K_CLAIMS value
local CHUNK = 500 -- members read per ZRANGE while walking an index

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

-- the lane of `service`'s `handler` (see the top)
local function lane_for(service, handler)
    if service == DEFAULT_SERVICE then
        return handler
    end
    return service .. '\0' .. handler
end

-- the service and the handler name of a lane
local function split_lane(lane)
    local at = string.find(lane, '\0', 1, true)
    if at then
        return string.sub(lane, 1, at - 1), string.sub(lane, at + 1)
    end
    return DEFAULT_SERVICE, lane
end

local function due_key(lane)
    return PREFIX .. ':retry:due:' .. lane
end

-- the due set item `id` is in: its lane's, or the legacy one
local function due_key_of(id)
    local lane = redis.call('HGET', K_HANDLER_OF, id)
    if lane then
        return due_key(lane)
    end
    return K_LEGACY
end

-- the later of two scores, as the text of the later one
local function later(a, b)
    if b and tonumber(b) > tonumber(a) then
        return b
    end
    return a
end

-- Ordering keys (since ordering keys; no layout change: records written before are unkeyed): a keyed record joins its group's zset when it is written;
-- it is in its lane's due set only while it is the group's head, so that claims and
-- next_due never see the records an earlier one of their key holds back.
local K_ORDER_OF = PREFIX .. ':retry:order_of'
local turned = false -- a parked record was made due (the script publishes on CHANNEL)

local function order_key(group)
    return PREFIX .. ':retry:order:' .. group
end

-- the head of group `group` (nil: empty), after taking out the members whose record
-- is gone (a process of an older layout deleted it without knowing of the group)
local function order_head(group)
    local key = order_key(group)
    while true do
        local first = redis.call('ZRANGE', key, 0, 0)[1]
        if not first or redis.call('HEXISTS', K_ITEMS, first) == 1 then
            return first
        end
        redis.call('ZREM', key, first)
        redis.call('HDEL', K_ORDER_OF, first)
    end
end

-- item `id` (of `lane`) joins the group of ordering key `key` ('': none) at the back;
-- returns whether it is held back (not the group's head)
local function enqueue_keyed(id, lane, key)
    if key == '' then
        return false
    end
    local group = #lane .. ':' .. lane .. ':' .. key
    redis.call('ZADD', order_key(group), redis.call('INCR', PREFIX .. ':retry:order_seq'), id)
    redis.call('HSET', K_ORDER_OF, id, group)
    return order_head(group) ~= id
end

-- is item `id` held back by an earlier record of its ordering group?
local function held_back(id)
    local group = redis.call('HGET', K_ORDER_OF, id)
    if not group then
        return false
    end
    return order_head(group) ~= id
end

-- take item `id` out of the due sets (its lane's, and the legacy one)
local function undue(id)
    local lane = redis.call('HGET', K_HANDLER_OF, id)
    if lane then
        local key = due_key(lane)
        redis.call('ZREM', key, id)
        if redis.call('ZCARD', key) == 0 then
            redis.call('SREM', K_HANDLERS, lane)
        end
        redis.call('HDEL', K_HANDLER_OF, id)
    end
    redis.call('ZREM', K_LEGACY, id)
end

-- item `id` of `lane` can be claimed from `score` on (it moves from the due set of
-- another lane or the legacy one if it was there)
local function set_due(id, lane, score)
    local old = redis.call('HGET', K_HANDLER_OF, id)
    if old ~= lane then
        if old then
            undue(id)
        else
            redis.call('ZREM', K_LEGACY, id)
        end
        redis.call('HSET', K_HANDLER_OF, id, lane)
        redis.call('SADD', K_HANDLERS, lane)
    end
    redis.call('ZADD', due_key(lane), score, id)
end

-- the claims count of item `id` (absent: 0)
local function set_claims(id, claims)
    if tonumber(claims) > 0 then
        redis.call('HSET', K_CLAIM_COUNT, id, claims)
    else
        redis.call('HDEL', K_CLAIM_COUNT, id)
    end
end

-- item `id` leaves its ordering group (if it has one); the group's next record, if
-- it was parked, is due from its next_retry (or its lease's end) on
local function leave_group(id)
    local group = redis.call('HGET', K_ORDER_OF, id)
    if not group then
        return
    end
    redis.call('HDEL', K_ORDER_OF, id)
    redis.call('ZREM', order_key(group), id)
    local head = order_head(group)
    if head and redis.call('HEXISTS', K_HANDLER_OF, head) == 0 then
        local colon = string.find(group, ':', 1, true)
        local lane = string.sub(group, colon + 1, colon + tonumber(string.sub(group, 1, colon - 1)))
        local due = redis.call('ZSCORE', K_NEXT, head)
        if due then
            set_due(head, lane, later(due, redis.call('ZSCORE', K_LEASED, head)))
            turned = true
        end
    end
end

local function drop_retry(id)
    local gone = redis.call('HDEL', K_ITEMS, id)
    redis.call('ZREM', K_NEXT, id)
    undue(id)
    redis.call('ZREM', K_LEASED, id)
    redis.call('ZREM', K_CREATED, id)
    redis.call('HDEL', K_CLAIMS, id)
    redis.call('HDEL', K_CLAIM_COUNT, id)
    leave_group(id)
    return gone == 1
end

-- a script that made a parked record due tells the watchers
local function announce_turn()
    if turned then
        redis.call('PUBLISH', CHANNEL, 'turn')
    end
end

-- store (or replace) an unleased item of `lane` due at next_score, with `claims` (in
-- no due set while an earlier record of its ordering group holds it back)
local function put_retry(id, json, next_score, created_score, lane, claims)
    redis.call('HSET', K_ITEMS, id, json)
    redis.call('ZADD', K_NEXT, next_score, id)
    if held_back(id) then
        undue(id)
    else
        set_due(id, lane, next_score)
    end
    if created_score then
        redis.call('ZADD', K_CREATED, created_score, id)
    end
    redis.call('ZREM', K_LEASED, id)
    redis.call('HDEL', K_CLAIMS, id)
    set_claims(id, claims)
end

local function push(list, a, b)
    list[#list + 1] = a
    list[#list + 1] = b
end

-- `command` on `key` with the arguments `args`, UNPACK of them at a time (Lua's
-- unpack is bounded by its stack; UNPACK is even, for pairs)
local UNPACK = 1000
local function bulk(command, key, args)
    for start = 1, #args, UNPACK do
        redis.call(command, key, unpack(args, start, math.min(start + UNPACK - 1, #args)))
    end
end

-- Adds the `count` items of ARGV[first...] (9 arguments each: id, json, next_retry,
-- created_at, lane, claim (time .. owner) or '', lease_until or '', claims, ordering
-- key or '') whose id is not stored yet: one HSETNX each, then one command per index
-- key for the whole batch (a new id has no lease, claim or due entry to remove); a
-- keyed item joins its ordering group, and is parked (left out of its due set) behind
-- an earlier one. Returns one character per item ('1' added, '0' already there), how
-- many were added, and whether an unleased one was made due.
local function add_items(first, count)
    local flags, added, unleased = {}, 0, false
    local nexts, created, handler_of, leased, claims, counts, no_count = {}, {}, {}, {}, {}, {}, {}
    local due, lanes = {}, {}
    for i = first, first + 9 * (count - 1), 9 do
        local id = ARGV[i]
        if redis.call('HSETNX', K_ITEMS, id, ARGV[i + 1]) == 1 then
            flags[#flags + 1] = '1'
            added = added + 1
            local next_score, lane, lease = ARGV[i + 2], ARGV[i + 4], ARGV[i + 6]
            push(nexts, next_score, id)
            push(created, ARGV[i + 3], id)
            local parked = enqueue_keyed(id, lane, ARGV[i + 8])
            local set = due[lane]
            if set == nil and not parked then
                set = {}
                due[lane] = set
                lanes[#lanes + 1] = lane
            end
            if not parked then
                push(handler_of, id, lane)
            end
            if lease == '' then
                if not parked then
                    push(set, next_score, id)
                    unleased = true
                end
            else
                if not parked then
                    push(set, later(next_score, lease), id)
                end
                push(leased, lease, id)
                push(claims, id, ARGV[i + 5])
            end
            if tonumber(ARGV[i + 7]) > 0 then
                push(counts, id, ARGV[i + 7])
            else
                no_count[#no_count + 1] = id
            end
        else
            flags[#flags + 1] = '0'
        end
    end
    bulk('ZADD', K_NEXT, nexts)
    bulk('ZADD', K_CREATED, created)
    bulk('HSET', K_HANDLER_OF, handler_of)
    for _, lane in ipairs(lanes) do
        bulk('ZADD', due_key(lane), due[lane])
    end
    bulk('SADD', K_HANDLERS, lanes)
    bulk('ZADD', K_LEASED, leased)
    bulk('HSET', K_CLAIMS, claims)
    bulk('HSET', K_CLAIM_COUNT, counts)
    bulk('HDEL', K_CLAIM_COUNT, no_count) -- (left by a process of an older layout)
    return table.concat(flags), added, unleased
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

-- The lanes ARGV[at...] names: a service ('': any), then n handler names (n = -1:
-- every handler) and the names. With a service and names, their lanes; otherwise
-- the lanes of P:retry:handlers (those whose due set is not empty) that match. Also
-- returns whether a lane matches.
local function lane_args(at)
    local service, n = ARGV[at], tonumber(ARGV[at + 1])
    local names = nil
    if n >= 0 then
        names = {}
        for j = 1, n do
            names[ARGV[at + 1 + j]] = true
        end
    end
    local function wants(lane)
        local lane_service, handler = split_lane(lane)
        return (service == '' or lane_service == service) and (names == nil or names[handler] == true)
    end
    local lanes = {}
    if service ~= '' and names ~= nil then
        for j = 1, n do
            lanes[j] = lane_for(service, ARGV[at + 1 + j])
        end
    else
        for _, lane in ipairs(redis.call('SMEMBERS', K_HANDLERS)) do
            if wants(lane) then
                lanes[#lanes + 1] = lane
            end
        end
    end
    return lanes, wants
end

-- the per-value index sets of a dead letter: key name, position in the index JSON,
-- and whether P:dead:values:<name> lists the values (the fields one groups by)
local DEAD_FIELDS = {
    { 'type', 1, true },
    { 'handler', 2, true },
    { 'processed', 3, false },
    { 'reason', 5, true },
    { 'group', 6, true },
    { 'service', 8, true },
}
local K_DEAD_EVENTS = KEYS[11]

local function value_key(name, value)
    return PREFIX .. ':dead:' .. name .. ':' .. value
end

local function values_key(name)
    return PREFIX .. ':dead:values:' .. name
end

-- an index of layout 1 has no reason, group or event id, one of layouts 1 to 3 no
-- service: those fields are skipped (migrate.py back-fills them)
local function index_dead(id, index)
    local ix = cjson.decode(index)
    local created = ix[4]
    redis.call('HSET', K_DEAD_INDEX, id, index)
    redis.call('ZADD', K_DEAD_CREATED, created, id)
    for _, field in ipairs(DEAD_FIELDS) do
        local value = ix[field[2]]
        if value ~= nil then
            value = tostring(value)
            redis.call('ZADD', value_key(field[1], value), created, id)
            if field[3] then
                redis.call('SADD', values_key(field[1]), value)
            end
        end
    end
    if ix[7] ~= nil then
        redis.call('ZADD', K_DEAD_EVENTS, 0, ix[7] .. '\0' .. id)
    end
end

local function unindex_dead(id)
    local index = redis.call('HGET', K_DEAD_INDEX, id)
    redis.call('HDEL', K_DEAD_INDEX, id)
    redis.call('ZREM', K_DEAD_CREATED, id)
    if not index then
        return
    end
    local ix = cjson.decode(index)
    for _, field in ipairs(DEAD_FIELDS) do
        local value = ix[field[2]]
        if value ~= nil then
            value = tostring(value)
            local key = value_key(field[1], value)
            redis.call('ZREM', key, id)
            if field[3] and redis.call('ZCARD', key) == 0 then
                redis.call('SREM', values_key(field[1]), value)
            end
        end
    end
    if ix[7] ~= nil then
        redis.call('ZREM', K_DEAD_EVENTS, ix[7] .. '\0' .. id)
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

-- id, json, claim (time .. owner), lease_until score and claims count of each item
-- (nil when absent)
local function fetch_retry(ids)
    local out = {}
    for _, id in ipairs(ids) do
        out[#out + 1] = id
        out[#out + 1] = redis.call('HGET', K_ITEMS, id)
        out[#out + 1] = redis.call('HGET', K_CLAIMS, id)
        out[#out + 1] = redis.call('ZSCORE', K_LEASED, id)
        out[#out + 1] = redis.call('HGET', K_CLAIM_COUNT, id)
    end
    return out
end

-- a < b by bytes, as Redis orders members (Lua's < on strings follows the locale)
local function bytes_less(a, b)
    for j = 1, math.min(#a, #b) do
        local x, y = string.byte(a, j), string.byte(b, j)
        if x ~= y then
            return x < y
        end
    end
    return #a < #b
end

-- A dead letter filter from ARGV[at...]: created_after score or '' (inclusive),
-- created_before score or '' (exclusive), event_id or '', the cursor's created_at
-- score and id or '', '' (only dead letters after it, newest first), n, then n keys
-- of per-value zsets a dead letter must be in (its type, handler, reason, group,
-- processed).
local function dead_filter(at)
    local f = {
        after = ARGV[at],
        before = ARGV[at + 1],
        event = ARGV[at + 2],
        cursor = ARGV[at + 3],
        cursor_id = ARGV[at + 4],
        sets = {},
    }
    for j = 1, tonumber(ARGV[at + 5]) do
        f.sets[j] = ARGV[at + 5 + j]
    end
    f.min = f.after == '' and '-inf' or f.after
    f.max = f.before == '' and '+inf' or '(' .. f.before
    return f
end

-- The reverse ranks (newest first) of the first and last member of zset `key` that
-- filter f's time range and cursor let through (first > last: none). The members
-- at the cursor's score are in descending id order: a binary search finds the first
-- one below the cursor's id, so a cursor costs O(log^2 n) whatever the ties.
local function dead_window(key, f)
    local first = 0
    if f.before ~= '' then
        first = redis.call('ZCOUNT', key, f.before, '+inf')
    end
    local last = first + redis.call('ZCOUNT', key, f.min, f.max) - 1
    if f.cursor ~= '' then
        local low = redis.call('ZCOUNT', key, '(' .. f.cursor, '+inf')
        local high = low + redis.call('ZCOUNT', key, f.cursor, f.cursor)
        while low < high do
            local mid = math.floor((low + high) / 2)
            if bytes_less(redis.call('ZREVRANGE', key, mid, mid)[1], f.cursor_id) then
                high = mid
            else
                low = mid + 1
            end
        end
        first = math.max(first, low)
    end
    return first, last
end

-- Without an event id: the most selective zset of the filter (fewest members in its
-- window; P:dead:created when there is none), the filter's other zsets, and the
-- window's first and last reverse rank in the base (see dead_window).
local function dead_candidates(f)
    local base, others = K_DEAD_CREATED, {}
    local first, last = nil, nil
    for _, key in ipairs(f.sets) do
        local low, high = dead_window(key, f)
        if first == nil or high - low < last - first then
            base, first, last = key, low, high
        end
    end
    for _, key in ipairs(f.sets) do
        if key ~= base then
            others[#others + 1] = key
        end
    end
    if first == nil then
        first, last = dead_window(base, f)
    end
    return base, others, first, last
end

local function in_all(keys, id)
    for _, key in ipairs(keys) do
        if not redis.call('ZSCORE', key, id) then
            return false
        end
    end
    return true
end

-- Calls visit(id, score) for each dead letter matching filter f but the first `skip`,
-- newest first (created_at, then id, descending), until visit returns true. Cost: the
-- members of the most selective zset in the time range, from the cursor (if any) up to
-- the last one visited;
-- with an event id, the dead letters of that event.
local function walk_dead(f, skip, visit)
    if f.event ~= '' then
        local found = {}
        local low, high = tonumber(f.after) or -math.huge, tonumber(f.before) or math.huge
        local cursor = tonumber(f.cursor)
        local function after_cursor(at, id)
            return cursor == nil or at < cursor or (at == cursor and bytes_less(id, f.cursor_id))
        end
        local members = redis.call(
            'ZRANGEBYLEX', K_DEAD_EVENTS, '[' .. f.event .. '\0', '(' .. f.event .. '\1'
        )
        for _, member in ipairs(members) do
            local id = string.sub(member, #f.event + 2)
            local index = redis.call('HGET', K_DEAD_INDEX, id)
            -- (an event id holding a NUL would match a longer one's members)
            if index and cjson.decode(index)[7] == f.event then
                local score = redis.call('ZSCORE', K_DEAD_CREATED, id)
                local at = tonumber(score)
                local inside = score and at >= low and at < high and after_cursor(at, id)
                if inside and in_all(f.sets, id) then
                    found[#found + 1] = { id, at, score }
                end
            end
        end
        table.sort(found, function(a, b)
            return a[2] > b[2] or (a[2] == b[2] and bytes_less(b[1], a[1]))
        end)
        for j = skip + 1, #found do
            if visit(found[j][1], found[j][3]) then
                return
            end
        end
        return
    end
    local base, others, first, last = dead_candidates(f)
    local skipped = 0
    if #others == 0 then
        first = first + skip -- every member matches: skip by rank
    end
    for start = first, last, CHUNK do
        local page = redis.call('ZREVRANGE', base, start, math.min(start + CHUNK - 1, last), 'WITHSCORES')
        for j = 1, #page, 2 do
            local id = page[j]
            if #others == 0 or in_all(others, id) then
                if skipped < skip and #others > 0 then
                    skipped = skipped + 1
                elseif visit(id, page[j + 1]) then
                    return
                end
            end
        end
    end
end

-- the raw (still JSON-escaped) text of the JSON string whose opening quote is just
-- before `pos`, and the position after its closing quote
local function raw_json_string(text, pos)
    local at = pos
    while true do
        local stop = string.find(text, '["\\]', at)
        if not stop then
            return nil, nil
        end
        if string.byte(text, stop) == 34 then
            return string.sub(text, pos, stop - 1), stop + 1
        end
        at = stop + 2 -- the escaped character
    end
end


-- the handler name of a retry item record (nil when it cannot be read): from the
-- front of the record (codec.py writes attempt, id, handler_name first), else from
-- the whole record decoded
local function handler_of(json)
    local _, at = string.find(json, '^{"attempt":%-?%d+,"id":"')
    if at then
        local _, after = raw_json_string(json, at + 1)
        local head = ',"handler_name":"'
        if after and string.sub(json, after, after + #head - 1) == head then
            local raw = raw_json_string(json, after + #head)
            if raw and not string.find(raw, '\\', 1, true) then
                return raw
            end
            if raw then
                local ok, name = pcall(cjson.decode, '"' .. raw .. '"')
                if ok and type(name) == 'string' then
                    return name
                end
            end
        end
    end
    local ok, record = pcall(cjson.decode, json)
    if ok and type(record) == 'table' and type(record.handler_name) == 'string' then
        return record.handler_name
    end
    return nil
end

-- the service of a retry item record (nil when it cannot be read): codec.py writes it
-- last, and only when it is not the default (a service name needs no JSON escape):
-- from the end of the record; a record with no '"service":' anywhere is of the default
-- service; any other (one whose event names a service, or in another order) is
-- decoded whole
local function service_of(json)
    local service = string.match(json, ',"service":"([A-Za-z0-9._%-]+)"}$')
    if service then
        return service
    end
    if not string.find(json, '"service":', 1, true) then
        return DEFAULT_SERVICE
    end
    local ok, record = pcall(cjson.decode, json)
    if not ok or type(record) ~= 'table' then
        return nil
    end
    if type(record.service) == 'string' and record.service ~= '' then
        return record.service
    end
    return DEFAULT_SERVICE
end

-- the lane of a retry item record (nil when no handler can be read from it)
local function lane_of(json)
    local handler = handler_of(json)
    if handler == nil then
        return nil
    end
    return lane_for(service_of(json) or DEFAULT_SERVICE, handler)
end

-- the attempt of a retry item record (nil when it cannot be read): from the front of
-- the record (codec.py writes attempt first), else from the record decoded
local function attempt_of(json)
    local attempt = tonumber(string.match(json, '^{"attempt":(%-?%d+)'))
    if attempt == nil then
        local ok, record = pcall(cjson.decode, json)
        if ok and type(record) == 'table' then
            attempt = tonumber(record.attempt)
        end
    end
    return attempt
end

-- the kind of a retry item record whose next_retry score is `score`, at `now` (both
-- numbers): 'pending' or 'scheduled' for a first delivery (attempt 0) due by `now` or
-- after it, 'retry' for any other record (RetryItem.kind)
local function kind_of(json, score, now)
    if attempt_of(json) ~= 0 then
        return 'retry'
    end
    if score <= now then
        return 'pending'
    end
    return 'scheduled'
end

-- name: record_failures
-- ARGV: prefix, n_retry, n_dead,
--       n_retry x (id, json, next, created, lane, claim (time .. owner) or '',
--                  lease_until or '', claims, ordering key or ''),
--       n_dead x (id, json, index)
-- An id already there is skipped: a write repeated after a lost reply adds nothing twice.
local n_retry, n_dead = tonumber(ARGV[2]), tonumber(ARGV[3])
local _, added = add_items(4, n_retry)
local i = 4 + 9 * n_retry
for _ = 1, n_dead do
    put_dead(ARGV[i], ARGV[i + 1], ARGV[i + 2])
    i = i + 3
end
if added > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_added', added)
    redis.call('PUBLISH', CHANNEL, 'added')
end
return added

-- name: record_pending
-- ARGV: prefix, n x (id, json, next, created, lane, claim (time .. owner) or '',
--       lease_until or '', claims, ordering key or '')
-- First deliveries: each id not stored yet is added (outside the running totals).
-- Returns one character per item, '1' for those added and '0' for those skipped.
-- Publishes only when an unleased (deferred) one was added: a leased one's publisher
-- delivers it, and its lease's end is next_due.
local flags, _, deferred = add_items(2, (#ARGV - 1) / 9)
if deferred then
    redis.call('PUBLISH', CHANNEL, 'pending')
end
return flags

-- name: claim_due
-- ARGV: prefix, now, limit, owner, lease_until, now (ISO text), service ('': any),
--       n (-1: every handler), n handler names (see lane_args)
-- The due items of those lanes (unleased, or their lease ran out), earliest first
-- (the time each can be claimed from, then id): up to `limit` from the front of each
-- lane's due set, merged, so that no other lane's items are read. Each claim adds
-- one to the item's claims count. Returns {id, json, claims} per item.
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local lanes, wants = lane_args(7)
local picked = {}
for _, lane in ipairs(lanes) do
    local key = due_key(lane)
    local page = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0, limit)
    for j = 1, #page, 2 do
        picked[#picked + 1] = { page[j], tonumber(page[j + 1]), key }
    end
end
-- items an older layout made due: each moves to its lane's due set (the first claim
-- to see it moves it; it is claimed now if it is in one of the lanes asked for)
local legacy = redis.call('ZRANGEBYSCORE', K_LEGACY, '-inf', ARGV[2], 'WITHSCORES', 'LIMIT', 0, limit)
for j = 1, #legacy, 2 do
    local id, score = legacy[j], legacy[j + 1]
    local json = redis.call('HGET', K_ITEMS, id)
    local lane = json and lane_of(json)
    if not json then
        drop_retry(id) -- an index entry without its record: nothing to deliver
    elseif lane and held_back(id) then
        redis.call('ZREM', K_LEGACY, id) -- parked: its group's head leaving makes it due
    elseif lane then
        set_due(id, lane, score)
        if wants(lane) then
            picked[#picked + 1] = { id, tonumber(score), due_key(lane) }
        end
    else -- no handler can be read from it: any worker takes it (to dead-letter it)
        picked[#picked + 1] = { id, tonumber(score), K_LEGACY }
    end
end
if #lanes > 1 or #legacy > 0 then
    table.sort(picked, function(a, b)
        return a[2] < b[2] or (a[2] == b[2] and bytes_less(a[1], b[1]))
    end)
end
local out, seen = {}, {}
local lease_until = ARGV[5]
for _, pick in ipairs(picked) do
    if #out >= 3 * limit then
        break
    end
    local id, key = pick[1], pick[3]
    if not seen[id] then
        seen[id] = true
        local json = redis.call('HGET', K_ITEMS, id)
        if not json then
            drop_retry(id) -- an index entry without its record: nothing to deliver
        else
            -- the due set is an index: the item's own next_retry and lease decide (a
            -- process of an older layout may have changed them without it)
            local due = redis.call('ZSCORE', K_NEXT, id) or pick[2]
            local lease = redis.call('ZSCORE', K_LEASED, id)
            if tonumber(due) > now or (lease and tonumber(lease) > now) then
                redis.call('ZADD', key, lease and later(due, lease) or due, id)
            else
                redis.call('ZADD', key, later(lease_until, due), id)
                redis.call('ZADD', K_LEASED, lease_until, id)
                redis.call('HSET', K_CLAIMS, id, ARGV[6] .. ARGV[4])
                out[#out + 1] = id
                out[#out + 1] = json
                out[#out + 1] = redis.call('HINCRBY', K_CLAIM_COUNT, id, 1)
            end
        end
    end
end
return out

-- name: extend_leases
-- ARGV: prefix, owner, lease_until, ids...
local n = 0
for j = 4, #ARGV do
    local id = ARGV[j]
    if ARGV[2] ~= '' and owner_of(id) == ARGV[2] then
        redis.call('ZADD', K_LEASED, ARGV[3], id)
        redis.call('ZADD', due_key_of(id), later(ARGV[3], redis.call('ZSCORE', K_NEXT, id)), id)
        n = n + 1
    end
end
return n

-- name: release
-- ARGV: prefix, owner, ids...
-- Each item the owner holds is due again at its next_retry, one claim fewer.
local n = 0
for j = 3, #ARGV do
    local id = ARGV[j]
    local claim = redis.call('HGET', K_CLAIMS, id)
    if claim and ARGV[2] ~= '' and string.sub(claim, STAMP + 1) == ARGV[2] then
        redis.call('HSET', K_CLAIMS, id, string.sub(claim, 1, STAMP)) -- keep updated_at
        redis.call('ZREM', K_LEASED, id)
        local due = redis.call('ZSCORE', K_NEXT, id)
        if due then
            redis.call('ZADD', due_key_of(id), due, id)
        end
        if redis.call('HINCRBY', K_CLAIM_COUNT, id, -1) <= 0 then
            redis.call('HDEL', K_CLAIM_COUNT, id)
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
--       n_rescheduled x (id, json, next_retry, lane, first delivery '1'/'0'),
--       n_dead x (id, dead id, dead json, dead index, first delivery '1'/'0')
-- Returns the ids the outcomes were applied to. The running totals count retries
-- only: a first delivery (attempt 0) that worked is not counted, one rescheduled adds
-- a retry, one dead-lettered leaves retry_dead_lettered alone.
local has_owner, owner, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local n_ok, n_again, n_dead = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local applied = {}
local done, attempts, moved, again, added = 0, 0, 0, 0, 0
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
        if attempt ~= 0 then
            done = done + 1
            attempts = attempts + attempt
        end
    end
    i = i + 2
end
for _ = 1, n_again do
    local id = ARGV[i]
    if held(id, has_owner, owner, now) then
        put_retry(id, ARGV[i + 1], ARGV[i + 2], nil, ARGV[i + 3], 0)
        applied[#applied + 1] = id
        again = again + 1
        if ARGV[i + 4] == '1' then
            added = added + 1
        end
    end
    i = i + 5
end
for _ = 1, n_dead do
    local id = ARGV[i]
    if held(id, has_owner, owner, now) then
        drop_retry(id)
        put_dead(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
        applied[#applied + 1] = id
        if ARGV[i + 4] ~= '1' then
            moved = moved + 1
        end
    end
    i = i + 5
end
if done > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_succeeded', done)
    redis.call('HINCRBY', K_COUNTERS, 'retry_succeeded_attempts', attempts)
end
if moved > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_dead_lettered', moved)
end
if added > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_added', added)
end
if again > 0 then
    redis.call('PUBLISH', CHANNEL, 'rescheduled')
end
announce_turn()
return applied

-- name: next_due
-- ARGV: prefix, service ('': any), n (-1: every handler), n handler names (see
-- lane_args). The earliest time an item of those lanes can be claimed from (its
-- next_retry, or while it is leased, the later of that and the lease's end: its score
-- in the due set), as the stored score text (exact); nil when there is none. Items an
-- older layout made due count for every lane (the next claim moves them to their
-- lane's set).
local lanes = lane_args(2)
local best, best_text = nil, nil
local keys = { K_LEGACY }
for _, lane in ipairs(lanes) do
    keys[#keys + 1] = due_key(lane)
end
for _, key in ipairs(keys) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 and (best == nil or tonumber(first[2]) < best) then
        best, best_text = tonumber(first[2]), first[2]
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
local gone = drop_retry(ARGV[2])
announce_turn()
if gone then
    return 1
end
return 0

-- name: page_retry_kind
-- ARGV: prefix, kind (retry, pending or scheduled), now, start, count. Reads `count`
-- items in next_retry, id order from the `start`-th of those the kind's time range
-- holds (pending: due by now; scheduled: due after now; retry: every item); returns
-- {how many were read, then fetch_retry's fields of those of the kind}.
local kind, now = ARGV[2], tonumber(ARGV[3])
local page
if kind == 'pending' then
    page = redis.call('ZRANGEBYSCORE', K_NEXT, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', ARGV[4], ARGV[5])
elseif kind == 'scheduled' then
    page = redis.call('ZRANGEBYSCORE', K_NEXT, '(' .. ARGV[3], '+inf', 'WITHSCORES', 'LIMIT', ARGV[4], ARGV[5])
else
    local start = tonumber(ARGV[4])
    page = redis.call('ZRANGE', K_NEXT, start, start + tonumber(ARGV[5]) - 1, 'WITHSCORES')
end
local ids = {}
for j = 1, #page, 2 do
    local json = redis.call('HGET', K_ITEMS, page[j])
    if json and kind_of(json, tonumber(page[j + 1]), now) == kind then
        ids[#ids + 1] = page[j]
    end
end
local out = fetch_retry(ids)
table.insert(out, 1, #page / 2)
return out

-- name: count_kinds
-- ARGV: prefix, now, start, stop (ranks in next_retry, id order). Counts the items of
-- that rank range per kind at now; returns {read, retry, pending, scheduled}.
local now = tonumber(ARGV[2])
local page = redis.call('ZRANGE', K_NEXT, ARGV[3], ARGV[4], 'WITHSCORES')
local counts = { retry = 0, pending = 0, scheduled = 0 }
for j = 1, #page, 2 do
    local json = redis.call('HGET', K_ITEMS, page[j])
    if json then
        local kind = kind_of(json, tonumber(page[j + 1]), now)
        counts[kind] = counts[kind] + 1
    end
end
return { #page / 2, counts.retry, counts.pending, counts.scheduled }

-- name: cancel_delivery
-- ARGV: prefix, id, now. Deletes the item if it is a first delivery (attempt 0) that
-- no live lease holds at now; returns 1 if it did, else 0.
local id, now = ARGV[2], tonumber(ARGV[3])
local json = redis.call('HGET', K_ITEMS, id)
if not json or attempt_of(json) ~= 0 or not held(id, '0', '', now) then
    return 0
end
drop_retry(id)
announce_turn()
return 1

-- name: expire_candidates
-- ARGV: prefix, before, now, offset, count. Read only: of `count` items created before
-- `before` (from rank `offset`), the id and JSON of those no live lease holds that
-- are retries (they expire by age) or first deliveries (attempt 0: deferred or
-- scheduled) due since before `before` (never before their time). A record whose
-- attempt cannot be read expires by age. Returns {scanned, id, json, id, json, ...}.
local before, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', K_CREATED, '-inf', '(' .. ARGV[2], 'LIMIT', ARGV[4], ARGV[5])
-- is the record a first delivery? (from the front of it, where codec.py writes
-- attempt; a record in another order is decoded whole)
local function first_delivery(json)
    local attempt = string.match(json, '^{"attempt":(%-?%d+)')
    if attempt == nil then
        local ok, record = pcall(cjson.decode, json)
        attempt = ok and type(record) == 'table' and record.attempt or nil
    end
    return attempt ~= nil and tonumber(attempt) == 0
end
local out = { #ids }
for _, id in ipairs(ids) do
    local lease = redis.call('ZSCORE', K_LEASED, id)
    if (not lease) or tonumber(lease) <= now then
        local json = redis.call('HGET', K_ITEMS, id) or ''
        local expires = true
        if json ~= '' and first_delivery(json) then
            local due = redis.call('ZSCORE', K_NEXT, id)
            expires = (not due) or tonumber(due) < before
        end
        if expires then
            out[#out + 1] = id
            out[#out + 1] = json
        end
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
announce_turn()
return moved

-- name: list_dead
-- ARGV: prefix, offset, limit, filter (see dead_filter). The id and JSON of each
-- matching dead letter of the page, newest first (created_at, then id, descending).
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
if limit > 0 then
    walk_dead(dead_filter(4), offset, function(id)
        out[#out + 1] = id
        out[#out + 1] = redis.call('HGET', K_DEAD, id)
        return #out >= 2 * limit
    end)
end
return out

-- name: count_dead
-- ARGV: prefix, filter (see dead_filter). With at most one zset and no event id, a
-- ZCOUNT; with several and no time range, ZINTERCARD (Redis 7); otherwise a walk of
-- the most selective zset.
local f = dead_filter(2)
if f.event == '' then
    local _, others, first, last = dead_candidates(f)
    if #others == 0 then
        return math.max(last - first + 1, 0)
    end
    if f.after == '' and f.before == '' and f.cursor == '' then
        local n = redis.pcall('ZINTERCARD', #f.sets, unpack(f.sets))
        if type(n) == 'number' then
            return n
        end
    end
end
local n = 0
walk_dead(f, 0, function()
    n = n + 1
    return false
end)
return n

-- name: group_dead
-- ARGV: prefix, field (type, handler, reason, group or service), own value or '' (the filter's
-- value of that field, its zset being among the filter's too), filter (see dead_filter).
-- Returns {value, count, oldest score, newest score, id of the newest} per group, in
-- no order. Without other conditions than a time range and a cursor (and the field's
-- own value): a few O(log n) calls per value of the field; otherwise a walk of the matching dead
-- letters, reading each one's index entry.
local name, own = ARGV[2], ARGV[3]
local f = dead_filter(4)
local out = {}
if f.event == '' and (#f.sets == 0 or (#f.sets == 1 and own ~= '')) then
    local values = { own }
    if own == '' then
        values = redis.call('SMEMBERS', values_key(name))
    end
    for _, value in ipairs(values) do
        local key = value_key(name, value)
        local first, last = dead_window(key, f)
        if last >= first then
            local oldest = redis.call('ZREVRANGE', key, last, last, 'WITHSCORES')
            local newest = redis.call('ZREVRANGE', key, first, first, 'WITHSCORES')
            out[#out + 1] = value
            out[#out + 1] = last - first + 1
            out[#out + 1] = oldest[2]
            out[#out + 1] = newest[2]
            out[#out + 1] = newest[1]
        end
    end
    return out
end
local position = nil
for _, field in ipairs(DEAD_FIELDS) do
    if field[1] == name then
        position = field[2]
    end
end
local groups, order = {}, {}
walk_dead(f, 0, function(id, score)
    local index = redis.call('HGET', K_DEAD_INDEX, id)
    local value = index and cjson.decode(index)[position]
    if value == nil and index and name == 'service' then
        value = DEFAULT_SERVICE -- an index of an older layout, not back-filled yet
    end
    if value then
        local group = groups[value]
        if group == nil then -- the walk is newest first: the first one seen is the sample
            groups[value] = { 1, score, score, id }
            order[#order + 1] = value
        else
            group[1] = group[1] + 1
            group[2] = score
        end
    end
    return false
end)
for _, value in ipairs(order) do
    local group = groups[value]
    out[#out + 1] = value
    out[#out + 1] = group[1]
    out[#out + 1] = group[2]
    out[#out + 1] = group[3]
    out[#out + 1] = group[4]
end
return out

-- name: backfill_dead
-- ARGV: prefix, n x (id, index as read, index of the current layout). Re-indexes each
-- dead letter whose index entry is still as read; returns how many.
local n = 0
for i = 2, #ARGV, 3 do
    if redis.call('HGET', K_DEAD_INDEX, ARGV[i]) == ARGV[i + 1] then
        unindex_dead(ARGV[i])
        index_dead(ARGV[i], ARGV[i + 2])
        n = n + 1
    end
end
return n

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
-- ARGV: prefix, dead id, retry id, retry json, next_retry, created_at, lane, ordering
-- key or ''. A keyed record joins the back of its group.
if not drop_dead(ARGV[2]) then
    return 0
end
if redis.call('HEXISTS', K_ORDER_OF, ARGV[3]) == 0 then
    enqueue_keyed(ARGV[3], ARGV[7], ARGV[8] or '')
end
put_retry(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], 0)
redis.call('HINCRBY', K_COUNTERS, 'retry_added', 1)
redis.call('PUBLISH', CHANNEL, 'requeued')
return 1

-- name: index_due
-- ARGV: prefix, ids... The upgrade to layout 3 (migrate.py): each stored item not yet
-- in a due set goes into its lane's, scored by when it can be claimed (its
-- next_retry, or while it is leased, the later of that and the lease's end), and out
-- of P:retry:ready; one no handler can be read from stays in (or joins) P:retry:ready,
-- which every claim looks at. Returns how many were indexed.
local n = 0
for j = 2, #ARGV do
    local id = ARGV[j]
    local json = redis.call('HGET', K_ITEMS, id)
    local due = redis.call('ZSCORE', K_NEXT, id)
    if json and due and redis.call('HEXISTS', K_HANDLER_OF, id) == 0 then
        due = later(due, redis.call('ZSCORE', K_LEASED, id))
        local lane = lane_of(json)
        if lane and held_back(id) then
            redis.call('ZREM', K_LEGACY, id)
        elseif lane then
            set_due(id, lane, due)
            n = n + 1
        else
            redis.call('ZADD', K_LEGACY, due, id)
        end
    end
end
return n

-- name: delete_dead
-- ARGV: prefix, id
if drop_dead(ARGV[2]) then
    return 1
end
return 0

-- name: delete_dead_many
-- ARGV: prefix, ids... Returns how many of them were deleted.
local n = 0
for j = 2, #ARGV do
    if drop_dead(ARGV[j]) then
        n = n + 1
    end
end
return n

-- name: cleanup_dead
-- ARGV: prefix, before, count. Deletes up to `count` dead letters created before `before`.
local ids = redis.call('ZRANGEBYSCORE', K_DEAD_CREATED, '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
    redis.call('HDEL', K_DEAD, id)
    unindex_dead(id)
end
return #ids

-- name: group_retry
-- ARGV: prefix, field (handler_name, event_type or service), start, stop (ranks in
-- next_retry, id order). Counts the items of that rank range per value of the field.
-- Returns {scanned, then per group: the value as JSON-escaped text, count, earliest
-- score, latest score, id of the item due first}. The field is read from the front of
-- the record (codec.py writes attempt, id, handler_name, event_type first), the
-- service from its end (service_of); a record in another order is decoded whole; one
-- that cannot be decoded is not counted.
local name = ARGV[2]
local page = redis.call('ZRANGE', K_NEXT, ARGV[3], ARGV[4], 'WITHSCORES')
local function front_field(json)
    local _, at = string.find(json, '^{"attempt":%-?%d+,"id":"')
    if not at then
        return nil
    end
    local _, after = raw_json_string(json, at + 1)
    for _, field in ipairs({ 'handler_name', 'event_type' }) do
        local head = ',"' .. field .. '":"'
        if not after or string.sub(json, after, after + #head - 1) ~= head then
            return nil
        end
        local raw
        raw, after = raw_json_string(json, after + #head)
        if field == name then
            return raw
        end
    end
    return nil
end
local groups, order = {}, {}
for j = 1, #page, 2 do
    local id, score = page[j], page[j + 1]
    local json = redis.call('HGET', K_ITEMS, id)
    local value = nil
    if json and name == 'service' then
        value = service_of(json)
    elseif json then
        value = front_field(json)
    end
    if json and not value and name ~= 'service' then
        local ok, record = pcall(cjson.decode, json)
        if ok and type(record) == 'table' and type(record[name]) == 'string' then
            value = string.sub(cjson.encode(record[name]), 2, -2)
        end
    end
    if value then
        local group = groups[value]
        if group == nil then -- ascending: the first one seen is due first
            groups[value] = { 1, score, score, id }
            order[#order + 1] = value
        else
            group[1] = group[1] + 1
            group[3] = score
        end
    end
end
local out = { #page / 2 }
for _, value in ipairs(order) do
    local group = groups[value]
    out[#out + 1] = value
    out[#out + 1] = group[1]
    out[#out + 1] = group[2]
    out[#out + 1] = group[3]
    out[#out + 1] = group[4]
end
return out

-- name: newest_failures
-- ARGV: prefix, service ('' for every one), start, stop (ranks in next_retry, id
-- order). Per (service, handler) of the retries (attempt != 0) of that rank range,
-- the one with the greatest (updated_at, id): its claim's time when a claim holds
-- one (K_CLAIMS), else the record's. Returns {scanned, then per group: service,
-- handler, updated_at (STAMP characters of fixed-width text), id}. The attempt and
-- handler are read from the front of the record, the service from its end, and
-- updated_at by its key when the key appears once (an event's data may hold the
-- same text: then the record is decoded whole); a record that cannot be read is
-- passed over.
local wanted = ARGV[2]
local page = redis.call('ZRANGE', K_NEXT, ARGV[3], ARGV[4])
local function updated_of(json)
    local head = '"updated_at":"'
    local _, at = string.find(json, head, 1, true)
    if at and not string.find(json, head, at + 1, true) then
        return string.sub(json, at + 1, at + STAMP)
    end
    local ok, record = pcall(cjson.decode, json)
    if ok and type(record) == 'table' and type(record.updated_at) == 'string' then
        return record.updated_at
    end
    return nil
end
local newest, order = {}, {}
for _, id in ipairs(page) do
    local json = redis.call('HGET', K_ITEMS, id)
    local attempt = json and string.match(json, '^{"attempt":(%-?%d+),')
    if json and not attempt then
        local ok, record = pcall(cjson.decode, json)
        if ok and type(record) == 'table' and type(record.attempt) == 'number' then
            attempt = tostring(record.attempt)
        end
    end
    if attempt and tonumber(attempt) ~= 0 then
        local service = service_of(json)
        local handler = handler_of(json)
        if service and handler and (wanted == '' or service == wanted) then
            local claim = redis.call('HGET', K_CLAIMS, id)
            local stamp = claim and string.sub(claim, 1, STAMP) or updated_of(json)
            if stamp then
                local key = service .. '\0' .. handler
                local best = newest[key]
                if best == nil then
                    newest[key] = { service, handler, stamp, id }
                    order[#order + 1] = key
                elseif stamp > best[3] or (stamp == best[3] and id > best[4]) then
                    best[3], best[4] = stamp, id
                end
            end
        end
    end
end
local out = { #page }
for _, key in ipairs(order) do
    for _, value in ipairs(newest[key]) do
        out[#out + 1] = value
    end
end
return out

-- name: put_control
-- ARGV: prefix, key, expected version (0: none yet), value JSON. Writes the record if
-- its version is the expected one; returns the new version, or 0 on a conflict.
local record = PREFIX .. ':control:rec:' .. ARGV[2]
local current = tonumber(redis.call('HGET', record, 'version') or '0')
if current ~= tonumber(ARGV[3]) then
    return 0
end
redis.call('HSET', record, 'version', current + 1, 'value', ARGV[4])
redis.call('ZADD', PREFIX .. ':control:index', 0, ARGV[2])
return current + 1

-- name: list_control
-- ARGV: prefix, key prefix. Key, version and value of each record whose key starts
-- with it, by key (bytes; no UTF-8 text holds the byte 255, so it ends the range).
local start, stop = '-', '+'
if ARGV[2] ~= '' then
    start, stop = '[' .. ARGV[2], '(' .. ARGV[2] .. '\255'
end
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYLEX', PREFIX .. ':control:index', start, stop)) do
    local record = redis.call('HMGET', PREFIX .. ':control:rec:' .. key, 'version', 'value')
    if record[1] and record[2] and string.sub(key, 1, #ARGV[2]) == ARGV[2] then
        out[#out + 1] = key
        out[#out + 1] = record[1]
        out[#out + 1] = record[2]
    end
end
return out

-- name: delete_control
-- ARGV: prefix, key
redis.call('ZREM', PREFIX .. ':control:index', ARGV[2])
return redis.call('DEL', PREFIX .. ':control:rec:' .. ARGV[2])

-- name: take_tokens
-- ARGV: prefix, key, want, rate (tokens a second), burst, now (epoch seconds). The token
-- bucket in control record K (value {"tokens", "at"}; none or unreadable: a full one),
-- refilled for the time since `at` (never for a `now` before it) up to burst; takes up
-- to `want` whole tokens and returns how many (Store.take_tokens, in one step).
local record = PREFIX .. ':control:rec:' .. ARGV[2]
local want, rate, burst, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local stored = redis.call('HMGET', record, 'version', 'value')
local version = tonumber(stored[1] or '0')
local tokens, at = burst, now
if stored[2] then
    local ok, bucket = pcall(cjson.decode, stored[2])
    if ok and type(bucket) == 'table' and type(bucket.tokens) == 'number'
        and type(bucket.at) == 'number' then
        tokens, at = bucket.tokens, bucket.at
        if now > at then
            tokens, at = tokens + (now - at) * rate, now
        end
        tokens = math.min(tokens, burst)
    end
end
local granted = math.max(0, math.min(want, math.floor(tokens)))
if granted == 0 and stored[2] then
    return 0
end
redis.call('HSET', record, 'version', version + 1,
    'value', cjson.encode({tokens = tokens - granted, at = at}))
redis.call('ZADD', PREFIX .. ':control:index', 0, ARGV[2])
return granted

-- name: dead_check
-- ARGV: prefix. What migrate.py checks on connect: {P:dead_indexed_to or '', the
-- newest dead letter's created_at score or '', how many dead letters there are, how
-- many members the per-service sets have together}. The two counts are equal once
-- each dead letter is in its service's set and no set keeps one that went.
local total = 0
for _, service in ipairs(redis.call('SMEMBERS', values_key('service'))) do
    total = total + redis.call('ZCARD', value_key('service', service))
end
local newest = redis.call('ZREVRANGE', K_DEAD_CREATED, 0, 0, 'WITHSCORES')
return {
    redis.call('GET', PREFIX .. ':dead_indexed_to') or '',
    newest[2] or '',
    redis.call('ZCARD', K_DEAD_CREATED),
    total,
}

-- name: dead_indexed_to
-- ARGV: prefix, score. Moves P:dead_indexed_to on to the score (never back).
local key = PREFIX .. ':dead_indexed_to'
local current = redis.call('GET', key)
if not current or tonumber(current) < tonumber(ARGV[2]) then
    redis.call('SET', key, ARGV[2])
end
return 1

-- name: dead_unindexed
-- ARGV: prefix, min score, offset, count. Read only: of `count` dead letters created
-- from the score on (from rank `offset`), the id and index entry of each whose entry
-- has fewer elements than this layout writes (8). Returns {scanned, id, index, ...}.
local ids = redis.call('ZRANGEBYSCORE', K_DEAD_CREATED, ARGV[2], '+inf', 'LIMIT', ARGV[3], ARGV[4])
local out = { #ids }
for _, id in ipairs(ids) do
    local index = redis.call('HGET', K_DEAD_INDEX, id)
    if index and #cjson.decode(index) < 8 then
        out[#out + 1] = id
        out[#out + 1] = index
    end
end
return out

-- name: unindex_stale_services
-- ARGV: prefix, service, ids... Takes out of P:dead:service:S each id whose index entry
-- is gone or names another service (a process of layout 3 deleted or rewrote the
-- dead letter, unaware of that set), and S out of P:dead:values:service once its set is
-- empty. Returns how many ids it took out.
local service = ARGV[2]
local key = value_key('service', service)
local n = 0
for j = 3, #ARGV do
    local index = redis.call('HGET', K_DEAD_INDEX, ARGV[j])
    if not index or cjson.decode(index)[8] ~= service then
        n = n + redis.call('ZREM', key, ARGV[j])
    end
end
if redis.call('ZCARD', key) == 0 then
    redis.call('SREM', values_key('service'), service)
end
return n

-- name: retry_loads
-- ARGV: prefix, now, start, stop (ranks in next_retry, id order). Counts the items of
-- that rank range per lane (P:retry:handler_of, else read from the record) and kind at
-- now, and those a live lease holds. Returns {read, then per lane: the lane, retries,
-- pending, scheduled, leased, the next_retry score of its first pending one or ''}.
local now = tonumber(ARGV[2])
local page = redis.call('ZRANGE', K_NEXT, ARGV[3], ARGV[4], 'WITHSCORES')
local loads, order = {}, {}
for j = 1, #page, 2 do
    local id, score = page[j], tonumber(page[j + 1])
    local json = redis.call('HGET', K_ITEMS, id)
    local lane = json and (redis.call('HGET', K_HANDLER_OF, id) or lane_of(json))
    if lane then
        local load = loads[lane]
        if load == nil then
            load = { retry = 0, pending = 0, scheduled = 0, leased = 0, oldest = '' }
            loads[lane] = load
            order[#order + 1] = lane
        end
        local kind = kind_of(json, score, now)
        load[kind] = load[kind] + 1
        if kind == 'pending' and load.oldest == '' then -- ascending: the first is the oldest
            load.oldest = page[j + 1]
        end
        local lease = redis.call('ZSCORE', K_LEASED, id)
        if lease and tonumber(lease) > now then
            load.leased = load.leased + 1
        end
    end
end
local out = { #page / 2 }
for _, lane in ipairs(order) do
    local load = loads[lane]
    out[#out + 1] = lane
    out[#out + 1] = load.retry
    out[#out + 1] = load.pending
    out[#out + 1] = load.scheduled
    out[#out + 1] = load.leased
    out[#out + 1] = load.oldest
end
return out

-- name: dead_loads
-- ARGV: prefix. The dead letters of each (service, handler) that has any: {service,
-- handler, unprocessed, processed} each, from ZINTERCARD of the per-value sets (Redis
-- 7: each costs the smaller set); without it, a walk of each service's set reading
-- the index entries.
local out = {}
local handlers = redis.call('SMEMBERS', values_key('handler'))
local done_key = value_key('processed', '1')
for _, service in ipairs(redis.call('SMEMBERS', values_key('service'))) do
    local key = value_key('service', service)
    local fast = true
    for _, handler in ipairs(handlers) do
        local handler_key = value_key('handler', handler)
        local total = redis.pcall('ZINTERCARD', 2, key, handler_key)
        if type(total) ~= 'number' then
            fast = false
            break
        end
        if total > 0 then
            local done = redis.call('ZINTERCARD', 3, key, handler_key, done_key)
            out[#out + 1] = service
            out[#out + 1] = handler
            out[#out + 1] = total - done
            out[#out + 1] = done
        end
    end
    if not fast then
        local counts, order = {}, {}
        for start = 0, redis.call('ZCARD', key) - 1, CHUNK do
            for _, id in ipairs(redis.call('ZRANGE', key, start, start + CHUNK - 1)) do
                local index = redis.call('HGET', K_DEAD_INDEX, id)
                if index then
                    local ix = cjson.decode(index)
                    local handler = tostring(ix[2])
                    local count = counts[handler]
                    if count == nil then
                        count = { 0, 0 }
                        counts[handler] = count
                        order[#order + 1] = handler
                    end
                    local at = tonumber(ix[3]) == 1 and 2 or 1
                    count[at] = count[at] + 1
                end
            end
        end
        for _, handler in ipairs(order) do
            out[#out + 1] = service
            out[#out + 1] = handler
            out[#out + 1] = counts[handler][1]
            out[#out + 1] = counts[handler][2]
        end
    end
end
return out

-- name: subscription_helpers
-- Prepended (after `helpers`) to the scripts that read or write P:subs only
-- (SUBSCRIPTION_SCRIPTS in store.py): every helper costs each script call that
-- defines it, the hot paths' included.

-- a stored subscription row (see P:subs) from its fields as JSON texts, terms last
local function subscription_row(registered, updated, removed_at, removed_by, revision, terms)
    return '{"registered_at":' .. registered .. ',"updated_at":' .. updated .. ',"removed_at":'
        .. removed_at .. ',"removed_by":' .. removed_by .. ',"revision":' .. revision
        .. ',"terms":' .. terms .. '}'
end

-- the terms of a stored subscription row as they were written, and its other fields
-- decoded (the first ',"terms":' is the field's: the fields before it are times,
-- JSON-escaped text and a number; the terms are never decoded here)
local function subscription_terms(row)
    local at = string.find(row, ',"terms":', 1, true)
    return string.sub(row, at + 9, -2)
end

local function subscription_meta(row)
    local at = string.find(row, ',"terms":', 1, true)
    return cjson.decode(string.sub(row, 1, at - 1) .. '}')
end

-- the revision of this script's subscription writes: the next one, taken (INCR) at the
-- first write, so that a script that writes nothing leaves the revision as it is
local revision_taken = nil
local function subscriptions_revision()
    if revision_taken == nil then
        revision_taken = redis.call('INCR', K_SUBS_REVISION)
    end
    return revision_taken
end

-- tombstone subscription `key` (its stored row `row`) at `now` by `actor` (JSON texts)
-- unless it is one already; returns whether it did
local function tombstone(key, row, now, actor)
    local old = subscription_meta(row)
    if old.removed_at ~= cjson.null then
        return false
    end
    redis.call('HSET', K_SUBS, key, subscription_row(
        cjson.encode(old.registered_at), now, now, actor, subscriptions_revision(),
        subscription_terms(row)
    ))
    return true
end

-- is subscription `key` a tombstone? (false for none)
local function unsubscribed(key)
    local row = redis.call('HGET', K_SUBS, key)
    return row and subscription_meta(row).removed_at ~= cjson.null or false
end

-- name: put_subscriptions
-- ARGV: prefix, service, now (JSON text), actor (JSON text), prune ('1'/'0'), n,
--       n x (handler name, terms: canonical JSON, see P:subs)
-- Stores each subscription of the service: new, or back after a removal (added:
-- registered now), with other terms (changed: registered_at kept), or as it is
-- (unchanged: not written); with prune, tombstones the service's other live ones.
-- Every row written gets the same next revision. Returns {one character per
-- subscription: 'a' added, 'c' changed, 'u' unchanged; then the handlers pruned}.
local service, now, actor, prune = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local flags, named = {}, {}
for j = 7, 6 + 2 * tonumber(ARGV[6]), 2 do
    local handler, terms = ARGV[j], ARGV[j + 1]
    named[handler] = true
    local key = service .. '\0' .. handler
    local row = redis.call('HGET', K_SUBS, key)
    local old = row and subscription_meta(row)
    if not old or old.removed_at ~= cjson.null then
        redis.call('HSET', K_SUBS, key, subscription_row(now, now, 'null', 'null', subscriptions_revision(), terms))
        flags[#flags + 1] = 'a'
    elseif subscription_terms(row) ~= terms then
        redis.call('HSET', K_SUBS, key, subscription_row(
            cjson.encode(old.registered_at), now, 'null', 'null', subscriptions_revision(), terms
        ))
        flags[#flags + 1] = 'c'
    else
        flags[#flags + 1] = 'u'
    end
end
local out = { table.concat(flags) }
if prune then
    local head = service .. '\0'
    local rows = redis.call('HGETALL', K_SUBS)
    for j = 1, #rows, 2 do
        local key = rows[j]
        local handler = string.sub(key, #head + 1)
        if string.sub(key, 1, #head) == head and not named[handler] and tombstone(key, rows[j + 1], now, actor) then
            out[#out + 1] = handler
        end
    end
end
return out

-- name: remove_subscriptions
-- ARGV: prefix, service, now (JSON text), actor (JSON text), n (-1: every handler), n
-- handler names. Tombstones the service's live subscriptions of those handlers (one
-- next revision for all); returns the handlers removed.
local service, now, actor, n = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local names = nil
if n >= 0 then
    names = {}
    for j = 6, 5 + n do
        names[ARGV[j]] = true
    end
end
local head = service .. '\0'
local out = {}
local rows = redis.call('HGETALL', K_SUBS)
for j = 1, #rows, 2 do
    local key = rows[j]
    local handler = string.sub(key, #head + 1)
    if string.sub(key, 1, #head) == head and (names == nil or names[handler]) and tombstone(key, rows[j + 1], now, actor) then
        out[#out + 1] = handler
    end
end
return out

-- name: forget_subscriptions
-- ARGV: prefix, before (ISO text, as the rows keep their times: fixed width, UTC).
-- Deletes the tombstones removed before it; the revision stays. Returns how many.
local rows = redis.call('HGETALL', K_SUBS)
local n = 0
for j = 1, #rows, 2 do
    local removed_at = subscription_meta(rows[j + 1]).removed_at
    if removed_at ~= cjson.null and bytes_less(removed_at, ARGV[2]) then
        n = n + redis.call('HDEL', K_SUBS, rows[j])
    end
end
return n

-- name: unsubscribed_candidates
-- ARGV: prefix, now, limit. Read only: the tombstones of P:subs, and from the due set
-- of each tombstoned lane, in its order (each followed by the records its ordering
-- group parks behind it), up to `limit` items no live lease holds at now. Returns
-- {n, n x (subscription key, row), then per item: id, json, next_retry
-- score, subscription key}.
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local rows = redis.call('HGETALL', K_SUBS)
local out, removed = { 0 }, {}
for j = 1, #rows, 2 do
    if subscription_meta(rows[j + 1]).removed_at ~= cjson.null then
        out[1] = out[1] + 1
        out[#out + 1] = rows[j]
        out[#out + 1] = rows[j + 1]
        removed[#removed + 1] = rows[j]
    end
end
for _, key in ipairs(removed) do
    local due = due_key(lane_for(split_lane(key)))
    local found, start = 0, 0
    while found < limit do
        local page = redis.call('ZRANGE', due, start, start + CHUNK - 1)
        local function take(id)
            local json = redis.call('HGET', K_ITEMS, id)
            if found < limit and json and held(id, '0', '', now) then
                found = found + 1
                out[#out + 1] = id
                out[#out + 1] = json
                out[#out + 1] = redis.call('ZSCORE', K_NEXT, id) or ''
                out[#out + 1] = key
            end
        end
        for _, id in ipairs(page) do
            take(id)
            -- the records its ordering group parks behind it (in no due set)
            local group = redis.call('HGET', K_ORDER_OF, id)
            if group and found < limit then
                for _, parked in ipairs(redis.call('ZRANGE', order_key(group), 1, limit - found)) do
                    take(parked)
                end
            end
        end
        if #page < CHUNK then
            break
        end
        start = start + CHUNK
    end
end
return out

-- name: unsubscribed_move
-- ARGV: prefix, now, n x (id, JSON as read, subscription key, dead id, dead json, dead
-- index). Moves each item still as it was read, held by no live lease, whose
-- subscription is still a tombstone; returns their ids.
local now = tonumber(ARGV[2])
local moved, removed = {}, {}
for i = 3, #ARGV, 6 do
    local id, key = ARGV[i], ARGV[i + 2]
    if removed[key] == nil then
        removed[key] = unsubscribed(key)
    end
    if removed[key] and (redis.call('HGET', K_ITEMS, id) or '') == ARGV[i + 1] and held(id, '0', '', now) then
        drop_retry(id)
        put_dead(ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
        moved[#moved + 1] = id
    end
end
if #moved > 0 then
    redis.call('HINCRBY', K_COUNTERS, 'retry_dead_lettered', #moved)
end
announce_turn()
return moved

-- name: beat
-- ARGV: prefix, worker name, heartbeat JSON, last_seen score
redis.call('HSET', K_WORKERS, ARGV[2], ARGV[3])
redis.call('ZADD', K_WORKERS_SEEN, ARGV[4], ARGV[2])
return 1

-- name: forget_worker
-- ARGV: prefix, worker name. Returns 1 if it had a heartbeat, else 0.
redis.call('ZREM', K_WORKERS_SEEN, ARGV[2])
return redis.call('HDEL', K_WORKERS, ARGV[2])

-- name: prune_workers
-- ARGV: prefix, before score. Deletes the heartbeats last seen before it; returns how
-- many.
local names = redis.call('ZRANGEBYSCORE', K_WORKERS_SEEN, '-inf', '(' .. ARGV[2])
bulk('HDEL', K_WORKERS, names)
bulk('ZREM', K_WORKERS_SEEN, names)
return #names
