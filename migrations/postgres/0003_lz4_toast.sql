-- Compress large values (Pylon ticket bodies, their text, metadata) with lz4 instead of the
-- default pglz: pglz_compress was a fifth of PostgreSQL's CPU time under Pylon load, lz4 does
-- the same work several times faster. It changes only how values written from now on are
-- compressed; existing values stay readable as they are.
-- lz4 needs PostgreSQL 14 or later built with lz4 (the Debian and official builds are); elsewhere
-- the statements fail, which is caught here: the columns keep pglz and nothing else changes.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE deliveries ALTER COLUMN body SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE deliveries ALTER COLUMN headers SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE signals ALTER COLUMN verbatim SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE signals ALTER COLUMN source_metadata SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE activity_logs ALTER COLUMN metadata SET COMPRESSION lz4';
EXCEPTION
    WHEN feature_not_supported OR syntax_error THEN
        RAISE NOTICE 'lz4 compression is not available (%); large values keep pglz', SQLERRM;
END
$$;
