/**
 * Durable before clear, with the real mirror process: a region's marks are cleared
 * only after a flush of every leg holding its data completed after the region's last
 * write. Leg B is an in-process export of a VolatileDevice (a disk with a write-back
 * cache: only what a flush covered survives a power loss); leg A and the mirror are
 * real processes.
 * 1. Writes, then the marks clear; then B's node loses power and comes back with the
 *    generation the mirror expects: B must still hold every acknowledged write.
 * 2. B's flushes fail: B keeps its marks and goes out of sync (A's clear); once its
 *    flushes work again, only the marked regions are copied and the legs are equal.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { DeviceError } from "../../src/lib/errors.ts";
import { VolatileDevice } from "../../src/device/volatile_device.ts";
import { PageCacheFile } from "../../src/device/page_cache_file.ts";
import { Exporter } from "../../src/server/exporter.ts";
import { MemoryGeneration } from "../../src/server/write_generation.ts";
import { WriterLease } from "../../src/server/writer_lease.ts";
import {
  allInSyncAndClean,
  leg,
  memberName,
  startArray,
  startNewMirror,
  waitForMirror,
} from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { exportImage, scenario, startExport } from "../helpers/spawn.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

/**
 * Leg B: an export of a volatile disk in this process, that can lose power and come
 * back, or be restarted; each export process opens the disk anew.
 */
class VolatileLeg {
  readonly disk = new PageCacheFile(SIZE, "b");
  device = this.#open();
  readonly #generation = new MemoryGeneration();
  #exporter: Exporter;

  constructor() {
    this.#exporter = this.#start(0);
  }

  /** The export process restarts (its node keeps the page cache). */
  async restart(): Promise<void> {
    const port = this.#exporter.address.port;
    // Its device closes with a sync, which fails after a failed one: it must.
    await this.#exporter.shutdown().catch(() => {});
    this.device = this.#open();
    this.#exporter = this.#start(port);
  }

  #open(): VolatileDevice {
    return new VolatileDevice(SIZE, { id: "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0", disk: this.disk });
  }

  get name(): string {
    return memberName(this.#exporter.address);
  }

  /** The node loses power: connections drop, the cache is lost, and it serves again. */
  async powerCycle(): Promise<void> {
    const port = this.#exporter.address.port;
    this.device.frozen = true; // what it flushes while going down is lost too
    await this.#exporter.shutdown();
    this.device.powerLoss();
    this.device.frozen = false;
    this.device = this.#open();
    this.#exporter = this.#start(port);
  }

  async stop(): Promise<void> {
    await this.#exporter.shutdown();
  }

  #start(port: number): Exporter {
    return Exporter.start(this.device, {
      listen: { hostname: "127.0.0.1", port },
      lease: new WriterLease(this.#generation, false),
      log: quiet,
    });
  }
}

async function writeThrough(
  address: { hostname: string; port: number },
  at: number,
  data: Uint8Array,
) {
  const client = await RemoteDevice.connect(address, { log: quiet });
  await client.write(at, data); // no flush: what the mirror makes durable is the question
  await client.close();
}

Deno.test("a leg's power loss after the mirror cleared its marks loses no acknowledged write", () =>
  scenario("dst-durable-power-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = new VolatileLeg();
    try {
      const mirror = track(
        await startNewMirror([memberName(a.address), b.name], `${dir}/state`, "--timeout", "300"),
      );
      await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
      const data = randomBytes(2 * MiB);
      await writeThrough(mirror.address, MiB, data);
      // The marks clear after a second idle; B must have been flushed before that.
      await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
      await b.powerCycle();
      assertSameBytes(
        b.device.durable.subarray(MiB, 3 * MiB),
        data,
        "what B kept through its power loss",
      );
      assert.equal((await mirror.stop()).code, 0, mirror.log());
      await a.stop();
      assertSameBytes(b.device.durable, await Deno.readFile(`${dir}/a.img`), "B equals A");
    } finally {
      await b.stop();
    }
  }));

Deno.test("a leg whose flushes fail keeps its marks and leaves sync; once they work and its export is restarted, only those regions are copied", () =>
  scenario("dst-durable-flushfail-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    const b = new VolatileLeg();
    try {
      const mirror = track(
        await startNewMirror(
          [memberName(a.address), b.name],
          `${dir}/state`,
          "--timeout",
          "300",
          "--region",
          "64K",
        ),
      );
      await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
      b.device.failFlushes = true;
      await writeThrough(mirror.address, 0, randomBytes(128 * 1024)); // two regions
      const failed = await waitForMirror(
        mirror.address,
        (s) =>
          leg(s, b.name).state === "out-of-sync" &&
          leg(s, memberName(a.address)).dirtyRegions === 0,
        10_000,
      );
      assert.equal(
        leg(failed, b.name).dirtyRegions,
        2,
        "B keeps the marks of what it did not flush",
      );
      b.device.failFlushes = false;
      // Its export fails every sync until restarted: what the failed one covered may
      // not be on its disk.
      await b.restart();
      await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
      assert.match(mirror.log(), new RegExp(`resync of ${b.name}: 2 of 64 regions`));
      assert.equal((await mirror.stop()).code, 0, mirror.log());
      await a.stop();
      assertSameBytes(b.device.durable, await Deno.readFile(`${dir}/a.img`), "B equals A");
    } finally {
      await b.stop();
    }
  }));

