/**
 * A mirror's leg (README, "dst array"): what it is in each mode, the only functions
 * that change its mode, and the invariants the mirror keeps.
 *
 * Owns: the Leg type, its mode as a union, the transitions between modes, and the
 * check of the invariants that the legs alone show (checkLegs). Does not own: what
 * makes a leg change mode (mirror.ts, mirror_resync.ts, mirror_assembly.ts), the
 * bitmap (dirty_bitmap.ts), or saving the state (mirror.ts).
 *
 *                     connect, disconnect,
 *                        noteOutOfSync
 *                          +-----+
 *                          |     v
 *   attach (new leg) ---> out-of-sync ------ startResync -----> resyncing
 *                          ^  ^  ^                               |  |
 *                          |  |  +--- stopResync, leaveSync -----+  | finishResync
 *               reattach   |  |                                     v
 *   detached --------------+  +------------- leaveSync ---------- in-sync ---+
 *      ^                                                            ^        | lastLegFails,
 *      |                                                            +--------+ lastLegAnswers
 *      +---- detachLeg (from any other mode)
 *
 * Opening (mirror_assembly.ts) starts each leg in the mode its record says, without
 * a device where its member cannot be one, and may take legs out with leaveSync.
 *
 * Invariants (code that relies on one cites it, "Invariant N"):
 * 1. A region's mark for a leg clears only after a flush of that leg completed after
 *    the region's last write to it (the sweep, and a resync's copies likewise): a
 *    leg's volatile cache can lose acknowledged writes, and a cleared mark would hide it.
 * 2. The last in-sync leg never leaves sync (md never fails its last member): it holds
 *    the newest data. Its failures reach the caller as EIO, and I/O goes on by itself
 *    once it answers again. So an open mirror always has an in-sync leg.
 * 3. A mark is durable before any leg is written in its region (a write marks every
 *    leg's slot, whatever its mode, so a leg that misses the write has it marked).
 * 4. A write is acknowledged only when an in-sync leg took it and the state is durable:
 *    a leg that left sync on the way and could not be recorded so would be trusted
 *    again after a crash.
 * 5. A copy is alone in its region (region_activity.ts): a resync copy or a repair's
 *    rewrite never overlaps a write, so old bytes never land over a newer write.
 * 6. A restart vouches for nothing: a flush or read that spans a reconnect to a
 *    restarted export (another export instance) counts as failed, and a leg whose
 *    export restarted with marked regions leaves sync (but the last in-sync leg,
 *    Invariant 2), as it may have lost its cache. A reconnect to the same export
 *    process loses nothing: its page cache lived on, and fencing finished what the old
 *    connection had started.
 * 7. Only the recorded write stamp is trusted: a leg that comes back with another
 *    (epoch, generation) gets a full copy (or, as the only in-sync leg, its data stands
 *    and the others get one), and the state names the new stamp only once those marks
 *    are durable.
 * 8. The legs' shape (checkLegs): the mirror's records are the legs' own, in order;
 *    slots are distinct bits of the bitmap (below LEG_SLOTS_MAX); a resyncing leg is
 *    busy with its run, and its map of pending regions covers the bitmap. The state is
 *    saved from the modes (savedMode: resyncing as out-of-sync, as a resync under way
 *    starts over after a restart) and lags them between saves, but a detached leg is
 *    saved as detached at once (a restart must never write to a snapshot). The union
 *    itself makes the rest hold: an in-sync or resyncing leg has a device, a detached
 *    one has none.
 */

import { assert } from "../lib/assert.ts";
import type { BlockDevice } from "../device/block_device.ts";
import { LEG_SLOTS_MAX } from "./dirty_bitmap.ts";
import type { LegRecord, LegRecordState } from "./mirror_state.ts";

export type LegMode = "in-sync" | "resyncing" | "out-of-sync" | "detached";

/** A resync under way: what it has done, for its progress and for clearing marks. */
export interface ResyncRun {
  /** Regions copied but not yet flushed on the leg: their marks stay until they are. */
  unflushed: number[];
  full: boolean;
  regionsTotal: number;
  regionsDone: number;
  bytesCopied: number;
  startedMs: number;
}

