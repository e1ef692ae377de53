/**
 * Mirror faults found by review, in one process: a MirrorDevice over legs that are
 * Exporters of in-memory devices on loopback. Each case first failed:
 * 1. A leg whose node loses power and comes back within the retry budget (same
 *    generation and epoch) must get its marked regions copied again, not be trusted.
 * 2. Read repair must not overwrite a newer acknowledged write to the same range.
 * 3. A write the last in-sync leg refused but a resyncing leg took must not leave the
 *    legs different once the resync ends.
 * 4. Concurrent attaches get distinct slots, and the state loads again.
 */

import assert from "node:assert/strict";
import type { BlockDevice, IoFlags } from "../device/block_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { VolatileDevice } from "../device/volatile_device.ts";
import { DeviceError } from "../lib/errors.ts";
import { Exporter } from "../server/exporter.ts";
import { MemoryGeneration } from "../server/write_generation.ts";
import { WriterLease } from "../server/writer_lease.ts";
import { MirrorDevice } from "./mirror.ts";
import { openMember } from "./members.ts";
import { FolderStore } from "./mirror_store.ts";
import { silentLogger as quiet } from "../lib/log.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A leg: an Exporter of `device` on loopback that can restart on the same port. */
class Leg<D extends BlockDevice> {
  readonly #generation = new MemoryGeneration();
  exporter: Exporter;
  constructor(readonly device: D) {
    this.exporter = this.#start(0);
  }
  get name(): string {
    return `127.0.0.1:${this.exporter.address.port}`;
  }
  async restart(between: () => void): Promise<void> {
    const port = this.exporter.address.port;
    await this.exporter.shutdown();
    between();
    this.exporter = this.#start(port);
  }
  #start(port: number): Exporter {
    return Exporter.start(this.device, {
      listen: { hostname: "127.0.0.1", port },
      lease: new WriterLease(this.#generation, false),
      log: quiet,
    });
  }
}

function random(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(length, i + 65536)));
  }
  return bytes;
}

async function openMirror(names: string[], stateDir: string): Promise<MirrorDevice> {
  return await MirrorDevice.open(names, {
    store: new FolderStore(stateDir),
    source: names[0],
    regionBytes: 64 * 1024,
    openLeg: (name, clientId) =>
      openMember(name, { timeoutMs: 300, retries: 2, log: quiet, clientId }),
    log: quiet,
  });
}

async function settled(mirror: MirrorDevice, ms = 10_000): Promise<void> {
  const until = performance.now() + ms;
  while (mirror.status().members.some((l) => l.state !== "in-sync" || l.dirtyRegions > 0)) {
    if (performance.now() > until) {
      throw new Error(`not settled: ${JSON.stringify(mirror.status().members)}`);
    }
    await sleep(50);
  }
}

async function withMirror<A extends BlockDevice, B extends BlockDevice>(
  a: A,
  b: B,
  body: (mirror: MirrorDevice, legA: Leg<A>, legB: Leg<B>, dir: string) => Promise<void>,
): Promise<void> {
  const legA = new Leg(a);
  const legB = new Leg(b);
  const dir = await Deno.makeTempDir({ prefix: "dst-mirror-faults-" });
  const mirror = await openMirror([legA.name, legB.name], dir);
  try {
    await body(mirror, legA, legB, dir);
  } finally {
    await mirror.close();
    await legA.exporter.shutdown();
    await legB.exporter.shutdown();
    await Deno.remove(dir, { recursive: true });
  }
}

const SIZE = 1024 * 1024;

Deno.test("a leg that loses power and comes back within the retry budget gets its marked regions copied again", () =>
  withMirror(
    new MemoryDevice(SIZE, { id: "a".repeat(32) }),
    new VolatileDevice(SIZE, { id: "b".repeat(32) }),
    async (mirror, legA, legB) => {
      await settled(mirror);
      const data = random(128 * 1024);
      await mirror.write(0, data); // acknowledged by both, still in B's cache
      legB.device.frozen = true;
      await legB.restart(() => {
        legB.device.powerLoss();
        legB.device.frozen = false;
      });
      await settled(mirror);
      assert.deepEqual(legB.device.bytes.subarray(0, data.length), data, "B holds the write again");
      assert.deepEqual(legA.device.bytes, legB.device.bytes, "the legs are equal");
    },
  ));

