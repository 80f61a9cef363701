-- What a semantic cache lookup's embeddings call cost (`src/cache/semantic.rs`), on hits
-- and misses alike. At the end, in `TraceRow` order; a rerun's "column already exists"
-- counts as applied (see 0002).
ALTER TABLE {database}.{table} ADD COLUMN cache_embedding_usd Float64 DEFAULT 0
