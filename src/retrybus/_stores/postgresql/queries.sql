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

-- name: compatibility_table
-- per schema version, the oldest version whose code can still use a schema at it
-- (migrate.COMPATIBLE_FROM; _stores/_compatibility.py): written by the release
-- that brought the schema to that version, read by older ones
CREATE TABLE IF NOT EXISTS retrybus_schema_compatibility (
    version         integer PRIMARY KEY,
    compatible_from integer NOT NULL
);

-- name: compatible_from
SELECT compatible_from FROM retrybus_schema_compatibility WHERE version = $1;

-- name: record_compatible_from
INSERT INTO retrybus_schema_compatibility (version, compatible_from) VALUES ($1, $2)
ON CONFLICT (version) DO NOTHING;

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

-- name: schema_v4
-- Pending deliveries: claims counts the claims made since a record's last outcome
-- (RetryItem.claims). Adding a column with a constant default rewrites nothing
-- (PostgreSQL 11+): existing rows read as 0, and a retrybus of version 3 still
-- running inserts rows that get 0. The handler_name index gains next_retry, so that
-- a worker claiming only its handlers' records reads them in time order straight
-- from it (claim_due_for, next_due_for), however many other handlers' records are
-- due before them; it keeps its name and still serves list_retry's filter. The
-- partial index of leased items (the work in flight) gains handler_name first, for
-- next_due_for; next_due still reads all of it, as it read the old one.
ALTER TABLE retry_queue ADD COLUMN IF NOT EXISTS claims integer NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS retry_queue_handler_name;
CREATE INDEX IF NOT EXISTS retry_queue_handler_name ON retry_queue (handler_name, next_retry);
DROP INDEX IF EXISTS retry_queue_lease_until;
CREATE INDEX IF NOT EXISTS retry_queue_leased ON retry_queue (handler_name, lease_until)
    WHERE lease_until IS NOT NULL;

