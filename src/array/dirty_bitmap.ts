/**
 * The mirror's write-intent bitmap, kept on the array's own node (never on a leg):
 * one byte per region, one bit per leg slot (so at most 8 legs). A set bit means
 * "this leg may differ from the array's data in this region".
 *
 * - Before a write goes out, its regions' bits are set for every leg and the change
 *   is on stable storage (`mark()` resolves then). A region already marked costs
 *   nothing, so a busy region is persisted once, not per write.
 * - Bits are cleared lazily (`clear()` changes memory; the next flush writes it): a
 *   bit that stays set too long only means a region is copied that did not need it.
 *
 * After a crash, a set bit for an in-sync leg names a region that may have had a
 * write in flight; for an out-of-sync leg, a region it missed.
 *
 * The file is the bytes themselves, `regions` long; concurrent marks share one
 * write and one sync. Where the file lives is the store's business (mirror_store.ts).
 */

import { assert } from "../lib/assert.ts";
import { DstError } from "../lib/errors.ts";
import type { ImageFile } from "../device/image_file.ts";
import { plural } from "../lib/plural.ts";

export const LEG_SLOTS_MAX = 8;

export class DirtyBitmap {
  readonly #bytes: Uint8Array;
  readonly #file: ImageFile;
  #changedFirst = Infinity;
  #changedLast = -1;
  /**
   * A change may not be on stable storage yet: one not written out, or one whose
   * write or fdatasync failed. True at open too: a process that crashed may have
   * left its last writes to the file unsynced.
   */
  #syncNeeded = true;
  /** A flush not yet started: it will carry every change made so far. */
  #scheduled: Promise<void> | null = null;
  #running: Promise<void> | null = null;
  /** The flush that makes the latest mark durable (a repeated mark waits for it too). */
  #closed = false;

  private constructor(file: ImageFile, bytes: Uint8Array) {
    this.#file = file;
    this.#bytes = bytes;
  }

  /** Reads the bitmap from `file` (just made, or as a crash left it). */
  static open(file: ImageFile, regions: number): DirtyBitmap {
    assert(Number.isSafeInteger(regions) && regions > 0, "a bitmap has regions");
    const size = file.statSize();
    if (size !== regions) {
      file.close();
      throw new DstError(
        "STATE",
        `The mirror bitmap ${file.name} has ${plural(size, "region")}, the state says ` +
          `${regions}: ` +
          "the state folder is damaged; start over with --source LEG --force",
      );
    }
    const bytes = new Uint8Array(regions);
    file.readAt(bytes, 0);
    return new DirtyBitmap(file, bytes);
  }

  get name(): string {
    return this.#file.name;
  }

  get regions(): number {
    return this.#bytes.length;
  }

  has(region: number, slot: number): boolean {
    return (this.#bytes[region]! & (1 << slot)) !== 0;
  }

  /** How many regions are marked for `slot`. */
  count(slot: number): number {
    const bit = 1 << slot;
    let n = 0;
    for (const byte of this.#bytes) if ((byte & bit) !== 0) n += 1;
    return n;
  }

  /** Sets the bits of `mask` in regions first..last; resolves once that is durable. */
  mark(first: number, last: number, mask: number): Promise<void> {
    let changed = false;
    for (let region = first; region <= last; region++) {
      const byte = this.#bytes[region]!;
      if ((byte & mask) !== mask) {
        this.#bytes[region] = byte | mask;
        this.#noteChange(region);
        changed = true;
      }
    }
    return this.#marked(changed);
  }

  /**
   * What a mark waits for: a flush of its change; or, with every change taken by a
   * write-out already, the one running (if it fails, so does the mark); or nothing,
   * as the last one succeeded (a failed one leaves #syncNeeded set, so a mark whose
   * bits were set already but not made durable flushes again).
   */
  #marked(changed: boolean): Promise<void> {
    if (changed || this.#syncNeeded) return this.flush();
    return this.#running ?? Promise.resolve();
  }

  /** Sets the bits of `mask` in every region (a leg that needs a full copy). */
  markAll(mask: number): Promise<void> {
    return this.mark(0, this.regions - 1, mask);
  }

  /**
   * Sets the bits of `mask` in every region where `slot`'s bit is set, at once in
   * memory; resolves once that is durable.
   */
  markWhere(slot: number, mask: number): Promise<void> {
    const bit = 1 << slot;
    let changed = false;
    for (let region = 0; region < this.regions; region++) {
      const byte = this.#bytes[region]!;
      if ((byte & bit) === 0 || (byte & mask) === mask) continue;
      this.#bytes[region] = byte | mask;
      this.#noteChange(region);
      changed = true;
    }
    return this.#marked(changed);
  }

  /** Clears the bits of `mask` in `region`, in memory; the next flush writes it. */
  clear(region: number, mask: number): void {
    const byte = this.#bytes[region]!;
    if ((byte & mask) === 0) return;
    this.#bytes[region] = byte & ~mask;
    this.#noteChange(region);
  }

  /**
   * Writes every change so far and fdatasyncs; concurrent callers share one. With
   * nothing changed since the last flush that succeeded, and none running, there is
   * nothing to make durable (the sweeper calls this every time regions go idle).
   */
  flush(): Promise<void> {
    if (this.#scheduled !== null) return this.#scheduled;
    if (!this.#syncNeeded && this.#running === null && !this.#closed) return Promise.resolve();
    const run = async () => {
      await (this.#running ?? Promise.resolve()).catch(() => {});
      this.#scheduled = null; // changes from here on need the next flush
      const writing = this.#writeOut();
      this.#running = writing;
      try {
        await writing;
      } finally {
        if (this.#running === writing) this.#running = null;
      }
    };
    this.#scheduled = run();
    return this.#scheduled;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.flush().catch(() => {});
    this.#closed = true;
    this.#file.close();
  }

  #noteChange(region: number): void {
    this.#syncNeeded = true;
    if (region < this.#changedFirst) this.#changedFirst = region;
    if (region > this.#changedLast) this.#changedLast = region;
  }

  async #writeOut(): Promise<void> {
    if (this.#closed) throw new DstError("STATE", `${this.name} is closed`);
    const first = this.#changedFirst;
    const last = this.#changedLast;
    this.#changedFirst = Infinity;
    this.#changedLast = -1;
    this.#syncNeeded = false; // until a change or a failure from here on
    if (last >= first) {
      try {
        this.#file.writeAt(this.#bytes.subarray(first, last + 1), first);
      } catch (error) {
        this.#noteChange(first);
        this.#noteChange(last);
        throw new DstError("STATE", `Cannot write the mirror bitmap ${this.name}: ${error}`);
      }
    }
    try {
      await this.#file.datasync();
    } catch (error) {
      // The kernel may have marked the pages of a failed sync clean (Linux does): the
      // next write-out writes them again, not only syncs.
      this.#syncNeeded = true;
      if (last >= first) {
        this.#noteChange(first);
        this.#noteChange(last);
      }
      throw error;
    }
  }
}
