-- The answer the client got, kept for `with_responses` experiments beside the request body
-- (`src/trace/replay.rs`): compressed and cut alike, emptied with it. At the end, in
-- `TraceRow` order; a rerun's "column already exists" counts as applied (see 0002).
ALTER TABLE {database}.{table} ADD COLUMN replay_answer String DEFAULT ''