-- name: schema_v5
-- Claims, lease extensions and releases write only lease_owner, lease_until,
-- updated_at and claims: with no index on any of them, and room left on the page
-- for the new row version (the fillfactor), such an update is HOT (heap-only): it
-- adds no index entry, and the dead version is pruned from its page when the page
-- is next read, where an update of an indexed column adds an entry to every index
-- of the table and leaves the old ones for the next claims to walk over. So the
-- partial index of leased items goes: next_due and next_due_for find the leased
-- items that matter (those due before the first item no lease holds) at the front
-- of the (next_retry, attempt) and (handler_name, next_retry) indexes. The
-- next_retry index goes too: (next_retry, attempt) serves all it served (count_due
-- with a lower bound, for its generic plan). A claim of many rows of one page finds
-- room for some of them only (pruning frees the page for the next claims): a worker
-- draining 20,000 small records made about half to 60 % of its claims HOT with 80,
-- two thirds with 70, almost all with 50, and none of those lower settings was
-- measurably faster than 80, on more pages. The fillfactor holds for the pages
-- written from now on (existing ones are not rewritten: a queue's pages turn over).
-- A retrybus of version 4 still running keeps working: its next_due reads the
-- leased items without their index (next_due every item, next_due_for every item of
-- its handlers).
DROP INDEX IF EXISTS retry_queue_leased;
DROP INDEX IF EXISTS retry_queue_next_retry;
ALTER TABLE retry_queue SET (fillfactor = 80);

-- name: schema_v7
-- Ordering keys (issue 14). A record whose event carries a partitionkey extension
-- (1 to 200 characters) gets it as ordering_key and the next number of
-- retry_queue_ordering_seq as ordering_sequence, from a BEFORE INSERT trigger, so
-- that every writer (the store, a stage in an application's transaction, an older
-- retrybus in a rolling upgrade) numbers it; the trigger's WHEN test keeps the
-- function from running for unkeyed rows. The sequence is named through the
-- table's own schema: an application's connection may have another search_path.
-- The columns are added without a default (no rewrite): rows stored before read
-- NULL (unordered). The partial index holds only keyed records: what the claims'
-- in_turn condition looks up.
CREATE SEQUENCE IF NOT EXISTS retry_queue_ordering_seq;
ALTER TABLE retry_queue ADD COLUMN IF NOT EXISTS ordering_key text COLLATE "C",
    ADD COLUMN IF NOT EXISTS ordering_sequence bigint;
CREATE INDEX IF NOT EXISTS retry_queue_ordering
    ON retry_queue (service, handler_name, ordering_key, ordering_sequence)
    WHERE ordering_key IS NOT NULL;
CREATE OR REPLACE FUNCTION retry_queue_ordering() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.ordering_key := NEW.event_extensions ->> 'partitionkey';
    IF length(NEW.ordering_key) BETWEEN 1 AND 200 THEN
        NEW.ordering_sequence := nextval(
            format('%I.retry_queue_ordering_seq', TG_TABLE_SCHEMA)::regclass);
    ELSE
        NEW.ordering_key := NULL;
        NEW.ordering_sequence := NULL;
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS retry_queue_ordering ON retry_queue;
CREATE TRIGGER retry_queue_ordering BEFORE INSERT ON retry_queue FOR EACH ROW
    WHEN (NEW.event_extensions ? 'partitionkey')
    EXECUTE FUNCTION retry_queue_ordering();

-- name: schema_v8
-- The inbox (issue 14): the deliveries that succeeded for handlers with the inbox
-- on, by delivery id (service, event, handler), until when they are remembered.
-- A retrybus of version 7 still running (a rolling upgrade) never reads or writes
-- it. The worker's maintenance deletes what has expired (forget_successes); reads
-- test until themselves, so an entry not yet swept is not remembered either.
CREATE TABLE IF NOT EXISTS inbox_successes (
    id     text COLLATE "C" PRIMARY KEY,
    until  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_successes_until ON inbox_successes (until);

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

-- name: schema_v6
-- Services (issue 12). Each record keeps its service: a column with a constant
-- default rewrites nothing (PostgreSQL 11+), so every row stored before reads as
-- the default service's, and a retrybus of version 5 still running (a rolling
-- upgrade) inserts rows that get it. The handler index gains the service first, so
-- that a worker claiming its service's handlers' records reads them in time order
-- straight from it, however many other services' records are due before them (a
-- stopped service's backlog is never read); it keeps its name and still serves
-- list_retry's filter. Like every index of retry_queue it holds no lease column, so
-- that claims, lease extensions and releases stay HOT updates (schema_v5). It is
-- rebuilt in this transaction: one pass over the retry items, retry_queue locked
-- meanwhile. A version 5 process still running (a rolling upgrade) keeps working,
-- but its claim_due_for and next_due_for cannot use an index led by the service:
-- each reads the whole table (a sequential scan per handler) until the process is
-- upgraded. Dead letters get an index for a service's, newest first.
ALTER TABLE retry_queue ADD COLUMN IF NOT EXISTS service text NOT NULL DEFAULT 'default';
ALTER TABLE dead_letter_queue ADD COLUMN IF NOT EXISTS service text NOT NULL DEFAULT 'default';
DROP INDEX IF EXISTS retry_queue_handler_name;
CREATE INDEX IF NOT EXISTS retry_queue_handler_name
    ON retry_queue (service, handler_name, next_retry);
CREATE INDEX IF NOT EXISTS dead_letter_queue_service
    ON dead_letter_queue (service, created_at DESC, id DESC);

-- each service's handlers (StoredSubscription), one row per (service, handler), a
-- removed one kept as a tombstone (removed_at, removed_by) until forgotten; a
-- few rows per service, read whole by publishers when the revision moves on
CREATE TABLE IF NOT EXISTS retrybus_subscriptions (
    service          text COLLATE "C" NOT NULL,
    handler_name     text COLLATE "C" NOT NULL,
    patterns         json NOT NULL,
    policy           text NOT NULL,
    max_retries      integer NOT NULL,
    handler_timeout  double precision,
    registered_at    timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    removed_at       timestamptz,
    removed_by       text,
    revision         bigint NOT NULL,
    details          json NOT NULL DEFAULT '{}',
    PRIMARY KEY (service, handler_name)
);
CREATE INDEX IF NOT EXISTS retrybus_subscriptions_revision
    ON retrybus_subscriptions (revision);

-- store-wide revisions, one row each: 'subscriptions', the revision of the last
-- write of a subscription (subscriptions_revision). It goes up by one in the
-- transaction of every write that changes subscriptions, whose row lock makes
-- such writes take turns, and never down (forgetting tombstones leaves it). Not
-- a sequence: a sequence moves on outside the transaction, so that a reader could
-- see a revision before the rows written with it.
CREATE TABLE IF NOT EXISTS retrybus_revisions (
    name      text COLLATE "C" PRIMARY KEY,
    revision  bigint NOT NULL DEFAULT 0
);
INSERT INTO retrybus_revisions (name) VALUES ('subscriptions') ON CONFLICT (name) DO NOTHING;

-- each worker's last heartbeat (WorkerBeat), one row per worker name, rewritten
-- every few seconds
CREATE TABLE IF NOT EXISTS retrybus_workers (
    name        text COLLATE "C" PRIMARY KEY,
    service     text COLLATE "C" NOT NULL,
    host        text NOT NULL,
    pid         bigint NOT NULL,
    started_at  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    interval    double precision NOT NULL,
    lanes       integer NOT NULL,
    lanes_busy  integer NOT NULL,
    handlers    json NOT NULL,
    version     text NOT NULL
);
CREATE INDEX IF NOT EXISTS retrybus_workers_service ON retrybus_workers (service, last_seen);

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
SELECT id, handler_name, error_type, error, service FROM dead_letter_queue
WHERE failure_group IS NULL AND id > $1
ORDER BY id
LIMIT $2;

-- name: dead_without_group_v2
-- dead_without_group in the version 2 migration, before dead letters had a service
-- (all of them the default service's)
SELECT id, handler_name, error_type, error, 'default' AS service FROM dead_letter_queue
WHERE failure_group IS NULL AND id > $1
ORDER BY id
LIMIT $2;

-- name: set_failure_groups
UPDATE dead_letter_queue AS d SET failure_group = g.failure_group
FROM unnest($1::text[], $2::text[]) AS g(id, failure_group)
WHERE d.id = g.id AND d.failure_group IS NULL;

-- name: record_failures
-- $1..$22: one array per retry_queue column; $23..$44: one per dead letter column; $45: channel
WITH ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
           r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
           r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
           r.lease_owner, r.lease_until, r.metadata::json, r.claims, r.service
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
        $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[], $21::integer[],
        $22::text[]
    ) AS r(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    ON CONFLICT (id) DO NOTHING  -- a write repeated after a lost reply adds nothing twice
    RETURNING 1
), dead AS (
    INSERT INTO dead_letter_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
        service
    )
    SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
           d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
           d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
           d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group, d.service
    FROM unnest(
        $23::text[], $24::text[], $25::text[], $26::text[], $27::text[], $28::timestamptz[],
        $29::text[], $30::text[], $31::text[], $32::text[], $33::text[], $34::text[],
        $35::integer[], $36::integer[], $37::text[], $38::boolean[], $39::timestamptz[],
        $40::timestamptz[], $41::timestamptz[], $42::text[], $43::text[], $44::text[]
    ) AS d(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
        service
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
    SELECT pg_notify($45, '') FROM added WHERE added.n > 0
)
SELECT (SELECT n FROM added), (SELECT count(*) FROM dead), (SELECT count(*) FROM notified),
       (SELECT count(*) FROM counted);

-- name: record_retries
-- record_failures without dead letters (the common case): $1..$22 retry columns, $23 channel
WITH ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
           r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
           r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
           r.lease_owner, r.lease_until, r.metadata::json, r.claims, r.service
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
        $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[], $21::integer[],
        $22::text[]
    ) AS r(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
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
    SELECT pg_notify($23, '') FROM added WHERE added.n > 0
)
SELECT (SELECT n FROM added), (SELECT count(*) FROM notified), (SELECT count(*) FROM counted);

