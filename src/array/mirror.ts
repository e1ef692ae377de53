/**
 * A mirror: every leg holds the whole device (README, "dst array" and its fault table).
 *
 * Leg modes: in-sync (read from, written to), resyncing (written to, and its dirty
 * regions copied from an in-sync leg meanwhile), out-of-sync (failed or away; its
 * missed regions stay marked), detached (taken out by the user: a snapshot).
 *
 * - Writes go to every in-sync and resyncing leg; the ack goes up once all of them
 *   answered. A leg that fails (its transactions used up every resend) goes
 *   out-of-sync and the array goes on degraded; the caller sees an error only when
 *   no in-sync leg took the write.
 * - Before a write goes out its regions are marked for every leg in the bitmap, on
 *   stable storage (dirty_bitmap.ts); once a region has been idle for a while, and a
 *   flush of each leg that holds its data completed after its last write, those legs'
 *   marks are cleared; resync copies likewise clear only once flushed. So after a
 *   crash of this process, or of a leg's node that lost its volatile cache, the marked
 *   regions are the only ones where in-sync legs may differ.
 * - Overlapping writes: each leg orders overlapping requests in the order they were
 *   issued (RemoteDevice's overlap gate; a file's writes are synchronous), and the
 *   mirror issues a write to all legs in the same turn, so legs never disagree on
 *   the order. A resync copy takes its region alone (region_activity.ts).
 * - Reads go to the in-sync leg with the fewest requests in flight.
 * - A leg's identity is its export id; a leg that comes back with another write
 *   (epoch, generation) than the mirror recorded was written by someone else, or its
 *   export lost its state, and gets a full copy.
 * - The last in-sync leg never leaves sync; a read error is answered from another leg
 *   and the bytes written back; when the state cannot be made durable, no write is
 *   acknowledged.
 */

import {
  MIRROR_CLEAR_DELAY_MS,
  MIRROR_RESYNC_FLUSH_REGIONS,
  MIRROR_RESYNC_PARALLEL,
  MIRROR_SUPERVISE_MS,
} from "../constants.ts";
import {
  type BlockDevice,
  checkRange,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  type IoFlags,
  reconnecting,
} from "../device/block_device.ts";
import { HandshakeRefused } from "../client/dial.ts";
import { describeError, DeviceError, DstError } from "../lib/errors.ts";
import { randomId } from "../lib/hex.ts";
import { formatBytes, formatDuration } from "../lib/units.ts";
import type { Logger } from "../lib/log.ts";
import { type Clock, systemClock, type Timer } from "../lib/clock.ts";
import { DirtyBitmap, LEG_SLOTS_MAX } from "./dirty_bitmap.ts";
import { type LegRecord, type MirrorState, regionCount, STATE_VERSION } from "./mirror_state.ts";
import type { MirrorStore } from "./mirror_store.ts";
import type { OpenedMember } from "./members.ts";
import { RegionActivity } from "./region_activity.ts";

export type LegMode = "in-sync" | "resyncing" | "out-of-sync" | "detached";

export interface ResyncProgress {
  full: boolean;
  regionsDone: number;
  regionsTotal: number;
  bytesCopied: number;
  bytesPerSecond: number;
  etaMs: number | null;
}

export interface MirrorLegStatus {
  name: string;
  state: LegMode;
  exportId: string;
  dirtyRegions: number;
  inFlight: number;
  errors: number;
  resync?: ResyncProgress;
  /** Why a leg is out of sync, when known. */
  reason?: string;
}

export interface MirrorStatus {
  kind: "mirror";
  sizeBytes: number;
  regionBytes: number;
  stateDir: string;
  members: MirrorLegStatus[];
  /** What resyncs copied since this process started. */
  resyncedBytes: number;
}

/**
 * Opens the member `name` as a leg, connecting as `clientId` (the mirror's identity,
 * kept in its store): the CLI's is members.ts's openMember; tests pass their own.
 */
export type LegOpener = (name: string, clientId: Uint8Array) => Promise<OpenedMember>;

export interface MirrorOptions {
  /** Where the state, the bitmap and the identity are kept (mirror_store.ts). */
  store: MirrorStore;
  /** Start over: this member's data is right, the others get a full copy. */
  source?: string;
  regionBytes: number;
  openLeg: LegOpener;
  log: Logger;
  /** Where time and timers come from (default the system's). */
  clock?: Clock;
}

interface Leg {
  record: LegRecord;
  device: BlockDevice | null;
  mode: LegMode;
  inFlight: number;
  errors: number;
  reason: string | null;
  /** Regions still to copy while resyncing (1 = copy), or null. */
  pending: Uint8Array | null;
  resync: ResyncRun | null;
  /** A connect attempt or resync is under way: the supervisor leaves the leg alone. */
  busy: boolean;
  /**
   * Counts the leg's reconnects to a restarted export, which may have lost what it had
   * not flushed: a flush or read that spans one vouches for nothing.
   */
  connections: number;
  lastFailureMs: number;
}

/** Why a device cannot be a leg of a mirror of `sizeBytes` ("is read-only"), or null. */
function checkFit(info: DeviceInfo, sizeBytes: number): string | null {
  if (info.sizeBytes < sizeBytes) {
    return `is ${info.sizeBytes} bytes, smaller than the mirror's ${sizeBytes}`;
  }
  if (info.readOnly) return "is read-only";
  return null;
}

/** Ranges read to tell whether a device is empty: its start, its end, and between. */
const EMPTY_SAMPLES = 16;
const EMPTY_SAMPLE_BYTES = 64 * 1024;

/**
 * Whether `device` reads as zeroes at its start, its end and evenly between: what a
 * filesystem or a partition table puts on a disk lands there. A sample, so a mirror
 * never overwrites such a disk without being told to.
 */
async function looksEmpty(device: BlockDevice): Promise<boolean> {
  const size = device.info.sizeBytes;
  const length = Math.min(EMPTY_SAMPLE_BYTES, size);
  const buffer = new Uint8Array(length);
  for (let i = 0; i < EMPTY_SAMPLES; i++) {
    const offset = Math.floor(((size - length) * i) / (EMPTY_SAMPLES - 1));
    await device.read(offset, buffer);
    for (let j = 0; j < buffer.length; j++) if (buffer[j] !== 0) return false;
  }
  return true;
}

/** The order legs left sync in, kept in the state: the higher, the later (newer data). */
function nextLeftSyncSeq(legs: Leg[]): number {
  return Math.max(0, ...legs.map((l) => l.record.leftSyncSeq ?? 0)) + 1;
}

/** A leg as its record says, not yet doing anything. */
function newLeg(record: LegRecord, device: BlockDevice | null, reason: string | null): Leg {
  return {
    record,
    device,
    mode: record.state,
    inFlight: 0,
    errors: 0,
    reason,
    pending: null,
    resync: null,
    busy: false,
    connections: 0,
    lastFailureMs: Number.NEGATIVE_INFINITY, // never failed: the supervisor may act at once
  };
}

