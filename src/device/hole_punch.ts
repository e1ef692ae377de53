/**
 * Freeing a range of an image file: fallocate(PUNCH_HOLE | KEEP_SIZE) through Deno's
 * FFI and the C library, which Deno has no call for. The range reads as zeroes after,
 * and a sparse image gets its space back. Where that cannot be done (not Linux, no
 * --allow-ffi, a file system or device without hole punching) punch() says so and
 * the caller writes zeroes instead, as before.
 *
 * The hole is punched through a descriptor of its own on the same path: the page
 * cache and fdatasync belong to the file, not to a descriptor, so the export's
 * writes, reads and syncs see it.
 */

const O_RDWR = 0o2;
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

/** Whether hole punching can be tried at all here (Linux, --allow-ffi). */
export function holePunchingAvailable(): boolean {
  return loadLibc() !== null;
}

export class HolePuncher {
  #fd: number | null = null;
  #unsupported = false;

  constructor(readonly path: string) {}

  /**
   * Punches [offset, offset + length); true when done. False, and false from then on
   * for this file, when it cannot be (the caller writes zeroes over the range).
   */
  async punch(offset: number, length: number): Promise<boolean> {
    if (this.#unsupported) return false;
    const calls = loadLibc();
    if (calls === null) return this.#giveUp();
    if (this.#fd === null) {
      const fd = calls.open(new TextEncoder().encode(`${this.path}\0`), O_RDWR | O_CLOEXEC, 0);
      if (fd < 0) return this.#giveUp();
      this.#fd = fd;
    }
    const result = await calls.fallocate(
      this.#fd,
      FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
      BigInt(offset),
      BigInt(length),
    );
    return result === 0 ? true : this.#giveUp();
  }

  close(): void {
    if (this.#fd !== null) loadLibc()?.close(this.#fd);
    this.#fd = null;
  }

  #giveUp(): false {
    this.#unsupported = true;
    this.close();
    return false;
  }
}
