import assert from "node:assert/strict";
import type { MirrorStatus } from "../array/mirror.ts";
import type { ExportStatus } from "../server/exporter.ts";
import {
  progressBar,
  ratesBetween,
  renderFrame,
  renderStatus,
  type Sample,
  watchDocument,
} from "./status_view.ts";
import { explicitWatch, parseWatchSeconds } from "./status.ts";
import { UsageError } from "../lib/errors.ts";

const MiB = 1024 * 1024;

function exportStatus(fields: Partial<ExportStatus> = {}): ExportStatus {
  return {
    kind: "export",
    name: "/srv/disk0.img",
    listen: "127.0.0.1:1025",
    sizeBytes: 64 * MiB,
    blockSize: 4096,
    readOnly: false,
    exportId: "a".repeat(32),
    clients: 1,
    inFlight: 0,
    uptimeMs: 10_000,
    reads: 0,
    readBytes: 0,
    writes: 0,
    writtenBytes: 0,
    flushes: 0,
    discards: 0,
    zeroes: 0,
    errors: 0,
    tampered: 0,
    protection: "none",
    memory: { limitBytes: 256 * MiB, usedBytes: 0, peakBytes: 0 },
    writeGeneration: 1,
    writeEpoch: "e".repeat(32),
    writeLease: null,
    sharedWriters: false,
    ...fields,
  };
}

function mirror(resync: { done: number; total: number }, connected: boolean): MirrorStatus {
  return {
    kind: "mirror",
    sizeBytes: 64 * MiB,
    regionBytes: MiB,
    stateDir: "/var/lib/dst/m",
    resyncedBytes: 0,
    members: [
      {
        name: "10.0.0.5:1025",
        state: "in-sync",
        exportId: "b".repeat(32),
        dirtyRegions: 0,
        inFlight: 0,
        errors: 0,
        connected,
      },
      {
        name: "10.0.0.6:1025",
        state: "resyncing",
        exportId: "c".repeat(32),
        dirtyRegions: resync.total - resync.done,
        inFlight: 1,
        errors: 0,
        connected: true,
        resync: {
          full: true,
          regionsDone: resync.done,
          regionsTotal: resync.total,
          bytesCopied: resync.done * MiB,
          bytesPerSecond: MiB,
          etaMs: 1000 * (resync.total - resync.done),
        },
      },
    ],
  };
}

const at = (timeMs: number, status: ExportStatus): Sample => ({
  timeMs,
  rows: [{ address: "127.0.0.1:1025", status }],
});

Deno.test("renderStatus() with no export that answered prints no table, only the unreachable list", () => {
  const text = renderStatus([
    { address: "10.0.0.1:1025", error: "Cannot connect" },
    { address: "10.0.0.2:1025", error: "refused" },
  ]);
  assert.equal(text, "unreachable:\n10.0.0.1:1025: Cannot connect\n10.0.0.2:1025: refused");
});

Deno.test("ratesBetween() counts reads and writes per second of the export's own uptime", () => {
  const before = exportStatus({ uptimeMs: 10_000, reads: 10, readBytes: MiB, writes: 5 });
  const after = exportStatus({
    uptimeMs: 12_000,
    reads: 110,
    readBytes: 3 * MiB,
    writes: 105,
    writtenBytes: 4 * MiB,
  });
  assert.deepEqual(ratesBetween(before, after), { iops: 100, bytesPerSecond: 3 * MiB });
  assert.deepEqual(ratesBetween(after, after), null, "no time passed");
  assert.equal(ratesBetween(undefined, after), null, "no sample before");
  assert.equal(
    ratesBetween(before, exportStatus({ exportId: "f".repeat(32), uptimeMs: 20_000 })),
    null,
    "another export process answers at that address",
  );
});

Deno.test("renderFrame() outside a terminal: a timestamp line, the table with rates, no escape codes", () => {
  const first = at(Date.UTC(2026, 11, 1, 5, 3, 0), exportStatus({ uptimeMs: 10_000 }));
  const second = at(
    Date.UTC(2026, 11, 1, 5, 3, 2),
    exportStatus({ uptimeMs: 12_000, writes: 512, writtenBytes: 2 * MiB }),
  );
  const frame = renderFrame(first, second, { isTerminal: false, intervalSeconds: 2 });
  assert.ok(!frame.includes("\x1b"), "no escape codes");
  const lines = frame.split("\n");
  assert.equal(lines[0], "2026-12-01T05:03:02Z");
  assert.ok(lines[1]!.includes("IN FLIGHT  IOPS  MIB/S  READS"), lines[1]);
  assert.match(lines[2]!, /^127\.0\.0\.1:1025 .* 0 {10}256 {3}1\.0 {4}0 /);
  assert.ok(frame.endsWith("\n\n"), "a blank line before the next one");

  const opening = renderFrame(null, first, { isTerminal: false, intervalSeconds: 2 });
  assert.match(opening.split("\n")[2]!, / 0 {10}- {5}- {6}0 /, "no rates from one sample");
});