-- name: record_pending
-- First deliveries not yet made: $1..$22 retry columns, $23 channel. Ids already
-- stored are skipped; the totals are left alone (a first delivery is not a retry).
-- Only a record added without a lease (deferred, scheduled) wakes the workers: a
-- durable publish's records are leased to it while it runs them, and a NOTIFY
-- serialises the commits of every notifying transaction of the server.
-- Returns the ids added (NULL for none) and whether it notified.
WITH ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
           r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
           r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
           r.lease_owner, r.lease_until, r.metadata::json, r.claims, r.service
    FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
        $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
        $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[], $21::integer[],
        $22::text[]
    ) AS r(
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    ON CONFLICT (id) DO NOTHING  -- the same delivery recorded again: the record is there
    RETURNING id, lease_until
), notified AS (
    SELECT pg_notify($23, '') FROM (SELECT 1 FROM ins WHERE lease_until IS NULL LIMIT 1) AS deferred
)
SELECT (SELECT array_agg(id) FROM ins) AS added, (SELECT count(*) FROM notified) AS notified;

-- name: claim_due
-- any handler's items, of any service: $1 owner, $2 lease_until, $3 now, $4 limit.
-- The ids chosen are an array (an InitPlan), so that the rows are updated by
-- primary key look-ups even in the generic plan of the prepared statement, which
-- knows no limit (with "id IN (…)" it may hash-join a scan of the whole table).
UPDATE retry_queue
SET lease_owner = $1, lease_until = $2, updated_at = $3, claims = claims + 1
WHERE id = ANY(ARRAY(
    SELECT id FROM retry_queue
    WHERE next_retry <= $3 AND (lease_until IS NULL OR lease_until <= $3) AND {in_turn}
    ORDER BY next_retry
    LIMIT $4
    FOR UPDATE SKIP LOCKED
))
RETURNING *;

-- name: claim_due_of_service
-- claim_due ($1..$4) for any handler's items of the service $5 (admin and tests: a
-- worker names its handlers, claim_due_for): the due items in time order from the
-- (next_retry, attempt) index, other services' due before them read and passed
-- over. A query of its own, so that claim_due's generic plan knows no service.
UPDATE retry_queue
SET lease_owner = $1, lease_until = $2, updated_at = $3, claims = claims + 1
WHERE id = ANY(ARRAY(
    SELECT id FROM retry_queue
    WHERE next_retry >= '-infinity' AND next_retry <= $3
      AND (lease_until IS NULL OR lease_until <= $3)
      AND service = $5 AND {in_turn}
    ORDER BY next_retry
    LIMIT $4
    FOR UPDATE SKIP LOCKED
))
RETURNING *;

