-- Connections and transactions (bloom/db.py).
-- Conventions: bloom/sql.py.

-- name: apply_schema_lock
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:schema'));

-- name: settings_table_exists
SELECT to_regclass('runtime_settings') IS NOT NULL AS present;

-- name: missing_tables
-- Which of the tables schema.sql creates are not there (a restore that left some out).
SELECT name FROM unnest(CAST(:tables AS text[])) AS name WHERE to_regclass(name) IS NULL;

-- name: get_settings_value
SELECT value FROM runtime_settings WHERE key = :key;

-- name: ping
SELECT 1;

-- name: begin
BEGIN;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;
