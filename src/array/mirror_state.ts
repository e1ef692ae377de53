/**
 * The mirror's state folder, on the array's own node: `state.json` (the legs, each
 * leg's export id and last write generation, which legs are in sync), `bitmap`
 * (dirty_bitmap.ts) and `client-id`, the mirror's identity towards its legs' exports.
 * state.json is replaced atomically on every change.
 */

import { DstError } from "../lib/errors.ts";
import { ensureDir, readStateFile, stateRoot, writeStateFile } from "../lib/state_file.ts";
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

/** The default state folder of a mirror of these members: one folder per member list. */
export async function defaultMirrorStateDir(members: string[]): Promise<string> {
  const digest = await sha256Hex(`mirror\n${members.join("\n")}`);
  return `${stateRoot()}/arrays/mirror-${digest.slice(0, 16)}`;
}

function statePath(dir: string): string {
  return `${dir}/state.json`;
}

export function bitmapPath(dir: string): string {
  return `${dir}/bitmap`;
}

/** The state in `dir`, or null when there is none; a damaged one is a clear error. */
export function loadMirrorState(dir: string): MirrorState | null {
  const path = statePath(dir);
  const text = readStateFile(path);
  if (text === null) return null;
  const damaged = (why: string) =>
    new DstError(
      "STATE",
      `${path} is damaged (${why}); start over with --source LEG, naming the leg whose data is right`,
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

export function saveMirrorState(dir: string, state: MirrorState): void {
  ensureDir(dir);
  writeStateFile(statePath(dir), JSON.stringify(state, null, 2) + "\n");
}

/** Regions of `regionBytes` covering `sizeBytes`. */
export function regionCount(sizeBytes: number, regionBytes: number): number {
  return Math.ceil(sizeBytes / regionBytes);
}

/**
 * The mirror's client identity, made once and kept in its state folder: a restarted
 * mirror is the same writer to its legs' exports, so it fences its own old
 * connections and takes its writer lease back at once, while any other mirror is
 * refused. Written before any leg is opened.
 */
export function loadOrCreateClientId(dir: string): Uint8Array {
  const path = `${dir}/client-id`;
  const text = readStateFile(path);
  if (text !== null) {
    const hex = text.trim();
    if (!new RegExp(`^[0-9a-f]{${CLIENT_ID_BYTES * 2}}$`).test(hex)) {
      throw new DstError(
        "STATE",
        `${path} is damaged (not ${CLIENT_ID_BYTES * 2} hex digits); remove it only if no ` +
          `other copy of this mirror runs: the mirror then gets a new identity`,
      );
    }
    return hexToBytes(hex);
  }
  const id = crypto.getRandomValues(new Uint8Array(CLIENT_ID_BYTES));
  ensureDir(dir);
  writeStateFile(path, bytesToHex(id) + "\n");
  return id;
}
