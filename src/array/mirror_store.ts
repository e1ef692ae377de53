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

/** The bitmap's bytes on stable storage: written in place, made durable by sync(). */
export interface BitmapFile {
  /** Named in messages. */
  readonly name: string;
  size(): number;
  read(into: Uint8Array, offset: number): void;
  /** Writes; durable only once a later sync() resolves. */
  write(from: Uint8Array, offset: number): void;
  sync(): Promise<void>;
  close(): void;
}

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
  /** Opens the bitmap; `create` makes a new, clear one of `regions` bytes. */
  openBitmap(regions: number, create: boolean): BitmapFile;
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

  openBitmap(regions: number, create: boolean): BitmapFile {
    ensureDir(this.where);
    return openBitmapFile(`${this.where}/bitmap`, regions, create);
  }
}

/** The bitmap as a file: created full size and synced, or opened as it is. */
export function openBitmapFile(path: string, regions: number, create: boolean): BitmapFile {
  let fd: number;
  try {
    fd = fs.openSync(path, create ? "w+" : "r+", 0o600);
  } catch (error) {
    throw new DstError("STATE", `Cannot open the mirror bitmap ${path}: ${error}`, {
      cause: error,
    });
  }
  if (create) {
    fs.writeSync(fd, new Uint8Array(regions), 0, regions, 0);
    fs.fdatasyncSync(fd);
  }
  return {
    name: path,
    size: () => fs.fstatSync(fd).size,
    read: (into, offset) => void fs.readSync(fd, into, 0, into.length, offset),
    write: (from, offset) => void fs.writeSync(fd, from, 0, from.length, offset),
    sync: () =>
      new Promise<void>((resolve, reject) =>
        fs.fdatasync(fd, (error) => error ? reject(error) : resolve())
      ),
    close: () => fs.closeSync(fd),
  };
}
