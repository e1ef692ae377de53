/**
 * Freeing a range of an image file: fallocate(PUNCH_HOLE | KEEP_SIZE) through Deno's
 * FFI and the C library, which Deno has no call for. The range reads as zeroes after,
 * and a sparse image gets its space back. Where that cannot be done (not Linux, no
 * FFI permission, a file system or device without hole punching) punch() says so and
 * the caller writes zeroes instead.
 *
 * The hole is punched through a descriptor of its own, opened when the image is
 * (without following a symbolic link) and checked to be the very file the image's
 * descriptor has open (same device and inode): a path renamed or replaced since can
 * never get the hole. The page cache and fdatasync belong to the file, not to a
 * descriptor, so the export's writes, reads and syncs see the hole.
 */

const O_RDWR = 0o2;
const O_NOFOLLOW = 0o400000;
const O_CLOEXEC = 0o2000000;
const FALLOC_FL_KEEP_SIZE = 0x01;
const FALLOC_FL_PUNCH_HOLE = 0x02;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  // On a thread of its own: punching a large range of a cold file may take a while.
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32", nonblocking: true },
} as const;

type Libc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let libc: Libc | null | undefined;

/** The C library's calls, or null where they cannot be had (loaded once). */
function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  try {
    if (Deno.build.os !== "linux") return libc;
    if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return libc;
    libc = Deno.dlopen("libc.so.6", SYMBOLS).symbols;
  } catch {
    libc = null; // no libc.so.6 by that name (musl, say): zeroes are written instead
  }
  return libc;
}

/** Whether hole punching can be tried at all here (Linux, FFI permitted). */
export function holePunchingAvailable(): boolean {
  return loadLibc() !== null;
}

/** Which file a descriptor has open. */
export interface FileIdentity {
  dev: number;
  ino: number;
}

export class HolePuncher {
  #fd: number | null;
  #pending = 0;
  #closing = false;

  private constructor(readonly calls: Libc, fd: number) {
    this.#fd = fd;
  }

  /**
   * A puncher for `path` if it is still the file `identity` names (the image's own
   * descriptor's), or null (no FFI, the path changed, or it cannot be opened).
   */
  static open(path: string, identity: FileIdentity): HolePuncher | null {
    const calls = loadLibc();
    if (calls === null) return null;
    const fd = calls.open(
      new TextEncoder().encode(`${path}\0`),
      O_RDWR | O_NOFOLLOW | O_CLOEXEC,
      0,
    );
    if (fd < 0) return null;
    try {
      const opened = Deno.statSync(`/proc/self/fd/${fd}`);
      if (opened.dev === identity.dev && opened.ino === identity.ino) {
        return new HolePuncher(calls, fd);
      }
    } catch {
      // No /proc to tell which file it is: no punching.
    }
    calls.close(fd);
    return null;
  }

  /**
   * Punches [offset, offset + length); true when done. False, and false from then on
   * for this file, when it cannot be (the caller writes zeroes over the range).
   */
  async punch(offset: number, length: number): Promise<boolean> {
    if (this.#fd === null || this.#closing) return false;
    this.#pending += 1;
    let result: number;
    try {
      result = await this.calls.fallocate(
        this.#fd,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        BigInt(offset),
        BigInt(length),
      );
    } finally {
      this.#pending -= 1;
    }
    if (result !== 0) this.close(); // not supported here: zeroes from now on
    else this.#closeIfDone();
    return result === 0;
  }

  /** Closes the descriptor once no punch is running on it (a number reused meanwhile would be another file). */
  close(): void {
    this.#closing = true;
    this.#closeIfDone();
  }

  #closeIfDone(): void {
    if (!this.#closing || this.#pending > 0 || this.#fd === null) return;
    this.calls.close(this.#fd);
    this.#fd = null;
  }
}
