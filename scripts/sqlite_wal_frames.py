#!/usr/bin/env python3
"""Sizes schema changes for the SQLite writer by counting the WAL frames its commits write.

The writer's commit in a Slack run holds one inbox batch (new deliveries) and the worker's
finish of the previous batch (a signal, an activity entry, and the delivery row updated to
`processed`). This replays that pattern on the real schema (migrations/sqlite/0001_init.sql)
with rows of the benchmark's sizes, and prints WAL frames per commit and per delivery, and the
CPU time per delivery of this (Python) process, for schema variants:

  current         the schema as it is
  nostatus        without the deliveries_status index
  split           the body and headers in their own table (keyed by rowid), so that the
                  finish rewrites a ~300-byte row instead of a ~1.9 KB one
  split_nostatus  both

Usage: python3 scripts/sqlite_wal_frames.py [--batch N] [--page-size B] [--commits N] [VARIANT...]
Figures and what they led to: docs/PERFORMANCE.md, "Other tools".
"""

import argparse
import os
import sqlite3
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = open(os.path.join(ROOT, "migrations", "sqlite", "0001_init.sql")).read()
STATUS_INDEX = "CREATE INDEX deliveries_status ON deliveries (status, id);"


def run(variant, commits, batch, page, directory):
    path = os.path.join(directory, f"{variant}-{batch}-{page}.db")
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA page_size = {page}")
    c.execute("PRAGMA journal_mode = wal")
    c.execute("PRAGMA wal_autocheckpoint = 0")
    c.execute("PRAGMA synchronous = full")
    schema = SCHEMA if "nostatus" not in variant else SCHEMA.replace(STATUS_INDEX, "")
    c.executescript(schema)
    split = variant.startswith("split")
    if split:
        c.execute("CREATE TABLE delivery_bodies (rid INTEGER PRIMARY KEY, body BLOB, headers TEXT)")
    body = os.urandom(750).hex().encode()  # the bench's Slack envelope is ~1.5 KB
    headers = '{"content-type":"application/json","user-agent":"Slackbot 1.0","x-slack-request-timestamp":"1700000000"}'
    k = n = 0
    previous, sizes, frames = [], [], []
    started = time.process_time()
    for i in range(commits):
        c.execute("BEGIN IMMEDIATE")
        current = []
        for _ in range(batch):
            k += 1
            did = "dlv_%026d" % k
            c.execute(
                "INSERT INTO deliveries (id, workspace_id, integration_id, source, dedupe_scope,"
                " dedupe_key, body, headers, status, attempts, next_attempt_at, received_at,"
                " lease_owner, lease_expires_at) VALUES (?,?,?,?,?,?,?,?,'pending',1,?,?,?,?)",
                (did, "ws_1", "int_1", "slack", "slack:A1", "EvRUN%09d" % k,
                 b"" if split else body, "" if split else headers, k, k, "node-1", k + 30),
            )
            if split:
                c.execute("INSERT INTO delivery_bodies VALUES (last_insert_rowid(), ?, ?)", (body, headers))
            current.append(did)
        for did in previous:
            n += 1
            sid = "sig_%026d" % n
            c.execute(
                "INSERT INTO signals (id, workspace_id, verbatim, source, source_ref,"
                " source_metadata, status, created_at, updated_at) VALUES (?,?,?,?,?,?,'new',?,?)",
                (sid, "ws_1", "x" * 260, "slack", "T1:C1:%d.%06d" % (1700000000 + n // 10**6, n % 10**6),
                 '{"raw_text":"%s"}' % ("y" * 450), n, n),
            )
            c.execute(
                "INSERT INTO activity_logs (id, workspace_id, actor, action, target_type,"
                " target_id, metadata, created_at) VALUES (?,?,NULL,'signal.created','signal',?,?,?)",
                ("act_%026d" % n, "ws_1", sid, '{"delivery_id":"%s","source":"slack"}' % did, n),
            )
            c.execute(
                "UPDATE deliveries SET status = 'processed', signal_id = ?, processed_at = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
                (sid, n, did),
            )
        c.execute("COMMIT")
        previous = current
        size = os.path.getsize(path + "-wal")
        if sizes and size > sizes[-1] and i >= commits // 2:
            frames.append((size - sizes[-1]) / (page + 24))
        sizes.append(size)
        if i % 50 == 49:  # checkpoint now and then, as the checkpointer thread does
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes.append(0)
    cpu = (time.process_time() - started) / (commits * batch) * 1e6
    per_commit = sum(frames) / len(frames)
    print(f"{variant:15} batch {batch:3} page {page:5}: {per_commit:6.1f} frames/commit,"
          f" {per_commit / batch:4.2f} per delivery, {per_commit / batch * (page + 24) / 1024:5.1f}"
          f" KiB/delivery, {cpu:5.1f} us CPU/delivery (Python included)")
    c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["current", "nostatus", "split", "split_nostatus"])
    ap.add_argument("--batch", type=int, default=24, help="deliveries per commit (a Slack run: ~24)")
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--commits", type=int, default=400)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for v in a.variants:
            run(v, a.commits, a.batch, a.page_size, d)


if __name__ == "__main__":
    main()
