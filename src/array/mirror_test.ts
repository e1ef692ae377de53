/**
 * A mirror of in-memory legs, in one process and on a clock the test moves: no
 * network, no files. Its state is a MemoryMirrorStore, whose bitmap syncs a test can
 * hold; its legs are MemoryDevices (VolatileDevices where a lost cache matters)
 * behind a wrapper that fails every request, or holds flushes, when told to.
 */

import assert from "node:assert/strict";
import { MIRROR_CLEAR_DELAY_MS, MIRROR_SUPERVISE_MS } from "../constants.ts";
import type { BlockDevice, DeviceStats, IoFlags } from "../device/block_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { VolatileDevice } from "../device/volatile_device.ts";
import { AssertionError } from "../lib/assert.ts";
import type { Clock, Timer } from "../lib/clock.ts";
import { DeviceError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { MemoryMirrorStore } from "./memory_mirror_store.ts";
import { MirrorDevice } from "./mirror.ts";
import { checkLegs, finishResync, leaveSync, type Leg, newLeg } from "./mirror_leg.ts";
import type { LegRecord } from "./mirror_state.ts";

const SIZE = 1024 * 1024;
const REGION = 64 * 1024;
const REGIONS = SIZE / REGION;

/** Time that moves only when the test says so; timers run in order as it passes them. */
class ManualClock implements Clock {
  #now = 0;
  readonly #timers = new Set<{ at: number; every: number | null; fn: () => void }>();

  nowMs(): number {
    return this.#now;
  }

  after(ms: number, fn: () => void): Timer {
    return this.#add(ms, null, fn);
  }

  every(ms: number, fn: () => void): Timer {
    return this.#add(ms, ms, fn);
  }

  advance(ms: number): void {
    const until = this.#now + ms;
    for (;;) {
      const due = [...this.#timers].filter((t) => t.at <= until).sort((x, y) => x.at - y.at)[0];
      if (due === undefined) break;
      this.#now = due.at;
      if (due.every === null) this.#timers.delete(due);
      else due.at += due.every;
      due.fn();
    }
    this.#now = until;
  }

  #add(ms: number, every: number | null, fn: () => void): Timer {
    const timer = { at: this.#now + ms, every, fn };
    this.#timers.add(timer);
    return { cancel: () => this.#timers.delete(timer) };
  }
}

/** A logger that keeps its lines and tells a test when one it waits for is logged. */
class TestLog implements Logger {
  readonly lines: string[] = [];
  readonly #waiters = new Set<{ pattern: RegExp; resolve: (line: string) => void }>();

  debug(message: string): void {
    this.#add("DEBUG", message);
  }
  info(message: string): void {
    this.#add("INFO", message);
  }
  warn(message: string): void {
    this.#add("WARN", message);
  }
  error(message: string): void {
    this.#add("ERROR", message);
  }

  /**
   * Resolves with the first line from line `from` on that matches `pattern`; fails
   * after two seconds of real time, with the lines so far.
   */
  when(pattern: RegExp, from = 0): Promise<string> {
    const found = this.lines.slice(from).find((line) => pattern.test(line));
    if (found !== undefined) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const waiter = {
        pattern,
        resolve: (line: string) => {
          clearTimeout(timer);
          resolve(line);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        reject(new Error(`no log line ${pattern} in:\n${this.lines.join("\n")}`));
      }, 2000);
      this.#waiters.add(waiter);
    });
  }

  #add(level: string, message: string): void {
    const line = `${level} ${message}`;
    this.lines.push(line);
    for (const waiter of this.#waiters) {
      if (!waiter.pattern.test(line)) continue;
      this.#waiters.delete(waiter);
      waiter.resolve(line);
    }
  }
}

/** A leg's device that fails every request while `failing`, and holds flushes on `holdFlushes`. */
class TestDevice<D extends MemoryDevice = MemoryDevice> implements BlockDevice {
  failing = false;
  holdFlushes: Promise<void> | null = null;

  /** The inner device as a BlockDevice, whose requests take flags (MemoryDevice ignores them). */
  readonly #device: BlockDevice;

  constructor(readonly inner: D) {
    this.#device = inner;
  }

  get info() {
    return this.inner.info;
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    return this.#run(() => this.#device.read(offset, into));
  }

  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.#device.write(offset, data, flags));
  }

  async flush(): Promise<void> {
    if (this.holdFlushes !== null) await this.holdFlushes;
    return await this.#run(() => this.#device.flush());
  }

  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.#device.discard(offset, length, flags));
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#run(() => this.#device.writeZeroes(offset, length, flags));
  }

  stats(): DeviceStats {
    return this.inner.stats();
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  #run(op: () => Promise<void>): Promise<void> {
    if (!this.failing) return op();
    return Promise.reject(new DeviceError("EIO", `${this.info.name}: failing`));
  }
}

function random(length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(length, i + 65536)));
  }
  return bytes;
}

function memory(name: string): MemoryDevice {
  return new MemoryDevice(SIZE, { id: name.repeat(32), name });
}

