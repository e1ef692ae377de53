/**
 * One seeded run of the mirror simulation. From one number it draws the shape (2 or 3
 * legs, sizes), then a schedule of random I/O (writes, FUA writes, flushes, reads)
 * and faults (links cut, cut with the old bytes delivered late, partitions, export
 * crashes with and without power loss, exports that lose their state, disks whose
 * flushes fail, array crashes with and without power loss), then heals everything and
 * lets the mirror settle. Everything runs on simulated time in one process, so a
 * minute of faults takes milliseconds and a seed replays exactly.
 *
 * What it checks (and fails the seed on):
 * 1. Every read returns what the disk model (model.ts) allows: acknowledged writes,
 *    and what an acknowledged flush covered, read back.
 * 2. A leg is never trusted wrongly: a leg the mirror calls in sync holds what the
 *    model allows in every sector its durable bitmap marks clean (sampled each step,
 *    all of them at the end).
 * 3. Once healed, the mirror settles: every leg in sync, no region marked.
 * 4. Then every leg holds the same bytes, in cache and (after a flush) on stable
 *    storage, and they are what the model allows.
 */

import type { MirrorDevice } from "../../src/array/mirror.ts";
import { digest, DiskModel, SECTOR } from "./model.ts";
import { SimNetwork } from "./network.ts";
import { prng } from "./prng.ts";
import { Scheduler } from "./scheduler.ts";
import { type ExportNode, World } from "./world.ts";

export interface SimOutcome {
  seed: number;
  /** Why the seed failed, or null. */
  failure: string | null;
  /** The schedule as it ran: one line per action or fault, with its simulated time. */
  schedule: string[];
  /** The components' log lines (only when asked for: a replay). */
  log: string[];
  simulatedMs: number;
  ops: number;
}

/** How long the faults go on, and how long the healed mirror gets to settle. */
const FAULT_PHASE_MS = 10_000;
const SETTLE_LIMIT_MS = 180_000;

interface Op {
  kind: "write" | "read" | "flush";
  offset: number;
  length: number;
  /** Which array process it was sent to: an op of a crashed one never answers. */
  array: MirrorDevice;
  settled: boolean;
  values?: number[];
  fua?: boolean;
  token?: { versions: number[] };
}

class SimFailure extends Error {}

