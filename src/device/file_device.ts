/**
 * A BlockDevice on an image file or a block device, over an ImageFile (image_file.ts):
 * the real file, or one in memory whose syncs a test watches (page_cache_file.ts).
 * What it owns is when to sync: PREFLUSH syncs before the write, FUA after it, a
 * flush joins the sync queued behind a running one, close syncs before it closes.
 *
 * Reads and writes are synchronous positional calls (pread/pwrite through node:fs):
 * measured here at 1.2M 4 KiB reads/s against 16-21k for async Deno.FsFile calls,
 * because an async file call pays a thread-pool round trip. They block the event
 * loop only for as long as the kernel takes; from the page cache that is
 * microseconds, from a cold spinning disk it is milliseconds (README, "Real disks").
 * fdatasync is asynchronous, so a flush never stalls other clients, and concurrent
 * flushes share one fdatasync when they can (see #sync).
 *
 * Discard writes zeroes: there is no portable hole punching from Deno, and zeroes
 * keep the "reads back as zeroes" promise of DeviceInfo.
 */

import { assert } from "../lib/assert.ts";
import { describeError, DeviceError } from "../lib/errors.ts";
import {
  type BlockDevice,
  checkRange,
  checkWritable,
  type DeviceInfo,
  type DeviceStats,
  emptyStats,
  type IoFlags,
} from "./block_device.ts";
import { BLOCK_SIZE_DEFAULT } from "../constants.ts";
import { sha256Hex } from "../lib/hex.ts";
import { type ImageFile, openImageFile } from "./image_file.ts";

const ZERO_CHUNK_BYTES = 1024 * 1024;
/**
 * A discard or write-zeroes lets the event loop run after this many bytes: writing
 * 8 MiB of zeroes into the page cache takes a few milliseconds, so other clients'
 * requests (a ping, a small read) wait no longer than that behind a huge one (a
 * 256 MiB discard in one go held another client's ping for 438 ms).
 */
const ZERO_YIELD_BYTES = 8 * 1024 * 1024;

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create the image (sparse) or grow it to this size; never shrinks it. */
  createBytes?: number;
}

export class FileDevice implements BlockDevice {
  readonly #stats = emptyStats();
  #zeroes: Uint8Array | null = null;
  /** A sync that is running, and the one queued behind it that later callers share. */
  #syncRunning: Promise<void> | null = null;
  #syncQueued: Promise<void> | null = null;
  #closing: Promise<void> | null = null;
  /**
   * Set once an fdatasync failed: Linux may have marked the pages it was writing
   * clean, so a later fdatasync that succeeds would not cover them. Every sync fails
   * from then on (as PostgreSQL stops at a failed fsync): the caller was told its
   * writes may be lost, and only a new process, whose clients write again, goes on.
   */
  #syncFailed: string | null = null;

  /** Over a file already open: FileDevice.open() for a path; VolatileDevice for memory. */
  protected constructor(readonly info: DeviceInfo, readonly file: ImageFile) {}

  static async open(path: string, options: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = options.readOnly ?? false;
    if (options.createBytes !== undefined) {
      assert(!readOnly, "--create and --read-only are refused by the CLI");
      await growImage(path, options.createBytes);
    }
    let file: ImageFile;
    try {
      file = openImageFile(path, readOnly ? "r" : "r+");
    } catch (error) {
      throw new DeviceError("ENOENT", `Cannot open ${path}: ${describeError(error)}`, {
        cause: error,
      });
    }
    try {
      const sizeBytes = await sizeOf(path);
      if (sizeBytes === 0) {
        throw new DeviceError(
          "EINVAL",
          `${path} is empty: give it a size with --create SIZE (e.g. --create 1G)`,
        );
      }
      const id = await stableId(path);
      return new FileDevice(
        { sizeBytes, blockSize: BLOCK_SIZE_DEFAULT, readOnly, id, name: path },
        file,
      );
    } catch (error) {
      file.close();
      throw error;
    }
  }

  read(offset: number, into: Uint8Array): Promise<void> {
    try {
      checkRange(this.info, "read", offset, into.length);
      const done = this.file.readAt(into, offset);
      if (done < into.length) {
        throw new DeviceError("EIO", `Short read at ${offset + done} of ${this.info.name}`);
      }
      this.#stats.reads += 1;
      this.#stats.readBytes += into.length;
      return Promise.resolve();
    } catch (error) {
      return this.#fail(error, "read", offset, into.length);
    }
  }

  write(offset: number, data: Uint8Array, flags?: IoFlags): Promise<void> {
    if (flags?.preflush) {
      return this.#sync().then(() => this.write(offset, data, { fua: flags.fua }));
    }
    try {
      checkWritable(this.info, "write");
      checkRange(this.info, "write", offset, data.length);
      this.file.writeAt(data, offset);
      this.#stats.writes += 1;
      this.#stats.writtenBytes += data.length;
    } catch (error) {
      return this.#fail(error, "write", offset, data.length);
    }
    return flags?.fua ? this.#sync() : Promise.resolve();
  }

