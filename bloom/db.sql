-- Connections and transactions (bloom/db.py).
-- Conventions: bloom/sql.py.

-- name: apply_schema_lock
SELECT pg_advisory_xact_lock(hashtext('bloom-runtime:schema'));

-- name: ping
SELECT 1;

-- name: begin
BEGIN;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;
