-- Leadership rows (bloom/leadership.py). Conventions: bloom/sql.py.

-- name: take_leadership
-- Take a leadership that is free or expired, or renew the one this holder holds at the
-- epoch it believes it holds (:held_epoch; null when it holds none). A holder whose row
-- expired and was taken by another finds another holder or epoch and gets nothing.
-- Each change of holder adds one to the epoch.
INSERT INTO leaderships (name, holder, epoch, expires_at)
VALUES (:name, :holder, 1, :now + :ttl_ms)
ON CONFLICT (name) DO UPDATE
   SET holder = EXCLUDED.holder,
       epoch = CASE WHEN leaderships.holder = EXCLUDED.holder AND leaderships.epoch = :held_epoch
                    THEN leaderships.epoch ELSE leaderships.epoch + 1 END,
       expires_at = EXCLUDED.expires_at
 WHERE (leaderships.holder = EXCLUDED.holder AND leaderships.epoch = :held_epoch)
    OR leaderships.expires_at < :now
RETURNING epoch;

-- name: release_leadership
UPDATE leaderships SET expires_at = 0 WHERE name = :name AND holder = :holder AND epoch = :epoch;
