-- What replay reads (`src/trace/replay.rs`): the request's `max_tokens` (a routing input)
-- and, for `traces.replay_hours`, its zstd-compressed body, cut at
-- `traces.replay_max_body_bytes` and then marked. Columns go at the end, in `TraceRow`
-- order. 18.16 has no `ADD COLUMN IF NOT EXISTS`: a rerun (a crash before the migration
-- was recorded) meets "column already exists", which `prepare` takes as done.
ALTER TABLE {database}.{table} ADD COLUMN max_tokens UInt64 DEFAULT 0;
ALTER TABLE {database}.{table} ADD COLUMN replay_body String DEFAULT '';
ALTER TABLE {database}.{table} ADD COLUMN replay_body_truncated UInt8 DEFAULT 0
