/**
 * A read error on a mirror leg, with the real mirror process: leg B is an in-process
 * export of a memory device with a latent bad sector (reads of it fail with EIO until
 * it is written, as a disk remaps a sector on write). Reads through the mirror are
 * answered from the other leg, B gets the bytes written back and stays in sync; a leg
 * that cannot take the rewrite goes out of sync.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import type { IoFlags } from "../../src/device/block_device.ts";
import { MemoryDevice } from "../../src/device/memory_device.ts";
import { DeviceError } from "../../src/lib/errors.ts";
import { Exporter } from "../../src/server/exporter.ts";
import {
  allInSyncAndClean,
  leg,
  memberName,
  type RunningArray,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { exportImage, scenario } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

/** Reads that touch `bad` fail until a write covers it; with `refuseWrites`, writes fail too. */
class BadSectorDevice extends MemoryDevice {
  bad: { start: number; end: number } | null = null;
  refuseWrites = false;
  badReads = 0;

  override read(offset: number, into: Uint8Array): Promise<void> {
    const bad = this.bad;
    if (bad !== null && offset < bad.end && bad.start < offset + into.length) {
      this.badReads += 1;
      return Promise.reject(new DeviceError("EIO", "unreadable sector"));
    }
    return super.read(offset, into);
  }

  override write(offset: number, data: Uint8Array, _flags?: IoFlags): Promise<void> {
    if (this.refuseWrites) return Promise.reject(new DeviceError("EIO", "the disk is failing"));
    const bad = this.bad;
    if (bad !== null && offset <= bad.start && bad.end <= offset + data.length) this.bad = null;
    return super.write(offset, data);
  }
}

async function withBadSectorLeg(
  body: (device: BadSectorDevice, name: string) => Promise<void>,
): Promise<void> {
  const device = new BadSectorDevice(SIZE, { id: "bad0bad0bad0bad0bad0bad0bad0bad0" });
  const exporter = Exporter.start(device, {
    listen: { hostname: "127.0.0.1", port: 0 },
    log: quiet,
  });
  try {
    await body(device, memberName(exporter.address));
  } finally {
    await exporter.shutdown();
  }
}

/**
 * A mirror of B (a BadSectorDevice, first, so reads go to it) and A (a real export),
 * in sync and filled with random data through a client; `body` gets all of them.
 */
function withRepairRig(
  prefix: string,
  body: (rig: {
    b: BadSectorDevice;
    nameB: string;
    mirror: RunningArray;
    client: RemoteDevice;
    data: Uint8Array;
  }) => Promise<void>,
): Promise<void> {
  return scenario(prefix, (dir, track) =>
    withBadSectorLeg(async (b, nameB) => {
      const a = track(await exportImage(dir, "a.img", "4M"));
      const mirror = track(
        await startNewMirror([nameB, memberName(a.address)], `${dir}/state`, "--timeout", "300"),
      );
      await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
      const client = await RemoteDevice.connect(mirror.address, { log: quiet });
      try {
        const data = randomBytes(SIZE);
        await client.write(0, data);
        await client.flush();
        await body({ b, nameB, mirror, client, data });
      } finally {
        await client.close();
      }
    }));
}

Deno.test("a read error on a leg is answered from the other leg and the bytes are written back; the leg stays in sync", () =>
  withRepairRig("dst-repair-", async ({ b, nameB, mirror, client, data }) => {
    b.bad = { start: MiB, end: MiB + 4096 };
    const back = new Uint8Array(64 * 1024);
    await client.read(MiB, back);
    assertSameBytes(back, data.subarray(MiB, MiB + back.length), "read through the mirror");
    assert.equal(b.badReads, 1, "B failed the read once");
    // B's bad range heals when the rewrite reaches it; the log line follows its answer.
    const mended = new RegExp(`leg ${nameB} failed a read of .*rewrote them`);
    const status = await waitForMirror(
      mirror.address,
      () => b.bad === null && mended.test(mirror.log()),
      5_000,
    );
    assert.equal(leg(status, nameB).state, "in-sync", "a mended read error keeps B in sync");
    assertSameBytes(b.bytes, data, "B holds every byte, the rewritten ones included");
    // The sector is good again: B serves the next read itself.
    await client.read(MiB, back);
    assert.equal(b.badReads, 1);
  }));

Deno.test("a leg that cannot take the rewrite after a read error goes out of sync; the read is still answered", () =>
  withRepairRig("dst-repair-fail-", async ({ b, nameB, mirror, client, data }) => {
    b.bad = { start: 0, end: 4096 };
    b.refuseWrites = true;
    const back = new Uint8Array(4096);
    await client.read(0, back);
    assertSameBytes(back, data.subarray(0, 4096), "read through the mirror");
    await waitForMirror(mirror.address, (s) => leg(s, nameB).state === "out-of-sync", 5_000);
  }));
