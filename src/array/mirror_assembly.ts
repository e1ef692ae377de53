/**
 * Opening a mirror (README, "dst array"): from its saved state, or a new one made from
 * its members.
 *
 * Owns: checking the members against the state, taking the state's lock, choosing a
 * new mirror's source without guessing, the checks a member passes whenever it is
 * opened as a leg (identity, fit, write stamp: also used by a running mirror),
 * reconciling what a crash left marked, and the advice when no in-sync leg is
 * reachable. Does not own: the running mirror (mirror.ts, which starts watching,
 * saving and resyncing the legs this assembles), copying (mirror_resync.ts), or the
 * legs' modes (mirror_leg.ts, whose transitions it calls).
 */

import type { BlockDevice, DeviceInfo } from "../device/block_device.ts";
import { HandshakeRefused } from "../client/dial.ts";
import { DstError } from "../lib/errors.ts";
import { randomId } from "../lib/hex.ts";
import type { Logger } from "../lib/log.ts";
import { DirtyBitmap, LEG_SLOTS_MAX } from "./dirty_bitmap.ts";
import {
  deviceOf,
  leaveSync,
  type Leg,
  newLeg,
  noteOutOfSync,
  reasonOf,
  slotsMask,
} from "./mirror_leg.ts";
import {
  type LegRecord,
  matchLegs,
  type MirrorState,
  regionCount,
  STATE_VERSION,
} from "./mirror_state.ts";
import type { OpenedMember } from "./members.ts";
import type { MirrorOptions } from "./mirror.ts";

/** What a mirror is made of once its members are opened and checked against its state. */
export interface Assembled {
  state: MirrorState;
  /** One per record of the state, in its order; the first in-sync one is the source. */
  legs: Leg[];
  bitmap: DirtyBitmap;
  blockSize: number;
  /** The state's lock, held until the mirror closes. */
  lock: { release(): void };
  /** The mirror's identity towards its legs' exports. */
  clientId: Uint8Array;
}

/**
 * Opens the legs of a mirror of `members` with its state in options.store: checks the
 * state against the members, connects every leg and reconciles what a crash left
 * marked. Whatever it opened is closed again when it throws.
 */
export async function assembleMirror(
  members: string[],
  options: MirrorOptions,
): Promise<Assembled> {
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
    return await openLocked(members, options, lock);
  } catch (error) {
    lock.release();
    throw error;
  }
}

