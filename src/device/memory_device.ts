/** A BlockDevice in memory: the model for property tests and a fast stand-in for disks. */

import {
  type BlockDevice,
  checkRange,
  checkWritable,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  settle,
} from "./block_device.ts";
import { BLOCK_SIZE_DEFAULT } from "../constants.ts";

export class MemoryDevice implements BlockDevice {
  readonly info: DeviceInfo;
  readonly bytes: Uint8Array;
  readonly #stats = emptyStats();

  constructor(sizeBytes: number, options: { readOnly?: boolean; id?: string; name?: string } = {}) {
    this.bytes = new Uint8Array(sizeBytes);
    this.info = {
      sizeBytes,
      blockSize: BLOCK_SIZE_DEFAULT,
      readOnly: options.readOnly ?? false,
      id: options.id ?? "00000000000000000000000000000000",
      name: options.name ?? "memory",
    };
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    return settle(() => {
      checkRange(this.info, "read", offset, into.length);
      into.set(this.bytes.subarray(offset, offset + into.length));
      this.#stats.reads += 1;
      this.#stats.readBytes += into.length;
    });
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return settle(() => {
      checkWritable(this.info, "write");
      checkRange(this.info, "write", offset, data.length);
      this.bytes.set(data, offset);
      this.#stats.writes += 1;
      this.#stats.writtenBytes += data.length;
    });
  }

  flush(): Promise<void> {
    this.#stats.flushes += 1;
    return Promise.resolve();
  }

  discard(offset: number, length: number): Promise<void> {
    this.#stats.discards += 1;
    this.#stats.discardBytes += length;
    return this.#zero("discard", offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    this.#stats.zeroes += 1;
    this.#stats.zeroBytes += length;
    return this.#zero("write zeroes to", offset, length);
  }

  stats(): DeviceStats {
    return { ...this.#stats };
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  #zero(what: string, offset: number, length: number): Promise<void> {
    return settle(() => {
      checkWritable(this.info, what);
      checkRange(this.info, what, offset, length);
      this.bytes.fill(0, offset, offset + length);
    });
  }
}
