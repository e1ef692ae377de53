/**
 * A disk with a write-back cache, in memory: a FileDevice on a PageCacheFile. What
 * was written is read back at once, but only what an fdatasync covered (a flush, a
 * FUA or preflush write, a close) survives powerLoss(). Tests and the simulation use
 * it to see whether a layer above relies on data that was never made durable, and
 * since it is FileDevice's own sync logic that runs, they also see a FileDevice that
 * skips an fdatasync. `failFlushes` makes every fdatasync fail (EIO), as a disk whose
 * cache cannot be written out.
 */

import { BLOCK_SIZE_DEFAULT } from "../constants.ts";
import { FileDevice } from "./file_device.ts";
import { PageCacheFile } from "./page_cache_file.ts";

export interface VolatileDeviceOptions {
  id?: string;
  name?: string;
  /** Keep the disk's journal of writes and syncs (see PageCacheFile). */
  record?: boolean;
  /** The disk, when it outlives this device (an export process restarted on it). */
  disk?: PageCacheFile;
}

export class VolatileDevice extends FileDevice {
  readonly disk: PageCacheFile;

  constructor(sizeBytes: number, options: VolatileDeviceOptions = {}) {
    const name = options.name ?? "memory";
    const disk = options.disk?.reopen() ??
      new PageCacheFile(sizeBytes, name, { record: options.record });
    super({
      sizeBytes,
      blockSize: BLOCK_SIZE_DEFAULT,
      readOnly: false,
      id: options.id ?? "00000000000000000000000000000000",
      name,
    }, disk);
    this.disk = disk;
  }

  /** What reads see now. */
  get bytes(): Uint8Array {
    return this.disk.cache;
  }

  /** What survives a power loss. */
  get durable(): Uint8Array {
    return this.disk.durable;
  }

  get failFlushes(): boolean {
    return this.disk.failSyncs;
  }

  set failFlushes(fail: boolean) {
    this.disk.failSyncs = fail;
  }

  /** While frozen (the node is going down), flushes make nothing durable. */
  get frozen(): boolean {
    return this.disk.frozen;
  }

  set frozen(frozen: boolean) {
    this.disk.frozen = frozen;
  }

  /** The cache is gone: what was not synced reads as it was before. */
  powerLoss(): void {
    this.disk.powerLoss();
  }
}
