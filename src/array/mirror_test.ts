/**
 * A mirror of in-memory legs, in one process and on a clock the test moves: no
 * network, no files. Its state is a MemoryMirrorStore, whose bitmap syncs a test can
 * hold; its legs are MemoryDevices (VolatileDevices where a lost cache matters)
 * behind a wrapper that fails every request, or holds flushes, when told to.
 */

import assert from "node:assert/strict";
import { MIRROR_CLEAR_DELAY_MS, MIRROR_SUPERVISE_MS } from "../constants.ts";
import type {
  BlockDevice,
  DeviceStats,
  IoFlags,
  ReconnectListener,
} from "../device/block_device.ts";
import { MemoryDevice } from "../device/memory_device.ts";
import { VolatileDevice } from "../device/volatile_device.ts";
import { AssertionError } from "../lib/assert.ts";
import { DeviceError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { randomBytes } from "../../tests/helpers/random_bytes.ts";
import { MemoryMirrorStore } from "./memory_mirror_store.ts";
import { MirrorDevice } from "./mirror.ts";
import { checkLegs, finishResync, leaveSync, type Leg, newLeg } from "./mirror_leg.ts";
import type { LegRecord } from "./mirror_state.ts";
import { manyTurns } from "../../tests/helpers/turns.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";

const SIZE = 1024 * 1024;
const REGION = 64 * 1024;
const REGIONS = SIZE / REGION;

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

  /** Whether a line from line `from` on holds `text`. */
  has(text: string, from = 0): boolean {
    return this.lines.slice(from).some((line) => line.includes(text));
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

/** A leg's disk in memory, whose bytes a test reads directly. */
type InMemory = BlockDevice & { readonly bytes: Uint8Array };

/** A leg's device that fails every request while `failing`, and holds flushes on `holdFlushes`. */
class TestDevice<D extends InMemory = MemoryDevice> implements BlockDevice {
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

/**
 * A leg whose connection can be made again to a restarted export (Reconnecting), as a
 * RemoteDevice reports it: restart() is a power loss of its disk, then the reconnect.
 */
class RestartingDevice extends TestDevice<VolatileDevice> {
  /** Set false to stand for a connection that is down while the device redials. */
  connected = true;
  readonly gaveUp = false;
  #listener: ReconnectListener | null = null;

  setReconnectListener(listener: ReconnectListener): void {
    this.#listener = listener;
  }

  /** The export's node lost power and came back: what it had not flushed is gone. */
  restart(): void {
    this.inner.powerLoss();
    this.#listener?.({ writeGeneration: 1, writeEpoch: "e".repeat(32), restarted: true });
  }
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

/** Mirrors of legs "a" and "b" made of `a` and `b`, on one store, clock and log. */
class Rig<A extends InMemory, B extends InMemory> {
  readonly legs: { a: TestDevice<A>; b: TestDevice<B> };
  readonly generations = { a: 1, b: 1 };
  /** Legs whose member cannot be opened now (their export is down). */
  readonly unreachable = new Set<string>();
  readonly store = new MemoryMirrorStore();
  readonly clock = new ManualClock();
  readonly log = new TestLog();
  readonly #releases: Array<() => void> = [];

  /** Legs are wrapped in a TestDevice, unless given as one (a RestartingDevice, say). */
  constructor(a: A | TestDevice<A>, b: B | TestDevice<B>) {
    this.legs = {
      a: a instanceof TestDevice ? a : new TestDevice(a),
      b: b instanceof TestDevice ? b : new TestDevice(b),
    };
  }

  open(): Promise<MirrorDevice> {
    return MirrorDevice.open(["a", "b"], {
      store: this.store,
      regionBytes: REGION,
      clock: this.clock,
      log: this.log,
      openLeg: (name) => {
        if (name !== "a" && name !== "b") return Promise.reject(new Error(`no leg ${name}`));
        if (this.unreachable.has(name)) return Promise.reject(new Error(`${name} is down`));
        return Promise.resolve({
          device: this.legs[name],
          generation: this.generations[name],
          epoch: "e".repeat(32),
        });
      },
    });
  }

  /** A hold for the store's syncs or a leg's flushes; release() lets them go. */
  hold(): { promise: Promise<void>; release: () => void } {
    let resolve = () => {};
    const promise = new Promise<void>((r) => (resolve = r));
    const release = () => {
      if (this.store.holdSyncs === promise) this.store.holdSyncs = null;
      for (const leg of [this.legs.a, this.legs.b]) {
        if (leg.holdFlushes === promise) leg.holdFlushes = null;
      }
      resolve();
    };
    this.#releases.push(release);
    return { promise, release };
  }

  /** Lets every hold go, so a mirror can close. */
  releaseAll(): void {
    for (const release of this.#releases) release();
  }
}

/**
 * Runs `body` on a new mirror of `a` and `b` once b has its full copy of a; then lets
 * every hold go and closes it.
 */
async function withMirror<A extends InMemory, B extends InMemory>(
  a: A,
  b: B,
  body: (mirror: MirrorDevice, rig: Rig<A, B>) => Promise<void> | void,
): Promise<void> {
  const rig = new Rig(a, b);
  const mirror = await rig.open();
  try {
    await rig.log.when(/leg b is in sync/);
    await body(mirror, rig);
  } finally {
    rig.releaseAll();
    await mirror.close();
  }
}

function member(mirror: MirrorDevice, name: string) {
  return mirror.status().members.find((m) => m.name === name);
}

Deno.test("a new mirror copies its source to the other leg, and then the legs are equal and clean", async () => {
  const a = memory("a");
  a.bytes.set(randomBytes(SIZE));
  await withMirror(a, memory("b"), (mirror, { log, legs }) => {
    assert.ok(log.has("new mirror: no leg was ever written; a, the first, is the source"));
    assert.ok(log.has(`resync of b: ${REGIONS} of ${REGIONS} regions`));
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "b holds a's data");
    for (const leg of mirror.status().members) {
      assert.equal(leg.state, "in-sync");
      assert.equal(leg.dirtyRegions, 0);
    }
  });
});

Deno.test("a write reaches every leg and reads back", () =>
  withMirror(memory("a"), memory("b"), async (mirror, { legs }) => {
    const at = REGION - 1000; // across a region boundary
    const data = randomBytes(5000);
    await mirror.write(at, data);
    const back = new Uint8Array(data.length);
    await mirror.read(at, back);
    assert.deepEqual(back, data);
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), data);
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), data);
  }));