function volatile(name: string): VolatileDevice {
  return new VolatileDevice(SIZE, { id: name.repeat(32), name });
}

function sameBytes(x: Uint8Array, y: Uint8Array): boolean {
  return x.length === y.length && x.every((byte, i) => byte === y[i]);
}

/** Lets every promise that can settle now settle (legs and store here answer at once). */
function turn(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** A hold that a test releases: for the store's syncs or a leg's flushes. */
function hold(): { promise: Promise<void>; release: () => void } {
  let release = () => {};
  const promise = new Promise<void>((resolve) => (release = resolve));
  return { promise, release };
}

/** Mirrors of legs "a" and "b" made of `a` and `b`, on one store, clock and log. */
function rig<A extends MemoryDevice, B extends MemoryDevice>(a: A, b: B) {
  const legs = { a: new TestDevice(a), b: new TestDevice(b) };
  const generations = { a: 1, b: 1 };
  const store = new MemoryMirrorStore();
  const clock = new ManualClock();
  const log = new TestLog();
  const open = () =>
    MirrorDevice.open(["a", "b"], {
      store,
      regionBytes: REGION,
      clock,
      log,
      openLeg: (name) => {
        if (name !== "a" && name !== "b") return Promise.reject(new Error(`no leg ${name}`));
        return Promise.resolve({
          device: legs[name],
          generation: generations[name],
          epoch: "e".repeat(32),
        });
      },
    });
  return { legs, generations, store, clock, log, open };
}

/** A new mirror of `a` and `b`, once b has its full copy of a. */
async function settledMirror<A extends MemoryDevice, B extends MemoryDevice>(a: A, b: B) {
  const parts = rig(a, b);
  const mirror = await parts.open();
  await parts.log.when(/leg b is in sync/);
  return { ...parts, mirror };
}

function mode(mirror: MirrorDevice, name: string) {
  return mirror.status().members.find((m) => m.name === name);
}

Deno.test("a new mirror copies its source to the other leg, and then the legs are equal and clean", async () => {
  const a = memory("a");
  a.bytes.set(random(SIZE));
  const { mirror, log, legs } = await settledMirror(a, memory("b"));
  try {
    assert.ok(log.lines.some((l) => /new mirror: no leg was ever written; a, the first/.test(l)));
    assert.ok(log.lines.some((l) => l.includes(`resync of b: ${REGIONS} of ${REGIONS} regions`)));
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "b holds a's data");
    for (const leg of mirror.status().members) {
      assert.equal(leg.state, "in-sync");
      assert.equal(leg.dirtyRegions, 0);
    }
  } finally {
    await mirror.close();
  }
});

Deno.test("a write reaches every leg and reads back", async () => {
  const { mirror, legs } = await settledMirror(memory("a"), memory("b"));
  try {
    const at = REGION - 1000; // across a region boundary
    const data = random(5000);
    await mirror.write(at, data);
    const back = new Uint8Array(data.length);
    await mirror.read(at, back);
    assert.deepEqual(back, data);
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), data);
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), data);
  } finally {
    await mirror.close();
  }
});

Deno.test("a write reaches no leg before its mark is durable", async () => {
  const { mirror, legs, store } = await settledMirror(memory("a"), memory("b"));
  const sync = hold();
  try {
    const at = 3 * REGION;
    const data = random(4096);
    store.holdSyncs = sync.promise;
    const writing = mirror.write(at, data);
    await turn();
    const zeroes = new Uint8Array(data.length);
    assert.notEqual(store.durableBitmap()![3], 0b11, "the mark is not durable yet");
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), zeroes, "a waits");
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), zeroes, "b waits");
    store.holdSyncs = null;
    sync.release();
    await writing;
    assert.equal(store.durableBitmap()![3], 0b11, "marked for both legs");
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), data);
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), data);
  } finally {
    store.holdSyncs = null;
    sync.release();
    await mirror.close();
  }
});

Deno.test("a region's marks are not cleared before every leg holding it was flushed", async () => {
  const { mirror, legs, store, clock } = await settledMirror(volatile("a"), volatile("b"));
  const flush = hold();
  try {
    const at = 5 * REGION;
    const data = random(4096);
    await mirror.write(at, data);
    assert.equal(store.durableBitmap()![5], 0b11);
    legs.b.holdFlushes = flush.promise;
    clock.advance(MIRROR_CLEAR_DELAY_MS); // the region is idle: the sweep flushes both legs
    await turn();
    assert.deepEqual(legs.a.inner.durable.subarray(at, at + data.length), data, "a flushed");
    assert.notDeepEqual(legs.b.inner.durable.subarray(at, at + data.length), data, "b did not");
    assert.equal(store.durableBitmap()![5], 0b11, "no mark cleared while b's flush runs");
    assert.equal(mode(mirror, "b")?.dirtyRegions, 1);
    legs.b.holdFlushes = null;
    flush.release();
    await turn();
    assert.deepEqual(legs.b.inner.durable.subarray(at, at + data.length), data);
    assert.equal(store.durableBitmap()![5], 0, "both marks clear once both legs flushed");
  } finally {
    legs.b.holdFlushes = null;
    flush.release();
    await mirror.close();
  }
});