  flush(): Promise<void> {
    this.#stats.flushes += 1;
    return this.#sync();
  }

  /**
   * Frees the range where the file can (a hole: it reads as zeroes and a sparse image
   * gets its space back); elsewhere writes zeroes over it, as write-zeroes does.
   */
  discard(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#zeroRange("discard", "discards", "discardBytes", offset, length, flags, true);
  }

  writeZeroes(offset: number, length: number, flags?: IoFlags): Promise<void> {
    return this.#zeroRange("write zeroes to", "zeroes", "zeroBytes", offset, length, flags);
  }

  stats(): DeviceStats {
    return { ...this.#stats };
  }

  /** Flushes and closes; calls after the first share its outcome (the fd is closed once). */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      try {
        if (!this.info.readOnly) await this.#sync();
      } finally {
        this.file.close();
      }
    })();
    return this.#closing;
  }

  /** Writes zeroes over a range (a discard too); `counter` and `bytes` are the stats it counts in. */
  async #zeroRange(
    what: string,
    counter: "discards" | "zeroes",
    bytes: "discardBytes" | "zeroBytes",
    offset: number,
    length: number,
    flags?: IoFlags,
    punch = false,
  ): Promise<void> {
    if (flags?.preflush) await this.#sync();
    try {
      checkWritable(this.info, what);
      checkRange(this.info, what, offset, length);
      const punched = punch && length > 0 && await this.file.punchHole(offset, length);
      this.#zeroes ??= new Uint8Array(ZERO_CHUNK_BYTES);
      for (let done = 0; !punched && done < length; done += ZERO_CHUNK_BYTES) {
        if (done > 0 && done % ZERO_YIELD_BYTES === 0) await nextTurn();
        this.file.writeAt(
          this.#zeroes.subarray(0, Math.min(ZERO_CHUNK_BYTES, length - done)),
          offset + done,
        );
      }
      this.#stats[counter] += 1;
      this.#stats[bytes] += length;
    } catch (error) {
      return this.#fail(error, what, offset, length);
    }
    if (flags?.fua) await this.#sync();
  }

  /**
   * fdatasync, shared: a caller arriving while one runs cannot use it (its writes may
   * have come after that sync began), so it joins the single sync queued behind it.
   */
  #sync(): Promise<void> {
    if (this.#syncFailed !== null) {
      this.#stats.errors += 1;
      return Promise.reject(
        new DeviceError(
          "EIO",
          `an earlier fdatasync of ${this.info.name} failed (${this.#syncFailed}): what was ` +
            "written before it may not be on disk, and no later sync can say otherwise; " +
            "restart the export (clients then write again what they have not seen flushed)",
        ),
      );
    }
    if (this.#syncRunning === null) {
      this.#syncRunning = this.#fdatasync().finally(() => {
        this.#syncRunning = null;
      });
      return this.#syncRunning;
    }
    this.#syncQueued ??= this.#syncRunning.catch(() => {}).then(() => {
      this.#syncQueued = null;
      return this.#sync();
    });
    return this.#syncQueued;
  }

  async #fdatasync(): Promise<void> {
    try {
      await this.file.datasync();
    } catch (error) {
      this.#stats.errors += 1;
      this.#syncFailed ??= describeError(error);
      throw new DeviceError(
        "EIO",
        `fdatasync of ${this.info.name} failed: ${describeError(error)}`,
        {
          cause: error,
        },
      );
    }
  }

  #fail(error: unknown, what: string, offset: number, length: number): Promise<never> {
    this.#stats.errors += 1;
    if (error instanceof DeviceError) return Promise.reject(error);
    return Promise.reject(
      new DeviceError(
        "EIO",
        `Cannot ${what} ${length} bytes at offset ${offset} of ${this.info.name}: ${
          describeError(error)
        }`,
        { cause: error },
      ),
    );
  }
}

/** Lets the event loop run: timers, I/O and other requests due now go first. */
function nextTurn(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** Creates a sparse image, or grows a smaller one; an image is never shrunk. */
async function growImage(path: string, sizeBytes: number): Promise<void> {
  const file = await Deno.open(path, { read: true, write: true, create: true });
  try {
    const current = (await file.stat()).size;
    if (current < sizeBytes) await file.truncate(sizeBytes);
  } finally {
    file.close();
  }
}

/** A block device's size comes from seeking to its end; a file's is the same. */
async function sizeOf(path: string): Promise<number> {
  const file = await Deno.open(path, { read: true });
  try {
    return await file.seek(0, Deno.SeekMode.End);
  } finally {
    file.close();
  }
}

/** The same file (device and inode) gets the same id after every restart. */
async function stableId(path: string): Promise<string> {
  const real = await Deno.realPath(path);
  const stat = await Deno.stat(real);
  const text = `${real}\0${stat.dev}\0${stat.ino ?? 0}`;
  return (await sha256Hex(text)).slice(0, 32);
}