Deno.test("a write reaches no leg before its mark is durable", () =>
  withMirror(memory("a"), memory("b"), async (mirror, rig) => {
    const { legs, store } = rig;
    const at = 3 * REGION;
    const data = randomBytes(4096);
    const sync = rig.hold();
    store.holdSyncs = sync.promise;
    const writing = mirror.write(at, data);
    await manyTurns();
    const zeroes = new Uint8Array(data.length);
    assert.notEqual(store.durableBitmap()![3], 0b11, "the mark is not durable yet");
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), zeroes, "a waits");
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), zeroes, "b waits");
    sync.release();
    await writing;
    assert.equal(store.durableBitmap()![3], 0b11, "marked for both legs");
    assert.deepEqual(legs.a.inner.bytes.subarray(at, at + data.length), data);
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), data);
  }));

Deno.test("a region's marks are not cleared before every leg holding it was flushed", () =>
  withMirror(volatile("a"), volatile("b"), async (mirror, rig) => {
    const { legs, store, clock } = rig;
    const at = 5 * REGION;
    const data = randomBytes(4096);
    await mirror.write(at, data);
    assert.equal(store.durableBitmap()![5], 0b11);
    const flush = rig.hold();
    legs.b.holdFlushes = flush.promise;
    clock.advance(MIRROR_CLEAR_DELAY_MS); // the region is idle: the sweep flushes both legs
    await manyTurns();
    assert.deepEqual(legs.a.inner.durable.subarray(at, at + data.length), data, "a flushed");
    assert.notDeepEqual(legs.b.inner.durable.subarray(at, at + data.length), data, "b did not");
    assert.equal(store.durableBitmap()![5], 0b11, "no mark cleared while b's flush runs");
    assert.equal(member(mirror, "b")?.dirtyRegions, 1);
    flush.release();
    await manyTurns();
    assert.deepEqual(legs.b.inner.durable.subarray(at, at + data.length), data);
    assert.equal(store.durableBitmap()![5], 0, "both marks clear once both legs flushed");
  }));