interface ResyncRun {
  /** Regions copied but not yet flushed on the leg: their marks stay until they are. */
  unflushed: number[];
  full: boolean;
  regionsTotal: number;
  regionsDone: number;
  bytesCopied: number;
  startedMs: number;
}

export class MirrorDevice implements BlockDevice {
  readonly info: DeviceInfo;
  readonly #legs: Leg[];
  readonly #state: MirrorState;
  readonly #bitmap: DirtyBitmap;
  readonly #regions: RegionActivity;
  readonly #idle = new Set<number>();
  readonly #stats = emptyStats();
  readonly #log: Logger;
  readonly #options: MirrorOptions;
  readonly #clock: Clock;
  /** The state folder's lock, held until close(). */
  readonly #lock: { release(): void };
  readonly #sweeper: Timer;
  /** The sweep under way, if any (close() waits for it). */
  #sweeping: Promise<void> | null = null;
  /**
   * Regions written while a leg flush that will clear marks runs: one set per such
   * flush. A region written meanwhile keeps its marks (the flush may not cover it).
   */
  readonly #flushWatchers = new Set<Set<number>>();
  readonly #supervisor: Timer;
  /** Waiters for a condition on the legs (close, detach), checked when a leg quiets. */
  readonly #quietWaiters = new Set<{ ready: () => boolean; resolve: () => void }>();
  /** The mirror's identity towards its legs' exports. */
  readonly #clientId: Uint8Array;
  #resyncedBytes = 0;
  #closing = false;
  /** Why the state could not be made durable; while set, writes fail (see #stateFailed). */
  #stateError: Error | null = null;
  #retryingState = false;
  /** The tail of the queue of detach and attach operations: they run one at a time. */
  #controlTurn: Promise<unknown> = Promise.resolve();

  private constructor(
    state: MirrorState,
    legs: Leg[],
    bitmap: DirtyBitmap,
    blockSize: number,
    options: MirrorOptions,
    lock: { release(): void },
    clientId: Uint8Array,
  ) {
    this.#lock = lock;
    this.#clientId = clientId;
    this.#clock = options.clock ?? systemClock;
    this.#state = state;
    this.#legs = legs;
    this.#bitmap = bitmap;
    this.#options = options;
    this.#log = options.log;
    this.info = {
      sizeBytes: state.sizeBytes,
      blockSize,
      readOnly: false,
      id: state.arrayId,
      name: `mirror(${legs.map((l) => l.record.name).join(", ")})`,
    };
    this.#regions = new RegionActivity((region) => this.#idle.add(region));
    this.#sweeper = this.#clock.every(MIRROR_CLEAR_DELAY_MS, () => void this.#sweep());
    this.#supervisor = this.#clock.every(MIRROR_SUPERVISE_MS, () => this.#supervise());
  }

  /**
   * Opens a mirror of `members` with its state in options.store: checks the
   * state against the members, connects every leg, reconciles what a crash left
   * marked, and starts bringing back legs that are behind.
   */
  static async open(members: string[], options: MirrorOptions): Promise<MirrorDevice> {
    if (members.length < 2 || members.length > LEG_SLOTS_MAX) {
      throw new DstError("USAGE", `A mirror has 2 to ${LEG_SLOTS_MAX} legs, not ${members.length}`);
    }
    if (new Set(members).size !== members.length) {
      throw new DstError("USAGE", "A mirror's legs must be different members");
    }
    if (options.source !== undefined && !members.includes(options.source)) {
      throw new DstError("USAGE", `--source ${options.source} is not one of the members`);
    }
    // Before anything opens a leg or writes the state: one array per state folder.
    const lock = options.store.lock();
    try {
      return await MirrorDevice.#openLocked(members, options, lock);
    } catch (error) {
      lock.release();
      throw error;
    }
  }

