-- Managed projects: git repositories the fleet keeps cloned (bloom/projects/service.py).
-- Conventions: bloom/sql.py.

-- name: list_projects
SELECT * FROM managed_projects ORDER BY created_at DESC, id DESC LIMIT :limit OFFSET :offset;

-- name: get_project
SELECT * FROM managed_projects WHERE id = :project_id;

-- name: project_node_statuses
SELECT * FROM project_node_status WHERE project_id = :project_id ORDER BY node_id;

-- name: create_project
-- A second project of the same name inserts nothing (the caller answers 409).
WITH created AS (
    INSERT INTO managed_projects (id, name, repo_url, canonical_id, target_path, clone_status, primary_node_id,
                                  created_at, updated_at, error_message)
    VALUES (:project_id, :name, :repo_url, :canonical_id, :target_path, 'pending', :primary_node_id, :now, :now, NULL)
    ON CONFLICT (name) DO NOTHING
    RETURNING *
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'project_created', 'project', id, :actor,
           jsonb_build_object('name', name, 'repo_url', repo_url) FROM created
)
SELECT * FROM created;

-- name: delete_project
WITH nodes_gone AS (
    DELETE FROM project_node_status WHERE project_id = :project_id
), removed AS (
    DELETE FROM managed_projects WHERE id = :project_id RETURNING id, name
), audit AS (
    INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
    SELECT :audit_id, :now, 'project_deleted', 'project', id, :actor, jsonb_build_object('name', name) FROM removed
)
SELECT id FROM removed;

-- name: set_clone_status
-- The project's status and one node's, together; the node's row is made on first use.
WITH project AS (
    UPDATE managed_projects
       SET clone_status = :status, error_message = :error_message, updated_at = :now
     WHERE id = :project_id
    RETURNING id
), node AS (
    INSERT INTO project_node_status (id, project_id, node_id, clone_status, last_sync_at, error_message, repo_path)
    SELECT :row_id, id, :node_id, :status, :synced_at, :error_message, :repo_path FROM project
    ON CONFLICT (project_id, node_id) DO UPDATE
       SET clone_status = EXCLUDED.clone_status,
           last_sync_at = COALESCE(EXCLUDED.last_sync_at, project_node_status.last_sync_at),
           error_message = EXCLUDED.error_message,
           repo_path = COALESCE(EXCLUDED.repo_path, project_node_status.repo_path)
    RETURNING *
)
SELECT * FROM node;

-- name: set_project_status
UPDATE managed_projects SET clone_status = :status, error_message = :error_message, updated_at = :now
 WHERE id = :project_id
RETURNING *;

-- name: propagation_targets
-- Approved workers with a url that do not hold the project yet (not cloned, not synced):
-- one name per agent address (30 names of one agent are one clone, not 30 calls with the
-- agent key).
SELECT DISTINCT ON (w.address) w.id, w.url FROM workers w
 WHERE w.url IS NOT NULL AND w.approved
   AND NOT EXISTS (SELECT 1 FROM project_node_status s
                    WHERE s.project_id = :project_id AND s.node_id = w.id AND s.clone_status IN ('cloned', 'synced'))
 ORDER BY w.address, w.id;
