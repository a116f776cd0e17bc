-- A running job's lease: the worker that claimed it extends it with every heartbeat; once it
-- has passed, any process (API replica or worker) may queue the job again, counting the
-- attempt, or fail it when its attempts are spent. Jobs left running by a version without
-- leases get the 60 s those versions waited for a heartbeat.
ALTER TABLE job ADD COLUMN lease_until TEXT;

UPDATE job SET lease_until = strftime('%Y-%m-%dT%H:%M:%fZ', heartbeat_at, '+60 seconds')
WHERE status = 'running' AND heartbeat_at IS NOT NULL;

CREATE INDEX job_by_lease ON job (status, lease_until);
