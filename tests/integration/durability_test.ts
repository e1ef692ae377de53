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

Deno.test({
  name:
    "FUA, preflush, flush and SIGTERM reach the export's disk as fdatasync, after the writes they cover",
  ignore: missing("nbdkit", "nbdfuse"),
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "dst-durability-" });
    const socket = `${dir}/disk.sock`;
    const logFile = `${dir}/disk.log`;
    const nbdkit = spawnTool("nbdkit", [
      "-f",
      "-U",
      socket,
      "--filter=log",
      "memory",
      "16M",
      `logfile=${logFile}`,
    ]);
    try {
      await waitForFile(socket);
      await withFuseDisk(`nbd+unix:///?socket=${socket}`, `${dir}/mnt`, async (disk) => {
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
          assert.ok(flushFrom(ops, last + 1) > last, "SIGTERM flushed after the last write");
        } finally {
          await server.stop("SIGKILL");
        }
      });
    } finally {
      nbdkit.kill("SIGTERM");
      await nbdkit.status;
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/** nbdkit makes its socket once it serves; waits for it (at most 10 s). */
async function waitForFile(path: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    try {
      await Deno.stat(path);
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  throw new Error(`${path} did not appear within 10 s`);
}
