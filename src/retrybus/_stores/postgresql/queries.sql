-- All SQL of the PostgreSQL store, one named query per block.
-- Every connection's search_path is the store's schema (``?schema=NAME``, default
-- public), so names are unqualified. Every time comes from the caller (``now``),
-- never from the server's clock: tests drive a manual clock.
-- event_data and metadata are ``json`` (kept as written, so any JSON value round-trips
-- exactly, floats like 1e300 and "\u0000" included: jsonb refuses "\u0000", which an
-- edited payload kept in metadata may hold); extensions are ``jsonb``.

-- name: version_table
CREATE TABLE IF NOT EXISTS retrybus_schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: current_version
SELECT coalesce(max(version), 0) FROM retrybus_schema_version;

-- name: record_version
INSERT INTO retrybus_schema_version (version) VALUES ($1) ON CONFLICT (version) DO NOTHING;

-- name: schema_v1
CREATE TABLE IF NOT EXISTS retry_queue (
    id               text PRIMARY KEY,
    event_id         text,
    event_type       text,
    event_data       json,
    event_source     text,
    event_timestamp  timestamptz,
    event_subject    text,
    event_extensions jsonb NOT NULL DEFAULT '{}',
    handler_name     text,
    error            text NOT NULL DEFAULT '',
    error_type       text NOT NULL DEFAULT '',
    traceback        text NOT NULL DEFAULT '',
    attempt          integer,
    max_retries      integer,
    next_retry       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    lease_owner      text,
    lease_until      timestamptz,
    metadata         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS retry_queue_next_retry ON retry_queue (next_retry);
CREATE INDEX IF NOT EXISTS retry_queue_handler_name ON retry_queue (handler_name);
CREATE INDEX IF NOT EXISTS retry_queue_next_retry_attempt ON retry_queue (next_retry, attempt);
CREATE INDEX IF NOT EXISTS retry_queue_created_at ON retry_queue (created_at);
CREATE INDEX IF NOT EXISTS retry_queue_lease_until ON retry_queue (lease_until)
    WHERE lease_until IS NOT NULL;

CREATE TABLE IF NOT EXISTS dead_letter_queue (
    id               text PRIMARY KEY,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    event_data       json,
    event_source     text NOT NULL,
    event_timestamp  timestamptz NOT NULL,
    event_subject    text,
    event_extensions jsonb NOT NULL DEFAULT '{}',
    handler_name     text NOT NULL,
    error            text NOT NULL DEFAULT '',
    error_type       text NOT NULL DEFAULT '',
    traceback        text NOT NULL DEFAULT '',
    attempt          integer NOT NULL,
    max_retries      integer NOT NULL DEFAULT 0,
    reason           text NOT NULL,
    processed        boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL,
    processed_at     timestamptz,
    first_failed_at  timestamptz,
    metadata         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS dead_letter_queue_created_at ON dead_letter_queue (created_at DESC);
CREATE INDEX IF NOT EXISTS dead_letter_queue_processed ON dead_letter_queue (processed);
CREATE INDEX IF NOT EXISTS dead_letter_queue_event_type ON dead_letter_queue (event_type);
CREATE INDEX IF NOT EXISTS dead_letter_queue_handler_name ON dead_letter_queue (handler_name);

-- one row: its columns are the running totals of bus.stats()
CREATE TABLE IF NOT EXISTS retrybus_counters (
    id                       integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    retry_added              bigint NOT NULL DEFAULT 0,
    retry_succeeded          bigint NOT NULL DEFAULT 0,
    retry_succeeded_attempts bigint NOT NULL DEFAULT 0,
    retry_dead_lettered      bigint NOT NULL DEFAULT 0
);
INSERT INTO retrybus_counters (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

-- name: schema_v2
-- Failure groups: DeadLetterItem.failure_group is computed in Python, so it is stored
-- with every dead letter; the migration back-fills existing rows (dead_without_group,
-- set_failure_groups) before schema_v2_indexes. The column stays nullable: a retrybus
-- of schema version 1 still running against the database (a rolling upgrade) leaves
-- it NULL, and the store fills such rows before a query that needs them.
-- Control records: small JSON documents written with compare-and-set on version.
ALTER TABLE dead_letter_queue ADD COLUMN IF NOT EXISTS failure_group text;

CREATE TABLE IF NOT EXISTS retrybus_control (
    key     text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL,
    value   json NOT NULL
);

-- name: schema_v3
-- metadata becomes json, as event_data is: jsonb refuses "\u0000", and metadata keeps
-- copies of payloads (an edit's original). Both ways between json and jsonb are
-- assignment casts, so a retrybus of version 2 still running keeps working.
ALTER TABLE retry_queue
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    ALTER COLUMN metadata SET DEFAULT '{}';
ALTER TABLE dead_letter_queue
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    ALTER COLUMN metadata SET DEFAULT '{}';

-- name: schema_v2_indexes
-- newest first (created_at DESC, id DESC) straight from the index; it still serves
-- cleanup_dead's created_at < $1
DROP INDEX IF EXISTS dead_letter_queue_created_at;
CREATE INDEX IF NOT EXISTS dead_letter_queue_created_at
    ON dead_letter_queue (created_at DESC, id DESC);
-- a group's members newest first, and its count
CREATE INDEX IF NOT EXISTS dead_letter_queue_failure_group
    ON dead_letter_queue (failure_group, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dead_letter_queue_event_id ON dead_letter_queue (event_id);
-- empty but for rows an older retrybus wrote (see schema_v2)
CREATE INDEX IF NOT EXISTS dead_letter_queue_without_group
    ON dead_letter_queue (id) WHERE failure_group IS NULL;

-- name: dead_without_group
-- $1: the last id of the previous batch ('' for the first)
SELECT id, handler_name, error_type, error FROM dead_letter_queue
WHERE failure_group IS NULL AND id > $1
ORDER BY id
LIMIT $2;

-- name: set_failure_groups
UPDATE dead_letter_queue AS d SET failure_group = g.failure_group
FROM unnest($1::text[], $2::text[]) AS g(id, failure_group)
WHERE d.id = g.id AND d.failure_group IS NULL;

-- name: record_failures
-- $1..$20: one array per retry_queue column; $21..$41: one per dead letter column; $42: channel
WITH ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata
    )
    SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
           r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
           r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
           r.lease_owner, r.lease_until, r.metadata::json
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
        $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[]
    ) AS r(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata
    )
    ON CONFLICT (id) DO NOTHING  -- a write repeated after a lost reply adds nothing twice
    RETURNING 1
), dead AS (
    INSERT INTO dead_letter_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group
    )
    SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
           d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
           d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
           d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group
    FROM unnest(
        $21::text[], $22::text[], $23::text[], $24::text[], $25::text[], $26::timestamptz[],
        $27::text[], $28::text[], $29::text[], $30::text[], $31::text[], $32::text[],
        $33::integer[], $34::integer[], $35::text[], $36::boolean[], $37::timestamptz[],
        $38::timestamptz[], $39::timestamptz[], $40::text[], $41::text[]
    ) AS d(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group
    )
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
), added AS (
    SELECT count(*) AS n FROM ins
), counted AS (
    UPDATE retrybus_counters SET retry_added = retry_added + added.n
    FROM added WHERE added.n > 0
    RETURNING 1
), notified AS (
    SELECT pg_notify($42, '') FROM added WHERE added.n > 0
)
SELECT (SELECT n FROM added), (SELECT count(*) FROM dead), (SELECT count(*) FROM notified),
       (SELECT count(*) FROM counted);

-- name: record_retries
-- record_failures without dead letters (the common case): $1..$20 retry columns, $21 channel
WITH ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata
    )
    SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
           r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
           r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
           r.lease_owner, r.lease_until, r.metadata::json
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
        $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[]
    ) AS r(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata
    )
    ON CONFLICT (id) DO NOTHING  -- a write repeated after a lost reply adds nothing twice
    RETURNING 1
), added AS (
    SELECT count(*) AS n FROM ins
), counted AS (
    UPDATE retrybus_counters SET retry_added = retry_added + added.n
    FROM added WHERE added.n > 0
    RETURNING 1
), notified AS (
    SELECT pg_notify($21, '') FROM added WHERE added.n > 0
)
SELECT (SELECT n FROM added), (SELECT count(*) FROM notified), (SELECT count(*) FROM counted);