/** A leg's mode and what goes with it. */
export type LegState =
  | {
    readonly mode: "in-sync";
    readonly device: BlockDevice;
    /** While it is the last in-sync leg and fails (Invariant 2): why; else null. */
    readonly reason: string | null;
  }
  | {
    readonly mode: "resyncing";
    readonly device: BlockDevice;
    /** Regions still to copy (1 = copy), one per region of the bitmap. */
    readonly pending: Uint8Array;
    readonly run: ResyncRun;
  }
  | {
    readonly mode: "out-of-sync";
    /** Null while it has no connection: unreachable, refused, or its device gave up. */
    readonly device: BlockDevice | null;
    /** Why it is out of sync, when known. */
    readonly reason: string | null;
  }
  | { readonly mode: "detached" };

export interface Leg {
  readonly record: LegRecord;
  /** Changed only by the transitions below. */
  readonly state: LegState;
  inFlight: number;
  errors: number;
  /** A connect attempt or resync is under way: the supervisor leaves the leg alone. */
  busy: boolean;
  /**
   * Counts the leg's reconnects to a restarted export, which may have lost what it had
   * not flushed: a flush or read that spans one vouches for nothing.
   */
  connections: number;
  lastFailureMs: number;
}

/** A leg in `state`, not yet doing anything. */
export function newLeg(record: LegRecord, state: LegState): Leg {
  return {
    record,
    state,
    inFlight: 0,
    errors: 0,
    busy: false,
    connections: 0,
    lastFailureMs: Number.NEGATIVE_INFINITY, // never failed: the supervisor may act at once
  };
}

function become(leg: Leg, state: LegState): void {
  (leg as { state: LegState }).state = state;
}

function expectMode<M extends LegMode>(
  state: LegState,
  mode: M,
  transition: string,
): asserts state is Extract<LegState, { mode: M }> {
  assert(state.mode === mode, `${transition} starts from ${mode}, not ${state.mode}`);
}

/** out-of-sync, connected -> resyncing: it takes writes, and `pending` is copied to it. */
export function startResync(leg: Leg, pending: Uint8Array, run: ResyncRun): void {
  const state = leg.state;
  expectMode(state, "out-of-sync", "startResync");
  assert(state.device !== null, "a resync needs a device");
  assert(leg.busy, "a resyncing leg is busy with its run");
  become(leg, { mode: "resyncing", device: state.device, pending, run });
}

/** resyncing -> in-sync: every region it missed is copied and flushed. */
export function finishResync(leg: Leg): void {
  const state = leg.state;
  expectMode(state, "resyncing", "finishResync");
  become(leg, { mode: "in-sync", device: state.device, reason: null });
}

/** resyncing -> out-of-sync: the resync stopped without failing (the mirror closes). */
export function stopResync(leg: Leg): void {
  const state = leg.state;
  expectMode(state, "resyncing", "stopResync");
  become(leg, { mode: "out-of-sync", device: state.device, reason: null });
}

/**
 * in-sync or resyncing -> out-of-sync, keeping its device; resolves the mode it left.
 * A leg that leaves in-sync gets the next leftSyncSeq of `records` (the order of
 * leaving sync tells which leg is newest; a resyncing leg never was in sync). The
 * caller keeps Invariant 2 (it never takes the last in-sync leg out).
 */
export function leaveSync(
  leg: Leg,
  reason: string,
  records: readonly LegRecord[],
): "in-sync" | "resyncing" {
  const state = leg.state;
  assert(
    state.mode === "in-sync" || state.mode === "resyncing",
    `leaveSync starts from in-sync or resyncing, not ${state.mode}`,
  );
  become(leg, { mode: "out-of-sync", device: state.device, reason });
  if (state.mode === "in-sync") {
    leg.record.leftSyncSeq = Math.max(0, ...records.map((r) => r.leftSyncSeq ?? 0)) + 1;
  }
  return state.mode;
}

/** The last in-sync leg fails and stays in sync (Invariant 2); `reason` is why. */
export function lastLegFails(leg: Leg, reason: string): void {
  const state = leg.state;
  expectMode(state, "in-sync", "lastLegFails");
  become(leg, { ...state, reason });
}

/** An in-sync leg that failed answers again. */
export function lastLegAnswers(leg: Leg): void {
  const state = leg.state;
  expectMode(state, "in-sync", "lastLegAnswers");
  become(leg, { ...state, reason: null });
}

/** An out-of-sync leg gets a new reason (a reopen refused or failed, a foreign write). */
export function noteOutOfSync(leg: Leg, reason: string): void {
  const state = leg.state;
  expectMode(state, "out-of-sync", "noteOutOfSync");
  become(leg, { ...state, reason });
}