export async function simulate(
  seed: number,
  options: { trace?: boolean } = {},
): Promise<SimOutcome> {
  const random = prng(seed);
  const int = (min: number, max: number) => min + Math.floor(random() * (max - min + 1));
  const chance = (p: number) => random() < p;
  const log: string[] = [];
  const schedule: string[] = [];
  const scheduler = new Scheduler();
  const network = new SimNetwork(scheduler, { random, latencyMs: { min: 0, max: 3 } });
  const legs = int(2, 3);
  const regionBytes = [4096, 8192, 16384][int(0, 2)]!;
  const sizeBytes = regionBytes * int(8, 24) - (chance(0.3) ? SECTOR * int(1, 7) : 0);
  const world = new World(scheduler, network, {
    legs,
    sizeBytes,
    regionBytes,
    random,
    trace: options.trace ? (line) => log.push(line) : null,
  });
  const model = new DiskModel(sizeBytes);
  const sectors = sizeBytes / SECTOR;
  const ops = new Set<Op>();
  /** In-flight reads per sector: writes keep off them, so a read checks one state. */
  const reading = new Uint16Array(sectors);
  let opCount = 0;
  let failure: string | null = null;
  /** An open of the array under way (an attempt counter: a crash abandons the attempt). */
  let reopening = false;
  let openAttempt = 0;

  const note = (line: string) => schedule.push(`${scheduler.nowMs()} ${line}`);
  const fail = (why: string) => {
    failure ??= `at ${scheduler.nowMs()} ms: ${why}`;
  };

  /** Sectors first..last are free of in-flight writes (and, for a write, reads). */
  const free = (first: number, count: number, forWrite: boolean) => {
    for (let s = first; s < first + count; s++) {
      if (model.isBusy(s) || (forWrite && reading[s]! > 0)) return false;
    }
    return true;
  };

  const randomData = (length: number) => {
    const data = new Uint8Array(length);
    for (let i = 0; i < length; i += 4) {
      const word = (random() * 0x100000000) >>> 0;
      data[i] = word & 0xff;
      data[i + 1] = (word >>> 8) & 0xff;
      data[i + 2] = (word >>> 16) & 0xff;
      data[i + 3] = word >>> 24;
    }
    return data;
  };

  const settle = (op: Op, acked: boolean) => {
    if (op.settled) return;
    op.settled = true;
    ops.delete(op);
    const first = op.offset / SECTOR;
    if (op.kind === "write") {
      model.writeSettled(op.offset, op.values!, acked, op.fua === true);
      // Settled while legs restarted or failed flushes: if no leg the mirror may count
      // on holds what may read back, a leg that took it earlier may have lost it since.
      const inSync = inSyncLegs();
      const failing = world.nodes.some((node) => node.disk.failSyncs);
      op.values!.forEach((_, k) => {
        const s = first + k;
        if (model.isBusy(s) || (!model.hasSuspects(s) && !failing)) return;
        if (!trustedCopy(s, inSync, model.allowed(s))) model.taint(s);
      });
    }
    if (op.kind === "read") {
      for (let s = first; s < first + op.length / SECTOR; s++) reading[s]! -= 1;
    }
    if (op.kind === "flush" && acked) model.flushAcked(op.token!);
  };

  const startWrite = (mirror: MirrorDevice) => {
    const count = int(1, Math.min(16, sectors));
    const first = int(0, sectors - count);
    if (!free(first, count, true)) return;
    const data = randomData(count * SECTOR);
    const fua = chance(0.15);
    const op: Op = {
      kind: "write",
      offset: first * SECTOR,
      length: data.length,
      array: mirror,
      settled: false,
      values: DiskModel.digests(data),
      fua,
    };
    note(`write ${op.offset}+${op.length}${fua ? " fua" : ""}`);
    model.writeStarted(op.offset, op.length);
    ops.add(op);
    opCount += 1;
    mirror.write(op.offset, data, fua ? { fua: true } : undefined).then(
      () => settle(op, true),
      () => settle(op, false),
    );
  };

  const startRead = (mirror: MirrorDevice) => {
    const count = int(1, Math.min(32, sectors));
    const first = int(0, sectors - count);
    if (!free(first, count, false)) return;
    const into = new Uint8Array(count * SECTOR);
    const op: Op = {
      kind: "read",
      offset: first * SECTOR,
      length: into.length,
      array: mirror,
      settled: false,
    };
    note(`read ${op.offset}+${op.length}`);
    for (let s = first; s < first + count; s++) reading[s]! += 1;
    ops.add(op);
    opCount += 1;
    mirror.read(op.offset, into).then(
      () => {
        if (op.settled) return;
        const wrong = model.readReturned(op.offset, into);
        if (wrong !== null) fail(`a read returned what no write or flush allows: ${wrong}`);
        settle(op, true);
      },
      () => settle(op, false),
    );
  };

  const startFlush = (mirror: MirrorDevice) => {
    const op: Op = {
      kind: "flush",
      offset: 0,
      length: 0,
      array: mirror,
      settled: false,
      token: model.flushStarted(),
    };
    note("flush");
    ops.add(op);
    opCount += 1;
    mirror.flush().then(() => settle(op, true), () => settle(op, false));
  };

  /** The mirror's view of which legs are in sync, by node index (null: the array is down). */
  const inSyncLegs = (): boolean[] | null => {
    const mirror = world.mirror;
    if (mirror === null) return null;
    const members = mirror.status().members;
    return world.nodes.map((node) =>
      members.some((m) => m.name === node.address && m.state === "in-sync")
    );
  };

  const sectorDigest = (bytes: Uint8Array, s: number) =>
    digest(bytes.subarray(s * SECTOR, (s + 1) * SECTOR));

  /**
   * A leg's export restarted, having lost its disk's cache or not (the mirror cannot
   * tell which), or its disk began failing flushes. Where the model's newest values were unflushed (or a write is in
   * flight), they survive only if another in-sync leg whose export did not restart
   * since holds them; if none does, they may be gone.
   */
  const legSuspect = (index: number, powerLoss: boolean) => {
    const inSync = inSyncLegs();
    // A sector being written is marked too: its write is judged when it is acknowledged.
    const inFlight = [...Array(sectors).keys()].filter((s) => model.isBusy(s));
    for (const s of new Set([...model.unflushed(), ...inFlight])) {
      if (powerLoss) model.noteLossRisk(s);
      model.suspect(s, index);
      if (!model.isBusy(s) && !trustedCopy(s, inSync, model.allowed(s))) model.taint(s);
    }
  };

  /** Whether a leg the mirror may count on (in sync, not suspect, flushing) holds one of `values`. */
  const trustedCopy = (s: number, inSync: boolean[] | null, values: ReadonlySet<number>) =>
    inSync !== null &&
    world.nodes.some((node, j) =>
      inSync[j] && !model.isSuspect(s, j) && !node.disk.failSyncs &&
      values.has(sectorDigest(node.disk.cache, s))
    );

  /** Invariant 2, on `count` sampled sectors (or all). */
  const checkTrust = (count: number | null) => {
    const inSync = inSyncLegs();
    const bitmap = world.store.durableBitmap();
    if (inSync === null || bitmap === null) return;
    const regionOf = (s: number) => Math.floor((s * SECTOR) / regionBytes);
    const check = (s: number) => {
      if (model.isBusy(s)) return;
      world.nodes.forEach((node, slot) => {
        if (!inSync[slot] || (bitmap[regionOf(s)]! & (1 << slot)) !== 0) return;
        const value = sectorDigest(node.disk.cache, s);
        if (!model.allowed(s).has(value)) {
          fail(
            `leg ${node.address} is in sync and region ${regionOf(s)} is clean for it, but ` +
              `sector ${s} holds ${value.toString(16)} (on stable storage ` +
              `${sectorDigest(node.disk.durable, s).toString(16)}), not one of ` +
              [...model.allowed(s)].map((v) => v.toString(16)).join(", "),
          );
        }
      });
    };
    if (count === null) { for (let s = 0; s < sectors; s++) check(s); }
    else for (let i = 0; i < count; i++) check(int(0, sectors - 1));
  };

  const crashArray = (powerLoss: boolean) => {
    note(`crash array${powerLoss ? " (power loss)" : ""}`);
    for (const op of [...ops]) settle(op, false); // nobody will answer them now
    world.crashArray(powerLoss);
    openAttempt += 1; // an open under way died with the process
    reopening = false;
    // A leg lost power while values were unflushed: the reopened array cannot know
    // which leg lost them, so they may be gone.
    for (const s of model.atRisk()) model.taint(s);
  };

  const reopenArray = async (): Promise<void> => {
    if (reopening || world.arrayProcess !== null) return;
    reopening = true;
    const attempt = ++openAttempt;
    note("open array");
    try {
      await world.openArray();
      note("array open");
    } catch (error) {
      note(`array open failed: ${error instanceof Error ? error.message.split("\n")[0] : error}`);
    } finally {
      if (attempt === openAttempt) reopening = false;
    }
  };

  const fault = () => {
    const node = world.nodes[int(0, legs - 1)]!;
    const roll = random();
    if (roll < 0.2) {
      const late = chance(0.5);
      const cut = network.cutClientSide(node.address, { late });
      if (cut > 0) note(`cut ${node.address}${late ? " (late delivery)" : ""}`);
    } else if (roll < 0.3) {
      note("deliver late bytes");
      network.deliverLate();
    } else if (roll < 0.45) {
      const ms = int(100, 3000);
      note(`partition ${node.address} for ${ms} ms`);
      network.partition(`leg${node.index}`, true);
      scheduler.at(ms, () => network.partition(`leg${node.index}`, false));
    } else if (roll < 0.7) {
      if (!node.up) return;
      const powerLoss = chance(0.5);
      const loseState = chance(0.1);
      const ms = int(50, 3000);
      note(
        `crash ${node.address}${powerLoss ? " (power loss)" : ""}` +
          `${loseState ? " losing its export state" : ""}, back in ${ms} ms`,
      );
      legSuspect(node.index, powerLoss);
      node.crash(powerLoss);
      if (loseState) node.loseState();
      scheduler.at(ms, () => {
        if (!node.up) node.start();
      });
    } else if (roll < 0.8) {
      const ms = int(100, 2000);
      note(`${node.address}'s disk fails flushes for ${ms} ms`);
      // A failed flush may have dropped what it did not write out (as Linux drops dirty
      // pages after a failed fsync): the mirror can count on that leg no more than on
      // a restarted one.
      legSuspect(node.index, false);
      node.disk.failSyncs = true;
      node.syncFailed = true;
      scheduler.at(ms, () => {
        node.disk.failSyncs = false;
        restartFailedExport(node);
      });
    } else {
      if (world.arrayProcess === null) return;
      crashArray(chance(0.3));
      const ms = int(50, 2000);
      scheduler.at(ms, () => void reopenArray());
    }
  };

  /**
   * The disk works again, but an export whose fdatasync failed fails every sync until
   * it is restarted (what the failed one covered may not be on disk): its operator
   * restarts it, as its errors say.
   */
  const restartFailedExport = (node: ExportNode) => {
    if (!node.syncFailed || !node.up) return;
    note(`restart ${node.address} (its fdatasync failed)`);
    legSuspect(node.index, false);
    node.crash(false);
    node.start();
  };

  const step = async (ms: number) => {
    await scheduler.advance(ms);
    if (failure !== null) throw new SimFailure(failure);
  };

  try {
    for (const node of world.nodes) node.start();
    note(`${legs} legs of ${sizeBytes} bytes, regions of ${regionBytes}`);
    void reopenArray();
    await scheduler.runUntil(() => !reopening, 30_000);
    if (world.mirror === null) throw new SimFailure("the new mirror did not open");

    // Faults and I/O.
    while (scheduler.nowMs() < FAULT_PHASE_MS) {
      await step(int(1, 60));
      const mirror = world.mirror;
      if (chance(0.06)) fault();
      else if (mirror !== null && ops.size < 8) {
        const roll = random();
        if (roll < 0.55) startWrite(mirror);
        else if (roll < 0.85) startRead(mirror);
        else startFlush(mirror);
      } else if (mirror === null && !reopening) {
        void reopenArray();
      }
      checkTrust(8);
    }

    // Heal everything, then let the mirror settle.
    note("heal");
    for (const node of world.nodes) {
      network.partition(`leg${node.index}`, false);
      node.disk.failSyncs = false;
      restartFailedExport(node);
      if (!node.up) node.start();
    }
    network.deliverLate();
    const settled = () => {
      if (world.mirror === null) {
        if (!reopening) void reopenArray();
        return false;
      }
      if (ops.size > 0) return false;
      return world.mirror.status().members.every((m) =>
        m.state === "in-sync" && m.dirtyRegions === 0
      );
    };
    if (!(await scheduler.runUntil(settled, SETTLE_LIMIT_MS))) {
      const members = world.mirror?.status().members ?? "the array is not open";
      throw new SimFailure(
        `the healed mirror did not settle in ${SETTLE_LIMIT_MS / 1000} s: ` +
          JSON.stringify(members),
      );
    }
    note("settled");
    checkTrust(null);
    if (failure !== null) throw new SimFailure(failure);

    // Every leg the same, and what the model allows, in cache and on stable storage.
    const mirror = world.mirror!;
    const whole = new Uint8Array(sizeBytes);
    let read = false;
    void mirror.read(0, whole).then(() => (read = true), (e) => fail(`final read failed: ${e}`));
    await scheduler.runUntil(() => read || failure !== null, 10_000);
    if (!read) throw new SimFailure(failure ?? "the final read did not finish");
    const wrong = model.readReturned(0, whole);
    if (wrong !== null) throw new SimFailure(`after settling, ${wrong}`);
    let flushed = false;
    // A flush may first report a loss the mirror saw (the only in-sync leg restarted
    // with writes unflushed; the model allowed for it): reported once, then it flushes.
    const finalFlush = () =>
      mirror.flush().catch((e) => {
        if (!/may be lost/.test(String(e))) throw e;
        return mirror.flush();
      });
    void finalFlush().then(() => (flushed = true), (e) => fail(`final flush failed: ${e}`));
    await scheduler.runUntil(() => flushed || failure !== null, 10_000);
    if (!flushed) throw new SimFailure(failure ?? "the final flush did not finish");
    for (const node of world.nodes) {
      for (
        const [what, bytes] of [["cache", node.disk.cache], [
          "stable storage",
          node.disk.durable,
        ]] as const
      ) {
        const at = bytes.findIndex((b, i) => b !== whole[i]);
        if (at >= 0) {
          throw new SimFailure(
            `after settling, leg ${node.address}'s ${what} differs from what the mirror ` +
              `reads at byte ${at} (sector ${Math.floor(at / SECTOR)})`,
          );
        }
      }
    }
    let closed = false;
    void mirror.close().then(() => (closed = true), (e) => fail(`close failed: ${e}`));
    await scheduler.runUntil(() => closed || failure !== null, 30_000);
    if (!closed) throw new SimFailure(failure ?? "the mirror did not close");
  } catch (error) {
    if (!(error instanceof SimFailure)) {
      failure ??= `the simulation itself threw: ${
        error instanceof Error ? error.stack ?? error.message : error
      }`;
    } else failure ??= error.message;
  } finally {
    // Whatever is left: every process dies, so no timer of this seed outlives it.
    world.ended = true;
    world.arrayProcess?.kill();
    for (const node of world.nodes) node.process?.kill();
  }
  return { seed, failure, schedule, log, simulatedMs: scheduler.nowMs(), ops: opCount };
}