-- name: claim_due
UPDATE retry_queue
SET lease_owner = $1, lease_until = $2, updated_at = $3
WHERE id IN (
    SELECT id FROM retry_queue
    WHERE next_retry <= $3 AND (lease_until IS NULL OR lease_until <= $3)
    ORDER BY next_retry
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
RETURNING *;

-- name: extend_leases
UPDATE retry_queue SET lease_until = $1 WHERE lease_owner = $2 AND id = ANY($3::text[]);

-- name: release
WITH released AS (
    UPDATE retry_queue SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = $1 AND id = ANY($2::text[])
    RETURNING 1
), notified AS (
    SELECT pg_notify($3, '') FROM (SELECT 1 FROM released LIMIT 1) AS any_released
)
SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM notified);

-- name: complete
-- $1 owner (NULL: only items no live lease holds at $2), $2 now, $3 channel;
-- $4 succeeded ids; $5..$12 rescheduled columns; $13 dead-lettered retry ids and
-- $14..$34 their dead letters' columns.
WITH succeeded AS (
    DELETE FROM retry_queue
    WHERE id = ANY($4::text[])
      AND (lease_owner = $1 OR ($1::text IS NULL AND (lease_until IS NULL OR lease_until <= $2)))
    RETURNING id, attempt
), rescheduled AS (
    UPDATE retry_queue AS q
    SET attempt = n.attempt, next_retry = n.next_retry, error = n.error,
        error_type = n.error_type, traceback = n.traceback, updated_at = n.updated_at,
        metadata = n.metadata::json, lease_owner = NULL, lease_until = NULL
    FROM unnest(
        $5::text[], $6::integer[], $7::timestamptz[], $8::text[], $9::text[], $10::text[],
        $11::timestamptz[], $12::text[]
    ) AS n(id, attempt, next_retry, error, error_type, traceback, updated_at, metadata)
    WHERE q.id = n.id
      AND (q.lease_owner = $1
           OR ($1::text IS NULL AND (q.lease_until IS NULL OR q.lease_until <= $2)))
    RETURNING q.id
), moved AS (
    DELETE FROM retry_queue
    WHERE id = ANY($13::text[])
      AND (lease_owner = $1 OR ($1::text IS NULL AND (lease_until IS NULL OR lease_until <= $2)))
    RETURNING id
), dead AS (
    INSERT INTO dead_letter_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group
    )
    SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
           d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
           d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
           d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group
    FROM unnest(
        $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[],
        $19::timestamptz[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[],
        $25::text[], $26::integer[], $27::integer[], $28::text[], $29::boolean[],
        $30::timestamptz[], $31::timestamptz[], $32::timestamptz[], $33::text[], $34::text[]
    ) AS d(
        retry_id, id, event_id, event_type, event_data, event_source, event_timestamp,
        event_subject, event_extensions, handler_name, error, error_type, traceback, attempt,
        max_retries, reason, processed, created_at, processed_at, first_failed_at, metadata,
        failure_group
    )
    WHERE d.retry_id IN (SELECT id FROM moved)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
), totals AS (
    SELECT (SELECT count(*) FROM succeeded) AS done,
           (SELECT coalesce(sum(attempt), 0) FROM succeeded) AS attempts,
           (SELECT count(*) FROM moved) AS moved
), counted AS (
    UPDATE retrybus_counters
    SET retry_succeeded = retry_succeeded + totals.done,
        retry_succeeded_attempts = retry_succeeded_attempts + totals.attempts,
        retry_dead_lettered = retry_dead_lettered + totals.moved
    FROM totals WHERE totals.done > 0 OR totals.moved > 0
    RETURNING 1
), notified AS (
    SELECT pg_notify($3, '') FROM (SELECT 1 FROM rescheduled LIMIT 1) AS any_rescheduled
)
SELECT id FROM succeeded
UNION ALL SELECT id FROM rescheduled
UNION ALL SELECT id FROM moved
UNION ALL SELECT NULL FROM notified
UNION ALL SELECT NULL FROM counted;

