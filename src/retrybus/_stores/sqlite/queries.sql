-- All SQL of the SQLite store, one named query per block.
-- Times are ISO 8601 text in UTC with microseconds ('2025-01-07T10:00:00.000000+00:00'),
-- so they sort as text and any tool can read them. JSON columns hold JSON text.

-- name: schema
-- (the store splits it at semicolons: none in comments)
CREATE TABLE IF NOT EXISTS retry_queue (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    event_data       TEXT NOT NULL,
    event_source     TEXT NOT NULL,
    event_timestamp  TEXT NOT NULL,
    event_subject    TEXT,
    event_extensions TEXT NOT NULL DEFAULT '{}',
    handler_name     TEXT NOT NULL,
    error            TEXT NOT NULL DEFAULT '',
    error_type       TEXT NOT NULL DEFAULT '',
    traceback        TEXT NOT NULL DEFAULT '',
    attempt          INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL,
    next_retry       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    lease_owner      TEXT,
    lease_until      TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    -- claims made since the last outcome was written (RetryItem.claims)
    claims           INTEGER NOT NULL DEFAULT 0,
    -- RetryItem.service: rows written before version 5 read the default
    service          TEXT NOT NULL DEFAULT 'default',
    -- RetryItem.ordering_key (the event's partitionkey extension) and the record's
    -- place in its key's order, both set on insert by retry_queue_ordering (the
    -- trigger below), NULL for records without a key
    ordering_key     TEXT,
    ordering_sequence INTEGER
);
-- the records of one (service, handler, key) in sequence order: what the claims'
-- in_turn condition looks up, and the trigger's next number (unkeyed records are
-- left out of it)
CREATE INDEX IF NOT EXISTS retry_queue_ordering
    ON retry_queue (service, handler_name, ordering_key, ordering_sequence)
    WHERE ordering_key IS NOT NULL;
-- a worker's own items in due order (claim_due and next_due with a service and
-- handlers): a seek per (service, handler), whatever other handlers or other
-- services have waiting. lease_until is left out so that claims, extensions and
-- releases do not rewrite this index
CREATE INDEX IF NOT EXISTS retry_queue_handler_name
    ON retry_queue (service, handler_name, next_retry);