Deno.test("a leg whose writes fail goes out of sync, the array serves on, and the leg catches up once it answers", async () => {
  const { mirror, legs, clock, log } = await settledMirror(memory("a"), memory("b"));
  try {
    const at = 2 * REGION;
    const data = random(4096);
    legs.b.failing = true;
    await mirror.write(at, data);
    assert.equal(mode(mirror, "b")?.state, "out-of-sync");
    assert.equal(mode(mirror, "b")?.reason, "b: failing");
    assert.ok(log.lines.some((l) => l.includes("leg b is out of sync (b: failing); 1 in-sync")));
    const back = new Uint8Array(data.length);
    await mirror.read(at, back);
    assert.deepEqual(back, data, "read from a");
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), new Uint8Array(4096));

    legs.b.failing = false;
    const from = log.lines.length;
    clock.advance(MIRROR_SUPERVISE_MS); // the supervisor finds b reachable: a resync
    await log.when(/leg b is in sync/, from);
    assert.ok(log.lines.slice(from).some((l) => l.includes(`resync of b: 1 of ${REGIONS}`)));
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
    assert.equal(mode(mirror, "b")?.state, "in-sync");
  } finally {
    await mirror.close();
  }
});

Deno.test("the last in-sync leg never leaves sync: its failures are EIO, and it serves again once it answers", async () => {
  const { mirror, legs, log } = await settledMirror(memory("a"), memory("b"));
  try {
    legs.b.failing = true;
    await mirror.write(0, random(4096)); // b leaves sync; a is the last in-sync leg
    legs.a.failing = true;
    const eio = (error: unknown) => error instanceof DeviceError && error.errno === "EIO";
    await assert.rejects(mirror.write(0, random(4096)), eio);
    await assert.rejects(mirror.read(0, new Uint8Array(4096)), eio);
    assert.equal(mode(mirror, "a")?.state, "in-sync");
    assert.equal(mode(mirror, "a")?.reason, "a: failing");
    assert.ok(log.lines.some((l) => l.includes("leg a, the last in-sync leg, failed")));

    legs.a.failing = false;
    const data = random(4096);
    await mirror.write(0, data);
    const back = new Uint8Array(data.length);
    await mirror.read(0, back);
    assert.deepEqual(back, data);
    assert.equal(mode(mirror, "a")?.state, "in-sync");
    assert.equal(mode(mirror, "a")?.reason, undefined);
    assert.ok(log.lines.some((l) => l.includes("leg a, the last in-sync leg, answers again")));
  } finally {
    await mirror.close();
  }
});

Deno.test("reopened from its state, a mirror gives a leg someone else wrote to a full copy", async () => {
  const first = await settledMirror(memory("a"), memory("b"));
  const { legs, generations, log, open } = first;
  await first.mirror.write(0, random(4096));
  await first.mirror.close();
  // While the mirror is down another writer is granted b: its generation moves on.
  legs.b.inner.bytes.set(random(4096), 7 * REGION);
  generations.b = 2;
  const from = log.lines.length;
  const mirror = await open();
  try {
    await log.when(/leg b is in sync/, from);
    const lines = log.lines.slice(from);
    assert.ok(lines.some((l) => l.includes("leg b was written by someone else while away")));
    assert.ok(lines.some((l) => l.includes(`resync of b: ${REGIONS} of ${REGIONS} regions`)));
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
  } finally {
    await mirror.close();
  }
});

Deno.test("a detached leg keeps its snapshot, the only in-sync leg cannot be detached, and attach copies only what changed", async () => {
  const { mirror, legs, log } = await settledMirror(memory("a"), memory("b"));
  try {
    assert.match(await mirror.detach("b"), /^b detached; its data is a snapshot/);
    await assert.rejects(mirror.detach("a"), /a is the only in-sync leg/);
    const snapshot = legs.b.inner.bytes.slice();
    await mirror.write(REGION, random(4096));
    assert.ok(sameBytes(legs.b.inner.bytes, snapshot), "b keeps its snapshot");
    const from = log.lines.length;
    assert.equal(await mirror.attach("b"), `b attached; resyncing 1 of ${REGIONS} regions`);
    await log.when(/leg b is in sync/, from);
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
  } finally {
    await mirror.close();
  }
});

Deno.test("leg transitions refuse a leg in another mode, and checkLegs a mirror with no in-sync leg", () => {
  const record: LegRecord = {
    slot: 0,
    name: "a",
    exportId: "a".repeat(32),
    generation: 1,
    state: "in-sync",
  };
  const leg: Leg = newLeg(record, { mode: "in-sync", device: memory("a"), reason: null });
  assert.throws(() => finishResync(leg), AssertionError);
  checkLegs([leg], [record], REGIONS);
  leaveSync(leg, "test");
  assert.equal(leg.state.mode, "out-of-sync");
  assert.throws(() => checkLegs([leg], [record], REGIONS), /Invariant 2/);
});
