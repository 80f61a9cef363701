-- Response cache hits (`src/cache`): answered without a provider call, and what the answer
-- cost when it was bought. At the end, in `TraceRow` order; a rerun's "column already
-- exists" counts as applied (see 0002).
ALTER TABLE {database}.{table} ADD COLUMN cache_hit UInt8 DEFAULT 0;
ALTER TABLE {database}.{table} ADD COLUMN cache_saved_usd Float64 DEFAULT 0