  static async #openLocked(
    members: string[],
    options: MirrorOptions,
    lock: { release(): void },
  ): Promise<MirrorDevice> {
    // One identity for every leg connection, kept in the store: a restarted mirror is
    // the same writer, so it fences its own old connections and takes its lease back.
    const clientId = options.store.loadOrCreateClientId();
    // No state and no --source: a new mirror, whose source #assemble picks without guessing.
    const previous = options.source === undefined ? options.store.loadState() : null;
    if (previous !== null) {
      const known = previous.legs.map((l) => l.name);
      const same = known.length === members.length && known.every((n) => members.includes(n));
      if (!same) {
        throw new DstError(
          "STATE",
          `The mirror state in ${options.store.where} is for legs ${known.join(", ")}, ` +
            `not ${members.join(", ")}: pass the same legs, another --state, or --source MEMBER ` +
            "to start over from that member's data (the others then get a full copy)",
        );
      }
    }

    const detached = new Set(
      (previous?.legs ?? []).filter((l) => l.state === "detached").map((l) => l.name),
    );
    const opened = await Promise.all(members.map(async (name) => {
      // A detached leg is not opened: opening starts a write generation, and it is a snapshot.
      if (detached.has(name)) return new Error("detached");
      try {
        return await options.openLeg(name, clientId);
      } catch (error) {
        return error instanceof Error ? error : new Error(String(error));
      }
    }));
    try {
      // A leg whose lease another writer holds is not "down": two writers must not share it.
      const leased = opened.findIndex((o) =>
        o instanceof HandshakeRefused && o.code === "WRITE_LEASE_HELD"
      );
      if (leased >= 0) {
        throw new DstError(
          "WRITE_LEASE_HELD",
          `Leg ${members[leased]}: ${(opened[leased] as Error).message}. Another array or ` +
            `client writes to it; a mirror never shares a leg with another writer`,
        );
      }
      return await MirrorDevice.#assemble(members, opened, previous, options, lock, clientId);
    } catch (error) {
      await Promise.allSettled(
        opened.map((o) => o instanceof Error ? undefined : o.device.close()),
      );
      throw error;
    }
  }

  static async #assemble(
    members: string[],
    opened: Array<OpenedMember | Error>,
    previous: MirrorState | null,
    options: MirrorOptions,
    lock: { release(): void },
    clientId: Uint8Array,
  ): Promise<MirrorDevice> {
    const log = options.log;
    let state: MirrorState;
    let fresh = false;
    if (previous === null) {
      // A new mirror (or a start over): every member must be here to size it.
      const missing = members.filter((_, i) => opened[i] instanceof Error);
      if (missing.length > 0) {
        const why = members.map((name, i) =>
          opened[i] instanceof Error ? `${name}: ${(opened[i] as Error).message}` : null
        ).filter((x) => x !== null).join("; ");
        throw new DstError("CONNECT", `Cannot make the mirror, members unreachable: ${why}`);
      }
      const devices = opened as OpenedMember[];
      const ids = devices.map((o) => o.device.info.id);
      const twice = ids.findIndex((id, i) => ids.indexOf(id) !== i);
      if (twice >= 0) {
        throw new DstError(
          "USAGE",
          `${members[ids.indexOf(ids[twice]!)]} and ${members[twice]} are the same export ` +
            `(id ${ids[twice]}): a mirror's legs must be different devices`,
        );
      }
      const readOnly = devices.find((o) => o.device.info.readOnly);
      if (readOnly !== undefined) {
        throw new DstError(
          "USAGE",
          `${readOnly.device.info.name} is read-only; a leg must be writable`,
        );
      }
      const source = options.source ?? await MirrorDevice.#pickSource(members, devices, options);
      const sizeBytes = Math.min(...devices.map((o) => o.device.info.sizeBytes));
      state = {
        version: STATE_VERSION,
        kind: "mirror",
        arrayId: randomId(),
        sizeBytes,
        regionBytes: options.regionBytes,
        legs: members.map((name, slot) => ({
          slot,
          name,
          exportId: devices[slot]!.device.info.id,
          generation: devices[slot]!.generation,
          epoch: devices[slot]!.epoch,
          state: name === source ? "in-sync" : "out-of-sync",
        })),
      };
      fresh = true;
    } else {
      state = previous;
    }
    const regions = regionCount(state.sizeBytes, state.regionBytes);
    const bitmap = DirtyBitmap.open(options.store.openBitmap(regions, fresh), regions);
    if (fresh) {
      for (const leg of state.legs) {
        if (leg.state !== "in-sync") await bitmap.markAll(1 << leg.slot);
      }
    }

    const legs = state.legs.map((record) => newLeg(record, null, null));
    for (const leg of legs) {
      const member = opened[members.indexOf(leg.record.name)]!;
      if (leg.mode === "detached") continue;
      if (member instanceof Error) {
        if (leg.mode === "in-sync") leg.mode = "out-of-sync";
        leg.reason = member.message;
        log.warn(`leg ${leg.record.name} is not reachable: ${member.message}`);
        continue;
      }
      const refusal = MirrorDevice.#checkIdentity(leg.record, member, state.sizeBytes);
      if (refusal !== null) {
        await member.device.close();
        if (leg.mode === "in-sync") leg.mode = "out-of-sync";
        leg.reason = refusal;
        log.error(`leg ${leg.record.name}: ${refusal}`);
        continue;
      }
      leg.device = member.device;
      // A new mirror's records hold the generations it was made with already.
      if (!fresh) await MirrorDevice.#checkGeneration(leg, member, legs, bitmap, log);
    }

    // After a crash, in-sync legs may differ where the bitmap is marked: the first
    // reachable in-sync leg is the truth; the others are brought level from it.
    const source = legs.find((l) => l.mode === "in-sync" && l.device !== null);
    if (source === undefined) {
      await bitmap.close();
      throw new DstError("CONNECT", MirrorDevice.#noSourceAdvice(legs, members, options));
    }
    for (const leg of legs) {
      if (leg.mode === "in-sync" && leg.device === null) leg.mode = "out-of-sync";
    }
    for (const leg of legs) {
      if (leg === source || leg.mode !== "in-sync") continue;
      if (bitmap.count(leg.record.slot) > 0) {
        leg.mode = "out-of-sync";
        leg.reason = "regions marked when the array stopped; reconciling them from " +
          source.record.name;
      }
    }
    // Where only the source is marked (a write it took that the others may not have, or
    // a crash before they were marked), the others are marked too: they are copied.
    const others = legs.filter((l) => l !== source).reduce((m, l) => m | 1 << l.record.slot, 0);
    const sourceOnly: Promise<void>[] = [];
    for (let r = 0; r < regions; r++) {
      if (bitmap.has(r, source.record.slot)) sourceOnly.push(bitmap.mark(r, r, others));
    }
    await Promise.all(sourceOnly);
    for (const leg of legs) {
      if (leg !== source && leg.mode === "in-sync" && bitmap.count(leg.record.slot) > 0) {
        leg.mode = "out-of-sync";
        leg.reason = "regions marked when the array stopped; reconciling them from " +
          source.record.name;
      }
    }
    // The source is the truth from here on: its own marks clear once it is flushed.
    await source.device!.flush();
    for (let r = 0; r < regions; r++) bitmap.clear(r, 1 << source.record.slot);
    await bitmap.flush();

    const blockSize = Math.max(...legs.map((l) => l.device?.info.blockSize ?? 512));
    const mirror = new MirrorDevice(state, legs, bitmap, blockSize, options, lock, clientId);
    for (const leg of legs) mirror.#watch(leg);
    mirror.#save();
    for (const leg of legs) {
      if (leg.mode === "out-of-sync" && leg.device !== null) void mirror.#resync(leg);
    }
    return mirror;
  }

  /** Why an opened member cannot be this leg, or null. */
  /**
   * What to do when no in-sync leg is reachable at start: the in-sync legs hold the
   * newest data (the last one never leaves sync), then the one that left sync last.
   */
  static #noSourceAdvice(legs: Leg[], members: string[], options: MirrorOptions): string {
    const byNewest = [...legs].filter((l) => l.mode !== "detached").sort((a, b) =>
      (a.record.state === "in-sync" ? Infinity : a.record.leftSyncSeq ?? 0) -
      (b.record.state === "in-sync" ? Infinity : b.record.leftSyncSeq ?? 0)
    ).reverse();
    const newest = byNewest[0]?.record.name ?? members[0]!;
    const why = legs.map((l) => `${l.record.name}: ${l.reason ?? l.mode}`).join("; ");
    return `No in-sync leg of the mirror is reachable (${why}). ${newest} holds the newest ` +
      `data: start its export and run this again. Only if it is lost for good, start over ` +
      `from the next newest with\n  dst array mirror ${members.join(" ")} --source ` +
      `${byNewest[1]?.record.name ?? newest} --state ${options.store.where}`;
  }

  /**
   * A new mirror's source when no --source was given, without guessing: each leg's
   * write generation, now that this mirror holds its lease, is 1 exactly when nobody
   * but this mirror was ever granted writing to it. At most one leg written: that one
   * (or the first, when none was) is the source. More than one: their data may differ
   * and only the user knows which is right, so the mirror is refused.
   */
  static async #pickSource(
    members: string[],
    devices: OpenedMember[],
    options: MirrorOptions,
  ): Promise<string> {
    const line = (source: string) =>
      `dst array mirror ${members.join(" ")} --source ${source} --state ${options.store.where}`;
    const written = members.filter((_, i) => devices[i]!.generation > 1);
    if (written.length > 1) {
      throw new DstError(
        "STATE",
        `No mirror state in ${options.store.where}, and more than one leg was written before ` +
          `(${written.join(", ")}): their data may differ. Say which one is right with ` +
          `--source; the others get a full copy of it, e.g.\n  ${line(written[0]!)}\n(to ` +
          `reopen an existing mirror instead, pass the --state DIR it was made with)`,
      );
    }
    const source = written[0] ?? members[0]!;
    // The generation only knows DST's writers: an image filled some other way (mkfs, dd)
    // counts as never written. A leg about to be overwritten must look empty.
    for (let i = 0; i < members.length; i++) {
      if (members[i] === source || await looksEmpty(devices[i]!.device)) continue;
      throw new DstError(
        "STATE",
        `No mirror state in ${options.store.where}, and ${members[i]} holds data (not all ` +
          `zeroes) that no DST writer wrote, which making ${source} the source would ` +
          `overwrite. Say which leg is right with --source, e.g.\n  ${line(source)}`,
      );
    }
    options.log.info(
      written.length === 1
        ? `new mirror: ${source} is the source, the only leg that was ever written; ` +
          "the others get a full copy of it"
        : `new mirror: no leg was ever written; ${source}, the first, is the source ` +
          "(the others get a full copy of it)",
    );
    return source;
  }

  static #checkIdentity(record: LegRecord, member: OpenedMember, sizeBytes: number): string | null {
    const info = member.device.info;
    if (info.id !== record.exportId) {
      return `is a different export now (id ${info.id}, was ${record.exportId}); ` +
        "detach it and attach the new one, or start over with --source";
    }
    return checkFit(info, sizeBytes);
  }

  /**
   * Takes a leg's write generation as of a new connection into its record. A leg
   * whose generation is not the one we recorded was written by someone else: full copy.
   */
  static #checkGeneration(
    leg: Leg,
    stamp: { generation: number; epoch: string },
    legs: Leg[],
    bitmap: DirtyBitmap,
    log: Logger,
  ): Promise<void> {
    // The mirror is the same writer on every connection: any change is someone else's
    // grant, and another epoch is an export that lost its state (anything may have happened).
    const { generation, epoch } = stamp;
    const record = leg.record;
    const sameEpoch = record.epoch === epoch;
    if (generation === record.generation && sameEpoch) return Promise.resolve();
    const what = sameEpoch
      ? `was written by someone else while away (write generation ${generation}, expected ` +
        `${record.generation})`
      : `has lost or replaced its export state (write epoch ${epoch.slice(0, 8)}, recorded ` +
        `${record.epoch === undefined ? "none" : record.epoch.slice(0, 8)})`;
    const othersInSync = legs.some((l) => l !== leg && l.mode === "in-sync");
    let mask = 1 << record.slot;
    if (leg.mode === "in-sync" && !othersInSync) {
      // The only in-sync leg: no better copy exists, so its data stands, and every other
      // leg gets a full copy of it (the foreign writes may be anywhere).
      log.error(
        `leg ${record.name} ${what}; it is the only in-sync leg, so its data stands ` +
          "and the other legs get a full copy of it",
      );
      mask = legs.filter((l) => l !== leg).reduce((m, l) => m | 1 << l.record.slot, 0);
    } else {
      log.warn(`leg ${record.name} ${what}; it gets a full copy`);
      if (leg.mode === "in-sync" || leg.mode === "resyncing") {
        leg.mode = "out-of-sync";
        record.leftSyncSeq = nextLeftSyncSeq(legs);
      }
      leg.reason = sameEpoch ? "written by someone else while away" : "its export lost its state";
    }
    // The record (saved by the caller) names the new generation only once the marks are durable.
    return bitmap.markAll(mask).then(() => {
      record.generation = generation;
      record.epoch = epoch;
    });
  }

  // --- I/O ------------------------------------------------------------------------

  async read(offset: number, into: Uint8Array): Promise<void> {
    checkRange(this.info, "read", offset, into.length);
    if (await this.#readFromSome(offset, into)) {
      this.#stats.reads += 1;
      this.#stats.readBytes += into.length;
      return;
    }
    this.#stats.errors += 1;
    throw new DeviceError("EIO", `${this.info.name}: no in-sync leg could be read`);
  }

  /**
   * Reads from the in-sync legs, least busy first, each at most once. When a leg fails
   * and another answers, the failing leg gets those bytes written back (#repair): a
   * disk remaps a bad sector on write, and a leg that cannot take them goes out of sync.
   * When none answers, the failing legs go out of sync (but the last in-sync one, see
   * #legFailed). Resolves whether one of them answered.
   */
  async #readFromSome(offset: number, into: Uint8Array): Promise<boolean> {
    const tried = new Set<Leg>();
    const failed: Array<{ leg: Leg; error: unknown }> = [];
    for (;;) {
      const leg = this.#readLeg(tried);
      if (leg === null) {
        for (const { leg, error } of failed) this.#legFailed(leg, error);
        return false;
      }
      tried.add(leg);
      const error = await this.#tryOnLeg(leg, (d) => d.read(offset, into), true);
      if (error === null) {
        if (failed.length > 0) void this.#repair(failed, offset, into.length);
        return true;
      }
      failed.push({ leg, error });
    }
  }

  /**
   * Writes a range that some legs failed to read back to them, from a fresh read of
   * another leg, holding its regions alone (a copy's lock: writers wait, so no newer
   * write is overtaken by these bytes), their marks durable first. Only a failed
   * rewrite takes a leg out of sync.
   */
  async #repair(failed: Array<{ leg: Leg; error: unknown }>, offset: number, length: number) {
    const region = this.#state.regionBytes;
    const first = Math.floor(offset / region);
    const last = Math.floor((offset + length - 1) / region);
    // In ascending order, as one region at a time is all a resync copy ever holds.
    for (let r = first; r <= last; r++) await this.#regions.lockCopy(r);
    try {
      for (let r = first; r <= last; r++) {
        for (const watcher of this.#flushWatchers) watcher.add(r); // as any write does
      }
      const data = new Uint8Array(length);
      const source = this.#readLeg(new Set(failed.map((f) => f.leg)));
      const error = source === null ? new Error("no other in-sync leg") : await this.#tryOnLeg(
        source,
        (d) => d.read(offset, data),
        true,
      );
      if (error !== null) {
        for (const f of failed) this.#legFailed(f.leg, f.error);
        return;
      }
      let mask = 0;
      for (const f of failed) mask |= 1 << f.leg.record.slot;
      await this.#bitmap.mark(first, last, mask);
      for (const { leg, error: readError } of failed) {
        if (leg.mode !== "in-sync") continue;
        const writeError = await this.#tryOnLeg(leg, (d) => d.write(offset, data));
        if (writeError === null) {
          leg.errors += 1; // the read error, mended
          this.#log.warn(
            `leg ${leg.record.name} failed a read of ${length} bytes at ${offset} ` +
              `(${describeError(readError)}); rewrote them from ${source!.record.name}`,
          );
        } else {
          this.#legFailed(leg, writeError);
        }
      }
    } catch (error) {
      for (const f of failed) this.#legFailed(f.leg, error);
    } finally {
      for (let r = first; r <= last; r++) {
        this.#regions.unlockCopy(r);
        this.#idle.add(r); // the sweep clears the marks once the legs are flushed
      }
    }
  }

  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    return this.#mutate("write", offset, data.length, (d) => d.write(offset, data, flags), () => {
      this.#stats.writes += 1;
      this.#stats.writtenBytes += data.length;
    });
  }

  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#mutate(
      "discard",
      offset,
      length,
      (d) => d.discard(offset, length, flags),
      () => (this.#stats.discards += 1),
    );
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#mutate(
      "write zeroes",
      offset,
      length,
      (d) => d.writeZeroes(offset, length, flags),
      () => (this.#stats.zeroes += 1),
    );
  }

  async flush(): Promise<void> {
    await this.#onWriteLegs("flush", (d) => d.flush());
    this.#stats.flushes += 1;
  }

  stats(): DeviceStats {
    return { ...this.#stats };
  }

  async #mutate(
    what: string,
    offset: number,
    length: number,
    op: (device: BlockDevice) => Promise<void>,
    count: () => void,
  ): Promise<void> {
    checkRange(this.info, what, offset, length);
    if (this.#stateError !== null) {
      this.#stats.errors += 1;
      throw new DeviceError(
        "EIO",
        `${this.info.name}: the mirror state cannot be made durable ` +
          `(${describeError(this.#stateError)}); the ${what} is refused until it can`,
      );
    }
    const region = this.#state.regionBytes;
    const first = Math.floor(offset / region);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / region);
    await this.#regions.enterWrite(first, last);
    try {
      for (let r = first; r <= last; r++) {
        this.#idle.delete(r);
        for (const watcher of this.#flushWatchers) watcher.add(r);
      }
      await this.#bitmap.mark(first, last, this.#slotsMask()).catch((error) => {
        throw new DeviceError(
          "EIO",
          `${this.info.name}: cannot record the write in the bitmap: ${describeError(error)}`,
        );
      });
      await this.#onWriteLegs(what, op);
      count();
    } finally {
      this.#regions.exitWrite(first, last);
    }
  }

  /** Runs `op` on every leg that takes writes; it fails unless an in-sync leg took it. */
  async #onWriteLegs(what: string, op: (device: BlockDevice) => Promise<void>): Promise<void> {
    const targets = this.#legs.filter((l) => l.mode === "in-sync" || l.mode === "resyncing");
    const ok = await Promise.all(targets.map((leg) => this.#onLeg(leg, op)));
    if (!targets.some((leg, i) => ok[i] && leg.mode === "in-sync")) {
      // A resyncing leg that took it now differs from the in-sync one that did not:
      // back out of sync with it, so its marked regions are copied again from that leg.
      targets.forEach((leg, i) => {
        if (ok[i] && leg.mode === "resyncing") {
          this.#legFailed(leg, new Error(`it took a ${what} that the in-sync leg refused`));
        }
      });
      this.#stats.errors += 1;
      throw new DeviceError("EIO", `${this.info.name}: no in-sync leg took the ${what}`);
    }
    // A leg left sync on the way and the state could not say so durably: a crash now
    // would trust that leg again, so this is not acknowledged either.
    if (this.#stateError !== null) {
      this.#stats.errors += 1;
      throw new DeviceError(
        "EIO",
        `${this.info.name}: the mirror state cannot be made durable ` +
          `(${describeError(this.#stateError)})`,
      );
    }
  }

  /** Runs `op` on a leg; a failure takes the leg out of sync. Resolves whether it worked. */
  async #onLeg(
    leg: Leg,
    op: (device: BlockDevice) => Promise<void>,
    vouches = false,
  ): Promise<boolean> {
    const error = await this.#tryOnLeg(leg, op, vouches);
    if (error === null) return true;
    this.#legFailed(leg, error);
    return false;
  }

  /**
   * Runs `op` on a leg; resolves with its error, or null when it worked. With `vouches`
   * (a read, a flush: what it says holds only for one connection), an `op` that spanned
   * a reconnect of the leg counts as failed.
   */
  async #tryOnLeg(
    leg: Leg,
    op: (device: BlockDevice) => Promise<void>,
    vouches = false,
  ): Promise<unknown> {
    const device = leg.device;
    if (device === null) return new Error("not connected");
    const connections = leg.connections;
    leg.inFlight += 1;
    try {
      await op(device);
      if (vouches && leg.connections !== connections) {
        return new Error("the leg reconnected while it ran");
      }
      if (leg.reason !== null && leg.mode === "in-sync") {
        this.#log.info(`leg ${leg.record.name}, the last in-sync leg, answers again`);
        leg.reason = null;
      }
      return null;
    } catch (error) {
      return error ?? new Error("failed");
    } finally {
      leg.inFlight -= 1;
      this.#quieted();
    }
  }

  #readLeg(skip?: Set<Leg>): Leg | null {
    let best: Leg | null = null;
    for (const leg of this.#legs) {
      if (leg.mode !== "in-sync" || leg.device === null || skip?.has(leg)) continue;
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  #slotsMask(): number {
    let mask = 0;
    for (const leg of this.#legs) mask |= 1 << leg.record.slot;
    return mask;
  }

  // --- legs going and coming ---------------------------------------------------------

  #legFailed(leg: Leg, error: unknown): void {
    leg.errors += 1;
    leg.lastFailureMs = this.#clock.nowMs();
    if (leg.mode !== "in-sync" && leg.mode !== "resyncing") return;
    const othersInSync = this.#legs.some((l) => l !== leg && l.mode === "in-sync");
    if (leg.mode === "in-sync" && !othersInSync) {
      // Invariant: the last in-sync leg is never failed (md never fails its last member):
      // it holds the newest data. Its failures reach the caller as EIO, and I/O goes on
      // by itself once it answers again.
      const reason = describeError(error);
      if (leg.reason === null) {
        this.#log.error(
          `leg ${leg.record.name}, the last in-sync leg, failed (${reason}); the array ` +
            "returns EIO until it answers again",
        );
      }
      leg.reason = reason;
      return;
    }
    const was = leg.mode;
    leg.mode = "out-of-sync";
    // The order of leaving sync tells which leg is newest; a resyncing leg never was.
    if (was === "in-sync") leg.record.leftSyncSeq = nextLeftSyncSeq(this.#legs);
    leg.reason = describeError(error);
    const left = this.#legs.filter((l) => l.mode === "in-sync").length;
    this.#log.warn(
      `leg ${leg.record.name} is out of sync (${
        was === "resyncing" ? "while resyncing; " : ""
      }${leg.reason}); ${left} in-sync leg${left === 1 ? "" : "s"} left` +
        (left === 0 ? ": the array fails I/O until a leg is back" : ""),
    );
    this.#save();
  }

  /** Follows a remote leg's reconnects: its write generation says whether we can trust it. */
  #watch(leg: Leg): void {
    const device = leg.device === null ? null : reconnecting(leg.device);
    if (device === null) return;
    device.setReconnectListener(({ writeGeneration, writeEpoch, restarted }) => {
      if (leg.device !== device || leg.mode === "detached") return;
      // The same export process kept its page cache (it finished what the old connection
      // had started before it answered the new one): only a restart can have lost data.
      if (restarted) {
        leg.connections += 1;
        this.#reconnected(leg);
      }
      // Marks durable before the state names the new generation; a failure is a save failure.
      MirrorDevice.#checkGeneration(
        leg,
        { generation: writeGeneration, epoch: writeEpoch },
        this.#legs,
        this.#bitmap,
        this.#log,
      ).then(
        () => this.#save(),
        (error) => this.#stateFailed(error),
      );
    });
  }

  /**
   * A leg's connection was made again to a restarted export: a disk cache may have been
   * lost with it, and the writes its marked regions stand for with it. So a leg with
   * marked regions leaves sync and gets them copied again (but the last in-sync leg,
   * which holds the newest data whatever happened).
   */
  #reconnected(leg: Leg): void {
    if (leg.mode !== "in-sync" && leg.mode !== "resyncing") return;
    if (this.#bitmap.count(leg.record.slot) === 0) return;
    const othersInSync = this.#legs.some((l) => l !== leg && l.mode === "in-sync");
    if (leg.mode === "in-sync" && !othersInSync) return;
    this.#legFailed(
      leg,
      new Error(
        "it reconnected: what it had not flushed may be lost, its marked regions are copied",
      ),
    );
  }

  /** Every second: legs that are out of sync and reachable are resynced; lost ones re-dialed. */
  #supervise(): void {
    if (this.#closing) return;
    if (this.#stateError !== null && !this.#retryingState) {
      // Try again, marks first: writes wait on it.
      this.#retryingState = true;
      this.#bitmap.flush().then(() => this.#save(), (error) => this.#stateFailed(error))
        .finally(() => (this.#retryingState = false));
    }
    for (const leg of this.#legs) {
      if (leg.mode !== "out-of-sync" || leg.busy) continue;
      if (this.#clock.nowMs() - leg.lastFailureMs < MIRROR_SUPERVISE_MS) continue;
      const device = leg.device;
      const remote = device === null ? null : reconnecting(device);
      if (device !== null && remote?.gaveUp === true) {
        // It refused a changed export at that address; dial afresh, checking identity again.
        leg.device = null;
        leg.busy = true;
        void device.close().finally(() => {
          leg.busy = false;
          this.#quieted();
        });
      } else if (device === null) {
        void this.#reopen(leg);
      } else if (remote === null || remote.connected) {
        void this.#resync(leg);
      }
    }
  }

  async #reopen(leg: Leg): Promise<void> {
    leg.busy = true;
    try {
      const member = await this.#options.openLeg(leg.record.name, this.#clientId);
      const refusal = MirrorDevice.#checkIdentity(leg.record, member, this.info.sizeBytes);
      if (refusal !== null) {
        await member.device.close();
        if (leg.reason !== refusal) this.#log.error(`leg ${leg.record.name}: ${refusal}`);
        leg.reason = refusal;
        leg.lastFailureMs = this.#clock.nowMs();
        return;
      }
      if (this.#closing || leg.mode !== "out-of-sync") {
        await member.device.close();
        return;
      }
      try {
        await MirrorDevice.#checkGeneration(leg, member, this.#legs, this.#bitmap, this.#log);
      } catch (error) {
        await member.device.close().catch(() => {}); // not adopted: it must not linger
        throw error;
      }
      leg.device = member.device;
      this.#watch(leg);
      this.#save();
      this.#log.info(`leg ${leg.record.name} is reachable again`);
    } catch (error) {
      leg.reason = describeError(error);
      leg.lastFailureMs = this.#clock.nowMs();
    } finally {
      leg.busy = false;
      this.#quieted();
    }
    if (leg.device !== null && leg.mode === "out-of-sync") void this.#resync(leg);
  }

  /**
   * Brings an out-of-sync leg level: it starts taking writes, and every region
   * marked for it is copied from an in-sync leg, a few at a time, while I/O goes on.
   */
  async #resync(leg: Leg): Promise<void> {
    if (leg.busy || leg.mode !== "out-of-sync" || leg.device === null || this.#closing) return;
    if (this.#readLeg() === null) return; // nothing to copy from
    leg.busy = true;
    const slot = leg.record.slot;
    const regions = this.#bitmap.regions;
    const pending = new Uint8Array(regions);
    let total = 0;
    for (let r = 0; r < regions; r++) {
      if (this.#bitmap.has(r, slot)) {
        pending[r] = 1;
        total += 1;
      }
    }
    const run: ResyncRun = {
      unflushed: [],
      full: total === regions,
      regionsTotal: total,
      regionsDone: 0,
      bytesCopied: 0,
      startedMs: this.#clock.nowMs(),
    };
    leg.pending = pending;
    leg.resync = run;
    leg.mode = "resyncing";
    leg.reason = null;
    this.#log.info(
      `resync of ${leg.record.name}: ${total} of ${regions} regions ` +
        `(${formatBytes(Math.min(total * this.#state.regionBytes, this.info.sizeBytes))}) to copy`,
    );
    let lastLogMs = this.#clock.nowMs();
    let next = 0;
    // Workers share `next`; a copy that fails takes the leg out, which stops the others.
    const worker = async (buffer: Uint8Array) => {
      try {
        for (;;) {
          while (next < regions && pending[next] === 0) next += 1;
          if (next >= regions || leg.mode !== "resyncing" || this.#closing) return;
          await this.#copyRegion(leg, next++, buffer);
          if (leg.mode !== "resyncing") return;
          run.regionsDone += 1;
          if (run.unflushed.length >= MIRROR_RESYNC_FLUSH_REGIONS) {
            await this.#flushCopies(leg, run);
          }
          if (this.#clock.nowMs() - lastLogMs >= 1000) {
            lastLogMs = this.#clock.nowMs();
            this.#logProgress(leg.record.name, this.#progress(run));
          }
        }
      } catch (error) {
        this.#legFailed(leg, error);
      }
    };
    try {
      await Promise.all(
        Array.from(
          { length: MIRROR_RESYNC_PARALLEL },
          () => worker(new Uint8Array(this.#state.regionBytes)),
        ),
      );
      if (leg.mode === "resyncing" && !this.#closing) {
        await this.#flushCopies(leg, run);
        if (leg.mode === "resyncing") {
          leg.mode = "in-sync";
          leg.pending = null;
          this.#save();
          const seconds = (this.#clock.nowMs() - run.startedMs) / 1000;
          this.#log.info(
            `leg ${leg.record.name} is in sync: copied ${run.regionsDone} regions, ` +
              `${formatBytes(run.bytesCopied)} in ${seconds.toFixed(1)} s`,
          );
        }
      }
    } catch (error) {
      this.#legFailed(leg, error);
    } finally {
      if (leg.mode !== "resyncing") leg.pending = null;
      if (leg.mode === "resyncing") leg.mode = "out-of-sync"; // stopped by close
      leg.busy = false;
      this.#quieted();
    }
  }

  /** Copies one region from an in-sync leg to `leg`, alone in that region. */
  async #copyRegion(leg: Leg, region: number, buffer: Uint8Array): Promise<void> {
    const start = region * this.#state.regionBytes;
    const length = Math.min(this.#state.regionBytes, this.info.sizeBytes - start);
    const data = buffer.subarray(0, length);
    await this.#regions.lockCopy(region);
    try {
      if (!(await this.#readFromSome(start, data))) {
        throw new DeviceError("EIO", "no in-sync leg could be read to copy from");
      }
      if (leg.mode !== "resyncing") return;
      await leg.device!.write(start, data);
      leg.pending![region] = 0;
      leg.resync!.unflushed.push(region); // its mark clears once a flush of the leg covers it
      leg.resync!.bytesCopied += length;
      this.#resyncedBytes += length;
    } finally {
      this.#regions.unlockCopy(region);
    }
  }

  #logProgress(name: string, p: ResyncProgress): void {
    this.#log.info(
      `resync of ${name}: ${p.regionsDone}/${p.regionsTotal} regions, ` +
        `${formatBytes(p.bytesPerSecond)}/s` +
        (p.etaMs === null ? "" : `, about ${formatDuration(p.etaMs)} left`),
    );
  }

  #progress(run: ResyncRun): ResyncProgress {
    const seconds = Math.max((this.#clock.nowMs() - run.startedMs) / 1000, 0.001);
    const rate = run.bytesCopied / seconds;
    const left = (run.regionsTotal - run.regionsDone) * this.#state.regionBytes;
    return {
      full: run.full,
      regionsDone: run.regionsDone,
      regionsTotal: run.regionsTotal,
      bytesCopied: run.bytesCopied,
      bytesPerSecond: Math.round(rate),
      etaMs: rate > 0 ? Math.round((left / rate) * 1000) : null,
    };
  }

  /** Clears the marks of regions idle since the last sweep, for legs that have the data. */
  /**
   * Clears the marks of regions that went idle, for the legs that hold their data:
   * only after a flush of each such leg has completed after the region's last write
   * (md flushes its members before it clears bitmap bits): a leg's volatile cache can
   * lose acknowledged writes on power loss, and a cleared mark would hide that. A leg
   * whose flush fails keeps its marks (and goes out of sync, but the last in-sync one).
   */
  #sweep(): Promise<void> {
    this.#sweeping ??= this.#sweepOnce().finally(() => (this.#sweeping = null));
    return this.#sweeping;
  }

  async #sweepOnce(): Promise<void> {
    // A region with a write in flight is not idle; it comes back here once it is.
    const candidates = [...this.#idle].filter((region) => this.#regions.writers(region) === 0);
    for (const region of candidates) this.#idle.delete(region);
    if (candidates.length === 0) return;
    const holders = this.#legs.filter((l) =>
      (l.mode === "in-sync" || l.mode === "resyncing") && l.device !== null
    );
    // What each leg held when its flush started: a resync copy landing later is not covered.
    const heldAtStart = holders.map((leg) =>
      candidates.map((region) => leg.mode === "in-sync" || leg.pending?.[region] === 0)
    );
    const { result: flushed, touched } = await this.#flushWatching(() =>
      Promise.all(holders.map((leg) => this.#onLeg(leg, (d) => d.flush(), true)))
    );
    // A leg whose flush failed keeps its marks; if it is still a holder (the last in-sync
    // leg, which never leaves sync), the region is tried again once it flushes.
    const retry = holders.some((leg, i) =>
      !flushed[i] && (leg.mode === "in-sync" || leg.mode === "resyncing")
    );
    candidates.forEach((region, j) => {
      if (touched.has(region)) return; // written meanwhile: it is idle again later
      let mask = 0;
      holders.forEach((leg, i) => {
        const stillHolds = leg.mode === "in-sync" || leg.mode === "resyncing";
        if (flushed[i] && heldAtStart[i]![j] && stillHolds) mask |= 1 << leg.record.slot;
      });
      this.#bitmap.clear(region, mask);
      if (retry) this.#idle.add(region);
    });
    await this.#bitmap.flush().catch((error) =>
      this.#log.error(`cannot write the bitmap: ${describeError(error)}`)
    );
  }

  /** Runs `flush`, noting the regions written while it ran. */
  async #flushWatching<T>(flush: () => Promise<T>): Promise<{ result: T; touched: Set<number> }> {
    const touched = new Set<number>();
    this.#flushWatchers.add(touched);
    try {
      return { result: await flush(), touched };
    } finally {
      this.#flushWatchers.delete(touched);
    }
  }

  /**
   * Flushes a resyncing leg, then clears the marks of the regions it had copied
   * before the flush began (a throw takes the leg out, marks kept). A copied region
   * written meanwhile keeps its mark; the sweep clears it once it is idle and flushed.
   */
  async #flushCopies(leg: Leg, run: ResyncRun): Promise<void> {
    const copied = run.unflushed.splice(0);
    const quiet = copied.filter((region) => this.#regions.writers(region) === 0);
    const connections = leg.connections;
    const { touched } = await this.#flushWatching(() => leg.device!.flush());
    if (leg.connections !== connections) {
      throw new Error("the leg reconnected while it flushed its copies");
    }
    const slot = 1 << leg.record.slot;
    for (const region of quiet) if (!touched.has(region)) this.#bitmap.clear(region, slot);
  }

  // --- at runtime: detach, attach, status -----------------------------------------

  /**
   * Takes a leg out; it keeps the data as of now, and its missed regions are tracked.
   * Only an in-sync leg is a consistent snapshot: any other is refused unless `force`.
   */
  detach(name: string, force = false): Promise<string> {
    return this.#oneAtATime(() => this.#detach(name, force));
  }

  /** Puts a detached leg back (its missed regions are copied) or adds a new one (full copy). */
  attach(name: string): Promise<string> {
    return this.#oneAtATime(() => this.#attach(name));
  }

  /** Runs `operation` after every earlier detach or attach has ended. */
  #oneAtATime<T>(operation: () => Promise<T>): Promise<T> {
    const run = this.#controlTurn.then(operation, operation);
    this.#controlTurn = run.catch(() => {});
    return run;
  }

  async #detach(name: string, force: boolean): Promise<string> {
    const leg = this.#legs.find((l) => l.record.name === name);
    if (leg === undefined) throw new DstError("USAGE", `${name} is not a leg of this mirror`);
    if (leg.mode === "detached") throw new DstError("USAGE", `${name} is detached already`);
    const wasInSync = leg.mode === "in-sync";
    if (!wasInSync && !force) {
      throw new DstError(
        "USAGE",
        `${name} is ${leg.mode}: its data is not a consistent copy of the mirror, so it would ` +
          `be no snapshot; wait until it is in sync, or take it out anyway with --force`,
      );
    }
    const inSync = this.#legs.filter((l) => l.mode === "in-sync");
    if (inSync.length === 1 && inSync[0] === leg) {
      throw new DstError("USAGE", `${name} is the only in-sync leg; attach another one first`);
    }
    leg.mode = "detached";
    leg.reason = null;
    this.#save();
    await this.#whenQuiet(() => leg.inFlight === 0 && !leg.busy);
    const device = leg.device;
    leg.device = null;
    if (device !== null) {
      await device.flush().catch(() => {});
      await device.close();
    }
    if (!wasInSync) {
      this.#log.warn(`leg ${name} detached with --force: its data is NOT a consistent copy`);
      return `${name} detached (forced); its data is NOT a consistent copy of the mirror`;
    }
    this.#log.info(`leg ${name} detached: it holds the data as of now`);
    return `${name} detached; its data is a snapshot as of now`;
  }

  async #attach(name: string): Promise<string> {
    let leg = this.#legs.find((l) => l.record.name === name);
    if (leg !== undefined && leg.mode !== "detached") {
      throw new DstError("USAGE", `${name} is a leg already (${leg.mode})`);
    }
    const member = await this.#options.openLeg(name, this.#clientId);
    try {
      const info = member.device.info;
      if (leg === undefined) {
        const used = new Set(this.#legs.map((l) => l.record.slot));
        const slot = [...Array(LEG_SLOTS_MAX).keys()].find((s) => !used.has(s));
        const unfit = checkFit(info, this.info.sizeBytes);
        const same = this.#legs.find((l) => l.record.exportId === info.id);
        const refusal = info.id === this.info.id
          ? `${name} is this mirror's own export: a mirror cannot be its own leg`
          : same !== undefined
          ? `${name} is the same export as leg ${same.record.name} (id ${info.id})`
          : slot === undefined
          ? `the mirror has ${LEG_SLOTS_MAX} legs already`
          : unfit === null
          ? null
          : `${name} ${unfit}`;
        if (refusal !== null) {
          await member.device.close();
          throw new DstError("USAGE", refusal);
        }
        await this.#bitmap.markAll(1 << slot!);
        const record: LegRecord = {
          slot: slot!,
          name,
          exportId: info.id,
          generation: member.generation,
          epoch: member.epoch,
          state: "out-of-sync",
        };
        this.#state.legs.push(record);
        leg = newLeg(record, member.device, "new leg");
        this.#legs.push(leg);
      } else {
        const refusal = MirrorDevice.#checkIdentity(leg.record, member, this.info.sizeBytes);
        if (refusal !== null) {
          await member.device.close();
          throw new DstError("USAGE", `${name} ${refusal}`);
        }
        leg.mode = "out-of-sync";
        await MirrorDevice.#checkGeneration(leg, member, this.#legs, this.#bitmap, this.#log);
        leg.device = member.device;
      }
    } catch (error) {
      if (leg?.device !== member.device) await member.device.close().catch(() => {});
      throw error;
    }
    this.#watch(leg);
    this.#save();
    const dirty = this.#bitmap.count(leg.record.slot);
    void this.#resync(leg);
    return `${name} attached; resyncing ${dirty} of ${this.#bitmap.regions} regions`;
  }

  status(): MirrorStatus {
    return {
      kind: "mirror",
      sizeBytes: this.info.sizeBytes,
      regionBytes: this.#state.regionBytes,
      stateDir: this.#options.store.where,
      resyncedBytes: this.#resyncedBytes,
      members: this.#legs.map((leg) => ({
        name: leg.record.name,
        state: leg.mode,
        exportId: leg.record.exportId,
        dirtyRegions: this.#bitmap.count(leg.record.slot),
        inFlight: leg.inFlight,
        errors: leg.errors,
        ...(leg.mode === "resyncing" && leg.resync !== null
          ? { resync: this.#progress(leg.resync) }
          : {}),
        // Why it is out of sync; for the last in-sync leg, the failure it answers EIO for.
        ...(leg.reason !== null && (leg.mode === "out-of-sync" || leg.mode === "in-sync")
          ? { reason: leg.reason }
          : {}),
      })),
    };
  }

  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    this.#supervisor.cancel();
    await this.#whenQuiet(() => this.#legs.every((l) => l.inFlight === 0 && !l.busy));
    this.#sweeper.cancel();
    await this.#sweeping;
    await this.#sweep();
    this.#save();
    await this.#bitmap.close();
    await Promise.allSettled(this.#legs.map((l) => l.device?.close()));
    this.#lock.release();
  }

  /** Resolves once `ready()` holds; checked whenever a leg ends a request or a task. */
  #whenQuiet(ready: () => boolean): Promise<void> {
    if (ready()) return Promise.resolve();
    return new Promise((resolve) => this.#quietWaiters.add({ ready, resolve }));
  }

  #quieted(): void {
    for (const waiter of this.#quietWaiters) {
      if (!waiter.ready()) continue;
      this.#quietWaiters.delete(waiter);
      waiter.resolve();
    }
  }

  /**
   * The state (or a mark it depends on) could not be made durable: until it can, the
   * array acknowledges no write (a crash would forget what the state should say).
   */
  #stateFailed(error: unknown): void {
    if (this.#stateError === null) {
      this.#log.error(
        `cannot make the mirror state durable (${describeError(error)}); writes fail with EIO ` +
          "until it can (retried every second)",
      );
    }
    this.#stateError = error instanceof Error ? error : new Error(String(error));
  }

  #save(): void {
    for (const leg of this.#legs) {
      // A resync under way starts over after a restart.
      leg.record.state = leg.mode === "resyncing" ? "out-of-sync" : leg.mode;
    }
    try {
      this.#options.store.saveState(this.#state);
    } catch (error) {
      this.#stateFailed(error);
      return;
    }
    if (this.#stateError !== null) {
      this.#stateError = null;
      this.#log.info("the mirror state is durable again; writes go on");
    }
  }
}
