-- All SQL of the SQLite store, one named query per block.
-- Times are ISO 8601 text in UTC with microseconds ('2025-01-07T10:00:00.000000+00:00'),
-- so they sort as text and any tool can read them. JSON columns hold JSON text.

-- name: schema
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
    metadata         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS retry_queue_next_retry ON retry_queue (next_retry);
CREATE INDEX IF NOT EXISTS retry_queue_handler_name ON retry_queue (handler_name);
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
    metadata         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS dead_letter_queue_created_at ON dead_letter_queue (created_at DESC);
CREATE INDEX IF NOT EXISTS dead_letter_queue_processed ON dead_letter_queue (processed);
CREATE INDEX IF NOT EXISTS dead_letter_queue_event_type ON dead_letter_queue (event_type);
CREATE INDEX IF NOT EXISTS dead_letter_queue_handler_name ON dead_letter_queue (handler_name);

CREATE TABLE IF NOT EXISTS retrybus_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO retrybus_counters (name, value) VALUES
    ('retry_added', 0), ('retry_succeeded', 0), ('retry_succeeded_attempts', 0), ('retry_dead_lettered', 0);

-- name: insert_retry
INSERT INTO retry_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    next_retry, created_at, updated_at, lease_owner, lease_until, metadata
) VALUES (
    :id, :event_id, :event_type, :event_data, :event_source, :event_timestamp, :event_subject,
    :event_extensions, :handler_name, :error, :error_type, :traceback, :attempt, :max_retries,
    :next_retry, :created_at, :updated_at, :lease_owner, :lease_until, :metadata
);

-- name: insert_dead
INSERT OR IGNORE INTO dead_letter_queue (
    id, event_id, event_type, event_data, event_source, event_timestamp, event_subject,
    event_extensions, handler_name, error, error_type, traceback, attempt, max_retries,
    reason, processed, created_at, processed_at, first_failed_at, metadata
) VALUES (
    :id, :event_id, :event_type, :event_data, :event_source, :event_timestamp, :event_subject,
    :event_extensions, :handler_name, :error, :error_type, :traceback, :attempt, :max_retries,
    :reason, :processed, :created_at, :processed_at, :first_failed_at, :metadata
);

-- name: claim_due
UPDATE retry_queue
SET lease_owner = :owner, lease_until = :lease_until, updated_at = :now
WHERE rowid IN (
    SELECT rowid FROM retry_queue
    WHERE next_retry <= :now AND (lease_until IS NULL OR lease_until <= :now)
    ORDER BY next_retry
    LIMIT :limit
)
RETURNING *;

-- name: extend_leases
UPDATE retry_queue SET lease_until = ? WHERE lease_owner = ? AND id IN ({ids});

-- name: release
UPDATE retry_queue SET lease_owner = NULL, lease_until = NULL
WHERE lease_owner = ? AND id IN ({ids});

-- name: delete_succeeded
DELETE FROM retry_queue
WHERE (lease_owner = ?1 OR (?1 IS NULL AND (lease_until IS NULL OR lease_until <= ?2)))
  AND id IN ({ids})
RETURNING id, attempt;

-- name: reschedule
UPDATE retry_queue
SET attempt = :attempt, next_retry = :next_retry, error = :error, error_type = :error_type,
    traceback = :traceback, updated_at = :updated_at, metadata = :metadata,
    lease_owner = NULL, lease_until = NULL
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
SELECT next_retry FROM retry_queue WHERE lease_until IS NULL ORDER BY next_retry LIMIT 1;

-- name: next_lease_end
SELECT MIN(MAX(next_retry, lease_until)) FROM retry_queue WHERE lease_until IS NOT NULL;

-- name: retry_count
SELECT COUNT(*) FROM retry_queue;

-- name: count_due
SELECT COUNT(*) FROM retry_queue WHERE next_retry < ?;

-- name: get_retry
SELECT * FROM retry_queue WHERE id = ?;

-- name: list_retry
SELECT * FROM retry_queue
WHERE (:handler_name IS NULL OR handler_name = :handler_name)
  AND (:event_type IS NULL OR event_type = :event_type)
ORDER BY next_retry, id
LIMIT :limit OFFSET :offset;

-- name: delete_retry
DELETE FROM retry_queue WHERE id = ?;

-- name: take_expired
DELETE FROM retry_queue
WHERE id IN (
    SELECT id FROM retry_queue
    WHERE created_at < :before AND (lease_until IS NULL OR lease_until <= :now)
    LIMIT 500
)
RETURNING *;

-- name: list_dead
SELECT * FROM dead_letter_queue
WHERE (:event_type IS NULL OR event_type = :event_type)
  AND (:handler_name IS NULL OR handler_name = :handler_name)
  AND (:processed IS NULL OR processed = :processed)
ORDER BY created_at DESC, id DESC
LIMIT :limit OFFSET :offset;

-- name: get_dead
SELECT * FROM dead_letter_queue WHERE id = ?;

-- name: update_dead
UPDATE dead_letter_queue
SET error = :error, error_type = :error_type, traceback = :traceback, attempt = :attempt,
    processed = :processed, processed_at = :processed_at, metadata = :metadata,
    event_data = :event_data, reason = :reason
WHERE id = :id;

-- name: delete_dead
DELETE FROM dead_letter_queue WHERE id = ?;

-- name: count_dead
SELECT COUNT(*) FROM dead_letter_queue WHERE (:processed IS NULL OR processed = :processed);

-- name: cleanup_dead
DELETE FROM dead_letter_queue WHERE created_at < ?;
