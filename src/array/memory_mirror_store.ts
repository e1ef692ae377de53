/**
 * A mirror's state kept in memory, with the failures a real folder has: the bitmap's
 * writes are volatile until synced (a power loss of the array's node drops them),
 * saves and syncs can be made to fail or be held, and a crashed process's lock is let
 * go, as the kernel drops a dead process's flock. Unit tests and the simulation
 * (tests/sim/) run mirrors on it; the CLI uses FolderStore.
 *
 * One object is one process's view of the folder: crash() ends it (whatever that
 * process still does changes nothing) and returns the view for the next process.
 */

import { DstError } from "../lib/errors.ts";
import type { MirrorStore } from "./mirror_store.ts";
import type { ImageFile } from "../device/image_file.ts";
import { PageCacheFile } from "../device/page_cache_file.ts";
import type { MirrorState } from "./mirror_state.ts";
import { CLIENT_ID_BYTES } from "../protocol/mod.ts";

/** What the folder holds, shared by the views of the processes that use it in turn. */
interface Folder {
  /** The bitmap, as the page cache holds it and as stable storage does. */
  bitmap: PageCacheFile | null;
  state: string | null;
  clientId: Uint8Array | null;
  locked: boolean;
}

export class MemoryMirrorStore implements MirrorStore {
  readonly #folder: Folder;
  #dead = false;
  /** Makes saveState() throw, as a full or broken disk does. */
  failSaves = false;
  /** Makes the bitmap's syncs fail. */
  failSyncs = false;
  /** Syncs wait for this while it is set (a test holds a sync to see who waits on it). */
  holdSyncs: Promise<void> | null = null;

  constructor(readonly where = "memory", folder?: Folder) {
    this.#folder = folder ?? {
      bitmap: null,
      state: null,
      clientId: null,
      locked: false,
    };
  }

  lock(): { release(): void } {
    if (this.#folder.locked) {
      throw new DstError("STATE_LOCKED", `The state ${this.where} is in use by another array`);
    }
    this.#folder.locked = true;
    return {
      release: () => {
        if (!this.#dead) this.#folder.locked = false;
      },
    };
  }

  loadState(): MirrorState | null {
    return this.#folder.state === null ? null : JSON.parse(this.#folder.state);
  }

  saveState(state: MirrorState): void {
    if (this.failSaves) throw new DstError("STATE", `Cannot write ${this.where}: disk full`);
    if (!this.#dead) this.#folder.state = JSON.stringify(state);
  }

  loadOrCreateClientId(): Uint8Array {
    this.#folder.clientId ??= crypto.getRandomValues(new Uint8Array(CLIENT_ID_BYTES));
    return this.#folder.clientId.slice();
  }

  openBitmap(regions: number, create: boolean): Promise<ImageFile> {
    const folder = this.#folder;
    if (create || folder.bitmap === null) {
      // A failed sync drops what it covered, as Linux does: the bitmap must write it again.
      folder.bitmap = new PageCacheFile(regions, `${this.where}/bitmap`, {
        dropOnFailedSync: true,
      });
    }
    const file = folder.bitmap;
    return Promise.resolve({
      name: file.name,
      statSize: () => file.statSize(),
      punchHole: () => Promise.resolve(false),
      readAt: (into, offset) => file.readAt(into, offset),
      writeAt: (data, offset) => {
        if (!this.#dead) file.writeAt(data, offset);
      },
      datasync: async () => {
        if (this.holdSyncs !== null) await this.holdSyncs;
        if (this.#dead) return new Promise<void>(() => {}); // a dead process waits forever
        // The file fails the sync, and so loses what it covered, as a real one does.
        file.failSyncs = this.failSyncs;
        await file.datasync().catch((error) => {
          throw new DstError("STATE", `Cannot sync ${file.name}: ${error.message}`);
        });
      },
      close: () => {},
    });
  }

  /** The bitmap's bytes as stable storage holds them (what a power loss would leave). */
  durableBitmap(): Uint8Array | null {
    return this.#folder.bitmap?.durable.slice() ?? null;
  }

  /**
   * The process using this view died: its lock is let go and nothing it still does
   * changes the folder. With `powerLoss` its node went down too: what the bitmap had
   * not synced is gone (saves are durable when they return). Returns the view for
   * the process that comes next.
   */
  crash(options: { powerLoss: boolean }): MemoryMirrorStore {
    this.#dead = true;
    const folder = this.#folder;
    folder.locked = false;
    if (options.powerLoss) folder.bitmap?.powerLoss();
    return new MemoryMirrorStore(this.where, folder);
  }
}