-- name: next_due
SELECT least(
    (SELECT next_retry FROM retry_queue WHERE lease_until IS NULL ORDER BY next_retry LIMIT 1),
    (SELECT min(greatest(next_retry, lease_until)) FROM retry_queue WHERE lease_until IS NOT NULL)
);

-- name: retry_count
SELECT count(*) FROM retry_queue;

-- name: count_due
SELECT count(*) FROM retry_queue WHERE next_retry < $1;

-- name: get_retry
SELECT * FROM retry_queue WHERE id = $1;

-- name: list_retry
SELECT * FROM retry_queue
WHERE ($1::text IS NULL OR handler_name = $1)
  AND ($2::text IS NULL OR event_type = $2)
ORDER BY next_retry, id
LIMIT $3 OFFSET $4;

-- name: delete_retry
DELETE FROM retry_queue WHERE id = $1;

-- name: take_expired
DELETE FROM retry_queue
WHERE id IN (
    SELECT id FROM retry_queue
    WHERE created_at < $1 AND (lease_until IS NULL OR lease_until <= $2)
    LIMIT 500
    FOR UPDATE SKIP LOCKED
)
RETURNING *;

-- name: insert_dead
INSERT INTO dead_letter_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group
)
SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
       d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
       d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
       d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
    $13::integer[], $14::integer[], $15::text[], $16::boolean[], $17::timestamptz[],
    $18::timestamptz[], $19::timestamptz[], $20::text[], $21::text[]
) AS d(
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group
)
ON CONFLICT (id) DO NOTHING;