Deno.test("a leg whose export lost its state is never trusted: a new epoch means a full copy", () =>
  scenario("dst-durable-epoch-", async (dir, track) => {
    const exportB = (port: number) =>
      startExport([
        `${dir}/b.img`,
        ...(port === 0 ? ["--create", "4M"] : []),
        "--listen",
        `127.0.0.1:${port}`,
        "--state",
        `${dir}/b-state`,
      ]);
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    let b = track(await exportB(0));
    const legs = [memberName(a.address), memberName(b.address)];
    const state = `${dir}/state`;
    let mirror = track(await startNewMirror(legs, state));
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    const data = randomBytes(SIZE);
    await writeThrough(mirror.address, 0, data);
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    assert.equal((await mirror.stop()).code, 0, mirror.log());

    // Behind the mirror's back: B's export loses its state, and B's image is written
    // directly; its new state counts from 0 again, as the mirror's record once did.
    await b.stop();
    await Deno.remove(`${dir}/b-state`, { recursive: true });
    const foreign = await Deno.open(`${dir}/b.img`, { write: true });
    await foreign.write(new Uint8Array(64 * 1024).fill(0xee));
    foreign.close();
    b = track(await exportB(b.address.port));

    mirror = track(
      await startArray(["mirror", ...legs, "--state", state, "--export", "127.0.0.1:0"]),
    );
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    assert.match(mirror.log(), /lost or replaced its export state .* it gets a full copy/);
    assert.equal((await mirror.stop()).code, 0, mirror.log());
    await a.stop();
    await b.stop();
    assertSameBytes(await Deno.readFile(`${dir}/b.img`), data, "B holds the mirror's data again");
  }));

Deno.test("when the mirror state cannot be made durable, writes fail with EIO until it can", () =>
  scenario("dst-durable-state-", async (dir, track) => {
    const a = track(
      await exportImage(dir, "a.img", "4M"),
    );
    let b = track(await exportImage(dir, "b.img", "4M"));
    const [nameA, nameB] = [memberName(a.address), memberName(b.address)];
    const state = `${dir}/state`;
    const mirror = track(
      await startNewMirror([nameA, nameB], state, "--timeout", "300", "--retries", "1"),
    );
    await waitForMirror(mirror.address, allInSyncAndClean, 10_000);
    const client = await RemoteDevice.connect(mirror.address, { log: quiet });
    const model = new Uint8Array(SIZE);
    try {
      const first = randomBytes(MiB);
      await client.write(0, first);
      model.set(first, 0);
      // The state file cannot be replaced (even by root): its temporary name is a folder.
      await Deno.mkdir(`${state}/state.json.tmp`);
      await b.stop("SIGKILL");
      // B leaves sync; the state cannot say so, so neither this write nor later ones are
      // acknowledged.
      await assert.rejects(
        client.write(MiB, randomBytes(4096)),
        (e) => e instanceof DeviceError && e.errno === "EIO",
      );
      await assert.rejects(
        client.write(2 * MiB, randomBytes(4096)),
        (e) => e instanceof DeviceError && e.errno === "EIO",
      );
      assert.match(mirror.log(), /cannot make the mirror state durable/);

      await Deno.remove(`${state}/state.json.tmp`);
      const second = randomBytes(MiB);
      const until = performance.now() + 5_000;
      for (;;) {
        try {
          await client.write(2 * MiB, second);
          break;
        } catch (error) {
          if (performance.now() > until) throw error;
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
      }
      model.set(second, 2 * MiB);
      assert.match(mirror.log(), /the mirror state is durable again/);
      const saved = JSON.parse(await Deno.readTextFile(`${state}/state.json`));
      assert.equal(
        saved.legs.find((l: { name: string }) => l.name === nameB).state,
        "out-of-sync",
        "the state says B left sync",
      );
      b = track(await startExport([`${dir}/b.img`, "--listen", nameB]));
      await waitForMirror(mirror.address, allInSyncAndClean, 15_000);
      const back = new Uint8Array(SIZE);
      await client.read(0, back);
      // The refused writes may or may not have landed (EIO): compare what was acknowledged.
      assertSameBytes(back.subarray(0, MiB), model.subarray(0, MiB), "first MiB");
      assertSameBytes(
        back.subarray(2 * MiB, 3 * MiB),
        model.subarray(2 * MiB, 3 * MiB),
        "third MiB",
      );
    } finally {
      await client.close();
    }
    assert.equal((await mirror.stop()).code, 0, mirror.log());
    await a.stop();
    await b.stop();
    assertSameBytes(
      await Deno.readFile(`${dir}/a.img`),
      await Deno.readFile(`${dir}/b.img`),
      "the legs are equal",
    );
  }));
