-- The fingerprint of a caller's own provider key (BYOK, `X-Modelux-Provider-Key`), e.g.
-- `sk-proj-...TA0A`; empty when the stored credentials were used. Never the key itself.
-- At the end, in `TraceRow` order; a rerun's "column already exists" counts as applied.
ALTER TABLE {database}.{table} ADD COLUMN provider_key String DEFAULT ''