-- name: add_dead_lettered
UPDATE retrybus_counters SET retry_dead_lettered = retry_dead_lettered + $1;

-- name: list_dead
-- $1..$10: the DeadLetterFilter (event_type, handler_name, reason, processed,
-- created_after, created_before, event_id, failure_group, and the cursor as its
-- created_at and id; NULL matches anything), as in count_dead and group_dead;
-- $11 limit, $12 offset
SELECT * FROM dead_letter_queue
WHERE ($1::text IS NULL OR event_type = $1)
  AND ($2::text IS NULL OR handler_name = $2)
  AND ($3::text IS NULL OR reason = $3)
  AND ($4::boolean IS NULL OR processed = $4)
  AND ($5::timestamptz IS NULL OR created_at >= $5)
  AND ($6::timestamptz IS NULL OR created_at < $6)
  AND ($7::text IS NULL OR event_id = $7)
  AND ($8::text IS NULL OR failure_group = $8)
  AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::text))
ORDER BY created_at DESC, id DESC
LIMIT $11 OFFSET $12;

-- name: count_dead
SELECT count(*) FROM dead_letter_queue
WHERE ($1::text IS NULL OR event_type = $1)
  AND ($2::text IS NULL OR handler_name = $2)
  AND ($3::text IS NULL OR reason = $3)
  AND ($4::boolean IS NULL OR processed = $4)
  AND ($5::timestamptz IS NULL OR created_at >= $5)
  AND ($6::timestamptz IS NULL OR created_at < $6)
  AND ($7::text IS NULL OR event_id = $7)
  AND ($8::text IS NULL OR failure_group = $8)
  AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::text));

-- name: group_dead
-- $11 the field, $12 limit. One hash aggregate counts the groups; then, for each group
-- kept, the newest item is looked up by its created_at (last_at) in the created_at index.
-- Keys compare as code points (COLLATE "C"), whatever the database's collation.
WITH matching AS NOT MATERIALIZED (
    SELECT CASE $11::text
               WHEN 'failure_group' THEN coalesce(failure_group, '')
               WHEN 'handler_name' THEN handler_name
               WHEN 'event_type' THEN event_type
               WHEN 'reason' THEN reason
           END AS key,
           id, created_at
    FROM dead_letter_queue
    WHERE ($1::text IS NULL OR event_type = $1)
      AND ($2::text IS NULL OR handler_name = $2)
      AND ($3::text IS NULL OR reason = $3)
      AND ($4::boolean IS NULL OR processed = $4)
      AND ($5::timestamptz IS NULL OR created_at >= $5)
      AND ($6::timestamptz IS NULL OR created_at < $6)
      AND ($7::text IS NULL OR event_id = $7)
      AND ($8::text IS NULL OR failure_group = $8)
      AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::text))
), groups AS (
    SELECT key, count(*) AS n, min(created_at) AS first_at, max(created_at) AS last_at
    FROM matching
    GROUP BY key
    ORDER BY n DESC, key COLLATE "C"
    LIMIT $12
)
SELECT key, n, first_at, last_at,
       (SELECT max(m.id) FROM matching AS m
        WHERE m.key = g.key AND m.created_at = g.last_at) AS sample_id
