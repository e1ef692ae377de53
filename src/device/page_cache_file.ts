/**
 * An ImageFile in memory with a page cache in front of its stable storage, as a file
 * on a real disk has: a write is read back at once but survives powerLoss() only once
 * a datasync() that began after it resolved. With `dropOnFailedSync`, a sync that
 * fails loses what it covered for good, as Linux does: the pages it was writing back
 * are marked clean, so a later sync that succeeds does not write them unless they are
 * written again. Without it, they stay dirty and a later sync writes them. Tests watch the order of its calls in
 * `journal`; they can hold syncs (to see who waits on one), make them fail (a disk
 * whose cache cannot be written out) or freeze the disk (a node going down: syncs
 * resolve and make nothing durable). The simulation's disks and the mirror's
 * in-memory bitmap are built on it.
 */

import type { ImageFile } from "./image_file.ts";

export class PageCacheFile implements ImageFile {
  /** What reads see. */
  readonly cache: Uint8Array;
  /** What survives a power loss. */
  readonly durable: Uint8Array;
  /**
   * Every call in order, when recording: "write OFFSET+LENGTH", "sync" (a datasync
   * began), "synced" (it made durable what was written before it began), "close".
   */
  readonly journal: string[] | null;
  /** Syncs fail (EIO) while set. */
  failSyncs = false;
  /** While frozen, syncs resolve and make nothing durable. */
  frozen = false;
  /** Syncs wait for this while it is set. */
  holdSyncs: Promise<void> | null = null;
  #closed = false;
  /** The bytes written since a sync took them (1 = dirty). */
  readonly #dirty: Uint8Array;
  readonly #dropOnFailedSync: boolean;

  constructor(
    sizeBytes: number,
    readonly name = "memory",
    options: { record?: boolean; dropOnFailedSync?: boolean } = {},
  ) {
    this.cache = new Uint8Array(sizeBytes);
    this.durable = new Uint8Array(sizeBytes);
    this.journal = options.record ? [] : null;
    this.#dirty = new Uint8Array(sizeBytes);
    this.#dropOnFailedSync = options.dropOnFailedSync ?? false;
  }

  readAt(into: Uint8Array, offset: number): number {
    this.#checkOpen();
    const bytes = this.cache.subarray(offset, offset + into.length);
    into.set(bytes);
    return bytes.length;
  }

  writeAt(data: Uint8Array, offset: number): void {
    this.#checkOpen();
    if (offset + data.length > this.cache.length) {
      throw new RangeError(`${this.name}: a write at ${offset} runs past its end`);
    }
    this.journal?.push(`write ${offset}+${data.length}`);
    this.cache.set(data, offset);
    this.#dirty.fill(1, offset, offset + data.length);
  }

  async datasync(): Promise<void> {
    this.#checkOpen();
    this.journal?.push("sync");
    // What is written before the call is what this sync writes back: those pages are
    // clean from here on (a write made meanwhile dirties them again).
    const covered = this.cache.slice();
    const dirty = this.#dirty.slice();
    this.#dirty.fill(0);
    if (this.holdSyncs !== null) await this.holdSyncs;
    if (this.failSyncs) {
      if (!this.#dropOnFailedSync) {
        for (let i = 0; i < dirty.length; i++) this.#dirty[i] ||= dirty[i]!;
      }
      throw new Error(`${this.name}: EIO, the disk cannot write its cache out`);
    }
    if (this.frozen) return;
    for (let i = 0; i < dirty.length; i++) if (dirty[i] === 1) this.durable[i] = covered[i]!;
    this.journal?.push("synced");
  }

  statSize(): number {
    return this.cache.length;
  }

  /** No holes in memory: the caller writes zeroes, which a power loss may lose like any write. */
  punchHole(): Promise<boolean> {
    return Promise.resolve(false);
  }

  close(): void {
    this.#checkOpen();
    this.journal?.push("close");
    this.#closed = true;
  }

  /** Opened again, by a new process (what the cache holds stays, as the kernel keeps it). */
  reopen(): this {
    this.#closed = false;
    return this;
  }

  /** The node lost power: what no sync covered is gone. */
  powerLoss(): void {
    this.cache.set(this.durable);
    this.#dirty.fill(0);
  }

  #checkOpen(): void {
    if (this.#closed) throw new Error(`${this.name} is closed`);
  }
}