-- name: claim_due_for
-- only the items of the service $6 and its handlers $5 (distinct names); $1..$4 as
-- claim_due. For each handler, its earliest claimable items come straight from
-- the (service, handler_name, next_retry) index, locked as they are read (SKIP
-- LOCKED below the LIMIT, so that items another worker is claiming do not count);
-- the earliest $4 of those are leased. Other handlers' items, and other services'
-- (a stopped service's backlog), however many are due before them, are never
-- read. A handler's rows locked but not among the earliest $4 are let go when the
-- statement ends. The row comparison is service = $6 AND handler_name = h.name AND
-- next_retry <= $3 in a form only that index serves: with the equalities, the
-- planner may walk the (next_retry, attempt) index instead, filtering out every
-- other handler's item due earlier. The ids are an array, as in claim_due.
UPDATE retry_queue
SET lease_owner = $1, lease_until = $2, updated_at = $3, claims = claims + 1
WHERE id = ANY(ARRAY(
    SELECT c.id
    FROM unnest($5::text[]) AS h(name)
    CROSS JOIN LATERAL (
        SELECT id, next_retry FROM retry_queue
        WHERE (service, handler_name, next_retry)
              BETWEEN ($6::text, h.name, '-infinity') AND ($6::text, h.name, $3)
          AND (lease_until IS NULL OR lease_until <= $3) AND {in_turn}
        ORDER BY service, handler_name, next_retry
        LIMIT $4
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.next_retry, c.id
    LIMIT $4
))
RETURNING *;

-- name: claim_due_for_any_service
-- claim_due_for ($1..$5) for the handlers $5 of every service (admin and tests: a
-- worker names its service): the services the queue holds, one look-up each in
-- the leading column of the (service, handler_name, next_retry) index (a loose
-- index scan), then each (service, handler)'s range of it as in claim_due_for
WITH RECURSIVE services (name) AS (
    SELECT min(service) FROM retry_queue
    UNION ALL
    SELECT (SELECT min(service) FROM retry_queue WHERE service > s.name)
    FROM services AS s WHERE s.name IS NOT NULL
)
UPDATE retry_queue
SET lease_owner = $1, lease_until = $2, updated_at = $3, claims = claims + 1
WHERE id = ANY(ARRAY(
    SELECT c.id
    FROM services AS s
    CROSS JOIN unnest($5::text[]) AS h(name)
    CROSS JOIN LATERAL (
        SELECT id, next_retry FROM retry_queue
        WHERE (service, handler_name, next_retry)
              BETWEEN (s.name, h.name, '-infinity') AND (s.name, h.name, $3)
          AND (lease_until IS NULL OR lease_until <= $3) AND {in_turn}
        ORDER BY service, handler_name, next_retry
        LIMIT $4
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE s.name IS NOT NULL
    ORDER BY c.next_retry, c.id
    LIMIT $4
))
RETURNING *;

-- name: extend_leases
UPDATE retry_queue SET lease_until = $1
WHERE lease_owner = $2 AND id = ANY($3::text[]);

-- name: release
-- the claim that leased them no longer counts
WITH released AS (
    UPDATE retry_queue
    SET lease_owner = NULL, lease_until = NULL, claims = greatest(claims - 1, 0)
    WHERE lease_owner = $1 AND id = ANY($2::text[])
    RETURNING 1
), notified AS (
    SELECT pg_notify($3, '') FROM (SELECT 1 FROM released LIMIT 1) AS any_released
)
SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM notified);

-- name: complete
-- $1 owner (NULL: only items no live lease holds at $2), $2 now, $3 channel;
-- $4 succeeded ids; $5..$13 rescheduled columns (the last: first delivery or not);
-- $14 dead-lettered retry ids, $15 whether each is a first delivery, and $16..$37
-- their dead letters' columns. The totals count retries only: a first delivery
-- (attempt 0) that succeeds is not counted, one rescheduled adds a retry, one
-- dead-lettered leaves retry_dead_lettered alone.
WITH succeeded AS (
    DELETE FROM retry_queue
    WHERE id = ANY($4::text[])
      AND (lease_owner = $1 OR ($1::text IS NULL AND (lease_until IS NULL OR lease_until <= $2)))
    RETURNING id, attempt
), rescheduled AS (
    UPDATE retry_queue AS q
    SET attempt = n.attempt, next_retry = n.next_retry, error = n.error,
        error_type = n.error_type, traceback = n.traceback, updated_at = n.updated_at,
        metadata = n.metadata::json, lease_owner = NULL, lease_until = NULL, claims = 0
    FROM unnest(
        $5::text[], $6::integer[], $7::timestamptz[], $8::text[], $9::text[], $10::text[],
        $11::timestamptz[], $12::text[], $13::boolean[]
    ) AS n(id, attempt, next_retry, error, error_type, traceback, updated_at, metadata, first)
    WHERE q.id = n.id
      AND (q.lease_owner = $1
           OR ($1::text IS NULL AND (q.lease_until IS NULL OR q.lease_until <= $2)))
    RETURNING q.id, n.first
), moved AS (
    DELETE FROM retry_queue AS q
    USING unnest($14::text[], $15::boolean[]) AS m(id, first)
    WHERE q.id = m.id
      AND (q.lease_owner = $1
           OR ($1::text IS NULL AND (q.lease_until IS NULL OR q.lease_until <= $2)))
    RETURNING q.id, m.first
), dead AS (
    INSERT INTO dead_letter_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
        service
    )
    SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
           d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
           d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
           d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group, d.service
    FROM unnest(
        $14::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[],
        $21::timestamptz[], $22::text[], $23::text[], $24::text[], $25::text[], $26::text[],
        $27::text[], $28::integer[], $29::integer[], $30::text[], $31::boolean[],
        $32::timestamptz[], $33::timestamptz[], $34::timestamptz[], $35::text[], $36::text[],
        $37::text[]
    ) AS d(
        retry_id, id, event_id, event_type, event_data, event_source, event_timestamp,
        event_subject, event_extensions, handler_name, error, error_type, traceback, attempt,
        max_retries, reason, processed, created_at, processed_at, first_failed_at, metadata,
        failure_group, service
    )
    WHERE d.retry_id IN (SELECT id FROM moved)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
), totals AS (
    SELECT (SELECT count(*) FROM succeeded WHERE attempt IS DISTINCT FROM 0) AS done,
           (SELECT coalesce(sum(attempt), 0) FROM succeeded) AS attempts,
           (SELECT count(*) FROM rescheduled WHERE first) AS added,
           (SELECT count(*) FROM moved WHERE NOT first) AS moved
), counted AS (
    UPDATE retrybus_counters
    SET retry_added = retry_added + totals.added,
        retry_succeeded = retry_succeeded + totals.done,
        retry_succeeded_attempts = retry_succeeded_attempts + totals.attempts,
        retry_dead_lettered = retry_dead_lettered + totals.moved
    FROM totals WHERE totals.done > 0 OR totals.added > 0 OR totals.moved > 0
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
-- When the first item (of any service) falls due: the least, over the items, of
-- next_retry, or for a leased one of greatest(next_retry, lease_until) (a lease
-- that runs out makes its record claimable again). It needs no index of leases.
-- Let first be the earliest next_retry of an item that no lease holds past it: no
-- item due at or after first can fall due before it, so only the leased items due
-- strictly before first count, the entries that finding first walked past at the
-- front of the (next_retry, attempt) index: the work in flight (with no first,
-- every leased item). "< first" is written "<= first - 1 microsecond" (times are
-- whole microseconds), which is 'infinity' when there is no first. "lease_until
-- <= next_retry" (a lease that holds nothing back) also keeps a planner without
-- statistics walking the index, rather than reading and sorting every item; the
-- lower bound '-infinity' keeps it on the index for the leased ones.
WITH first AS (
    SELECT next_retry FROM retry_queue
    WHERE (lease_until IS NULL OR lease_until <= next_retry) AND {in_turn}
    ORDER BY next_retry
    LIMIT 1
)
SELECT least(
    (SELECT next_retry FROM first),
    (SELECT min(greatest(next_retry, lease_until)) FROM retry_queue
     WHERE next_retry BETWEEN '-infinity' AND coalesce(
               (SELECT next_retry FROM first) - interval '1 microsecond', 'infinity')
       AND lease_until IS NOT NULL)
);

-- name: next_due_of_service
-- next_due among the items of the service $1 (admin and tests: a worker names its
-- handlers, next_due_for): the same walk of the (next_retry, attempt) index,
-- other services' items passed over
WITH first AS (
    SELECT next_retry FROM retry_queue
    WHERE next_retry >= '-infinity'
      AND (lease_until IS NULL OR lease_until <= next_retry)
      AND service = $1 AND {in_turn}
    ORDER BY next_retry
    LIMIT 1
)
SELECT least(
    (SELECT next_retry FROM first),
    (SELECT min(greatest(next_retry, lease_until)) FROM retry_queue
     WHERE next_retry BETWEEN '-infinity' AND coalesce(
               (SELECT next_retry FROM first) - interval '1 microsecond', 'infinity')
       AND lease_until IS NOT NULL
       AND service = $1)
);

-- name: next_due_for
-- next_due among the items of the service $2 and its handlers $1, for each
-- handler from its range of the (service, handler_name, next_retry) index (the
-- row comparisons, as in claim_due_for): its first, and its leased items due
-- before that; other handlers' and other services' items, leased or not, are
-- never read
SELECT min(least(first.next_retry, leased.due))
FROM unnest($1::text[]) AS h(name)
LEFT JOIN LATERAL (
    SELECT next_retry FROM retry_queue
    WHERE (service, handler_name, next_retry)
          BETWEEN ($2::text, h.name, '-infinity') AND ($2::text, h.name, 'infinity')
      AND (lease_until IS NULL OR lease_until <= next_retry) AND {in_turn}
    ORDER BY service, handler_name, next_retry
    LIMIT 1
) AS first ON true
CROSS JOIN LATERAL (
    SELECT min(greatest(next_retry, lease_until)) AS due FROM retry_queue
    WHERE service = $2
      AND (handler_name, next_retry) BETWEEN (h.name, '-infinity')
              AND (h.name, coalesce(first.next_retry - interval '1 microsecond', 'infinity'))
      AND lease_until IS NOT NULL
) AS leased;

-- name: next_due_for_any_service
-- next_due_for ($1) for the handlers $1 of every service (the services found as
-- in claim_due_for_any_service)
WITH RECURSIVE services (name) AS (
    SELECT min(service) FROM retry_queue
    UNION ALL
    SELECT (SELECT min(service) FROM retry_queue WHERE service > s.name)
    FROM services AS s WHERE s.name IS NOT NULL
)
SELECT min(least(first.next_retry, leased.due))
FROM services AS s
CROSS JOIN unnest($1::text[]) AS h(name)
LEFT JOIN LATERAL (
    SELECT next_retry FROM retry_queue
    WHERE (service, handler_name, next_retry)
          BETWEEN (s.name, h.name, '-infinity') AND (s.name, h.name, 'infinity')
      AND (lease_until IS NULL OR lease_until <= next_retry) AND {in_turn}
    ORDER BY service, handler_name, next_retry
    LIMIT 1
) AS first ON true
CROSS JOIN LATERAL (
    SELECT min(greatest(next_retry, lease_until)) AS due FROM retry_queue
    WHERE service = s.name
      AND (handler_name, next_retry) BETWEEN (h.name, '-infinity')
              AND (h.name, coalesce(first.next_retry - interval '1 microsecond', 'infinity'))
      AND lease_until IS NOT NULL
) AS leased
WHERE s.name IS NOT NULL;

-- name: retry_count
SELECT count(*) FROM retry_queue;

-- name: count_due
-- the lower bound, which keeps out nothing, keeps a generic plan on the (next_retry,
-- attempt) index: a range with an unknown end is estimated narrow, where "< $1"
-- alone is a third of the table (the narrower next_retry index, which schema_v5
-- dropped, was cheap enough to scan even for that)
SELECT count(*) FROM retry_queue WHERE next_retry >= '-infinity' AND next_retry < $1;

-- name: get_retry
SELECT * FROM retry_queue WHERE id = $1;

-- name: list_retry
-- $5, $6: the next_retry range of the kind asked for (inclusive; NULL: open), bounds
-- of the next_retry index scan even in a generic plan; $7: only first deliveries
-- (attempt 0: pending, scheduled), only retries, or NULL: both; $8: only records of
-- that service, or NULL: of any
SELECT * FROM retry_queue
WHERE ($1::text IS NULL OR handler_name = $1)
  AND ($2::text IS NULL OR event_type = $2)
  AND next_retry >= coalesce($5::timestamptz, '-infinity')
  AND next_retry <= coalesce($6::timestamptz, 'infinity')
  AND ($7::boolean IS NULL OR (attempt IS NOT DISTINCT FROM 0) = $7)
  AND ($8::text IS NULL OR service = $8)
ORDER BY next_retry, id
LIMIT $3 OFFSET $4;

-- name: count_retry_kinds
-- $1 now: retries, pending and scheduled deliveries, in one pass (the
-- (next_retry, attempt) index holds both columns)
SELECT count(*) FILTER (WHERE attempt IS DISTINCT FROM 0),
       count(*) FILTER (WHERE attempt = 0 AND next_retry <= $1),
       count(*) FILTER (WHERE attempt = 0 AND next_retry > $1)
FROM retry_queue;

-- name: find_retry_ids
-- starts_with, not a range or LIKE: under a linguistic collation neither follows byte order
SELECT id FROM retry_queue WHERE starts_with(id, $1) ORDER BY id COLLATE "C" LIMIT $2;

-- name: cancel_delivery
-- $1 id, $2 now: a first delivery that no live lease holds
DELETE FROM retry_queue
WHERE id = $1 AND attempt = 0 AND (lease_until IS NULL OR lease_until <= $2);

-- name: delete_retry
DELETE FROM retry_queue WHERE id = $1;

-- name: take_expired
-- a retry expires by age; a first delivery (attempt 0: deferred or scheduled) only
-- once it has been due since before $1, never before its time
DELETE FROM retry_queue
WHERE id IN (
    SELECT id FROM retry_queue
    WHERE created_at < $1
      AND (attempt <> 0 OR next_retry < $1)
      AND (lease_until IS NULL OR lease_until <= $2)
    LIMIT 500
    FOR UPDATE SKIP LOCKED
)
RETURNING *;

-- name: insert_dead
INSERT INTO dead_letter_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
    service
)
SELECT d.id, d.event_id, d.event_type, d.event_data::json, d.event_source, d.event_timestamp,
       d.event_subject, d.event_extensions::jsonb, d.handler_name, d.error, d.error_type,
       d.traceback, d.attempt, d.max_retries, d.reason, d.processed, d.created_at,
       d.processed_at, d.first_failed_at, d.metadata::json, d.failure_group, d.service
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
    $13::integer[], $14::integer[], $15::text[], $16::boolean[], $17::timestamptz[],
    $18::timestamptz[], $19::timestamptz[], $20::text[], $21::text[], $22::text[]
) AS d(
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata, failure_group,
    service
)
ON CONFLICT (id) DO NOTHING;

