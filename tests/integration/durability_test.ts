/**
 * FUA, preflush, flush and a clean stop reach the exporting node's disk as real
 * fdatasync calls, in the right order, through the real `dst export` process.
 *
 * Killing a process cannot show a missing fdatasync (the page cache outlives it), and
 * a file on tmpfs or ext4 does not say when it was synced. So the export serves a file
 * whose every call is seen: nbdfuse makes an nbdkit memory disk a file, and nbdkit's
 * log filter lists what reached that disk. An fdatasync of the file arrives there as an
 * NBD flush, after the writes it covers. The unit tests in
 * src/device/file_device_test.ts pin the same order on a disk in memory; this test
 * pins that the real file calls behind them (src/device/image_file.ts) do sync.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { withFuseDisk } from "../helpers/fuse_disk.ts";
import { startExport } from "../helpers/spawn.ts";
import { missing, spawnTool } from "../helpers/tools.ts";
import { exists, waitUntil } from "../helpers/wait.ts";

const KiB = 1024;

interface DiskOp {
  op: "Write" | "Flush" | "Trim" | "Zero";
  offset: number;
  count: number;
}

/** The requests nbdkit's log filter saw, in order (its "...Op return" lines left out). */
async function diskOps(logFile: string): Promise<DiskOp[]> {
  const ops: DiskOp[] = [];
  const text = await Deno.readTextFile(logFile).catch(() => "");
  for (const line of text.split("\n")) {
    const match = / connection=\d+ (Write|Flush|Trim|Zero) id=\d+(?: offset=0x(\w+) count=0x(\w+))?/
      .exec(line);
    if (match === null) continue;
    ops.push({
      op: match[1] as DiskOp["op"],
      offset: parseInt(match[2] ?? "0", 16),
      count: parseInt(match[3] ?? "0", 16),
    });
  }
  return ops;
}

/** The index of the first disk write at or after `from` that covers byte `at`, or -1. */
function writeCovering(ops: DiskOp[], at: number, from = 0): number {
  return ops.findIndex((o, i) =>
    i >= from && o.op === "Write" && o.offset <= at && at < o.offset + o.count
  );
}

/** The index of the first flush at or after `from`, or -1. */
function flushFrom(ops: DiskOp[], from: number): number {
  return ops.findIndex((o, i) => i >= from && o.op === "Flush");
}

function filled(byte: number, length: number): Uint8Array {
  return new Uint8Array(length).fill(byte);
}

/**
 * Runs `body` with `disk`: a file (nbdfuse) over an nbdkit disk (`plugin`: its name
 * and arguments) that logs every request to `logFile`.
 */
