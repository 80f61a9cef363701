-- Which migrations have run, per trace table (several gateways may share a database with
-- different `table` settings). Plain MergeTree: a row is written once per applied file;
-- two gateways migrating at the same moment may both record a version, which is harmless
-- (readers take DISTINCT versions). Works on ClickHouse 18.16 through current.
CREATE TABLE IF NOT EXISTS {database}.schema_migrations
(
    table_name String,
    version UInt32,
    name String,
    applied_at DateTime
)
ENGINE = MergeTree()
ORDER BY (table_name, version)
