/**
 * A mirror: every leg holds the whole device (README, "dst array" and its fault table).
 *
 * Leg modes: in-sync (read from, written to), resyncing (written to, and its dirty
 * regions copied from an in-sync leg meanwhile), out-of-sync (failed or away; its
 * missed regions stay marked), detached (taken out by the user: a snapshot). The
 * modes, their transitions and the invariants they keep are in mirror_leg.ts.
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
 *
 * Owns: MirrorDevice itself: I/O (reads with repair, writes, discards, zeroes,
 * flushes), the sweep that clears marks, the supervisor that re-dials and resyncs
 * legs, a leg's failures and reconnects, detach and attach, status, saving the state
 * and close. Does not own: opening from the state or making a new mirror
 * (mirror_assembly.ts), resync runs (mirror_resync.ts), the legs' modes and
 * invariants (mirror_leg.ts), the bitmap (dirty_bitmap.ts), or where the state is
 * kept (mirror_store.ts).
 */

import { MIRROR_CLEAR_DELAY_MS, MIRROR_SUPERVISE_MS } from "../constants.ts";
import {
  type BlockDevice,
  checkRange,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  type IoFlags,
  reconnecting,
} from "../device/block_device.ts";
import { assert } from "../lib/assert.ts";
import { describeError, DeviceError, DstError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { type Clock, systemClock, type Timer } from "../lib/clock.ts";
import { type DirtyBitmap, LEG_SLOTS_MAX } from "./dirty_bitmap.ts";
import type { LegRecord, MirrorState } from "./mirror_state.ts";
import type { MirrorStore } from "./mirror_store.ts";
import type { OpenedMember } from "./members.ts";
import { RegionActivity } from "./region_activity.ts";
import {
  type Assembled,
  assembleMirror,
  checkFit,
  checkGeneration,
  checkIdentity,
} from "./mirror_assembly.ts";
import {
  checkLegs,
  connect,
  detachLeg,
  deviceOf,
  disconnect,
  lastLegAnswers,
  lastLegFails,
  leaveSync,
  type Leg,
  type LegMode,
  newLeg,
  noteOutOfSync,
  othersInSync,
  reasonOf,
  reattach,
  savedMode,
  slotsMask,
  takesWrites,
} from "./mirror_leg.ts";
import { Resyncer, type ResyncProgress } from "./mirror_resync.ts";
import { plural } from "../lib/plural.ts";

export type { LegMode, ResyncProgress };

export interface MirrorLegStatus {
  name: string;
  state: LegMode;
  exportId: string;
  dirtyRegions: number;
  inFlight: number;
  errors: number;
  /**
   * Whether the leg has a connection up now (a local file always has). Its mode
   * changes only once a request fails, so an in-sync leg whose export went away
   * shows here first: false while its device reconnects or the supervisor re-dials it.
   */
  connected: boolean;
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
  /**
   * Start over: this member's data is right, the others get a full copy. A store that
   * holds a state is refused unless `force` (mirror_assembly.ts).
   */
  source?: string;
  /** With `source`: start over even when the store holds a mirror's state. */
  force?: boolean;
  /**
   * The members' export ids as asked before opening them (null: unreachable), when the
   * store was found by them: a state whose legs are spelled or ordered otherwise is
   * then the same mirror, and its legs take the names given now.
   */
  memberIds?: ReadonlyArray<string | null>;
  regionBytes: number;
  openLeg: LegOpener;
  log: Logger;
  /**
   * Shows a resync's progress (a bar redrawn in place on a terminal) instead of a log
   * line each second; null when that leg's resync ends. Absent: log lines.
   */
  onResyncProgress?: (leg: string, progress: ResyncProgress | null) => void;
  /** Where time and timers come from (default the system's). */
  clock?: Clock;
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
  readonly #resyncer: Resyncer;
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
  /**
   * Set when the only in-sync leg came back from a restart with regions marked: writes
   * acknowledged since the last flush may be gone with its cache. The next flush
   * reports it (EIO), once, as a disk reports a lost write-back on the next fsync.
   */
  #lostSinceFlush: string | null = null;
  #retryingState = false;
  /** The tail of the queue of detach and attach operations: they run one at a time. */
  #controlTurn: Promise<unknown> = Promise.resolve();

  private constructor(assembled: Assembled, options: MirrorOptions) {
    const { state, legs, bitmap } = assembled;
    this.#lock = assembled.lock;
    this.#clientId = assembled.clientId;
    this.#clock = options.clock ?? systemClock;
    this.#state = state;
    this.#legs = legs;
    this.#bitmap = bitmap;
    this.#options = options;
    this.#log = options.log;
    this.info = {
      sizeBytes: state.sizeBytes,
      blockSize: assembled.blockSize,
      readOnly: false,
      id: state.arrayId,
      name: `mirror(${legs.map((l) => l.record.name).join(", ")})`,
    };
    this.#regions = new RegionActivity((region) => this.#idle.add(region));
    this.#resyncer = new Resyncer({
      bitmap,
      regions: this.#regions,
      regionBytes: state.regionBytes,
      sizeBytes: state.sizeBytes,
      clock: this.#clock,
      log: this.#log,
      ...(options.onResyncProgress === undefined ? {} : { showProgress: options.onResyncProgress }),
      closing: () => this.#closing,
      canCopy: () => this.#readLeg() !== null,
      readFromSome: (offset, into) => this.#readFromSome(offset, into),
      legFailed: (leg, error) => this.#legFailed(leg, error),
      flushWatching: (flush, clear) => this.#flushWatching(flush, clear),
      copied: (bytes) => (this.#resyncedBytes += bytes),
      save: () => this.#save(),
      invariants: () => this.#invariants(),
      quieted: () => this.#quieted(),
    });
    this.#sweeper = this.#clock.every(MIRROR_CLEAR_DELAY_MS, () => void this.#sweep());
    this.#supervisor = this.#clock.every(MIRROR_SUPERVISE_MS, () => this.#supervise());
  }

  /**
   * Opens a mirror of `members` with its state in options.store: checks the
   * state against the members, connects every leg, reconciles what a crash left
   * marked (mirror_assembly.ts), and starts bringing back legs that are behind.
   */
  static async open(members: string[], options: MirrorOptions): Promise<MirrorDevice> {
    const mirror = new MirrorDevice(await assembleMirror(members, options), options);
    for (const leg of mirror.#legs) mirror.#watch(leg);
    mirror.#save();
    for (const leg of mirror.#legs) {
      if (leg.state.mode === "out-of-sync" && leg.state.device !== null) void mirror.#resync(leg);
    }
    return mirror;
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
   * write is overtaken by these bytes, Invariant 5), their marks durable first
   * (Invariant 3). Only a failed rewrite takes a leg out of sync.
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
      if (
        source === null ||
        await this.#tryOnLeg(source, (d) => d.read(offset, data), true) !== null
      ) {
        for (const f of failed) this.#legFailed(f.leg, f.error);
        return;
      }
      let mask = 0;
      for (const f of failed) mask |= 1 << f.leg.record.slot;
      await this.#bitmap.mark(first, last, mask);
      for (const { leg, error: readError } of failed) {
        if (leg.state.mode !== "in-sync") continue;
        const writeError = await this.#tryOnLeg(leg, (d) => d.write(offset, data));
        if (writeError === null) {
          leg.errors += 1; // the read error, mended
          this.#log.warn(
            `leg ${leg.record.name} failed a read of ${length} bytes at ${offset} ` +
              `(${describeError(readError)}); rewrote them from ${source.record.name}`,
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
      () => {
        this.#stats.discards += 1;
        this.#stats.discardBytes += length;
      },
    );
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#mutate(
      "write zeroes",
      offset,
      length,
      (d) => d.writeZeroes(offset, length, flags),
      () => {
        this.#stats.zeroes += 1;
        this.#stats.zeroBytes += length;
      },
    );
  }

  async flush(): Promise<void> {
    this.#reportLoss();
    await this.#onWriteLegs("flush", (d) => d.flush());
    // The only in-sync leg restarted while this flush ran: it cannot vouch for what
    // was written before it (Invariant 6).
    this.#reportLoss();
    this.#stats.flushes += 1;
  }

  /** A possible loss #reconnected noted and no flush reported yet: reported now, once. */
  #reportLoss(): void {
    const lost = this.#lostSinceFlush;
    if (lost === null) return;
    this.#lostSinceFlush = null;
    this.#stats.errors += 1;
    throw new DeviceError("EIO", `${this.info.name}: ${lost}`);
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
      // Invariant 3: marked for every leg, whatever its mode, and durable before any
      // leg is written.
      await this.#bitmap.mark(first, last, slotsMask(this.#state.legs)).catch((error) => {
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
    const targets = this.#legs.filter(takesWrites);
    const ok = await Promise.all(targets.map((leg) => this.#onLeg(leg, op)));
    if (!targets.some((leg, i) => ok[i] && leg.state.mode === "in-sync")) {
      // A resyncing leg that took it now differs from the in-sync one that did not:
      // back out of sync with it, so its marked regions are copied again from that leg.
      targets.forEach((leg, i) => {
        if (ok[i] && leg.state.mode === "resyncing") {
          this.#legFailed(leg, new Error(`it took a ${what} that the in-sync leg refused`));
        }
      });
      this.#stats.errors += 1;
      throw new DeviceError("EIO", `${this.info.name}: no in-sync leg took the ${what}`);
    }
    // Invariant 4: a leg left sync on the way and the state could not say so durably:
    // a crash now would trust that leg again, so this is not acknowledged either.
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
   * (a read, a flush: what it says holds only for one export process), an `op` that
   * spanned a reconnect to a restarted export counts as failed (Invariant 6).
   */
  async #tryOnLeg(
    leg: Leg,
    op: (device: BlockDevice) => Promise<void>,
    vouches = false,
  ): Promise<unknown> {
    const device = deviceOf(leg);
    if (device === null) return new Error("not connected");
    const connections = leg.connections;
    leg.inFlight += 1;
    try {
      await op(device);
      if (vouches && leg.connections !== connections) {
        return new Error("the leg's export restarted while it ran");
      }
      if (leg.state.mode === "in-sync" && leg.state.reason !== null) {
        this.#log.info(`leg ${leg.record.name}, the last in-sync leg, answers again`);
        lastLegAnswers(leg);
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
      if (leg.state.mode !== "in-sync" || skip?.has(leg)) continue;
      if (best === null || leg.inFlight < best.inFlight) best = leg;
    }
    return best;
  }

  // --- legs going and coming ---------------------------------------------------------

  #legFailed(leg: Leg, error: unknown): void {
    leg.errors += 1;
    leg.lastFailureMs = this.#clock.nowMs();
    const state = leg.state;
    if (state.mode !== "in-sync" && state.mode !== "resyncing") return;
    const reason = describeError(error);
    if (state.mode === "in-sync" && !othersInSync(this.#legs, leg)) {
      // Invariant 2: the last in-sync leg is never failed (md never fails its last
      // member): it holds the newest data. Its failures reach the caller as EIO, and
      // I/O goes on by itself once it answers again.
      if (state.reason === null) {
        this.#log.error(
          `leg ${leg.record.name}, the last in-sync leg, failed (${reason}); the array ` +
            "returns EIO until it answers again",
        );
      }
      lastLegFails(leg, reason);
      return;
    }
    const was = leaveSync(leg, reason, this.#state.legs);
    const left = this.#legs.filter((l) => l.state.mode === "in-sync").length;
    this.#log.warn(
      `leg ${leg.record.name} is out of sync (${
        was === "resyncing" ? "while resyncing; " : ""
      }${reason}); ${plural(left, "in-sync leg")} left` +
        (left === 0 ? ": the array fails I/O until a leg is back" : ""),
    );
    this.#save();
  }

  /** Follows a remote leg's reconnects: its write generation says whether we can trust it. */
  #watch(leg: Leg): void {
    const current = deviceOf(leg);
    const device = current === null ? null : reconnecting(current);
    if (device === null) return;
    device.setReconnectListener(({ writeGeneration, writeEpoch, restarted }) => {
      // Another device since, or detached (a detached leg has none).
      if (deviceOf(leg) !== device) return;
      // The same export process kept its page cache (it finished what the old connection
      // had started before it answered the new one): only a restart can have lost data.
      if (restarted) {
        leg.connections += 1;
        this.#reconnected(leg);
      }
      // Invariant 7: marks durable before the state names the new generation; a failure
      // is a save failure.
      this.#checkGeneration(leg, { generation: writeGeneration, epoch: writeEpoch }).then(
        () => this.#save(),
        (error) => this.#stateFailed(error),
      );
      this.#invariants();
    });
  }

  /** checkGeneration (mirror_assembly.ts) for a leg of the running mirror. */
  async #checkGeneration(leg: Leg, stamp: { generation: number; epoch: string }): Promise<void> {
    const others = othersInSync(this.#legs, leg);
    const copied = await checkGeneration(
      leg,
      stamp,
      this.#state.legs,
      others,
      this.#bitmap,
      this.#log,
    );
    // A resync under way listed its regions before these marks: it starts over (found
    // by the simulation: a resync finished in sync with regions it never copied).
    for (const other of this.#legs) {
      if ((copied & (1 << other.record.slot)) === 0 || other.state.mode !== "resyncing") continue;
      this.#legFailed(other, new Error("it needs a full copy now; its resync starts over"));
    }
  }

  /**
   * A leg's connection was made again to a restarted export: a disk cache may have been
   * lost with it, and the writes its marked regions stand for with it. So a leg with
   * marked regions leaves sync and gets them copied again (but the last in-sync leg,
   * which holds the newest data whatever happened): Invariant 6.
   */
  #reconnected(leg: Leg): void {
    if (!takesWrites(leg)) return;
    const slot = leg.record.slot;
    if (this.#bitmap.count(slot) === 0) return;
    if (leg.state.mode === "in-sync" && !othersInSync(this.#legs, leg)) {
      // Invariant 2: it stays in sync and its data stands. But where it may have lost
      // what it had not flushed, another leg may have kept it (found by the
      // simulation: a leg that had flushed a write the standing leg lost had its mark
      // cleared, and resynced "in sync" kept it): every other leg gets those regions
      // copied from it, and a resync that listed its regions before starts over.
      const others = slotsMask(this.#state.legs.filter((record) => record !== leg.record));
      this.#bitmap.markWhere(slot, others).catch((error) => this.#stateFailed(error));
      this.#lostSinceFlush = `leg ${leg.record.name}, the only in-sync leg, restarted with ` +
        "writes not yet flushed: writes acknowledged since the last flush may be lost";
      for (const other of this.#legs) {
        if (other === leg || other.state.mode !== "resyncing") continue;
        this.#legFailed(other, new Error("the in-sync leg restarted; its resync starts over"));
      }
      return;
    }
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
    this.#invariants();
    if (this.#stateError !== null && !this.#retryingState) {
      // Try again, marks first: writes wait on it.
      this.#retryingState = true;
      this.#bitmap.flush().then(() => this.#save(), (error) => this.#stateFailed(error))
        .finally(() => (this.#retryingState = false));
    }
    for (const leg of this.#legs) {
      const state = leg.state;
      if (state.mode !== "out-of-sync" || leg.busy) continue;
      if (this.#clock.nowMs() - leg.lastFailureMs < MIRROR_SUPERVISE_MS) continue;
      const device = state.device;
      const remote = device === null ? null : reconnecting(device);
      if (device !== null && remote?.gaveUp === true) {
        // It refused a changed export at that address; dial afresh, checking identity again.
        disconnect(leg);
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
    let member: OpenedMember | null = null;
    try {
      member = await this.#openAgain(leg);
    } catch (error) {
      if (leg.state.mode === "out-of-sync") noteOutOfSync(leg, describeError(error));
      leg.lastFailureMs = this.#clock.nowMs();
    }
    if (member !== null) {
      connect(leg, member.device);
      this.#watch(leg);
      this.#save();
      this.#log.info(`leg ${leg.record.name} is reachable again`);
    }
    leg.busy = false;
    this.#quieted();
    if (leg.state.mode === "out-of-sync" && leg.state.device !== null) void this.#resync(leg);
  }

  /**
   * Opens an out-of-sync leg that has no device again, checked (identity, write stamp);
   * resolves it, or null when it is not to be adopted (refused, closing, detached).
   */
  async #openAgain(leg: Leg): Promise<OpenedMember | null> {
    const member = await this.#options.openLeg(leg.record.name, this.#clientId);
    const refusal = checkIdentity(leg.record, member, this.info.sizeBytes);
    if (refusal !== null) {
      await member.device.close();
      if (reasonOf(leg) !== refusal) this.#log.error(`leg ${leg.record.name}: ${refusal}`);
      if (leg.state.mode === "out-of-sync") noteOutOfSync(leg, refusal);
      leg.lastFailureMs = this.#clock.nowMs();
      return null;
    }
    if (this.#closing || leg.state.mode !== "out-of-sync") {
      await member.device.close();
      return null;
    }
    try {
      await this.#checkGeneration(leg, member);
    } catch (error) {
      await member.device.close().catch(() => {}); // not adopted: it must not linger
      throw error;
    }
    if (leg.state.mode !== "out-of-sync") {
      // Detached (with --force) while its marks were made durable: not adopted.
      await member.device.close();
      return null;
    }
    return member;
  }

  #resync(leg: Leg): Promise<void> {
    return this.#resyncer.resync(leg);
  }

  /**
   * Clears the marks of regions that went idle, for the legs that hold their data:
   * only after a flush of each such leg has completed after the region's last write
   * (Invariant 1; md flushes its members before it clears bitmap bits): a leg's
   * volatile cache can lose acknowledged writes on power loss, and a cleared mark
   * would hide that. A leg whose flush fails keeps its marks (and goes out of sync,
   * but the last in-sync one).
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
    const holders = this.#legs.filter(takesWrites);
    // What each leg held when its flush started: a resync copy landing later is not covered.
    // A leg whose state changed meanwhile (a resync stopped and started again, say)
    // clears nothing this time: marks set for it since must stay.
    const statesAtStart = holders.map((leg) => leg.state);
    const heldAtStart = holders.map((leg) => {
      const state = leg.state;
      return candidates.map((region) =>
        state.mode === "in-sync" || (state.mode === "resyncing" && state.pending[region] === 0)
      );
    });
    await this.#flushWatching(
      () => Promise.all(holders.map((leg) => this.#onLeg(leg, (d) => d.flush(), true))),
      (flushed, touched) => {
        // A leg whose flush failed keeps its marks; if it is still a holder (the last
        // in-sync leg, which never leaves sync), the region is tried again once it flushes.
        // So is a region of a holder whose state changed meanwhile.
        const retry = holders.some((leg, i) =>
          (!flushed[i] || leg.state !== statesAtStart[i]) && takesWrites(leg)
        );
        candidates.forEach((region, j) => {
          if (touched.has(region)) return; // written meanwhile: it is idle again later
          let mask = 0;
          holders.forEach((leg, i) => {
            if (flushed[i] && heldAtStart[i]![j] && leg.state === statesAtStart[i]) {
              mask |= 1 << leg.record.slot;
            }
          });
          this.#bitmap.clear(region, mask);
          if (retry) this.#idle.add(region);
        });
      },
    );
    await this.#bitmap.flush().catch((error) =>
      this.#log.error(`cannot write the bitmap: ${describeError(error)}`)
    );
  }

  /**
   * Runs `flush`, then `clear(result, touched)` with the regions written since it began.
   * `clear` runs while the watch is still on, in the same turn as it learns `touched`: a
   * write entering a region between the flush's end and the clearing is seen (it was not,
   * when the watch ended first: found by a test that writes at every turn in between).
   */
  async #flushWatching<T>(
    flush: () => Promise<T>,
    clear: (result: T, touched: ReadonlySet<number>) => void,
  ): Promise<void> {
    const touched = new Set<number>();
    this.#flushWatchers.add(touched);
    try {
      clear(await flush(), touched);
    } finally {
      this.#flushWatchers.delete(touched);
    }
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
    const mode = leg.state.mode;
    if (mode === "detached") throw new DstError("USAGE", `${name} is detached already`);
    const wasInSync = mode === "in-sync";
    if (!wasInSync && !force) {
      throw new DstError(
        "USAGE",
        `${name} is ${mode}: its data is not a consistent copy of the mirror, so it would ` +
          `be no snapshot; wait until it is in sync, or take it out anyway with --force`,
      );
    }
    const inSync = this.#legs.filter((l) => l.state.mode === "in-sync");
    // Invariant 2.
    if (inSync.length === 1 && inSync[0] === leg) {
      throw new DstError("USAGE", `${name} is the only in-sync leg; attach another one first`);
    }
    // Its requests and task under way hold the device until they end.
    const device = detachLeg(leg);
    this.#save();
    await this.#whenQuiet(() => leg.inFlight === 0 && !leg.busy);
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
    const known = this.#legs.find((l) => l.record.name === name);
    if (known !== undefined && known.state.mode !== "detached") {
      throw new DstError("USAGE", `${name} is a leg already (${known.state.mode})`);
    }
    const member = await this.#options.openLeg(name, this.#clientId);
    let leg: Leg;
    try {
      leg = known === undefined
        ? await this.#addLeg(name, member)
        : await this.#reattach(known, member);
    } catch (error) {
      await member.device.close().catch(() => {}); // not adopted: it must not linger
      throw error;
    }
    this.#watch(leg);
    this.#save();
    const dirty = this.#bitmap.count(leg.record.slot);
    void this.#resync(leg);
    return `${name} attached; resyncing ${dirty} of ${plural(this.#bitmap.regions, "region")}`;
  }

  /** A new leg for `member`, in a free slot, every region marked for it (a full copy). */
  async #addLeg(name: string, member: OpenedMember): Promise<Leg> {
    const info = member.device.info;
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
    if (refusal !== null) throw new DstError("USAGE", refusal);
    assert(slot !== undefined, "a mirror without a free slot refuses a new leg");
    // Invariant 3: its marks are durable before the state names it (and before it is written).
    await this.#bitmap.markAll(1 << slot);
    const record: LegRecord = {
      slot,
      name,
      exportId: info.id,
      generation: member.generation,
      epoch: member.epoch,
      state: "out-of-sync",
    };
    this.#state.legs.push(record);
    const leg = newLeg(record, { mode: "out-of-sync", device: member.device, reason: "new leg" });
    this.#legs.push(leg);
    return leg;
  }

  /** A detached leg back as out of sync, connected to `member` once its stamp is checked. */
  async #reattach(leg: Leg, member: OpenedMember): Promise<Leg> {
    const refusal = checkIdentity(leg.record, member, this.info.sizeBytes);
    if (refusal !== null) throw new DstError("USAGE", `${leg.record.name} ${refusal}`);
    reattach(leg);
    // Busy while its stamp is checked: the supervisor must not dial it meanwhile.
    leg.busy = true;
    try {
      await this.#checkGeneration(leg, member);
    } finally {
      leg.busy = false;
      this.#quieted();
    }
    connect(leg, member.device);
    return leg;
  }

  status(): MirrorStatus {
    return {
      kind: "mirror",
      sizeBytes: this.info.sizeBytes,
      regionBytes: this.#state.regionBytes,
      stateDir: this.#options.store.where,
      resyncedBytes: this.#resyncedBytes,
      members: this.#legs.map((leg) => {
        const state = leg.state;
        // Why it is out of sync; for the last in-sync leg, the failure it answers EIO for.
        const reason = reasonOf(leg);
        const device = deviceOf(leg);
        return {
          name: leg.record.name,
          state: state.mode,
          exportId: leg.record.exportId,
          dirtyRegions: this.#bitmap.count(leg.record.slot),
          inFlight: leg.inFlight,
          errors: leg.errors,
          connected: device !== null && (reconnecting(device)?.connected ?? true),
          ...(state.mode === "resyncing" ? { resync: this.#resyncer.progress(state.run) } : {}),
          ...(reason !== null ? { reason } : {}),
        };
      }),
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
    await Promise.allSettled(this.#legs.map((l) => deviceOf(l)?.close()));
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

  /** Asserts the legs' invariants (mirror_leg.ts, checkLegs): after mode changes, and cheaply. */
  #invariants(): void {
    checkLegs(this.#legs, this.#state.legs, this.#bitmap.regions);
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
    // Invariant 8: a resync under way is saved as out-of-sync; it starts over after a restart.
    for (const leg of this.#legs) leg.record.state = savedMode(leg.state.mode);
    this.#invariants();
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