async function withWatchedDisk(
  plugin: string[],
  body: (disk: string, logFile: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dst-durability-" });
  const socket = `${dir}/disk.sock`;
  const logFile = `${dir}/disk.log`;
  const nbdkit = spawnTool("nbdkit", [
    "-f",
    "-U",
    socket,
    "--filter=log",
    ...plugin,
    `logfile=${logFile}`,
  ]);
  try {
    // nbdkit makes its socket once it serves.
    await waitUntil(() => exists(socket), `${socket} to appear`, {
      timeoutMs: 10_000,
      everyMs: 50,
    });
    await withFuseDisk(
      `nbd+unix:///?socket=${socket}`,
      `${dir}/mnt`,
      (disk) => body(disk, logFile),
    );
  } finally {
    nbdkit.kill("SIGKILL"); // a flush of the slow disk may still be sleeping
    await nbdkit.status;
    await Deno.remove(dir, { recursive: true });
  }
}

/** A 16 MiB disk in memory. */
const MEMORY_DISK = ["memory", "16M"];

/**
 * A disk whose flush takes 5 s (nbdkit's eval plugin: reads are zeroes, writes are
 * dropped), so an fdatasync of a file on it is seen running.
 */
const SLOW_FLUSH_DISK = [
  "eval",
  "get_size=echo 16777216",
  "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
  "pwrite=cat >/dev/null",
  "can_write=exit 0",
  "can_flush=exit 0",
  "flush=sleep 5",
];

Deno.test({
  name:
    "FUA, preflush, flush and SIGTERM reach the export's disk as fdatasync, after the writes they cover",
  ignore: missing("nbdkit", "nbdfuse"),
  fn: () =>
    withWatchedDisk(MEMORY_DISK, async (disk, logFile) => {
      const server = await startExport([disk, "--listen", "127.0.0.1:0"]);
      try {
        const device = await RemoteDevice.connect(server.address, { log: quiet });

        // A plain write: no fdatasync, so the disk sees no flush.
        await device.write(0, filled(1, 4 * KiB));
        assert.equal(flushFrom(await diskOps(logFile), 0), -1, "no flush without FUA");

        // FUA: the write reaches the disk, then a flush, before the client hears back.
        await device.write(64 * KiB, filled(2, 4 * KiB), { fua: true });
        let ops = await diskOps(logFile);
        const fuaWrite = writeCovering(ops, 64 * KiB);
        assert.ok(fuaWrite >= 0, "the FUA write reached the disk");
        assert.ok(flushFrom(ops, fuaWrite + 1) > fuaWrite, "a flush after the FUA write");

        // Preflush: what came before is flushed before the write itself reaches the disk.
        const before = ops.length;
        await device.write(128 * KiB, filled(3, 4 * KiB));
        await device.write(192 * KiB, filled(4, 4 * KiB), { preflush: true });
        ops = await diskOps(logFile);
        const earlier = writeCovering(ops, 128 * KiB, before);
        assert.ok(earlier >= 0, "the earlier write reached the disk");
        const preflush = flushFrom(ops, earlier + 1);
        assert.ok(preflush > earlier, "a flush after the earlier write");
        const later = writeCovering(ops, 192 * KiB, before);
        assert.ok(later === -1 || later > preflush, "the preflush write comes after that flush");

        // Flush: everything written so far, then a flush.
        await device.flush();
        ops = await diskOps(logFile);
        const flushed = writeCovering(ops, 192 * KiB, before);
        assert.ok(flushed >= 0, "the preflush write reached the disk");
        assert.ok(flushFrom(ops, flushed + 1) > flushed, "a flush after it");

        // A clean stop syncs what the last writes left in the cache.
        const beforeStop = ops.length;
        await device.write(256 * KiB, filled(5, 4 * KiB));
        await device.close();
        assert.equal((await server.stop("SIGTERM")).code, 0);
        ops = await diskOps(logFile);
        const last = writeCovering(ops, 256 * KiB, beforeStop);
        assert.ok(last >= 0, "the last write reached the disk");
        // Two: the stop's fdatasync, and the flush nbdfuse sends for any close() of the
        // file (so one alone says nothing about the fdatasync).
        const flushes = ops.slice(last + 1).filter((o) => o.op === "Flush").length;
        assert.ok(flushes >= 2, `SIGTERM fdatasynced after the last write (${flushes} flushes)`);
      } finally {
        await server.stop("SIGKILL");
      }
    }),
});

Deno.test({
  name:
    "SIGTERM waits for the export's fdatasync to finish; a second signal exits without finishing, with code 130",
  ignore: missing("nbdkit", "nbdfuse"),
  fn: () =>
    withWatchedDisk(SLOW_FLUSH_DISK, async (disk, logFile) => {
      const server = await startExport([disk, "--listen", "127.0.0.1:0"]);
      try {
        const device = await RemoteDevice.connect(server.address, { log: quiet });
        await device.write(0, filled(6, 4 * KiB));
        await device.close();
        let exited: Deno.CommandStatus | null = null;
        const stopping = server.stop("SIGTERM").then((status) => (exited = status));
        await waitUntil(async () => flushFrom(await diskOps(logFile), 0) >= 0, "the stop's sync", {
          timeoutMs: 10_000,
          everyMs: 50,
        });
        await new Promise((resolve) => setTimeout(resolve, 500));
        assert.equal(exited, null, "the first signal waits for the sync");
        server.process.kill("SIGTERM");
        // It leaves without finishing. (Not sooner than the fdatasync under way: no
        // process can leave the kernel in the middle of one.)
        const status = await stopping;
        assert.equal(status.code, 130, "the second signal exits without finishing");
        assert.doesNotMatch(server.log(), /stopped cleanly/);
      } finally {
        await server.stop("SIGKILL");
      }
    }),
});
