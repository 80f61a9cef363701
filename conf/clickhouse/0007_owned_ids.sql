-- The provider-side ids a request's answer created (a Responses API response, a file, a
-- batch): later calls naming one are sent to the provider that holds it.
-- At the end, in `TraceRow` order; a rerun's "column already exists" counts as applied.
ALTER TABLE {database}.{table} ADD COLUMN owned_ids Array(String) DEFAULT emptyArrayString()