Deno.test("renderFrame() on a terminal redraws in place: cursor home, lines and the rest cleared", () => {
  const first = at(0, exportStatus({ uptimeMs: 1_000 }));
  const second = at(1_000, exportStatus({ uptimeMs: 2_000 }));
  const frame = renderFrame(first, second, { isTerminal: true, intervalSeconds: 1 });
  assert.ok(frame.startsWith("\x1b[H"), "cursor home");
  assert.ok(frame.endsWith("\x1b[J"), "what the last frame left below is cleared");
  assert.ok(
    frame.startsWith("\x1b[Hevery 1s: dst status 127.0.0.1:1025    1970-01-01T00:00:01Z"),
    frame,
  );
  assert.ok(
    frame.split("\n").slice(0, -1).every((line) => line.endsWith("\x1b[K")),
    "each line clears what the longer line before it left",
  );
  assert.match(frame, / 0 {5}0\.0 /, "idle: 0 IOPS, 0.0 MiB/s");
});

Deno.test("a resyncing leg gets a progress bar with --watch; a leg whose connection is down says so", () => {
  const status = exportStatus({ array: mirror({ done: 52, total: 100 }, false) });
  const watching = renderFrame(null, at(0, status), { isTerminal: false, intervalSeconds: 2 });
  assert.match(watching, /mirror, 64\.0 MiB, regions of 1\.0 MiB \(degraded\)\n/);
  assert.match(watching, /10\.0\.0\.5:1025 +in-sync \(reconnecting\) +0 /);
  assert.match(watching, /10\.0\.0\.6:1025 +resyncing \[#####\.\.\.\.\.\] 52% +48 /);
  const once = renderStatus([{ address: "127.0.0.1:1025", status }]);
  assert.match(once, /10\.0\.0\.6:1025 +resyncing 52% +48 /, "without --watch as before");
  assert.doesNotMatch(once, /IOPS/);
});

Deno.test("progressBar() fills a tenth per #, and an empty total is done", () => {
  assert.equal(progressBar(0, 10), "[..........] 0%");
  assert.equal(progressBar(52, 100), "[#####.....] 52%");
  assert.equal(progressBar(99, 100), "[#########.] 99%");
  assert.equal(progressBar(7, 7), "[##########] 100%");
  assert.equal(progressBar(0, 0), "[##########] 100%");
});

Deno.test("watchDocument() gives each answered export its rates, null before two samples", () => {
  const first = at(0, exportStatus({ uptimeMs: 1_000 }));
  const second: Sample = {
    timeMs: 1_000,
    rows: [
      { address: "127.0.0.1:1025", status: exportStatus({ uptimeMs: 2_000, reads: 3 }) },
      { address: "127.0.0.1:1", error: "connection refused" },
    ],
  };
  assert.equal(watchDocument(null, first).exports[0]!.rates, null);
  const document = watchDocument(first, second);
  assert.equal(document.time, "1970-01-01T00:00:01Z");
  assert.deepEqual(document.exports[0]!.rates, { iops: 3, bytesPerSecond: 0 });
  assert.deepEqual(document.exports[1], { address: "127.0.0.1:1", error: "connection refused" });
});

Deno.test("explicitWatch() gives --watch its value or the default; parseWatchSeconds() refuses the rest", () => {
  assert.deepEqual(explicitWatch(["h:1", "--watch"]), ["h:1", "--watch=2"]);
  assert.deepEqual(explicitWatch(["--watch", "h:1"]), ["--watch=2", "h:1"]);
  assert.deepEqual(explicitWatch(["--watch", "5", "h:1"]), ["--watch=5", "h:1"]);
  assert.deepEqual(explicitWatch(["--watch", "--json"]), ["--watch=2", "--json"]);
  assert.deepEqual(explicitWatch(["--watch=7"]), ["--watch=7"]);
  assert.deepEqual(explicitWatch(["--", "--watch"]), ["--", "--watch"]);
  assert.equal(parseWatchSeconds("1"), 1);
  assert.equal(parseWatchSeconds("3600"), 3600);
  for (const bad of ["0", "3601", "1.5", "-1", "", "two"]) {
    assert.throws(() => parseWatchSeconds(bad), UsageError, bad);
  }
  assert.throws(() => parseWatchSeconds("myhost"), /give it before --watch or as myhost:1025/);
});