Deno.test("a write that enters a region as its legs' flush ends keeps the region marked", async () => {
  // The sweep clears a region's marks after the legs' flush unless the region was
  // written meanwhile. A write entering just as the flush resolves must be seen:
  // try it at every point of the few promise turns between the two.
  for (let turns = 0; turns < 40; turns++) {
    await withMirror(volatile("a"), volatile("b"), async (mirror, rig) => {
      const { legs, store, clock } = rig;
      const at = 5 * REGION;
      await mirror.write(at, randomBytes(4096));
      const flush = rig.hold();
      legs.b.holdFlushes = flush.promise;
      clock.advance(MIRROR_CLEAR_DELAY_MS); // the sweep flushes both legs; b's is held
      await manyTurns();
      flush.release();
      for (let i = 0; i < turns; i++) await Promise.resolve();
      const data = randomBytes(4096);
      await mirror.write(at + 8192, data);
      await manyTurns();
      // Nothing flushed the second write since it landed: its region must stay marked.
      const unflushed = !sameBytes(legs.b.inner.durable.subarray(at + 8192, at + 12288), data);
      if (unflushed) {
        assert.equal(member(mirror, "b")?.dirtyRegions, 1, `written ${turns} turns after`);
        assert.equal(store.durableBitmap()![5], 0b11, `written ${turns} turns after`);
      }
    });
  }
});

Deno.test("a leg whose writes fail goes out of sync, the array serves on, and the leg catches up once it answers", () =>
  withMirror(memory("a"), memory("b"), async (mirror, { legs, clock, log }) => {
    const at = 2 * REGION;
    const data = randomBytes(4096);
    legs.b.failing = true;
    await mirror.write(at, data);
    assert.equal(member(mirror, "b")?.state, "out-of-sync");
    assert.equal(member(mirror, "b")?.reason, "b: failing");
    assert.ok(log.has("leg b is out of sync (b: failing); 1 in-sync leg left"));
    const back = new Uint8Array(data.length);
    await mirror.read(at, back);
    assert.deepEqual(back, data, "read from a");
    assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), new Uint8Array(4096));

    legs.b.failing = false;
    const from = log.lines.length;
    clock.advance(MIRROR_SUPERVISE_MS); // the supervisor finds b reachable: a resync
    await log.when(/leg b is in sync/, from);
    assert.ok(log.has(`resync of b: 1 of ${REGIONS} regions`, from), "only what it missed");
    assert.ok(log.has("leg b is in sync: copied 1 region,", from), "one region, not '1 regions'");
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
    assert.equal(member(mirror, "b")?.state, "in-sync");
  }));

Deno.test("the last in-sync leg never leaves sync: its failures are EIO, and it serves again once it answers", () =>
  withMirror(memory("a"), memory("b"), async (mirror, { legs, log }) => {
    legs.b.failing = true;
    await mirror.write(0, randomBytes(4096)); // b leaves sync; a is the last in-sync leg
    legs.a.failing = true;
    const eio = (error: unknown) => error instanceof DeviceError && error.errno === "EIO";
    await assert.rejects(mirror.write(0, randomBytes(4096)), eio);
    await assert.rejects(mirror.read(0, new Uint8Array(4096)), eio);
    assert.equal(member(mirror, "a")?.state, "in-sync");
    assert.equal(member(mirror, "a")?.reason, "a: failing");
    assert.ok(log.has("leg a, the last in-sync leg, failed (a: failing)"));

    legs.a.failing = false;
    const data = randomBytes(4096);
    await mirror.write(0, data);
    const back = new Uint8Array(data.length);
    await mirror.read(0, back);
    assert.deepEqual(back, data);
    assert.equal(member(mirror, "a")?.state, "in-sync");
    assert.equal(member(mirror, "a")?.reason, undefined);
    assert.ok(log.has("leg a, the last in-sync leg, answers again"));
  }));

