/**
 * What a mirror remembers across restarts, and its format: the legs (each leg's
 * export id, last write generation and epoch, which legs are in sync, the order they
 * left sync in), and the mirror's client identity towards its legs' exports. Where it
 * is kept is mirror_store.ts's business.
 */

import { DstError } from "../lib/errors.ts";
import { stateRoot } from "../lib/state_file.ts";
import { bytesToHex, hexToBytes, sha256Hex } from "../lib/hex.ts";
import { CLIENT_ID_BYTES } from "../protocol/mod.ts";
import { LEG_SLOTS_MAX } from "./dirty_bitmap.ts";

export const STATE_VERSION = 1;

/** What a leg is, as remembered across restarts ("resyncing" is remembered as out-of-sync). */
export type LegRecordState = "in-sync" | "out-of-sync" | "detached";

export interface LegRecord {
  /** Its bit in the bitmap, 0..7. */
  slot: number;
  /** The member as the user named it: HOST:PORT or a path. */
  name: string;
  exportId: string;
  /** The leg's write generation as of the mirror's latest connection to it. */
  generation: number;
  /** The epoch that generation counts in (absent in states from before epochs). */
  epoch?: string;
  state: LegRecordState;
  /**
   * When the leg last left sync, as an order (1, 2, ...; higher is later): after the
   * in-sync legs, the leg that left last holds the newest data. Absent: never left.
   */
  leftSyncSeq?: number;
}

export interface MirrorState {
  version: number;
  kind: "mirror";
  arrayId: string;
  sizeBytes: number;
  regionBytes: number;
  legs: LegRecord[];
}

/** Where mirrors without --state keep their states: a folder each (mirror_state_folder.ts). */
export function mirrorStatesRoot(): string {
  return `${stateRoot()}/arrays`;
}

/**
 * The default state folder of a new mirror of the legs with these export ids: named
 * from the set of ids, so neither the members' spelling nor their order changes it.
 */
export async function legIdsStateDir(exportIds: readonly string[]): Promise<string> {
  const digest = await sha256Hex(`mirror legs\n${[...exportIds].sort().join("\n")}`);
  return `${mirrorStatesRoot()}/mirror-${digest.slice(0, 16)}`;
}

/**
 * Where a mirror without --state kept its state before states were found by their
 * legs' ids: one folder per member list, as spelled and ordered. Still looked in, so
 * such a mirror keeps its state.
 */
export async function memberListStateDir(members: readonly string[]): Promise<string> {
  const digest = await sha256Hex(`mirror\n${members.join("\n")}`);
  return `${mirrorStatesRoot()}/mirror-${digest.slice(0, 16)}`;
}

/**
 * The records of a state's legs in the order of `members`, or null when they are not
 * the same legs. A member whose export id is known (`exportIds[i]`) is the record with
 * that id, however it is spelled; one whose id is not (null: it could not be asked) is
 * the record with its name.
 */
export function matchLegs(
  records: readonly LegRecord[],
  members: readonly string[],
  exportIds: readonly (string | null)[],
): LegRecord[] | null {
  if (records.length !== members.length) return null;
  const left = new Set(records);
  const matched: Array<LegRecord | undefined> = members.map(() => undefined);
  // By id first: a name is only asked for the records no id claimed.
  for (const byId of [true, false]) {
    for (const [i, name] of members.entries()) {
      const id = exportIds[i] ?? null;
      if ((id !== null) !== byId) continue;
      const record = [...left].find((r) => byId ? r.exportId === id : r.name === name);
      if (record === undefined) return null;
      left.delete(record);
      matched[i] = record;
    }
  }
  return matched as LegRecord[];
}

/**
 * The state in `text` (from `where`, named in messages), checked; a damaged one is a
 * clear error that says how to start over.
 */
export function parseMirrorState(text: string, where: string): MirrorState {
  const damaged = (why: string) =>
    new DstError(
      "STATE",
      `${where} is damaged (${why}); start over with --source LEG --force, naming the leg whose data is right`,
    );
  let state: MirrorState;
  try {
    state = JSON.parse(text);
  } catch {
    throw damaged("not JSON");
  }
  if (state.version !== STATE_VERSION || state.kind !== "mirror") throw damaged("wrong version");
  if (!Number.isSafeInteger(state.sizeBytes) || state.sizeBytes <= 0) throw damaged("size");
  if (!Number.isSafeInteger(state.regionBytes) || state.regionBytes <= 0) throw damaged("region");
  if (typeof state.arrayId !== "string" || !/^[0-9a-f]{32}$/.test(state.arrayId)) {
    throw damaged("array id");
  }
  if (!Array.isArray(state.legs) || state.legs.length === 0) throw damaged("no legs");
  const slots = new Set<number>();
  for (const leg of state.legs) {
    const ok = typeof leg.name === "string" && typeof leg.exportId === "string" &&
      Number.isSafeInteger(leg.generation) && Number.isSafeInteger(leg.slot) &&
      leg.slot >= 0 && leg.slot < LEG_SLOTS_MAX && !slots.has(leg.slot) &&
      ["in-sync", "out-of-sync", "detached"].includes(leg.state);
    if (!ok) throw damaged(`leg ${JSON.stringify(leg)}`);
    slots.add(leg.slot);
  }
  return state;
}

export function formatMirrorState(state: MirrorState): string {
  return JSON.stringify(state, null, 2) + "\n";
}

/** Regions of `regionBytes` covering `sizeBytes`. */
export function regionCount(sizeBytes: number, regionBytes: number): number {
  return Math.ceil(sizeBytes / regionBytes);
}

/** A client identity as kept in the state (32 hex digits), or a clear error. */
export function parseClientId(text: string, where: string): Uint8Array {
  const hex = text.trim();
  if (!new RegExp(`^[0-9a-f]{${CLIENT_ID_BYTES * 2}}$`).test(hex)) {
    throw new DstError(
      "STATE",
      `${where} is damaged (not ${CLIENT_ID_BYTES * 2} hex digits); remove it only if no ` +
        `other copy of this mirror runs: the mirror then gets a new identity`,
    );
  }
  return hexToBytes(hex);
}

export function formatClientId(id: Uint8Array): string {
  return bytesToHex(id) + "\n";
}
