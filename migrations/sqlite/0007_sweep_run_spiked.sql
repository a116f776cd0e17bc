-- Whether a sweep run's training loss spiked mid-run (it gave back more than half of what it
-- had gained; engine/sweep.rs, SpikeWatch): one of the signs that mark the stability edge.
-- NULL on runs stored before it was recorded.
ALTER TABLE sweep_run ADD COLUMN spiked INTEGER;