-- name: add_dead_lettered
UPDATE retrybus_counters SET retry_dead_lettered = retry_dead_lettered + $1;

-- name: list_dead
-- $1..$11: the DeadLetterFilter (event_type, handler_name, reason, processed,
-- created_after, created_before, event_id, failure_group, the cursor as its
-- created_at and id, and service; NULL matches anything), as in count_dead and
-- group_dead; $12 limit, $13 offset
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
  AND ($11::text IS NULL OR service = $11)
ORDER BY created_at DESC, id DESC
LIMIT $12 OFFSET $13;

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
  AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::text))
  AND ($11::text IS NULL OR service = $11);

-- name: group_dead
-- $12 the field, $13 limit. One hash aggregate counts the groups; then, for each group
-- kept, the newest item is looked up by its created_at (last_at) in the created_at index.
-- Keys compare as code points (COLLATE "C"), whatever the database's collation.
WITH matching AS NOT MATERIALIZED (
    SELECT CASE $12::text
               WHEN 'failure_group' THEN coalesce(failure_group, '')
               WHEN 'handler_name' THEN handler_name
               WHEN 'event_type' THEN event_type
               WHEN 'reason' THEN reason
               WHEN 'service' THEN service
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
      AND ($11::text IS NULL OR service = $11)
), groups AS (
    SELECT key, count(*) AS n, min(created_at) AS first_at, max(created_at) AS last_at
    FROM matching
    GROUP BY key
    ORDER BY n DESC, key COLLATE "C"
    LIMIT $13
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
-- $1 the dead letter's id, $2..$23 the new retry item's columns, $24 channel
WITH removed AS (
    DELETE FROM dead_letter_queue WHERE id = $1 RETURNING id
), ins AS (
    INSERT INTO retry_queue (
        id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
        event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
        next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
    )
    SELECT $2::text, $3::text, $4::text, $5::json, $6::text, $7::timestamptz, $8::text,
           $9::jsonb, $10::text, $11::text, $12::text, $13::text, $14::integer, $15::integer,
           $16::timestamptz, $17::timestamptz, $18::timestamptz, $19::text, $20::timestamptz,
           $21::json, $22::integer, $23::text
    FROM removed
    RETURNING 1
), counted AS (
    UPDATE retrybus_counters SET retry_added = retry_added + 1
    WHERE EXISTS (SELECT 1 FROM ins)
    RETURNING 1
), notified AS (
    SELECT pg_notify($24, '') FROM ins
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM counted), (SELECT count(*) FROM notified);

-- name: delete_dead
DELETE FROM dead_letter_queue WHERE id = $1;

-- name: delete_dead_many
DELETE FROM dead_letter_queue WHERE id = ANY($1::text[]);

-- name: cleanup_dead
DELETE FROM dead_letter_queue WHERE created_at < $1;

-- name: remember_successes
-- the ids are distinct (the caller sees to it): one row is updated once
INSERT INTO inbox_successes (id, until)
SELECT id, $2 FROM unnest($1::text[]) AS given (id)
ON CONFLICT (id) DO UPDATE SET until = greatest(inbox_successes.until, excluded.until);

-- name: remembered
SELECT id FROM inbox_successes WHERE id = ANY($1::text[]) AND until > $2;

-- name: forget_successes
DELETE FROM inbox_successes WHERE until <= $1;

-- name: group_retry
-- $1 the field, $2 limit; as group_dead, by next_retry, the sample being the item due first
WITH items AS NOT MATERIALIZED (
    -- a damaged row may lack the field
    SELECT coalesce(CASE $1::text
                        WHEN 'handler_name' THEN handler_name
                        WHEN 'event_type' THEN event_type
                        WHEN 'service' THEN service
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

-- name: newest_failures
-- $1 service (NULL: every one), $2 limit: per (service, handler), the retry
-- (attempt != 0) with the greatest (updated_at, id); newest first. No index holds
-- updated_at (every claim writes it, and an index on it would keep claims from
-- being HOT updates): one pass over the retry queue and a sort of its retries' keys.
SELECT q.* FROM retry_queue AS q
WHERE q.id = ANY(ARRAY(
    SELECT DISTINCT ON (service, handler_name) id
    FROM retry_queue
    WHERE attempt != 0 AND ($1::text IS NULL OR service = $1::text)
    ORDER BY service, handler_name, updated_at DESC, id COLLATE "C" DESC
))
ORDER BY q.updated_at DESC, q.service COLLATE "C", q.handler_name COLLATE "C"
LIMIT $2;

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

-- name: lock_subscriptions
-- a write of subscriptions takes the revision's row lock first, held until it
-- commits: one such write at a time, each reading what the one before wrote
SELECT revision FROM retrybus_revisions WHERE name = 'subscriptions' FOR UPDATE;

-- name: subscriptions_of_service
SELECT * FROM retrybus_subscriptions WHERE service = $1;

-- name: write_subscriptions
-- $1 service, $2 now, $3 actor; the subscriptions written whole (new, back after a
-- removal: tombstone cleared, or with new terms), one array per column: $4
-- handler_name, $5 patterns, $6 policy, $7 max_retries, $8 handler_timeout, $9
-- registered_at, $10 details; $11 the live handlers to tombstone. All with one new
-- revision. Returns it, and how many rows were put and tombstoned.
WITH bumped AS (
    UPDATE retrybus_revisions SET revision = revision + 1 WHERE name = 'subscriptions'
    RETURNING revision AS value
), put AS (
    INSERT INTO retrybus_subscriptions (
        service, handler_name, patterns, policy, max_retries, handler_timeout, registered_at,
        updated_at, removed_at, removed_by, revision, details
    )
    SELECT $1::text, p.handler_name, p.patterns::json, p.policy, p.max_retries,
           p.handler_timeout, p.registered_at, $2::timestamptz, NULL, NULL, bumped.value,
           p.details::json
    FROM bumped, unnest(
        $4::text[], $5::text[], $6::text[], $7::integer[], $8::double precision[],
        $9::timestamptz[], $10::text[]
    ) AS p(handler_name, patterns, policy, max_retries, handler_timeout, registered_at, details)
    ON CONFLICT (service, handler_name) DO UPDATE SET
        patterns = excluded.patterns, policy = excluded.policy,
        max_retries = excluded.max_retries, handler_timeout = excluded.handler_timeout,
        registered_at = excluded.registered_at, updated_at = excluded.updated_at,
        removed_at = NULL, removed_by = NULL, revision = excluded.revision,
        details = excluded.details
    RETURNING 1
), tombstoned AS (
    UPDATE retrybus_subscriptions AS s
    SET removed_at = $2, removed_by = $3, updated_at = $2, revision = bumped.value
    FROM bumped
    WHERE s.service = $1 AND s.handler_name = ANY($11::text[]) AND s.removed_at IS NULL
    RETURNING 1
)
SELECT value, (SELECT count(*) FROM put), (SELECT count(*) FROM tombstoned) FROM bumped;

-- name: list_subscriptions
-- $1 the service (NULL: every one), $2 tombstones too; in the primary key's order
SELECT * FROM retrybus_subscriptions
WHERE ($1::text IS NULL OR service = $1) AND ($2::boolean OR removed_at IS NULL)
ORDER BY service, handler_name;

-- name: subscriptions_revision
SELECT revision FROM retrybus_revisions WHERE name = 'subscriptions';

-- name: forget_subscriptions
DELETE FROM retrybus_subscriptions WHERE removed_at < $1;

-- name: any_tombstone
SELECT EXISTS (SELECT 1 FROM retrybus_subscriptions WHERE removed_at IS NOT NULL);

-- name: lock_tombstones
-- the tombstones, locked (FOR SHARE) until the transaction ends: a handler put back
-- meanwhile waits for the sweep (or, put back first, is no longer a tombstone here)
SELECT service, handler_name, removed_by FROM retrybus_subscriptions
WHERE removed_at IS NOT NULL
FOR SHARE;

-- name: take_unsubscribed
-- $1 now, $2 limit, $3 and $4 the tombstoned (service, handler)s (lock_tombstones):
-- their first $2 records (due first, then by id) that no live lease holds, deleted.
-- Each one's records are a range of the (service, handler_name, next_retry) index,
-- locked as read, skipping those a claim holds; the ids are an array, so that the
-- rows are deleted by primary key look-ups (as claim_due's are updated).
DELETE FROM retry_queue
WHERE id = ANY(ARRAY(
    SELECT c.id
    FROM unnest($3::text[], $4::text[]) AS t(service, handler_name)
    CROSS JOIN LATERAL (
        SELECT id, next_retry FROM retry_queue
        WHERE (service, handler_name, next_retry)
              BETWEEN (t.service, t.handler_name, '-infinity')
                  AND (t.service, t.handler_name, 'infinity')
          AND (lease_until IS NULL OR lease_until <= $1)
        ORDER BY service, handler_name, next_retry, id
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.next_retry, c.id
    LIMIT $2
))
RETURNING *;

-- name: beat
INSERT INTO retrybus_workers (
    name, service, host, pid, started_at, last_seen, interval, lanes, lanes_busy, handlers,
    version
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::json, $11)
ON CONFLICT (name) DO UPDATE SET
    service = excluded.service, host = excluded.host, pid = excluded.pid,
    started_at = excluded.started_at, last_seen = excluded.last_seen,
    interval = excluded.interval, lanes = excluded.lanes, lanes_busy = excluded.lanes_busy,
    handlers = excluded.handlers, version = excluded.version;

-- name: forget_worker
DELETE FROM retrybus_workers WHERE name = $1;

-- name: list_workers
SELECT * FROM retrybus_workers
WHERE ($1::text IS NULL OR service = $1)
ORDER BY service, name;

-- name: prune_workers
DELETE FROM retrybus_workers WHERE last_seen < $1;

-- name: service_loads
-- what waits per (service, handler) at $1: the retry queue counted per kind (as
-- count_retry_kinds) and its live leases, and the dead letters processed and not,
-- each table grouped before the two are put together; by service then handler
-- name as code points
SELECT service, handler_name, sum(pending) AS pending, sum(scheduled) AS scheduled,
       sum(retrying) AS retrying, sum(leased) AS leased,
       sum(dead_unprocessed) AS dead_unprocessed, sum(dead_processed) AS dead_processed,
       min(oldest_pending_due) AS oldest_pending_due
FROM (
    SELECT service, coalesce(handler_name, 'unknown') AS handler_name,
           count(*) FILTER (WHERE attempt = 0 AND next_retry <= $1) AS pending,
           count(*) FILTER (WHERE attempt = 0 AND next_retry > $1) AS scheduled,
           count(*) FILTER (WHERE attempt IS DISTINCT FROM 0) AS retrying,
           count(*) FILTER (WHERE lease_until > $1) AS leased,
           0 AS dead_unprocessed,
           0 AS dead_processed,
           min(next_retry) FILTER (WHERE attempt = 0 AND next_retry <= $1) AS oldest_pending_due
    FROM retry_queue
    GROUP BY 1, 2
    UNION ALL
    SELECT service, handler_name, 0, 0, 0, 0,
           count(*) FILTER (WHERE NOT processed), count(*) FILTER (WHERE processed), NULL
    FROM dead_letter_queue
    GROUP BY service, handler_name
) AS loads
GROUP BY service, handler_name
ORDER BY service COLLATE "C", handler_name COLLATE "C";

-- name: database_identity
-- What names this database on this server while it runs: the outbox compares the
-- store's answer with an application connection's (same_database).
SELECT current_database(), inet_server_port(), pg_postmaster_start_time();

-- name: stage_pending
-- record_pending on an application's connection, in its open transaction: every
-- name qualified with the store's schema ({schema}), no NOTIFY (a NOTIFY makes
-- every notifying transaction of the server commit in turn; the store notifies
-- after the caller's commit instead). $1..$22 the retry columns.
INSERT INTO {schema}.retry_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
)
SELECT r.id, r.event_id, r.event_type, r.event_data::json, r.event_source, r.event_timestamp,
       r.event_subject, r.event_extensions::jsonb, r.handler_name, r.error, r.error_type,
       r.traceback, r.attempt, r.max_retries, r.next_retry, r.created_at, r.updated_at,
       r.lease_owner, r.lease_until, r.metadata::json, r.claims, r.service
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
    $13::integer[], $14::integer[], $15::timestamptz[], $16::timestamptz[],
    $17::timestamptz[], $18::text[], $19::timestamptz[], $20::text[], $21::integer[],
    $22::text[]
) AS r(
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    next_retry, created_at, updated_at, lease_owner, lease_until, metadata, claims, service
)
ON CONFLICT (id) DO NOTHING;

-- name: notify
SELECT pg_notify($1, '');
