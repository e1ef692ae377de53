/**
 * The few file calls that decide durability, behind one small interface: positional
 * reads and writes, fdatasync, close. FileDevice (an exported image) and the mirror's
 * bitmap are built on it. `openImageFile` is the real one (node:fs); PageCacheFile
 * (page_cache_file.ts) is one in memory whose unsynced writes a power loss takes, so a
 * test can watch the order of writes and syncs and see what a crash would leave.
 *
 * It owns no policy: when to sync is FileDevice's and the bitmap's business.
 */

import * as fs from "node:fs";
import { HolePuncher } from "./hole_punch.ts";

export interface ImageFile {
  /** Named in messages. */
  readonly name: string;
  /** Reads into `into` from `offset`; returns how many bytes it read (fewer only at the end). */
  readAt(into: Uint8Array, offset: number): number;
  /** Writes all of `data` at `offset`; durable only once a later datasync() resolves. */
  writeAt(data: Uint8Array, offset: number): void;
  /** Makes every write that returned before this call durable (fdatasync). */
  datasync(): Promise<void>;
  /**
   * The size as the file system reports it (fstat). A block device reports 0:
   * FileDevice finds a device's size by seeking to its end instead.
   */
  statSize(): number;
  /**
   * Frees [offset, offset + length): it reads as zeroes after, and a sparse file gets
   * the space back. False when this file cannot (the caller writes zeroes instead).
   */
  punchHole(offset: number, length: number): Promise<boolean>;
  close(): void;
}

/**
 * How openImageFile opens: read-only, read-write, or created read-write and exclusively
 * (it fails on anything already at the path, a symlink too: nothing is written through one).
 */
export type OpenMode = "r" | "r+" | "wx+";

/** Opens a real file with node:fs; throws what the open throws (ENOENT, EACCES...). */
export function openImageFile(path: string, mode: OpenMode): ImageFile {
  const fd = fs.openSync(path, mode, 0o600);
  const identity = fs.fstatSync(fd);
  const holes = mode === "r" ? null : HolePuncher.open(path, identity);
  return {
    name: path,
    readAt(into, offset) {
      let done = 0;
      while (done < into.length) {
        const n = fs.readSync(fd, into, done, into.length - done, offset + done);
        if (n === 0) break;
        done += n;
      }
      return done;
    },
    writeAt(data, offset) {
      let done = 0;
      while (done < data.length) {
        done += fs.writeSync(fd, data, done, data.length - done, offset + done);
      }
    },
    // Asynchronous, so a sync that takes long (a cold disk) never stalls the event loop.
    datasync: () =>
      new Promise<void>((resolve, reject) =>
        fs.fdatasync(fd, (error) => error ? reject(error) : resolve())
      ),
    statSize: () => fs.fstatSync(fd).size,
    punchHole: (offset, length) => holes?.punch(offset, length) ?? Promise.resolve(false),
    close: () => {
      holes?.close();
      fs.closeSync(fd);
    },
  };
}
