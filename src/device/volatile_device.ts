/**
 * A memory device with a volatile cache, as a disk with write-back caching behaves:
 * what was written is read back at once, but only what a flush (or a FUA write)
 * covered survives powerLoss(). Tests and simulations use it to see whether a layer
 * above relies on data that was never made durable. `failFlushes` makes every flush
 * fail (EIO), as a disk whose cache cannot be written out.
 */

import type { IoFlags } from "./block_device.ts";
import { DeviceError } from "../lib/errors.ts";
import { MemoryDevice } from "./memory_device.ts";

export class VolatileDevice extends MemoryDevice {
  /** What survives a power loss. */
  readonly durable: Uint8Array;
  failFlushes = false;
  /** While frozen (the node is going down), flushes make nothing durable. */
  frozen = false;

  constructor(sizeBytes: number, options: { id?: string; name?: string } = {}) {
    super(sizeBytes, options);
    this.durable = new Uint8Array(sizeBytes);
  }

  override async write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    if (flags?.preflush) await this.flush();
    await super.write(offset, data);
    if (flags?.fua) await this.#persist(offset, data.length);
  }

  override async writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    await super.writeZeroes(offset, length);
    if (flags?.fua) await this.#persist(offset, length);
  }

  override async discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    await super.discard(offset, length);
    if (flags?.fua) await this.#persist(offset, length);
  }

  override async flush(): Promise<void> {
    await super.flush();
    await this.#persist(0, this.info.sizeBytes);
  }

  /** The cache is gone: what was not flushed reads as it was before. */
  powerLoss(): void {
    this.bytes.set(this.durable);
  }

  #persist(offset: number, length: number): Promise<void> {
    if (this.failFlushes) {
      return Promise.reject(new DeviceError("EIO", "flush failed: the disk's cache is broken"));
    }
    if (!this.frozen) this.durable.set(this.bytes.subarray(offset, offset + length), offset);
    return Promise.resolve();
  }
}