FROM groups AS g
ORDER BY n DESC, key COLLATE "C";

-- name: get_dead
SELECT * FROM dead_letter_queue WHERE id = $1;

-- name: find_dead_ids
-- starts_with, not a range or LIKE: under a linguistic collation neither follows byte order
SELECT id FROM dead_letter_queue WHERE starts_with(id, $1) ORDER BY id COLLATE "C" LIMIT $2;

-- name: update_dead
-- $11: the failure group of the (maybe new) error
UPDATE dead_letter_queue
SET error = $2, error_type = $3, traceback = $4, attempt = $5, processed = $6,
    processed_at = $7, metadata = $8::json, event_data = $9::json, reason = $10,
    failure_group = $11
WHERE id = $1;

-- name: requeue_dead
-- $1 the dead letter's id, $2..$21 the new retry item's columns, $22 channel
WITH removed AS (
    DELETE FROM dead_letter_queue WHERE id = $1 RETURNING id
), ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata
    )
    SELECT $2::text, $3::text, $4::text, $5::json, $6::text, $7::timestamptz, $8::text,
           $9::jsonb, $10::text, $11::text, $12::text, $13::text, $14::integer, $15::integer,
           $16::timestamptz, $17::timestamptz, $18::timestamptz, $19::text, $20::timestamptz,
           $21::json
    FROM removed
    RETURNING 1
), counted AS (
    UPDATE retrybus_counters SET retry_added = retry_added + 1
    WHERE EXISTS (SELECT 1 FROM ins)
    RETURNING 1
), notified AS (
    SELECT pg_notify($22, '') FROM ins
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM counted), (SELECT count(*) FROM notified);

-- name: delete_dead
DELETE FROM dead_letter_queue WHERE id = $1;

-- name: delete_dead_many
DELETE FROM dead_letter_queue WHERE id = ANY($1::text[]);

-- name: cleanup_dead
DELETE FROM dead_letter_queue WHERE created_at < $1;

-- name: group_retry
-- $1 the field, $2 limit; as group_dead, by next_retry, the sample being the item due first
WITH items AS NOT MATERIALIZED (
    -- a damaged row may lack the field
    SELECT coalesce(CASE $1::text
                        WHEN 'handler_name' THEN handler_name
                        WHEN 'event_type' THEN event_type
                    END, 'unknown') AS key,
           id, next_retry
    FROM retry_queue
), groups AS (
    SELECT key, count(*) AS n, min(next_retry) AS first_at, max(next_retry) AS last_at
    FROM items
    GROUP BY key
    ORDER BY n DESC, key COLLATE "C"
    LIMIT $2
)
SELECT key, n, first_at, last_at,
       (SELECT min(i.id) FROM items AS i
        WHERE i.key = g.key AND i.next_retry = g.first_at) AS sample_id
FROM groups AS g
ORDER BY n DESC, key COLLATE "C";

-- name: get_control
SELECT key, version, value::text AS value FROM retrybus_control WHERE key = $1;

-- name: create_control
-- version 0: only when there is no record under the key
INSERT INTO retrybus_control (key, version, value) VALUES ($1, 1, $2::json)
ON CONFLICT (key) DO NOTHING
RETURNING version;

-- name: update_control
-- a concurrent writer of the same version waits for the row lock, then finds the
-- version changed and updates nothing
UPDATE retrybus_control SET version = version + 1, value = $3::json
WHERE key = $1 AND version = $2
RETURNING version;

-- name: list_control
SELECT key, version, value::text AS value FROM retrybus_control
WHERE starts_with(key, $1)
ORDER BY key;

-- name: delete_control
DELETE FROM retrybus_control WHERE key = $1;

-- name: counters
SELECT retry_added, retry_succeeded, retry_succeeded_attempts, retry_dead_lettered
FROM retrybus_counters;
