/**
 * The promise of `dst array detach`: a leg taken out of a mirror is a usable
 * snapshot. An ext4 filesystem is made and filled through the mirror's NBD; one
 * leg is detached and the filesystem changed through the mirror; the detached
 * leg's export, attached alone and mounted read-only, is clean and holds the files
 * as of the detach. Attached back to the mirror, the leg gets only the regions it
 * missed, and both legs end up byte-identical.
 */

import assert from "node:assert/strict";
import {
  allInSyncAndClean,
  leg,
  memberName,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { withFuseDisk } from "../helpers/fuse_disk.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst, type RunningDst, startAttach, startExport, stopClean } from "../helpers/spawn.ts";
import { missing, tool, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

type Files = Map<string, Uint8Array>;

/** Writes `files` into the root of the ext4 image `disk` with debugfs -w (`replace`: rm first). */
async function putFiles(disk: string, dir: string, files: Files, replace = false): Promise<void> {
  for (const [name, bytes] of files) {
    await Deno.writeFile(`${dir}/in-${name}`, bytes);
    if (replace) await toolOk("debugfs", ["-w", "-R", `rm ${name}`, disk]);
    await toolOk("debugfs", ["-w", "-R", `write ${dir}/in-${name} ${name}`, disk]);
  }
}

/**
 * Asserts that the ext4 image `disk` is clean (e2fsck -fn) and that its root holds
 * `files` and nothing else (besides lost+found), each identical. Reads only.
 */
async function assertFilesystem(disk: string, dir: string, files: Files, what: string) {
  const check = await tool("e2fsck", ["-fn", disk]);
  assert.equal(check.code, 0, `${what}: e2fsck -fn\n${check.stdout}${check.stderr}`);
  // `ls -p` lines: /INODE/MODE/UID/GID/NAME/SIZE/
  const names = (await toolOk("debugfs", ["-R", "ls -p", disk])).split("\n")
    .map((line) => line.split("/")[5])
    .filter((name) => name !== undefined && ![".", "..", "lost+found"].includes(name));
  assert.deepEqual(names.sort(), [...files.keys()].sort(), `${what}: the files in /`);
  for (const [name, bytes] of files) {
    await toolOk("debugfs", ["-R", `dump ${name} ${dir}/out-${name}`, disk]);
    assertSameBytes(await Deno.readFile(`${dir}/out-${name}`), bytes, `${what}: ${name}`);
  }
}

/** An export's write generation, from `dst status ADDR --json`. */
async function writeGeneration(address: string): Promise<number> {
  const result = await runDst(["status", address, "--json"]);
  assert.equal(result.code, 0, result.stderr);
  return JSON.parse(result.stdout)[0].status.writeGeneration;
}

Deno.test({
  name:
    "a leg detached from a mirror is a snapshot: attached alone, ext4 on it is clean with the files as of the detach; attached back, only what it missed is copied",
  ignore: missing("nbdfuse", "mkfs.ext4", "e2fsck", "debugfs"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "dst-snapshot-" });
    const running: RunningDst[] = [];
    try {
      const a = await startExport([`${dir}/a.img`, "--create", "64M", "--listen", "127.0.0.1:0"]);
      running.push(a);
      const b = await startExport([`${dir}/b.img`, "--create", "64M", "--listen", "127.0.0.1:0"]);
      running.push(b);
      const nameA = memberName(a.address);
      const nameB = memberName(b.address);
      const mirror = await startNewMirror([nameA, nameB], `${dir}/state`, "--nbd", "127.0.0.1:0");
      running.push(mirror);
      const mirrorName = memberName(mirror.address);
      assert.ok(mirror.nbdUri !== null, mirror.line);
      await waitForMirror(mirror.address);

      // 1. A filesystem with two files, made through the mirror.
      const atDetach: Files = new Map([
        ["small.txt", new TextEncoder().encode("as of the detach\n")],
        ["big.bin", randomBytes(MiB + 12345)],
      ]);
      await withFuseDisk(mirror.nbdUri, `${dir}/mnt`, async (disk) => {
        await toolOk("mkfs.ext4", ["-q", "-F", disk]);
        await putFiles(disk, dir, atDetach);
      });
      // In sync, and the marks of the last writes cleared (once their regions are idle),
      // so that what B has missed at the attach is what changed after the detach.
      const synced = await waitForMirror(
        mirror.address,
        allInSyncAndClean,
      );
      assert.equal(synced.resyncedBytes, SIZE, "B's first copy was a full one");

      // 2. Detach B, then change the filesystem through the mirror: big.bin gets new
      // content (in the blocks it just freed), and a file is added.
      const detach = await runDst(["array", "detach", mirrorName, nameB]);
      assert.equal(detach.code, 0, detach.stderr);
      const generation = await writeGeneration(nameB);
      const later: Files = new Map([
        ["big.bin", randomBytes(MiB + 12345)],
        ["late.txt", new TextEncoder().encode("written after the detach\n")],
      ]);
      await withFuseDisk(mirror.nbdUri, `${dir}/mnt`, async (disk) => {
        await putFiles(disk, dir, later, true);
      });
      const now: Files = new Map([...atDetach, ...later]);

      // 3. The snapshot: B's export alone, attached and mounted read-only.
      const snapshot = await startAttach([
        nameB,
        "--read-only",
        "--socket",
        `${dir}/snapshot.sock`,
      ]);
      running.push(snapshot);
      await withFuseDisk(snapshot.uri, `${dir}/mnt`, async (disk) => {
        await assertFilesystem(disk, dir, atDetach, "the detached leg");
      }, { readOnly: true });
      await stopClean(snapshot, "the snapshot's attach");
      assert.equal(await writeGeneration(nameB), generation, "reading the snapshot wrote nothing");

      // 4. B back in the mirror: only the regions written since the detach are copied.
      const attach = await runDst(["array", "attach", mirrorName, nameB]);
      assert.equal(attach.code, 0, attach.stderr);
      const said = attach.stdout.match(/attached; resyncing (\d+) of (\d+) regions/);
      assert.ok(said !== null, attach.stdout);
      const missed = Number(said[1]);
      const regions = Number(said[2]);
      assert.equal(regions, SIZE / synced.regionBytes);
      assert.ok(missed >= 1 && missed <= regions / 4, attach.stdout);
      const final = await waitForMirror(mirror.address);
      const copied = final.resyncedBytes - synced.resyncedBytes;
      assert.ok(
        copied > 0 && copied <= missed * final.regionBytes,
        `the attach copied ${copied} bytes; B missed ${missed} regions`,
      );
      assert.equal(leg(final, nameB).errors, 0);
      assert.doesNotMatch(mirror.log(), /written by someone else/);
      await withFuseDisk(mirror.nbdUri, `${dir}/mnt`, async (disk) => {
        await assertFilesystem(disk, dir, now, "the mirror after the attach");
      }, { readOnly: true });

      await stopClean(mirror, "the mirror");
      await stopClean(a, "export A");
      await stopClean(b, "export B");
      assertSameBytes(
        await Deno.readFile(`${dir}/b.img`),
        await Deno.readFile(`${dir}/a.img`),
        "leg B's image against leg A's",
      );
    } finally {
      await Promise.all(running.map((process) => process.stop("SIGKILL")));
      await Deno.remove(dir, { recursive: true });
    }
  },
});
