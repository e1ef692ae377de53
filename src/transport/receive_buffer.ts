/**
 * Framing apart from I/O: bytes read from a connection in large chunks, parsed in
 * place. Frames that arrived whole are handed out as `subarray` views; nothing is
 * copied except the tail of a frame split across the end of a slab.
 *
 * A consumer that keeps a view beyond the current parse (an asynchronous write of a
 * payload) leases the slab. A leased slab is never compacted or refilled below its
 * read position; the buffer moves on to a spare slab instead, and the leased one
 * becomes spare again when its last lease ends.
 *
 * Invariants (checked by #invariants):
 * 1. 0 <= start <= end <= slab capacity.
 * 2. Bytes before `start` in a leased slab are never written.
 */

import { assert } from "../lib/assert.ts";
import type { ByteConn } from "./byte_conn.ts";

export interface Slab {
  readonly bytes: Uint8Array;
  readonly view: DataView;
  leases: number;
}

const SPARE_SLABS_MAX = 2;

export class ReceiveBuffer {
  #slab: Slab;
  #start = 0;
  #end = 0;
  readonly #spares: Slab[] = [];

  constructor(readonly slabBytes: number, readonly frameBytesMax: number) {
    assert(slabBytes > 0, "a slab holds bytes");
    this.#slab = newSlab(slabBytes);
  }

  /** Bytes received and not yet consumed. */
  get available(): number {
    return this.#end - this.#start;
  }

  /** The current slab's DataView and the read position, for decoding in place. */
  get view(): DataView {
    return this.#slab.view;
  }

  get position(): number {
    return this.#start;
  }

  /** Consumes `length` bytes and returns them as a view (valid until the next fill, or leased). */
  take(length: number): Uint8Array {
    assert(length <= this.available, "take() only what has arrived");
    const view = this.#slab.bytes.subarray(this.#start, this.#start + length);
    this.#start += length;
    return view;
  }

  skip(length: number): void {
    assert(length <= this.available, "skip() only what has arrived");
    this.#start += length;
  }

  /** Keeps the current slab's consumed bytes intact until `release()`. */
  lease(): Slab {
    this.#slab.leases += 1;
    return this.#slab;
  }

  release(slab: Slab): void {
    assert(slab.leases > 0, "release() follows lease()");
    slab.leases -= 1;
    if (
      slab.leases === 0 && slab !== this.#slab && slab.bytes.length === this.slabBytes &&
      this.#spares.length < SPARE_SLABS_MAX
    ) {
      this.#spares.push(slab);
    }
  }

  /**
   * Reads until at least `minBytes` are available. Returns false when the stream
   * ended first (the bytes already there stay available).
   */
  async fill(conn: ByteConn, minBytes: number): Promise<boolean> {
    assert(minBytes <= this.frameBytesMax, "fill() asks for at most one frame");
    while (this.available < minBytes) {
      this.#makeRoom(minBytes);
      const n = await conn.read(this.#slab.bytes.subarray(this.#end));
      if (n === null) return false;
      this.#end += n;
      this.#invariants();
    }
    return true;
  }

  /**
   * Copies what has arrived into `into`, then reads the rest of it straight from the
   * connection: a large payload skips the receive buffer. Returns false on end of stream.
   */
  async readInto(conn: ByteConn, into: Uint8Array): Promise<boolean> {
    const buffered = Math.min(this.available, into.length);
    into.set(this.take(buffered));
    let filled = buffered;
    while (filled < into.length) {
      const n = await conn.read(into.subarray(filled));
      if (n === null) return false;
      filled += n;
    }
    return true;
  }

  #makeRoom(minBytes: number): void {
    const slab = this.#slab;
    const capacity = slab.bytes.length;
    const fitsInPlace = capacity - this.#start >= minBytes && this.#end < capacity;
    if (fitsInPlace) return;
    const remaining = this.available;
    if (slab.leases === 0 && capacity >= minBytes) {
      slab.bytes.copyWithin(0, this.#start, this.#end);
    } else {
      const wanted = Math.max(this.slabBytes, minBytes);
      const spare = wanted === this.slabBytes ? this.#spares.pop() : undefined;
      const next = spare ?? newSlab(wanted);
      next.bytes.set(slab.bytes.subarray(this.#start, this.#end));
      this.#slab = next;
      if (slab.leases === 0 && slab.bytes.length === this.slabBytes) this.#spares.push(slab);
    }
    this.#start = 0;
    this.#end = remaining;
    this.#invariants();
  }

  #invariants(): void {
    assert(this.#start >= 0 && this.#start <= this.#end, "Invariant 1: start <= end");
    assert(this.#end <= this.#slab.bytes.length, "Invariant 1: end <= capacity");
  }
}

function newSlab(bytes: number): Slab {
  const buffer = new Uint8Array(bytes);
  return { bytes: buffer, view: new DataView(buffer.buffer), leases: 0 };
}