async function openLocked(
  members: string[],
  options: MirrorOptions,
  lock: { release(): void },
): Promise<Assembled> {
  const previous = loadPrevious(options);
  // One identity for every leg connection, kept in the store: a restarted mirror is
  // the same writer, so it fences its own old connections and takes its lease back.
  const clientId = options.store.loadOrCreateClientId();
  if (previous !== null) {
    const known = previous.legs.map((l) => l.name);
    const same = known.length === members.length && known.every((n) => members.includes(n));
    const matched = same || options.memberIds === undefined
      ? null
      : matchLegs(previous.legs, members, options.memberIds);
    if (matched !== null) renameLegs(previous, matched, members, options);
    if (!same && matched === null) {
      throw new DstError(
        "STATE",
        `The mirror state in ${options.store.where} is for legs ${known.join(", ")}, ` +
          `not ${members.join(", ")}: pass the same legs, another --state, or --source MEMBER ` +
          "--force to start over from that member's data (the others then get a full copy)",
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
    const { state, legs, bitmap, blockSize } = await assemble(members, opened, previous, options);
    return { state, legs, bitmap, blockSize, lock, clientId };
  } catch (error) {
    await Promise.allSettled(
      opened.map((o) => o instanceof Error ? undefined : o.device.close()),
    );
    throw error;
  }
}

/**
 * The legs of a state found by their export ids take the names the members are given
 * now (`matched` in their order), saved: the name is how the mirror finds a leg's
 * member and how its status shows it.
 */
function renameLegs(
  state: MirrorState,
  matched: LegRecord[],
  members: string[],
  options: MirrorOptions,
): void {
  let renamed = false;
  for (const [i, record] of matched.entries()) {
    if (record.name === members[i]) continue;
    options.log.info(
      `leg ${record.name} is ${members[i]} now (the same export, id ${record.exportId})`,
    );
    record.name = members[i]!;
    renamed = true;
  }
  if (renamed) options.store.saveState(state);
}

/**
 * The state the mirror reopens, or null for a new one (no state, or a start over).
 * --source over a state is refused without --force: starting over throws away what
 * only the state knows (which legs are in sync, the dirty regions), and a rerun of the
 * command that made the mirror must not do that silently.
 */
function loadPrevious(options: MirrorOptions): MirrorState | null {
  // A start over, as asked: the state is not even read (it may be damaged).
  if (options.source !== undefined && options.force === true) return null;
  const previous = options.store.loadState();
  if (previous !== null && options.source !== undefined) {
    throw new DstError(
      "STATE",
      `${options.store.where} holds a mirror's state: --source ${options.source} would ` +
        `start over with a full copy from ${options.source} to the other legs, discarding ` +
        "what the mirror knows (which legs are in sync, the dirty regions). To do that, " +
        "add --force; to reopen the mirror as it is, leave out --source",
    );
  }
  return previous;
}

/** A new mirror's state (or a start over's): every member must be here to size it. */
async function newState(
  members: string[],
  opened: Array<OpenedMember | Error>,
  options: MirrorOptions,
): Promise<MirrorState> {
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
  const source = options.source ?? await pickSource(members, devices, options);
  const sizeBytes = Math.min(...devices.map((o) => o.device.info.sizeBytes));
  return {
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
}

async function assemble(
  members: string[],
  opened: Array<OpenedMember | Error>,
  previous: MirrorState | null,
  options: MirrorOptions,
): Promise<Omit<Assembled, "lock" | "clientId">> {
  const fresh = previous === null;
  const state = previous ?? await newState(members, opened, options);
  const regions = regionCount(state.sizeBytes, state.regionBytes);
  const bitmap = DirtyBitmap.open(await options.store.openBitmap(regions, fresh), regions);
  try {
    return { state, bitmap, ...(await reconcile(state, fresh, bitmap, members, opened, options)) };
  } catch (error) {
    // A failed open leaves nothing of its own open (the caller closes the members).
    await bitmap.close().catch(() => {});
    throw error;
  }
}

/**
 * The legs of `state` with the members that opened, their stamps checked, and what a
 * crash left marked reconciled from the first reachable in-sync leg.
 */
async function reconcile(
  state: MirrorState,
  fresh: boolean,
  bitmap: DirtyBitmap,
  members: string[],
  opened: Array<OpenedMember | Error>,
  options: MirrorOptions,
): Promise<{ legs: Leg[]; blockSize: number }> {
  const log = options.log;
  const regions = bitmap.regions;
  if (fresh) {
    for (const leg of state.legs) {
      if (leg.state !== "in-sync") await bitmap.markAll(1 << leg.slot);
    }
  }

  // Each leg as its record says, but without a device where its member cannot be one.
  const legs: Leg[] = [];
  for (const [i, record] of state.legs.entries()) {
    const member = opened[members.indexOf(record.name)]!;
    if (record.state === "detached") {
      legs.push(newLeg(record, { mode: "detached" }));
      continue;
    }
    if (member instanceof Error) {
      legs.push(newLeg(record, { mode: "out-of-sync", device: null, reason: member.message }));
      log.warn(`leg ${record.name} is not reachable: ${member.message}`);
      continue;
    }
    const refusal = checkIdentity(record, member, state.sizeBytes);
    if (refusal !== null) {
      await member.device.close();
      legs.push(newLeg(record, { mode: "out-of-sync", device: null, reason: refusal }));
      log.error(`leg ${record.name}: ${refusal}`);
      continue;
    }
    const leg = newLeg(
      record,
      record.state === "in-sync"
        ? { mode: "in-sync", device: member.device, reason: null }
        : { mode: "out-of-sync", device: member.device, reason: null },
    );
    legs.push(leg);
    // A new mirror's records hold the generations it was made with already.
    if (fresh) continue;
    // Another leg in sync as the state says, reachable or not (one that is down holds the
    // mirror's newest data), unless this loop took it out for a foreign write: whatever
    // the order the legs are listed in.
    const othersInSync = state.legs.some((r, j) => {
      if (r === record || r.state !== "in-sync") return false;
      const seen = j < i ? legs[j]! : null;
      return seen === null || seen.state.mode === "in-sync" || deviceOf(seen) === null;
    });
    await checkGeneration(leg, member, state.legs, othersInSync, bitmap, log);
  }

  // After a crash, in-sync legs may differ where the bitmap is marked: the first
  // reachable in-sync leg is the truth; the others are brought level from it.
  const source = legs.find((l) => l.state.mode === "in-sync");
  // (Its mode is asked again only to tell the type checker that it has a device.)
  if (source === undefined || source.state.mode !== "in-sync") {
    throw new DstError("CONNECT", noSourceAdvice(legs, members, options));
  }
  // Where only the source is marked (a write it took that the others may not have, or
  // a crash before they were marked), the others are marked too: they are copied.
  const others = slotsMask(state.legs.filter((r) => r !== source.record));
  const sourceOnly: Promise<void>[] = [];
  for (let r = 0; r < regions; r++) {
    if (bitmap.has(r, source.record.slot)) sourceOnly.push(bitmap.mark(r, r, others));
  }
  await Promise.all(sourceOnly);
  for (const leg of legs) {
    // Invariant 2 holds: the source stays in sync.
    if (leg !== source && leg.state.mode === "in-sync" && bitmap.count(leg.record.slot) > 0) {
      leaveSync(
        leg,
        "regions marked when the array stopped; reconciling them from " + source.record.name,
        state.legs,
      );
    }
  }
  // The source is the truth from here on: its own marks clear once it is flushed
  // (Invariant 1).
  await source.state.device.flush();
  for (let r = 0; r < regions; r++) bitmap.clear(r, 1 << source.record.slot);
  await bitmap.flush();

  const blockSize = Math.max(...legs.map((l) => deviceOf(l)?.info.blockSize ?? 512));
  return { legs, blockSize };
}

/**
 * What to do when no in-sync leg is reachable at start: the in-sync legs hold the
 * newest data (the last one never leaves sync), then the one that left sync last.
 */
function noSourceAdvice(legs: Leg[], members: string[], options: MirrorOptions): string {
  // In sync as the state says and not taken out now (a leg written by someone else is
  // reachable, so taken out only if it was): newest; then by when they left sync.
  const rank = (l: Leg) =>
    l.record.state === "in-sync" && (l.state.mode === "in-sync" || deviceOf(l) === null)
      ? Infinity
      : l.record.leftSyncSeq ?? 0;
  // Newest first; ties keep the listed order (Infinity - Infinity would be NaN).
  const byNewest = [...legs].filter((l) => l.state.mode !== "detached").sort((a, b) =>
    rank(a) === rank(b) ? 0 : rank(a) > rank(b) ? -1 : 1
  );
  const newest = byNewest[0]?.record.name ?? members[0]!;
  const why = legs.map((l) => `${l.record.name}: ${reasonOf(l) ?? l.state.mode}`).join("; ");
  return `No in-sync leg of the mirror is reachable (${why}). ${newest} holds the newest ` +
    `data: start its export and run this again. Only if it is lost for good, start over ` +
    `from the next newest with\n  dst array mirror ${members.join(" ")} --source ` +
    `${byNewest[1]?.record.name ?? newest} --state ${options.store.where} --force`;
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

/**
 * A new mirror's source when no --source was given, without guessing: each leg's
 * write generation, now that this mirror holds its lease, is 1 exactly when nobody
 * but this mirror was ever granted writing to it. At most one leg written: that one
 * (or the first, when none was) is the source. More than one: their data may differ
 * and only the user knows which is right, so the mirror is refused.
 */
async function pickSource(
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

/** Why a device cannot be a leg of a mirror of `sizeBytes` ("is read-only"), or null. */
export function checkFit(info: DeviceInfo, sizeBytes: number): string | null {
  if (info.sizeBytes < sizeBytes) {
    return `is ${info.sizeBytes} bytes, smaller than the mirror's ${sizeBytes}`;
  }
  if (info.readOnly) return "is read-only";
  return null;
}

/** Why an opened member cannot be the leg `record` names, or null. */
export function checkIdentity(
  record: LegRecord,
  member: OpenedMember,
  sizeBytes: number,
): string | null {
  const info = member.device.info;
  if (info.id !== record.exportId) {
    return `is a different export now (id ${info.id}, was ${record.exportId}); ` +
      "detach it and attach the new one, or start over with --source MEMBER --force";
  }
  return checkFit(info, sizeBytes);
}

/**
 * Takes a leg's write generation as of a new connection into its record. A leg
 * whose generation is not the one we recorded was written by someone else: full copy
 * (Invariant 7). `records` are all the mirror's legs'; `othersInSync` says whether a
 * leg other than this one is in sync. Resolves with the slots (a mask) of the other
 * legs it marked for a full copy, once the marks are durable.
 */
export function checkGeneration(
  leg: Leg,
  stamp: { generation: number; epoch: string },
  records: readonly LegRecord[],
  othersInSync: boolean,
  bitmap: DirtyBitmap,
  log: Logger,
): Promise<number> {
  // The mirror is the same writer on every connection: any change is someone else's
  // grant, and another epoch is an export that lost its state (anything may have happened).
  const { generation, epoch } = stamp;
  const record = leg.record;
  const sameEpoch = record.epoch === epoch;
  if (generation === record.generation && sameEpoch) return Promise.resolve(0);
  const what = sameEpoch
    ? `was written by someone else while away (write generation ${generation}, expected ` +
      `${record.generation})`
    : `has lost or replaced its export state (write epoch ${epoch.slice(0, 8)}, recorded ` +
      `${record.epoch === undefined ? "none" : record.epoch.slice(0, 8)})`;
  let mask = 1 << record.slot;
  if (leg.state.mode === "in-sync" && !othersInSync) {
    // The only in-sync leg: no better copy exists, so its data stands (Invariant 2), and
    // every other leg gets a full copy of it (the foreign writes may be anywhere).
    log.error(
      `leg ${record.name} ${what}; it is the only in-sync leg, so its data stands ` +
        "and the other legs get a full copy of it",
    );
    mask = slotsMask(records.filter((r) => r !== record));
  } else {
    log.warn(`leg ${record.name} ${what}; it gets a full copy`);
    const reason = sameEpoch ? "written by someone else while away" : "its export lost its state";
    if (leg.state.mode === "in-sync" || leg.state.mode === "resyncing") {
      leaveSync(leg, reason, records);
    } else {
      noteOutOfSync(leg, reason);
    }
  }
  // Invariant 7: the record (saved by the caller) names the new generation only once
  // the marks are durable.
  return bitmap.markAll(mask).then(() => {
    record.generation = generation;
    record.epoch = epoch;
    return mask & ~(1 << record.slot);
  });
}