/** Reads fail once when `bad`; with `slow`, reads take 200 ms. */
class FlakyDevice extends MemoryDevice {
  bad = false;
  slow = false;
  override async read(offset: number, into: Uint8Array): Promise<void> {
    if (this.bad) {
      this.bad = false;
      throw new DeviceError("EIO", "bad sector");
    }
    if (this.slow) await sleep(200);
    return await super.read(offset, into);
  }
}

Deno.test("read repair never overwrites a newer acknowledged write to the same range", () =>
  withMirror(
    new FlakyDevice(SIZE, { id: "a".repeat(32) }),
    new FlakyDevice(SIZE, { id: "b".repeat(32) }),
    async (mirror, legA, legB) => {
      await settled(mirror);
      await mirror.write(0, random(4096));
      legA.device.bad = true; // the next read of A fails; B answers, A is repaired
      await mirror.read(0, new Uint8Array(4096));
      legB.device.slow = true; // the repair's fresh read of B is slow
      await sleep(20);
      const newer = random(4096);
      await mirror.write(0, newer);
      legB.device.slow = false;
      await settled(mirror);
      assert.deepEqual(legA.device.bytes.subarray(0, 4096), newer, "A holds the newer write");
      assert.deepEqual(legB.device.bytes.subarray(0, 4096), newer, "B holds the newer write");
    },
  ));

class FailOnceDevice extends MemoryDevice {
  failNext = false;
  override write(offset: number, data: Uint8Array, _flags?: IoFlags): Promise<void> {
    if (this.failNext) {
      this.failNext = false;
      return Promise.reject(new DeviceError("EIO", "write failed"));
    }
    return super.write(offset, data);
  }
}

class SlowWritesDevice extends MemoryDevice {
  override async write(offset: number, data: Uint8Array, _flags?: IoFlags): Promise<void> {
    await sleep(100);
    return await super.write(offset, data);
  }
}

Deno.test("a write the last in-sync leg refused but a resyncing leg took leaves no difference", async () => {
  const a = new FailOnceDevice(4 * SIZE, { id: "a".repeat(32) });
  a.bytes.set(random(4 * SIZE));
  await withMirror(
    a,
    new SlowWritesDevice(4 * SIZE, { id: "b".repeat(32) }),
    async (m, legA, legB) => {
      await sleep(400); // B is resyncing, its first regions copied
      a.failNext = true;
      await assert.rejects(m.write(0, random(4096)), /no in-sync leg took/);
      await settled(m, 20_000);
      assert.equal(m.status().members[1]!.state, "in-sync");
      assert.ok(
        legA.device.bytes.every((byte, i) => byte === legB.device.bytes[i]),
        "the legs are equal once B is in sync",
      );
    },
  );
});

Deno.test("concurrent attaches get distinct slots and the state loads again", async () => {
  const legs = ["a", "b", "c", "d"].map((c) =>
    new Leg(new MemoryDevice(SIZE, { id: c.repeat(32) }))
  );
  const dir = await Deno.makeTempDir({ prefix: "dst-mirror-attach-" });
  const mirror = await openMirror([legs[0]!.name, legs[1]!.name], dir);
  try {
    await settled(mirror);
    await Promise.all([mirror.attach(legs[2]!.name), mirror.attach(legs[3]!.name)]);
    const slots = mirror.status().members.length;
    assert.equal(slots, 4);
    await settled(mirror);
  } finally {
    await mirror.close();
  }
  const state = new FolderStore(dir).loadState()!;
  assert.equal(new Set(state.legs.map((l) => l.slot)).size, 4, "distinct slots");
  for (const leg of legs) await leg.exporter.shutdown();
  await Deno.remove(dir, { recursive: true });
});