Deno.test("reopened with the other in-sync leg down, a leg someone else wrote to is not trusted, whatever the legs' order", async () => {
  for (const [written, down] of [["a", "b"], ["b", "a"]] as const) {
    const rig = new Rig(memory("a"), memory("b"));
    const { generations, log, unreachable } = rig;
    const first = await rig.open();
    await log.when(/leg b is in sync/);
    await first.close();
    // While the mirror is down, one leg is written by another writer and the other's
    // export goes down: the one that is down holds the mirror's newest data.
    generations[written] = 2;
    unreachable.add(down);
    await assert.rejects(
      rig.open(),
      new RegExp(`No in-sync leg of the mirror is reachable .*${down} holds the newest data`),
      `${written} written by someone else, ${down} down`,
    );
  }
});

Deno.test("an open that fails leaves the bitmap closed", async () => {
  const rig = new Rig(memory("a"), memory("b"));
  const first = await rig.open();
  await rig.log.when(/leg b is in sync/);
  await first.close();
  let opened = 0;
  let closed = 0;
  const openBitmap = rig.store.openBitmap.bind(rig.store);
  rig.store.openBitmap = async (regions, create) => {
    const file = await openBitmap(regions, create);
    opened += 1;
    return { ...file, close: () => void (closed += 1) };
  };
  // Both legs answer, but the source cannot flush: the open fails after the bitmap opened.
  rig.legs.a.failing = true;
  rig.legs.b.failing = true;
  await assert.rejects(rig.open());
  assert.equal(opened, 1);
  assert.equal(closed, 1, "the failed open closed the bitmap it had opened");
});

Deno.test("reopened from its state, a mirror gives a leg someone else wrote to a full copy", async () => {
  const rig = new Rig(memory("a"), memory("b"));
  const { legs, generations, log } = rig;
  const first = await rig.open();
  await log.when(/leg b is in sync/);
  await first.write(0, randomBytes(4096));
  await first.close();
  // While the mirror is down another writer is granted b: its generation moves on.
  legs.b.inner.bytes.set(randomBytes(4096), 7 * REGION);
  generations.b = 2;
  const from = log.lines.length;
  const mirror = await rig.open();
  try {
    await log.when(/leg b is in sync/, from);
    assert.ok(log.has("leg b was written by someone else while away", from));
    assert.ok(log.has(`resync of b: ${REGIONS} of ${REGIONS} regions`, from));
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
  } finally {
    await mirror.close();
  }
});

Deno.test("a detached leg keeps its snapshot, the only in-sync leg cannot be detached, and attach copies only what changed", () =>
  withMirror(memory("a"), memory("b"), async (mirror, { legs, log }) => {
    assert.match(await mirror.detach("b"), /^b detached; its data is a snapshot/);
    await assert.rejects(mirror.detach("a"), /a is the only in-sync leg/);
    const snapshot = legs.b.inner.bytes.slice();
    await mirror.write(REGION, randomBytes(4096));
    assert.ok(sameBytes(legs.b.inner.bytes, snapshot), "b keeps its snapshot");
    const from = log.lines.length;
    assert.equal(await mirror.attach("b"), `b attached; resyncing 1 of ${REGIONS} regions`);
    await log.when(/leg b is in sync/, from);
    assert.ok(sameBytes(legs.a.inner.bytes, legs.b.inner.bytes), "the legs are equal");
  }));