-- the time order of the whole queue (claims of any handler, next_due, listings,
-- counts by kind): also what an index on next_retry alone would serve
CREATE INDEX IF NOT EXISTS retry_queue_next_retry_attempt ON retry_queue (next_retry, attempt);
CREATE INDEX IF NOT EXISTS retry_queue_created_at ON retry_queue (created_at);
CREATE INDEX IF NOT EXISTS retry_queue_lease_until ON retry_queue (lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE IF NOT EXISTS dead_letter_queue (
    id               TEXT PRIMARY KEY,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    event_data       TEXT NOT NULL,
    event_source     TEXT NOT NULL,
    event_timestamp  TEXT NOT NULL,
    event_subject    TEXT,
    event_extensions TEXT NOT NULL DEFAULT '{}',
    handler_name     TEXT NOT NULL,
    error            TEXT NOT NULL DEFAULT '',
    error_type       TEXT NOT NULL DEFAULT '',
    traceback        TEXT NOT NULL DEFAULT '',
    attempt          INTEGER NOT NULL,
    max_retries      INTEGER NOT NULL DEFAULT 0,
    reason           TEXT NOT NULL,
    processed        INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,
    processed_at     TEXT,
    first_failed_at  TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    -- DeadLetterItem.failure_group, computed in Python on every write, '' until then
    -- (rows of a version 1 database, or written by a process of that version)
    failure_group    TEXT NOT NULL DEFAULT '',
    -- DeadLetterItem.service: rows written before version 5 read the default
    service          TEXT NOT NULL DEFAULT 'default'
);
-- newest first (created_at DESC, id DESC) straight from the index, a cursor a seek
CREATE INDEX IF NOT EXISTS dead_letter_queue_created_at
    ON dead_letter_queue (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dead_letter_queue_processed ON dead_letter_queue (processed);
CREATE INDEX IF NOT EXISTS dead_letter_queue_event_type ON dead_letter_queue (event_type);
CREATE INDEX IF NOT EXISTS dead_letter_queue_handler_name ON dead_letter_queue (handler_name);
CREATE INDEX IF NOT EXISTS dead_letter_queue_event_id ON dead_letter_queue (event_id);
-- a group's members newest first, and its count
CREATE INDEX IF NOT EXISTS dead_letter_queue_failure_group
    ON dead_letter_queue (failure_group, created_at DESC, id DESC);
-- a service's dead letters newest first, and its count
CREATE INDEX IF NOT EXISTS dead_letter_queue_service
    ON dead_letter_queue (service, created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS retrybus_control (
    key     TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    value   TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS retrybus_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO retrybus_counters (name, value) VALUES
    ('retry_added', 0), ('retry_succeeded', 0), ('retry_succeeded_attempts', 0), ('retry_dead_lettered', 0);
-- the revision of the stored subscriptions (subscriptions_revision): one up with
-- every write that changes one, never down (forgetting tombstones leaves it)
INSERT OR IGNORE INTO retrybus_counters (name, value) VALUES ('subscriptions_revision', 0);

-- each service's handlers (StoredSubscription), one row per (service, handler),
-- a removed one kept as a tombstone (removed_at, removed_by) until forgotten
CREATE TABLE IF NOT EXISTS retrybus_subscriptions (
    service          TEXT NOT NULL,
    handler_name     TEXT NOT NULL,
    patterns         TEXT NOT NULL,
    policy           TEXT NOT NULL,
    max_retries      INTEGER NOT NULL,
    handler_timeout  REAL,
    registered_at    TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    removed_at       TEXT,
    removed_by       TEXT,
    revision         INTEGER NOT NULL,
    details          TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (service, handler_name)
) WITHOUT ROWID;
-- the tombstones (dead_letter_unsubscribed, forget_subscriptions): the few there are
CREATE INDEX IF NOT EXISTS retrybus_subscriptions_removed
    ON retrybus_subscriptions (removed_at) WHERE removed_at IS NOT NULL;

-- each worker's last heartbeat (WorkerBeat), one row per worker name: a few dozen
-- rows, each rewritten every few seconds: no index but the key
CREATE TABLE IF NOT EXISTS inbox_successes (
    id     TEXT PRIMARY KEY,
    until  TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_successes_until ON inbox_successes (until);
CREATE TABLE IF NOT EXISTS retrybus_workers (
    name        TEXT PRIMARY KEY,
    service     TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    interval    REAL NOT NULL,
    lanes       INTEGER NOT NULL,
    lanes_busy  INTEGER NOT NULL,
    handlers    TEXT NOT NULL,
    version     TEXT NOT NULL
) WITHOUT ROWID;

-- name: ordering_trigger
-- A keyed record (its event carries a partitionkey extension of 1 to 200
-- characters) gets its key and the next number of its (service, handler, key) as
-- it is written, by whatever writes it (the store, the outbox's staging in an
-- application's transaction): writers to one file take turns, so numbers follow
-- the order of the writes. The instr test keeps unkeyed inserts from parsing JSON.
CREATE TRIGGER IF NOT EXISTS retry_queue_ordering AFTER INSERT ON retry_queue
WHEN instr(NEW.event_extensions, '"partitionkey"') > 0
  AND length(json_extract(NEW.event_extensions, '$.partitionkey')) BETWEEN 1 AND 200
BEGIN
    UPDATE retry_queue
    SET ordering_key = json_extract(NEW.event_extensions, '$.partitionkey'),
        ordering_sequence = (
            SELECT coalesce(max(ordering_sequence), 0) + 1 FROM retry_queue
            WHERE service = NEW.service AND handler_name = NEW.handler_name
              AND ordering_key = json_extract(NEW.event_extensions, '$.partitionkey')
        )
    WHERE rowid = NEW.rowid;
END;

-- name: in_turn
-- (substituted for {in_turn} in the claims and next_due queries by sql.py) a
-- keyed record waits while an earlier record of its (service, handler, key) is
-- in the queue; an unkeyed record is never held up (the first test decides)
(retry_queue.ordering_key IS NULL OR NOT EXISTS (
    SELECT 1 FROM retry_queue AS earlier
    WHERE earlier.service = retry_queue.service
      AND earlier.handler_name = retry_queue.handler_name
      AND earlier.ordering_key = retry_queue.ordering_key
      AND earlier.ordering_sequence < retry_queue.ordering_sequence
))

-- name: compatibility_table
-- per schema version, the oldest version whose code can still use a file at it
-- (migrate.COMPATIBLE_FROM; _stores/_compatibility.py): written by the release
-- that brought the file to that version, read by older ones
CREATE TABLE IF NOT EXISTS retrybus_schema_compatibility (
    version         INTEGER PRIMARY KEY,
    compatible_from INTEGER NOT NULL
);

-- name: compatible_from
SELECT compatible_from FROM retrybus_schema_compatibility WHERE version = ?;

-- name: record_compatible_from
INSERT OR IGNORE INTO retrybus_schema_compatibility (version, compatible_from) VALUES (?, ?);

-- name: migrate_6_add_ordering_key
-- version 5 (or 1 to 4) -> 6, when retry_columns lacks ordering_key: old rows
-- read NULL (unordered)
ALTER TABLE retry_queue ADD COLUMN ordering_key TEXT;

-- name: migrate_6_add_ordering_sequence
ALTER TABLE retry_queue ADD COLUMN ordering_sequence INTEGER;

-- name: migrate_2_add_failure_group
-- version 1 -> 2, before the schema above runs again (it adds the index and the
-- control table); the store then back-fills failure_group in batches
ALTER TABLE dead_letter_queue ADD COLUMN failure_group TEXT NOT NULL DEFAULT '';

-- name: migrate_3_newest_first_indexes
-- version 2 (or 1) -> 3, when newest_first_index_columns lacks id: before the schema
-- above runs again and creates them anew with id after created_at, for the
-- newest-first order and keyset paging
DROP INDEX IF EXISTS dead_letter_queue_created_at;
DROP INDEX IF EXISTS dead_letter_queue_failure_group;

-- name: migrate_4_add_claims
-- version 3 (or 1, 2) -> 4, when retry_columns lacks claims: old rows read as 0
ALTER TABLE retry_queue ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;

-- name: migrate_5_add_retry_service
-- version 4 (or 1, 2, 3) -> 5, when retry_columns lacks service: no rewrite, old
-- rows read the default
ALTER TABLE retry_queue ADD COLUMN service TEXT NOT NULL DEFAULT 'default';

-- name: migrate_5_add_dead_service
-- likewise for dead_columns
ALTER TABLE dead_letter_queue ADD COLUMN service TEXT NOT NULL DEFAULT 'default';

-- name: migrate_5_handler_index
-- version 4 (or 1, 2, 3) -> 5, when handler_index_columns is not (service,
-- handler_name, next_retry): before the schema above runs again and creates it
-- anew (one pass over the retry items, in the upgrade's transaction)
DROP INDEX IF EXISTS retry_queue_handler_name;

-- name: migrate_5_drop_next_retry_index
-- version 4 (or 1, 2, 3) -> 5: no query chose it over retry_queue_next_retry_attempt,
-- which begins with the same column; every write of an item kept it up to date
DROP INDEX IF EXISTS retry_queue_next_retry;

-- name: retry_columns
SELECT name FROM pragma_table_info('retry_queue');

-- name: handler_index_columns
SELECT name FROM pragma_index_info('retry_queue_handler_name');

-- name: newest_first_index_columns
SELECT name FROM pragma_index_info('dead_letter_queue_created_at')
UNION ALL
SELECT name FROM pragma_index_info('dead_letter_queue_failure_group');

-- name: dead_columns
SELECT name FROM pragma_table_info('dead_letter_queue');

-- name: ungrouped_dead
SELECT rowid, handler_name, error_type, error, service FROM dead_letter_queue
WHERE failure_group = ''
LIMIT ?;

-- name: set_failure_group
UPDATE dead_letter_queue SET failure_group = ? WHERE rowid = ? AND failure_group = '';

-- name: insert_retry
-- OR IGNORE: a write repeated after an error whose commit went through adds nothing twice
INSERT OR IGNORE INTO retry_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
) VALUES (
    :id, :event_id, :event_type, :event_data, :event_source, :event_timestamp, :event_subject,
    :event_extensions, :handler_name, :error, :error_type, :traceback, :attempt, :max_retries,
    :next_retry, :created_at, :updated_at, :lease_owner, :lease_until, :metadata, :claims,
    :service
);

-- name: stored_retry_ids
-- which of a JSON array of ids are stored already (record_pending skips them): one
-- statement whatever the number of ids
SELECT id FROM retry_queue WHERE id IN (SELECT value FROM json_each(?));

-- name: insert_dead
INSERT OR IGNORE INTO dead_letter_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
    service
) VALUES (
    :id, :event_id, :event_type, :event_data, :event_source, :event_timestamp, :event_subject,
    :event_extensions, :handler_name, :error, :error_type, :traceback, :attempt, :max_retries,
    :reason, :processed, :created_at, :processed_at, :first_failed_at, :metadata, :failure_group,
    :service
);

-- name: claim_due
-- {service}: TRUE (any service) or service = :service (sql.service_query)
UPDATE retry_queue
SET lease_owner = :owner, lease_until = :lease_until, updated_at = :now, claims = claims + 1
WHERE rowid IN (
    SELECT rowid FROM retry_queue
    WHERE next_retry <= :now AND (lease_until IS NULL OR lease_until <= :now) AND {service}
      AND {in_turn}
    ORDER BY next_retry
    LIMIT :limit
)
RETURNING *;

-- name: queued_services
-- The services that have items in the retry queue (and a last NULL), one seek each
-- in retry_queue_handler_name, which they lead: a claim or next_due of the given
-- handlers of any service starts with it (sql.handler_query), each handler's seek
-- then running over these services
WITH RECURSIVE queued_services (name) AS (
    SELECT MIN(service) FROM retry_queue
    UNION ALL
    SELECT (SELECT MIN(service) FROM retry_queue WHERE service > name) FROM queued_services
    WHERE name IS NOT NULL
)

-- name: claim_due_of_handlers
-- The due slot (filled by sql.handler_query) is a set of (rid, next_retry) rows of
-- the worker's handlers: the first due items of each handler (due_of_handler, one
-- per handler, UNION ALL), or for very many handlers due_of_many_handlers
UPDATE retry_queue
SET lease_owner = :owner, lease_until = :lease_until, updated_at = :now, claims = claims + 1
WHERE rowid IN (
    SELECT rid FROM (
{due}
    ) ORDER BY next_retry LIMIT :limit
)
RETURNING *;

-- name: due_of_handler
-- one handler's first due items, straight from retry_queue_handler_name (a seek
-- to the service's handler, then its items in due order until enough are found).
-- {service} is service = :service, or for any service service IN (SELECT name FROM
-- queued_services): a seek for each, SQLite leaving each once it cannot beat the
-- items it has
SELECT rid, next_retry FROM (
    SELECT rowid AS rid, next_retry FROM retry_queue
    WHERE {service} AND handler_name = :h{n} AND next_retry <= :now
      AND (lease_until IS NULL OR lease_until <= :now) AND {in_turn}
    ORDER BY next_retry
    LIMIT :limit
)

-- name: due_of_many_handlers
-- the due items of the JSON array of handlers: one seek per handler too, but
-- every due item of theirs is read and sorted
SELECT rowid AS rid, next_retry FROM retry_queue
WHERE {service} AND handler_name IN (SELECT value FROM json_each(:handlers))
  AND next_retry <= :now
  AND (lease_until IS NULL OR lease_until <= :now) AND {in_turn}

-- name: extend_leases
UPDATE retry_queue SET lease_until = ? WHERE lease_owner = ? AND id IN ({ids});

-- name: release
-- the claim no longer counts
UPDATE retry_queue SET lease_owner = NULL, lease_until = NULL, claims = MAX(claims - 1, 0)
WHERE lease_owner = ? AND id IN ({ids});

-- name: delete_succeeded
DELETE FROM retry_queue
WHERE (lease_owner = ?1 OR (?1 IS NULL AND (lease_until IS NULL OR lease_until <= ?2)))
  AND id IN ({ids})
RETURNING id, attempt;

-- name: reschedule
-- the item written whole, unleased, its claims 0 again
UPDATE retry_queue
SET event_id = :event_id, event_type = :event_type, event_data = :event_data,
    event_source = :event_source, event_timestamp = :event_timestamp,
    event_subject = :event_subject, event_extensions = :event_extensions,
    handler_name = :handler_name, error = :error, error_type = :error_type,
    traceback = :traceback, attempt = :attempt, max_retries = :max_retries,
    next_retry = :next_retry, created_at = :created_at, updated_at = :updated_at,
    metadata = :metadata, lease_owner = NULL, lease_until = NULL, claims = 0
WHERE id = :id
  AND (lease_owner = :owner OR (:owner IS NULL AND (lease_until IS NULL OR lease_until <= :now)));

-- name: delete_held
DELETE FROM retry_queue
WHERE id = :id
  AND (lease_owner = :owner OR (:owner IS NULL AND (lease_until IS NULL OR lease_until <= :now)));

-- name: add_counter
UPDATE retrybus_counters SET value = value + ? WHERE name = ?;

-- name: counters
SELECT name, value FROM retrybus_counters;

-- name: next_due_unleased
-- {service}: as in claim_due
SELECT next_retry FROM retry_queue WHERE lease_until IS NULL AND {service} AND {in_turn}
ORDER BY next_retry LIMIT 1;

-- name: next_lease_end
-- the few leased items, from retry_queue_lease_until; {service} is TRUE or +service =
-- :service (the + keeps the planner off the handler index)
SELECT MIN(MAX(next_retry, lease_until)) FROM retry_queue
WHERE lease_until IS NOT NULL AND {service};

-- name: next_due_of_handlers
-- The first slot (filled by sql.handler_query) is the earliest unleased item of each
-- handler (first_of_handler, UNION ALL), or for very many handlers
-- first_of_many_handlers. The leased items are few (those in flight): read from the
-- partial index retry_queue_lease_until (the + keeps the planner off the handler
-- index, which would read every item of the handlers). {leased_service} is +service =
-- :service, or TRUE for any service
SELECT MIN(due) FROM (
    {first}
    UNION ALL
    SELECT MIN(MAX(next_retry, lease_until)) FROM retry_queue
    WHERE lease_until IS NOT NULL AND +handler_name IN (SELECT value FROM json_each(:handlers))
      AND {leased_service}
);

-- name: first_of_handler
SELECT due FROM (
    SELECT next_retry AS due FROM retry_queue
    WHERE {service} AND handler_name = :h{n} AND lease_until IS NULL AND {in_turn}
    ORDER BY next_retry
    LIMIT 1
)

-- name: first_of_many_handlers
SELECT MIN(next_retry) AS due FROM retry_queue
WHERE {service} AND handler_name IN (SELECT value FROM json_each(:handlers))
  AND lease_until IS NULL AND {in_turn}

-- name: retry_count
SELECT COUNT(*) FROM retry_queue;

-- name: count_due
SELECT COUNT(*) FROM retry_queue WHERE next_retry < ?;

-- name: get_retry
SELECT * FROM retry_queue WHERE id = ?;

-- name: list_retry
-- {kind}: the condition of the kind asked for (kind_retry, kind_pending,
-- kind_scheduled), or TRUE; the (next_retry, attempt) index serves the time range
-- and the attempt of each
SELECT * FROM retry_queue
WHERE (:handler_name IS NULL OR handler_name = :handler_name)
  AND (:event_type IS NULL OR event_type = :event_type)
  AND (:service IS NULL OR service = :service)
  AND {kind}
ORDER BY next_retry, id
LIMIT :limit OFFSET :offset;

-- name: kind_retry
attempt <> 0

-- name: kind_pending
attempt = 0 AND next_retry <= :now

-- name: kind_scheduled
attempt = 0 AND next_retry > :now

-- name: count_retry_kinds
-- one pass over the (next_retry, attempt) index, which holds both columns
SELECT coalesce(sum(attempt <> 0), 0),
       coalesce(sum(attempt = 0 AND next_retry <= :now), 0),
       coalesce(sum(attempt = 0 AND next_retry > :now), 0)
FROM retry_queue;

-- name: find_retry_ids
SELECT id FROM retry_queue WHERE id >= ? AND id < ? ORDER BY id LIMIT ?;

-- name: cancel_delivery
-- a first delivery that no live lease holds
DELETE FROM retry_queue
WHERE id = :id AND attempt = 0 AND (lease_until IS NULL OR lease_until <= :now);

-- name: delete_retry
DELETE FROM retry_queue WHERE id = ?;

-- name: take_expired
-- a retry expires by age; a first delivery (attempt 0: deferred or scheduled) only
-- once it has been due since before :before, never before its time
DELETE FROM retry_queue
WHERE id IN (
    SELECT id FROM retry_queue
    WHERE created_at < :before
      AND (attempt <> 0 OR next_retry < :before)
      AND (lease_until IS NULL OR lease_until <= :now)
    LIMIT 500
)
RETURNING *;

-- name: dead_filter
-- One condition per DeadLetterFilter field, one a line, named by its first parameter;
-- {where} in the queries below is the conditions of the fields that are set, joined
-- with AND (TRUE for none). The cursor is (:cursor, :cursor_id), its (created_at, id):
-- a row value, which SQLite seeks in the (created_at, id) indexes.
event_type = :event_type
handler_name = :handler_name
reason = :reason
processed = :processed
created_at >= :created_after
created_at < :created_before
event_id = :event_id
failure_group = :failure_group
service = :service
(created_at, id) < (:cursor, :cursor_id)

-- name: list_dead
SELECT * FROM dead_letter_queue
WHERE {where}
ORDER BY created_at DESC, id DESC
LIMIT :limit OFFSET :offset;

-- name: count_dead
SELECT COUNT(*) FROM dead_letter_queue WHERE {where};

-- name: group_dead
-- {by} is a column of DEAD_LETTER_GROUP_FIELDS; the sample is the newest item of the
-- group (created_at = last_at, the greatest id among those)
WITH counted AS (
    SELECT {by} AS key, COUNT(*) AS n, MIN(created_at) AS first_at, MAX(created_at) AS last_at
    FROM dead_letter_queue
    WHERE {where}
    GROUP BY {by}
    ORDER BY n DESC, key
    LIMIT :limit
)
SELECT key, n, first_at, last_at, (
    SELECT MAX(id) FROM dead_letter_queue
    WHERE {by} = counted.key AND created_at = counted.last_at AND {where}
) AS sample_id
FROM counted
ORDER BY n DESC, key;

-- name: get_dead
SELECT * FROM dead_letter_queue WHERE id = ?;

-- name: find_dead_ids
SELECT id FROM dead_letter_queue WHERE id >= ? AND id < ? ORDER BY id LIMIT ?;

-- name: update_dead
UPDATE dead_letter_queue
SET error = :error, error_type = :error_type, traceback = :traceback, attempt = :attempt,
    processed = :processed, processed_at = :processed_at, metadata = :metadata,
    event_data = :event_data, reason = :reason, failure_group = :failure_group
WHERE id = :id;

-- name: delete_dead
DELETE FROM dead_letter_queue WHERE id = ?;

-- name: delete_dead_many
DELETE FROM dead_letter_queue WHERE id IN ({ids});

-- name: cleanup_dead
DELETE FROM dead_letter_queue WHERE created_at < ?;

-- name: group_retry
-- {by} is a column of RETRY_GROUP_FIELDS; the sample is the item due first
-- (next_retry = first_at, the least id among those)
WITH counted AS (
    SELECT {by} AS key, COUNT(*) AS n, MIN(next_retry) AS first_at, MAX(next_retry) AS last_at
    FROM retry_queue
    GROUP BY {by}
    ORDER BY n DESC, key
    LIMIT :limit
)
SELECT key, n, first_at, last_at, (
    SELECT MIN(id) FROM retry_queue WHERE {by} = counted.key AND next_retry = counted.first_at
) AS sample_id
FROM counted
ORDER BY n DESC, key;

-- name: newest_failures
-- per (service, handler), the retry (attempt != 0) with the greatest (updated_at, id),
-- of the service :service (NULL: of every one); newest first, at most :limit. No
-- index holds updated_at (every claim writes it): one pass over the retry queue.
SELECT * FROM retry_queue
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY service, handler_name ORDER BY updated_at DESC, id DESC
        ) AS place
        FROM retry_queue
        WHERE attempt != 0 AND (:service IS NULL OR service = :service)
    )
    WHERE place = 1
)
ORDER BY updated_at DESC, service, handler_name
LIMIT :limit;

-- name: get_control
SELECT key, version, value FROM retrybus_control WHERE key = ?;

-- name: create_control
INSERT INTO retrybus_control (key, version, value) VALUES (:key, 1, :value)
ON CONFLICT (key) DO NOTHING;

-- name: replace_control
UPDATE retrybus_control SET version = version + 1, value = :value
WHERE key = :key AND version = :version;

-- name: list_control
-- the primary key's order is Python's str order (BINARY collation on UTF-8)
SELECT key, version, value FROM retrybus_control
WHERE key >= :prefix AND substr(key, 1, length(:prefix)) = :prefix
ORDER BY key;

-- name: delete_control
DELETE FROM retrybus_control WHERE key = ?;

-- name: subscriptions_revision
SELECT value FROM retrybus_counters WHERE name = 'subscriptions_revision';

-- name: next_subscriptions_revision
-- the revision of a write that changes subscriptions (in its transaction)
UPDATE retrybus_counters SET value = value + 1 WHERE name = 'subscriptions_revision'
RETURNING value;

-- name: subscriptions_of_service
SELECT * FROM retrybus_subscriptions WHERE service = ?;

-- name: put_subscription
-- a subscription written whole: new, back after a removal (its tombstone cleared),
-- or with new terms
INSERT INTO retrybus_subscriptions (
    service, handler_name, patterns, policy, max_retries, handler_timeout, registered_at,
    updated_at, removed_at, removed_by, revision, details
) VALUES (
    :service, :handler_name, :patterns, :policy, :max_retries, :handler_timeout, :registered_at,
    :updated_at, NULL, NULL, :revision, :details
)
ON CONFLICT (service, handler_name) DO UPDATE SET
    patterns = excluded.patterns, policy = excluded.policy, max_retries = excluded.max_retries,
    handler_timeout = excluded.handler_timeout, registered_at = excluded.registered_at,
    updated_at = excluded.updated_at, removed_at = NULL, removed_by = NULL,
    revision = excluded.revision, details = excluded.details;

-- name: tombstone_subscription
UPDATE retrybus_subscriptions
SET removed_at = :now, removed_by = :actor, updated_at = :now, revision = :revision
WHERE service = :service AND handler_name = :handler_name AND removed_at IS NULL;

-- name: list_subscriptions
-- the primary key's order: service, then handler name
SELECT * FROM retrybus_subscriptions
WHERE (:service IS NULL OR service = :service) AND (:removed OR removed_at IS NULL)
ORDER BY service, handler_name;

-- name: forget_subscriptions
DELETE FROM retrybus_subscriptions WHERE removed_at IS NOT NULL AND removed_at < ?;

-- name: tombstones
SELECT service, handler_name, removed_by FROM retrybus_subscriptions
WHERE removed_at IS NOT NULL;

-- name: unsubscribed_items
-- one tombstoned (service, handler)'s first items no live lease holds, due first: a
-- seek in retry_queue_handler_name (ties in next_retry sorted by id among themselves)
SELECT * FROM retry_queue
WHERE service = :service AND handler_name = :handler_name
  AND (lease_until IS NULL OR lease_until <= :now)
ORDER BY next_retry, id
LIMIT :limit;

-- name: beat
INSERT INTO retrybus_workers (
    name, service, host, pid, started_at, last_seen, interval, lanes, lanes_busy, handlers,
    version
) VALUES (
    :name, :service, :host, :pid, :started_at, :last_seen, :interval, :lanes, :lanes_busy,
    :handlers, :version
)
ON CONFLICT (name) DO UPDATE SET
    service = excluded.service, host = excluded.host, pid = excluded.pid,
    started_at = excluded.started_at, last_seen = excluded.last_seen,
    interval = excluded.interval, lanes = excluded.lanes, lanes_busy = excluded.lanes_busy,
    handlers = excluded.handlers, version = excluded.version;

-- name: forget_worker
DELETE FROM retrybus_workers WHERE name = ?;

-- name: list_workers
SELECT * FROM retrybus_workers
WHERE (:service IS NULL OR service = :service)
ORDER BY service, name;

-- name: prune_workers
DELETE FROM retrybus_workers WHERE last_seen < ?;

-- name: service_loads
-- what waits per (service, handler): the retry queue counted per kind at :now
-- (kind_retry, kind_pending, kind_scheduled), in the order of retry_queue_handler_name,
-- and the dead letters, each table grouped before the two are put together
SELECT service, handler_name, sum(pending), sum(scheduled), sum(retrying), sum(leased),
       sum(dead_unprocessed), sum(dead_processed), min(oldest_pending_due)
FROM (
    SELECT service, handler_name,
           sum(attempt = 0 AND next_retry <= :now) AS pending,
           sum(attempt = 0 AND next_retry > :now) AS scheduled,
           sum(attempt <> 0) AS retrying,
           sum(lease_until IS NOT NULL AND lease_until > :now) AS leased,
           0 AS dead_unprocessed,
           0 AS dead_processed,
           min(CASE WHEN attempt = 0 AND next_retry <= :now THEN next_retry END)
               AS oldest_pending_due
    FROM retry_queue
    GROUP BY service, handler_name
    UNION ALL
    SELECT service, handler_name, 0, 0, 0, 0, sum(processed = 0), sum(processed <> 0), NULL
    FROM dead_letter_queue
    GROUP BY service, handler_name
)
GROUP BY service, handler_name
ORDER BY service, handler_name;

-- name: remember_successes
INSERT INTO inbox_successes (id, until) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET until = max(inbox_successes.until, excluded.until);

-- name: remembered
SELECT id FROM inbox_successes WHERE id IN ({ids}) AND until > ?;

-- name: forget_successes
DELETE FROM inbox_successes WHERE until <= ?;
