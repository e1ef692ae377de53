/**
 * A mirror's state kept in memory, with the failures a real folder has: the bitmap's
 * writes are volatile until synced (a power loss of the array's node drops them),
 * saves and syncs can be made to fail, and a crashed process's lock is let go, as the
 * kernel drops a dead process's flock. Unit tests and the simulation (tests/sim/)
 * run mirrors on it; the CLI uses FolderStore.
 */

import { DstError } from "../lib/errors.ts";
import { type BitmapFile, type MirrorStore } from "./mirror_store.ts";
import type { MirrorState } from "./mirror_state.ts";
import { CLIENT_ID_BYTES } from "../protocol/mod.ts";

export class MemoryMirrorStore implements MirrorStore {
  /** The bitmap as the page cache holds it, and as stable storage does. */
  #bitmapCache: Uint8Array | null = null;
  #bitmapDurable: Uint8Array | null = null;
  #state: string | null = null;
  #clientId: Uint8Array | null = null;
  #locked = false;
  /** Bumped by crash(): handles of a crashed process change nothing any more. */
  #incarnation = 0;
  /** Makes saveState() throw, as a full or broken disk does. */
  failSaves = false;
  /** Makes the bitmap's syncs fail. */
  failSyncs = false;
  /** Syncs wait for this while it is set (a test holds a sync to see who waits on it). */
  holdSyncs: Promise<void> | null = null;

  constructor(readonly where = "memory") {}

  lock(): { release(): void } {
    if (this.#locked) {
      throw new DstError("STATE_LOCKED", `The state ${this.where} is in use by another array`);
    }
    this.#locked = true;
    const incarnation = this.#incarnation;
    return {
      release: () => {
        if (incarnation === this.#incarnation) this.#locked = false;
      },
    };
  }

  loadState(): MirrorState | null {
    return this.#state === null ? null : JSON.parse(this.#state);
  }

  saveState(state: MirrorState): void {
    if (this.failSaves) throw new DstError("STATE", `Cannot write ${this.where}: disk full`);
    this.#state = JSON.stringify(state);
  }

  loadOrCreateClientId(): Uint8Array {
    this.#clientId ??= crypto.getRandomValues(new Uint8Array(CLIENT_ID_BYTES));
    return this.#clientId.slice();
  }

  openBitmap(regions: number, create: boolean): BitmapFile {
    if (create || this.#bitmapCache === null) {
      this.#bitmapCache = new Uint8Array(regions);
      this.#bitmapDurable = new Uint8Array(regions);
    }
    const incarnation = this.#incarnation;
    const alive = () => incarnation === this.#incarnation;
    return {
      name: `${this.where}/bitmap`,
      size: () => this.#bitmapCache!.length,
      read: (into, offset) => into.set(this.#bitmapCache!.subarray(offset, offset + into.length)),
      write: (from, offset) => {
        if (alive()) this.#bitmapCache!.set(from, offset);
      },
      sync: async () => {
        if (this.holdSyncs !== null) await this.holdSyncs;
        if (!alive()) return new Promise<void>(() => {}); // a dead process waits forever
        if (this.failSyncs) throw new DstError("STATE", `Cannot sync ${this.where}/bitmap`);
        this.#bitmapDurable!.set(this.#bitmapCache!);
      },
      close: () => {},
    };
  }

  /** The bitmap's bytes as they would be read after a power loss (for checks). */
  durableBitmap(): Uint8Array | null {
    return this.#bitmapDurable?.slice() ?? null;
  }

  /**
   * The process using the store died: its lock is let go and its handles change
   * nothing from now on. With `powerLoss`, the node went down too: what the bitmap
   * had not synced is gone (the state is always durable: saves are synchronous).
   */
  crash(options: { powerLoss: boolean }): void {
    this.#incarnation += 1;
    this.#locked = false;
    if (options.powerLoss && this.#bitmapDurable !== null) {
      this.#bitmapCache!.set(this.#bitmapDurable);
    }
  }
}