Deno.test("status() shows a leg whose connection is down as not connected, its mode unchanged", async () => {
  const b = new RestartingDevice(volatile("b"));
  const rig = new Rig(memory("a"), b);
  const mirror = await rig.open();
  try {
    await rig.log.when(/leg b is in sync/);
    assert.deepEqual(member(mirror, "b")?.connected, true);
    b.connected = false; // its export went away; no request has failed yet
    assert.equal(member(mirror, "b")?.state, "in-sync");
    assert.equal(member(mirror, "b")?.connected, false);
    assert.equal(member(mirror, "a")?.connected, true, "a device that never reconnects is up");
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
  leaveSync(leg, "test", [record]);
  assert.equal(leg.state.mode, "out-of-sync");
  assert.equal(record.leftSyncSeq, 1, "a leg that leaves in-sync is stamped with the order");
  assert.throws(() => checkLegs([leg], [record], REGIONS), /Invariant 2/);
});

/**
 * The only in-sync leg, a, holds a write b missed (unflushed); b is resyncing, its
 * copy of that region in its cache and its flush held. Then a's node loses power and
 * its export comes back: returns the rig, the mirror and where the write was.
 */
async function lastLegRestartsDuringResync() {
  const a = new RestartingDevice(volatile("a"));
  const rig = new Rig(a, volatile("b"));
  const mirror = await rig.open();
  await rig.log.when(/leg b is in sync/);
  const { legs, clock } = rig;
  for (let i = 0; i < 2; i++) {
    clock.advance(MIRROR_CLEAR_DELAY_MS); // the first copy's marks clear
    await manyTurns();
  }
  const at = 5 * REGION;
  const data = randomBytes(4096);
  legs.b.failing = true;
  await mirror.write(at, data); // a takes it, unflushed; b fails and leaves sync
  legs.b.failing = false;
  assert.equal(member(mirror, "b")?.state, "out-of-sync");
  const aFlush = rig.hold();
  a.holdFlushes = aFlush.promise;
  const bFlush = rig.hold();
  legs.b.holdFlushes = bFlush.promise;
  clock.advance(MIRROR_SUPERVISE_MS); // b's resync copies the region; its flush is held
  await manyTurns();
  assert.equal(member(mirror, "b")?.state, "resyncing");
  assert.deepEqual(legs.b.inner.bytes.subarray(at, at + data.length), data, "b has the copy");
  a.restart();
  await manyTurns();
  return { rig, mirror, a, at, data, release: () => [aFlush, bFlush].forEach((h) => h.release()) };
}

Deno.test("the only in-sync leg restarts while a resync flushes its copies: the legs end equal", async () => {
  const { rig, mirror, at, data, release } = await lastLegRestartsDuringResync();
  try {
    release(); // b's flush of the copy it made before a lost the write
    await manyTurns();
    for (let i = 0; i < 10; i++) {
      rig.clock.advance(MIRROR_SUPERVISE_MS);
      await manyTurns();
    }
    assert.deepEqual(
      mirror.status().members.map((m) => [m.name, m.state, m.dirtyRegions]),
      [["a", "in-sync", 0], ["b", "in-sync", 0]],
    );
    const aBytes = rig.legs.a.inner.bytes.subarray(at, at + data.length);
    const bBytes = rig.legs.b.inner.bytes.subarray(at, at + data.length);
    assert.ok(sameBytes(aBytes, bBytes), "both in-sync legs hold the same bytes");
  } finally {
    rig.releaseAll();
    await mirror.close();
  }
});

for (const when of ["spans", "follows"] as const) {
  Deno.test(`a mirror flush that ${when} the only in-sync leg's restart fails (EIO), once`, async () => {
    const a = new RestartingDevice(volatile("a"));
    const rig = new Rig(a, volatile("b"));
    const mirror = await rig.open();
    try {
      await rig.log.when(/leg b is in sync/);
      rig.legs.b.failing = true;
      await mirror.write(5 * REGION, randomBytes(4096)); // acknowledged by a alone, unflushed
      const hold = rig.hold();
      if (when === "spans") a.holdFlushes = hold.promise;
      const flushing = when === "spans" ? mirror.flush() : null;
      await manyTurns();
      a.restart(); // the write is gone with a's cache
      hold.release();
      await assert.rejects(flushing ?? mirror.flush(), /may be lost/, "it cannot vouch for it");
      await mirror.flush(); // reported once: later flushes vouch for what came after
    } finally {
      rig.legs.b.failing = false;
      rig.releaseAll();
      await mirror.close();
    }
  });
}
