-- The horizon of each sweep run (its OneCycle's length in steps): a sweep may screen
-- candidates at a short horizon and judge the best at the planned run's. NULL on runs
-- stored before.
ALTER TABLE sweep_run ADD COLUMN steps INTEGER;