/** out-of-sync, not connected -> out-of-sync, connected to `device`. */
export function connect(leg: Leg, device: BlockDevice): void {
  const state = leg.state;
  expectMode(state, "out-of-sync", "connect");
  assert(state.device === null, "connect: it has no device yet");
  become(leg, { ...state, device });
}

/** out-of-sync, connected -> out-of-sync, not connected; returns the device to close. */
export function disconnect(leg: Leg): BlockDevice {
  const state = leg.state;
  expectMode(state, "out-of-sync", "disconnect");
  const device = state.device;
  assert(device !== null, "disconnect: it has a device");
  become(leg, { ...state, device: null });
  return device;
}

/**
 * Any mode but detached -> detached; returns the device it had (to close once the
 * requests and the task under way on it have ended: they hold it themselves).
 */
export function detachLeg(leg: Leg): BlockDevice | null {
  const state = leg.state;
  assert(state.mode !== "detached", "detachLeg: not detached already");
  become(leg, { mode: "detached" });
  return state.device;
}

/** detached -> out-of-sync, not connected yet (attach connects it). */
export function reattach(leg: Leg): void {
  expectMode(leg.state, "detached", "reattach");
  become(leg, { mode: "out-of-sync", device: null, reason: null });
}

/** The leg's device, or null when it has none (detached, or not connected). */
export function deviceOf(leg: Leg): BlockDevice | null {
  return leg.state.mode === "detached" ? null : leg.state.device;
}

/** Why the leg is out of sync, or why the last in-sync leg fails; else null. */
export function reasonOf(leg: Leg): string | null {
  const state = leg.state;
  return state.mode === "in-sync" || state.mode === "out-of-sync" ? state.reason : null;
}

/** Whether the leg is written to: in-sync and resyncing legs are. */
export function takesWrites(leg: Leg): boolean {
  return leg.state.mode === "in-sync" || leg.state.mode === "resyncing";
}

/** Whether a leg other than `leg` is in sync (Invariant 2 asks before one leaves). */
export function othersInSync(legs: readonly Leg[], leg: Leg): boolean {
  return legs.some((l) => l !== leg && l.state.mode === "in-sync");
}

/** The bits of `records`' slots. */
export function slotsMask(records: readonly LegRecord[]): number {
  return records.reduce((mask, record) => mask | 1 << record.slot, 0);
}

/**
 * Records that `leg` left sync now: the order legs left sync in, kept in the state,
 * tells which holds the newest data (the higher, the later).
 */

/** What the state records for a leg in `mode` (Invariant 8: resyncing as out-of-sync). */
export function savedMode(mode: LegMode): LegRecordState {
  return mode === "resyncing" ? "out-of-sync" : mode;
}

/**
 * Asserts Invariants 2 and 8 of an open mirror's legs, against the state's `records`
 * and a bitmap of `regions` regions. Cheap: a few checks per leg.
 */
export function checkLegs(legs: readonly Leg[], records: readonly LegRecord[], regions: number) {
  assert(legs.length === records.length, "Invariant 8: every leg has its record in the state");
  const slots = new Set<number>();
  legs.forEach((leg, i) => {
    assert(leg.record === records[i], "Invariant 8: the state's records are the legs', in order");
    assert(Number.isInteger(leg.record.slot), "Invariant 8: a leg's slot is a whole number");
    assert(leg.record.slot >= 0, "Invariant 8: a leg's slot is a bit of the bitmap");
    assert(leg.record.slot < LEG_SLOTS_MAX, "Invariant 8: a leg's slot is below LEG_SLOTS_MAX");
    slots.add(leg.record.slot);
    assert(leg.inFlight >= 0, "a leg's requests in flight are never negative");
    const state = leg.state;
    assert(
      state.mode !== "detached" || leg.record.state === "detached",
      "Invariant 8: a detached leg is saved as detached (a restart never writes to a snapshot)",
    );
    if (state.mode !== "resyncing") return;
    assert(leg.busy, "Invariant 8: a resyncing leg is busy with its run");
    assert(state.pending.length === regions, "Invariant 8: a resync's map covers the bitmap");
    assert(state.run.regionsDone <= state.run.regionsTotal, "a resync copies what it counted");
  });
  assert(slots.size === legs.length, "Invariant 8: every leg has a slot of its own");
  assert(
    legs.some((leg) => leg.state.mode === "in-sync"),
    "Invariant 2: an open mirror has an in-sync leg",
  );
}
