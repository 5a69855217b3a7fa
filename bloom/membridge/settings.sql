-- Runtime settings: the Membridge config, the connection test, the shared upstream status (bloom/membridge/settings.py).
-- Conventions: bloom/sql.py.

-- name: get_settings
SELECT key, value, updated_at FROM runtime_settings WHERE key = ANY(CAST(:keys AS text[]));

-- name: save_membridge_config
WITH saved AS (
    INSERT INTO runtime_settings (key, value, updated_at)
    VALUES ('membridge_server_url', :server_url, :now), ('admin_key', :admin_key, :now)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    RETURNING key
), audit AS (
    -- The key itself is never written to the audit log.
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    VALUES (:audit_id, :now, 'config_updated', 'config', 'membridge', :actor,
            jsonb_build_object('membridge_server_url', :server_url, 'admin_key_changed', true))
)
SELECT count(*) AS saved FROM saved;

-- name: save_connection_test
WITH saved AS (
    INSERT INTO runtime_settings (key, value, updated_at)
    VALUES ('connected', :connected_text, :now), ('last_test', CAST(:now AS text), :now)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    RETURNING key
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'connection_test', 'config', 'membridge', :actor,
           jsonb_build_object('membridge_server_url', :server_url, 'connected', true)
     WHERE :connected
)
SELECT count(*) AS saved FROM saved;

-- name: put_setting
INSERT INTO runtime_settings (key, value, updated_at)
VALUES (:key, :value, :now)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at;
