"""Bytes per delivery on SQLite before and after the retention purge (docs/PERFORMANCE.md,
"Retention"): the real migrations, 10,000 small generic deliveries, the purge statement of
`Store::purge_deliveries_before` in batches of 500, no VACUUM until the last line."""
# Bytes per delivery on SQLite before and after the retention purge (no VACUUM).
import sqlite3, glob, os, time, json, random, string
import sys, tempfile
HERE = os.path.dirname(os.path.abspath(__file__))
db = os.path.join(tempfile.mkdtemp(), "m.db")
for f in (db, db + "-wal", db + "-shm"):
    if os.path.exists(f): os.remove(f)
c = sqlite3.connect(db, isolation_level=None)
c.execute("PRAGMA journal_mode=WAL")
for f in sorted(glob.glob(os.path.join(HERE, "..", "migrations", "sqlite", "*.sql"))):
    c.executescript(open(f).read())
def uid(p):  # ulid-like, lower-case, 26 chars
    return p + "_" + "".join(random.choice("0123456789abcdefghjkmnpqrstvwxyz") for _ in range(26))
N = 10_000
now = int(time.time() * 1e6)
c.execute("BEGIN")
for i in range(N):
    msg = f"msg_{uid('m')[2:]}"
    body = json.dumps({"verbatim": "Exporting to CSV times out", "source_ref": f"ticket-{i}",
                       "source_name": "Jane", "customer_email": "jane@acme.test",
                       "metadata": {"plan": "pro"}}).encode()
    headers = json.dumps({"content-type": "application/json", "user-agent": "acme-sender/1.0",
                          "webhook-id": msg, "webhook-timestamp": str(now // 1_000_000)},
                         sort_keys=True)
    t = now - 3_600_000_000 + i
    c.execute("INSERT INTO deliveries (id, workspace_id, webhook_key_id, source, dedupe_scope, "
              "dedupe_key, body, headers, status, attempts, next_attempt_at, signal_id, "
              "received_at, processed_at) VALUES (?,?,?,?,?,?,?,?,'processed',1,?,?,?,?)",
              (uid("dlv"), uid("ws"), uid("whk"), "webhook", uid("whk"), msg, body, headers, t,
               uid("sig"), t, t + 1000))
c.execute("COMMIT")
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
def used():
    ps = c.execute("PRAGMA page_size").fetchone()[0]
    pc = c.execute("PRAGMA page_count").fetchone()[0]
    fl = c.execute("PRAGMA freelist_count").fetchone()[0]
    try:
        global payload
        payload = c.execute("SELECT SUM(payload), SUM(unused) FROM dbstat WHERE name = 'deliveries'").fetchone()
        d = c.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'deliveries' OR name IN "
                      "(SELECT name FROM sqlite_master WHERE tbl_name = 'deliveries')").fetchone()[0]
    except sqlite3.OperationalError:
        d = None
    return ps, pc, fl, d
before = used(); pb = payload
print("plan:", c.execute("EXPLAIN QUERY PLAN SELECT id FROM deliveries WHERE purged_at IS NULL "
      "AND status <> 'pending' AND received_at < ? ORDER BY received_at LIMIT 500", (now,)).fetchall())
batches = 0
t0 = time.time()
while True:
    n = c.execute("UPDATE deliveries SET body = ?, headers = '{}', purged_at = ? WHERE id IN "
                  "(SELECT id FROM deliveries WHERE purged_at IS NULL AND status <> 'pending' "
                  "AND received_at < ? ORDER BY received_at LIMIT 500) "
                  "AND purged_at IS NULL AND status <> 'pending'", (b"", now, now)).rowcount
    batches += 1
    if n < 500: break
dt = time.time() - t0
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
after = used(); pa = payload
print("deliveries table only: payload/unused bytes before", pb, "after", pa,
      f"-> payload per row {pb[0]/N:.0f} -> {pa[0]/N:.0f} B")
c.execute("VACUUM")
ps, pc, fl, d = used()
print(f"after VACUUM (not done by signalbox): file={pc*ps} B -> {pc*ps/N:.0f} B/delivery")
for name, (ps, pc, fl, d) in (("before", before), ("after", after)):
    print(f"{name}: page_size={ps} page_count={pc} freelist={fl} file={pc*ps} B "
          f"used={(pc-fl)*ps} B -> {(pc-fl)*ps/N:.0f} B/delivery (file {pc*ps/N:.0f}); "
          f"deliveries table+indexes (dbstat) {d} B -> {d/N if d else 0:.0f} B/delivery")
print(f"purge: {batches} statements, {dt*1000:.0f} ms total, {dt*1000/batches:.1f} ms each")
