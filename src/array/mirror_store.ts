/**
 * Where a mirror keeps what it must remember, behind a seam: the state folder on the
 * array's own node (FolderStore), or memory (memory_mirror_store.ts, for unit tests
 * and the simulation, where it can lose what it had not synced).
 *
 * A folder holds `lock` (state_lock.ts), `state.json` (replaced atomically and
 * durably on every change), `bitmap` (dirty_bitmap.ts) and `client-id`.
 */

import * as fs from "node:fs";
import { DstError } from "../lib/errors.ts";
import { type ImageFile, openImageFile } from "../device/image_file.ts";
import { ensureDir, readStateFile, writeStateFile } from "../lib/state_file.ts";
import {
  formatClientId,
  formatMirrorState,
  type MirrorState,
  parseClientId,
  parseMirrorState,
} from "./mirror_state.ts";
import { StateLock } from "./state_lock.ts";
import { CLIENT_ID_BYTES } from "../protocol/mod.ts";

export interface MirrorStore {
  /** Where the state is, as the user knows it (the folder). */
  readonly where: string;
  /** Takes the store for this process alone, or throws STATE_LOCKED saying who has it. */
  lock(): { release(): void };
  /** The saved state, or null when there is none (a new mirror). */
  loadState(): MirrorState | null;
  /** Replaces the state atomically; durable when it returns (throws when it cannot be). */
  saveState(state: MirrorState): void;
  /** The mirror's identity towards its legs' exports, made once and kept. */
  loadOrCreateClientId(): Uint8Array;
  /** Opens the bitmap; `create` makes a new, clear one of `regions` bytes, durably. */
  openBitmap(regions: number, create: boolean): Promise<ImageFile>;
}

/** A mirror's state in a folder of the array's node. */
export class FolderStore implements MirrorStore {
  constructor(readonly where: string) {}

  lock(): { release(): void } {
    return StateLock.take(this.where);
  }

  loadState(): MirrorState | null {
    const path = `${this.where}/state.json`;
    const text = readStateFile(path);
    return text === null ? null : parseMirrorState(text, path);
  }

  saveState(state: MirrorState): void {
    ensureDir(this.where);
    writeStateFile(`${this.where}/state.json`, formatMirrorState(state));
  }

  loadOrCreateClientId(): Uint8Array {
    const path = `${this.where}/client-id`;
    const text = readStateFile(path);
    if (text !== null) return parseClientId(text, path);
    const id = crypto.getRandomValues(new Uint8Array(CLIENT_ID_BYTES));
    ensureDir(this.where);
    writeStateFile(path, formatClientId(id));
    return id;
  }

  openBitmap(regions: number, create: boolean): Promise<ImageFile> {
    ensureDir(this.where);
    return openBitmapFile(`${this.where}/bitmap`, regions, create);
  }
}

/** The bitmap as a file: created full size and synced, or opened as it is. */
export async function openBitmapFile(
  path: string,
  regions: number,
  create: boolean,
): Promise<ImageFile> {
  let file: ImageFile;
  try {
    // A new bitmap replaces what is there, exclusively: a link at the path is removed,
    // never written through.
    if (create) fs.rmSync(path, { force: true });
    file = openImageFile(path, create ? "wx+" : "r+");
  } catch (error) {
    throw new DstError("STATE", `Cannot open the mirror bitmap ${path}: ${error}`, {
      cause: error,
    });
  }
  if (create) {
    // Durable before the state that names it is saved: a crash never leaves a state
    // whose bitmap is missing or short.
    try {
      file.writeAt(new Uint8Array(regions), 0);
      await file.datasync();
    } catch (error) {
      file.close();
      throw new DstError("STATE", `Cannot write the mirror bitmap ${path}: ${error}`, {
        cause: error,
      });
    }
  }
  return file;
}
