/**
 * The one abstraction: anything that holds blocks. Every server serves a BlockDevice
 * and every array is made of them, so exporting a disk, attaching one and stacking
 * arrays into trees are the same few parts put together (README, "Layout").
 *
 * Contract for callers: a request lies inside [0, sizeBytes); buffers passed in are
 * not touched by the caller until the returned promise settles. Requests in flight
 * at the same time may complete in any order; a caller that needs two overlapping
 * requests ordered waits for the first (RemoteDevice does this itself).
 */

import { DeviceError } from "../lib/errors.ts";

export interface IoFlags {
  /** The data is on stable storage before the promise resolves. */
  fua?: boolean;
  /** Everything completed before this request is on stable storage before it runs. */
  preflush?: boolean;
}

export interface DeviceInfo {
  readonly sizeBytes: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  /** Stable across restarts; 32 hex digits. */
  readonly id: string;
  /** What a person would call it: a path, or HOST:PORT. */
  readonly name: string;
}

export interface DeviceStats {
  reads: number;
  readBytes: number;
  writes: number;
  writtenBytes: number;
  flushes: number;
  discards: number;
  /** The bytes that discards named (what they freed or zeroed). */
  discardBytes: number;
  zeroes: number;
  zeroBytes: number;
  errors: number;
}

export interface BlockDevice {
  readonly info: DeviceInfo;
  read(offset: number, into: Uint8Array): Promise<void>;
  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void>;
  flush(): Promise<void>;
  /** Trim: the range's contents may be dropped; DST devices read it back as zeroes. */
  discard(offset: number, length: number, flags?: IoFlags): Promise<void>;
  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void>;
  stats(): DeviceStats;
  close(): Promise<void>;
}

export function emptyStats(): DeviceStats {
  return {
    reads: 0,
    readBytes: 0,
    writes: 0,
    writtenBytes: 0,
    flushes: 0,
    discards: 0,
    discardBytes: 0,
    zeroes: 0,
    zeroBytes: 0,
    errors: 0,
  };
}

/**
 * Throws a DeviceError when [offset, offset + length) is not inside the device.
 * Reads past the end are EINVAL and writes ENOSPC, as NBD maps them.
 */
export function checkRange(info: DeviceInfo, what: string, offset: number, length: number): void {
  if (
    !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 ||
    offset + length > info.sizeBytes
  ) {
    const errno = what === "read" ? "EINVAL" : "ENOSPC";
    throw new DeviceError(
      errno,
      `Cannot ${what} ${length} bytes at offset ${offset}: ${info.name} is ${info.sizeBytes} bytes`,
    );
  }
}

export function checkWritable(info: DeviceInfo, what: string): void {
  if (info.readOnly) {
    throw new DeviceError("EPERM", `Cannot ${what}: ${info.name} is read-only`);
  }
}

/** Runs synchronous device work and reports its outcome as a promise (a throw rejects). */
export function settle(work: () => void): Promise<void> {
  try {
    work();
    return Promise.resolve();
  } catch (error) {
    return Promise.reject(error);
  }
}

/** What a device learned about its export when its connection was made again. */
export interface Reconnection {
  /** The export's write stamp now (see the protocol spec, "Write generation"). */
  writeGeneration: number;
  writeEpoch: string;
  /**
   * The export's process started again since the last connection: what its disk had
   * not flushed may be gone (a node that lost power restarts its export).
   */
  restarted: boolean;
}

/** Called when a device's connection was made again. */
export type ReconnectListener = (reconnection: Reconnection) => void;

/**
 * A device whose connection comes and goes (RemoteDevice): what a mirror needs to
 * follow a leg's reconnects, without knowing the class behind it.
 */
export interface Reconnecting {
  /** A connection is up now. */
  readonly connected: boolean;
  /** It gave up for good (the export changed identity): open it again to go on. */
  readonly gaveUp: boolean;
  setReconnectListener(listener: ReconnectListener): void;
}

/** `device` as Reconnecting when it is one, else null (a local file never reconnects). */
export function reconnecting(device: BlockDevice): (BlockDevice & Reconnecting) | null {
  return "setReconnectListener" in device ? device as BlockDevice & Reconnecting : null;
}
