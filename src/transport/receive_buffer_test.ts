import assert from "node:assert/strict";
import { concat, pattern } from "../../tests/helpers/bytes.ts";
import { AssertionError } from "../lib/assert.ts";
import type { ByteConn } from "./byte_conn.ts";
import { ReceiveBuffer } from "./receive_buffer.ts";

/** A connection that hands out scripted chunks, as much of each as the reader has room for, then null. */
class ScriptedConn implements ByteConn {
  readonly #chunks: Uint8Array[];
  /** Every buffer read() was given, in order. */
  readonly targets: Uint8Array[] = [];

  constructor(chunks: Uint8Array[]) {
    this.#chunks = chunks.map((chunk) => chunk.slice());
  }

  get reads(): number {
    return this.targets.length;
  }

  read(into: Uint8Array): Promise<number | null> {
    assert.ok(into.length > 0, "the reader always offers room");
    this.targets.push(into);
    const chunk = this.#chunks[0];
    if (chunk === undefined) return Promise.resolve(null);
    const n = Math.min(chunk.length, into.length);
    into.set(chunk.subarray(0, n));
    if (n === chunk.length) this.#chunks.shift();
    else this.#chunks[0] = chunk.subarray(n);
    return Promise.resolve(n);
  }

  write(_data: Uint8Array): Promise<number> {
    return Promise.reject(new Error("this connection is only read"));
  }

  close(): void {}
}

/** Splits `bytes` into chunks of `size` bytes (the last may be shorter). */
function chunked(bytes: Uint8Array, size: number): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let at = 0; at < bytes.length; at += size) chunks.push(bytes.subarray(at, at + size));
  return chunks;
}

Deno.test("ReceiveBuffer.fill() returns true once enough bytes arrived in 1-byte chunks", async () => {
  const data = pattern(10, 8);
  const conn = new ScriptedConn(chunked(data, 1));
  const buffer = new ReceiveBuffer(64, 64);
  assert.equal(await buffer.fill(conn, 8), true);
  assert.equal(buffer.available, 8);
  assert.equal(conn.reads, 8);
  assert.deepEqual(buffer.take(8), data);
});

Deno.test("ReceiveBuffer.fill() reads no more once minBytes are available", async () => {
  const conn = new ScriptedConn([pattern(0, 4), pattern(4, 4), pattern(8, 4)]);
  const buffer = new ReceiveBuffer(64, 64);
  assert.equal(await buffer.fill(conn, 3), true);
  assert.equal(conn.reads, 1);
  assert.equal(buffer.available, 4);
  assert.equal(await buffer.fill(conn, 4), true, "already there: no read");
  assert.equal(conn.reads, 1);
});

Deno.test("ReceiveBuffer.fill() decodes a frame header split across chunks in place", async () => {
  const frame = new Uint8Array(12);
  const view = new DataView(frame.buffer);
  view.setUint32(0, 0xdeadbeef);
  view.setUint32(4, 7);
  view.setUint32(8, 0x01020304);
  const conn = new ScriptedConn([frame.subarray(0, 3), frame.subarray(3, 9), frame.subarray(9)]);
  const buffer = new ReceiveBuffer(64, 64);

  assert.equal(await buffer.fill(conn, 8), true);
  assert.equal(buffer.view.getUint32(buffer.position), 0xdeadbeef);
  assert.equal(buffer.view.getUint32(buffer.position + 4), 7);
  buffer.skip(8);
  assert.equal(await buffer.fill(conn, 4), true);
  assert.equal(buffer.view.getUint32(buffer.position), 0x01020304);
});

Deno.test("ReceiveBuffer.fill() returns false at end of stream and keeps the partial bytes", async () => {
  const conn = new ScriptedConn([pattern(1, 3)]);
  const buffer = new ReceiveBuffer(64, 64);
  assert.equal(await buffer.fill(conn, 5), false);
  assert.equal(buffer.available, 3);
  assert.deepEqual(buffer.take(3), pattern(1, 3));
  assert.equal(await buffer.fill(conn, 1), false, "still ended");
});

Deno.test("ReceiveBuffer.fill() on an ended empty stream returns false", async () => {
  const buffer = new ReceiveBuffer(16, 16);
  assert.equal(await buffer.fill(new ScriptedConn([]), 1), false);
  assert.equal(buffer.available, 0);
});

Deno.test("ReceiveBuffer.fill() refuses to wait for more than frameBytesMax", async () => {
  const buffer = new ReceiveBuffer(16, 32);
  await assert.rejects(buffer.fill(new ScriptedConn([pattern(0, 64)]), 33), AssertionError);
});

Deno.test("ReceiveBuffer.take() returns a view into the slab and advances the position", async () => {
  const conn = new ScriptedConn([pattern(0, 10)]);
  const buffer = new ReceiveBuffer(32, 32);
  await buffer.fill(conn, 10);

  const first = buffer.take(4);
  assert.deepEqual(first, pattern(0, 4));
  assert.equal(first.buffer, buffer.view.buffer, "a view, not a copy");
  assert.equal(first.byteOffset, 0);
  assert.equal(buffer.position, 4);
  assert.equal(buffer.available, 6);

  buffer.skip(3);
  assert.equal(buffer.position, 7);
  assert.equal(buffer.available, 3);

  const rest = buffer.take(3);
  assert.deepEqual(rest, pattern(7, 3));
  assert.equal(rest.byteOffset, 7);
  assert.equal(buffer.available, 0);
  assert.deepEqual(buffer.take(0), new Uint8Array(0));
});

Deno.test("ReceiveBuffer.take() and skip() refuse more than has arrived", async () => {
  const buffer = new ReceiveBuffer(32, 32);
  await buffer.fill(new ScriptedConn([pattern(0, 4)]), 4);
  assert.throws(() => buffer.take(5), AssertionError);
  assert.throws(() => buffer.skip(5), AssertionError);
  assert.equal(buffer.available, 4, "a refused take consumes nothing");
});

Deno.test("ReceiveBuffer.fill() compacts the tail to the slab's start when it is near the end", async () => {
  const first = pattern(0, 12);
  const second = pattern(100, 8);
  const conn = new ScriptedConn([first, second]);
  const buffer = new ReceiveBuffer(16, 16);
  const slab = buffer.view.buffer;

  await buffer.fill(conn, 12);
  buffer.skip(10); // 2 bytes left at 10..12; 8 more do not fit behind them
  assert.equal(await buffer.fill(conn, 8), true);
  assert.equal(buffer.view.buffer, slab, "the same slab, compacted");
  assert.equal(buffer.position, 0);
  assert.equal(buffer.available, 10);
  assert.deepEqual(buffer.take(10), concat(first.subarray(10), second));
});

Deno.test("ReceiveBuffer.fill() compacts a full slab whose head was consumed", async () => {
  const conn = new ScriptedConn([pattern(0, 16), pattern(16, 16)]);
  const buffer = new ReceiveBuffer(16, 16);
  const slab = buffer.view.buffer;

  await buffer.fill(conn, 16);
  buffer.skip(12);
  assert.equal(await buffer.fill(conn, 16), true);
  assert.equal(buffer.view.buffer, slab);
  assert.deepEqual(buffer.take(16), pattern(12, 16));
});

Deno.test("ReceiveBuffer.fill() grows past the slab size for a frame up to frameBytesMax", async () => {
  const head = pattern(0, 6);
  const frame = pattern(50, 40);
  const conn = new ScriptedConn(chunked(concat(head, frame), 7));
  const buffer = new ReceiveBuffer(16, 64);

  assert.equal(await buffer.fill(conn, 6), true);
  assert.deepEqual(buffer.take(6), head);
  assert.equal(await buffer.fill(conn, 40), true);
  assert.ok(buffer.view.buffer.byteLength >= 40, "a slab that holds the whole frame");
  assert.deepEqual(buffer.take(40), frame);
});

Deno.test("ReceiveBuffer.fill() grows with the buffered bytes of the big frame kept", async () => {
  const frame = pattern(3, 64);
  const conn = new ScriptedConn(chunked(frame, 5));
  const buffer = new ReceiveBuffer(16, 64);

  assert.equal(await buffer.fill(conn, 10), true); // 10 bytes land in the 16-byte slab
  assert.equal(await buffer.fill(conn, 64), true);
  assert.equal(buffer.view.buffer.byteLength, 64);
  assert.deepEqual(buffer.take(64), frame);
});

Deno.test("ReceiveBuffer.fill() without a lease may overwrite views taken before it", async () => {
  // The control for the lease tests below: this sequence does compact over the view.
  const first = pattern(0, 10);
  const conn = new ScriptedConn([first, pattern(200, 12)]);
  const buffer = new ReceiveBuffer(16, 16);

  await buffer.fill(conn, 10);
  const view = buffer.take(8);
  await buffer.fill(conn, 12);
  assert.notDeepEqual(view, first.subarray(0, 8));
});

Deno.test("ReceiveBuffer.fill() keeps a leased slab's consumed bytes intact", async () => {
  const first = pattern(0, 10);
  const second = pattern(200, 12);
  const conn = new ScriptedConn([first, second]);
  const buffer = new ReceiveBuffer(16, 16);

  await buffer.fill(conn, 10);
  const slab = buffer.lease();
  assert.equal(slab.leases, 1);
  const view = buffer.take(8);
  assert.equal(await buffer.fill(conn, 12), true); // would compact: the tail is near the end

  assert.deepEqual(view, first.subarray(0, 8), "the leased view keeps its bytes");
  assert.deepEqual(slab.bytes.subarray(0, 10), first);
  assert.notEqual(buffer.view.buffer, slab.bytes.buffer, "the buffer moved to another slab");
  assert.deepEqual(buffer.take(14), concat(first.subarray(8), second));
});

Deno.test("ReceiveBuffer.fill() reads on behind the read position of a leased slab", async () => {
  const conn = new ScriptedConn([pattern(0, 4), pattern(4, 4)]);
  const buffer = new ReceiveBuffer(32, 32);

  await buffer.fill(conn, 4);
  const slab = buffer.lease();
  const view = buffer.take(4);
  assert.equal(await buffer.fill(conn, 4), true);
  assert.equal(buffer.view.buffer, slab.bytes.buffer, "room was left: the same slab");
  assert.deepEqual(view, pattern(0, 4));
  assert.deepEqual(buffer.take(4), pattern(4, 4));
});

Deno.test("ReceiveBuffer.release() makes a leased slab reusable", async () => {
  const conn = new ScriptedConn(chunked(pattern(0, 64), 10));
  const buffer = new ReceiveBuffer(16, 16);

  await buffer.fill(conn, 10);
  const first = buffer.lease();
  buffer.skip(8);
  await buffer.fill(conn, 12); // moves to a second slab
  const second = buffer.lease();
  assert.notEqual(second, first);

  buffer.release(first);
  assert.equal(first.leases, 0);
  buffer.skip(buffer.available);
  await buffer.fill(conn, 16); // the second slab is leased: moves to a spare, the first one
  assert.equal(buffer.view.buffer, first.bytes.buffer);
  buffer.release(second);
  assert.equal(second.leases, 0);
});

Deno.test("ReceiveBuffer does not reuse a slab until its last lease is released", async () => {
  const conn = new ScriptedConn(chunked(pattern(0, 64), 10));
  const buffer = new ReceiveBuffer(16, 16);

  await buffer.fill(conn, 10);
  const first = buffer.lease();
  buffer.lease();
  buffer.skip(8);
  await buffer.fill(conn, 12);
  buffer.release(first); // one lease still held
  const firstBytes = first.bytes.slice();

  buffer.lease();
  buffer.skip(buffer.available);
  await buffer.fill(conn, 16);
  assert.notEqual(buffer.view.buffer, first.bytes.buffer);
  assert.deepEqual(first.bytes, firstBytes, "the still-leased slab was not written");
});

Deno.test("ReceiveBuffer.release() without a lease is refused", () => {
  const buffer = new ReceiveBuffer(16, 16);
  const slab = buffer.lease();
  buffer.release(slab);
  assert.throws(() => buffer.release(slab), AssertionError);
});

Deno.test("ReceiveBuffer.readInto() copies buffered bytes and reads the rest directly", async () => {
  const data = pattern(0, 20);
  const conn = new ScriptedConn([data.subarray(0, 10), data.subarray(10, 16), data.subarray(16)]);
  const buffer = new ReceiveBuffer(64, 64);

  await buffer.fill(conn, 4); // reads the first 10 bytes
  buffer.skip(2);
  const into = new Uint8Array(18);
  assert.equal(await buffer.readInto(conn, into), true);
  assert.deepEqual(into, data.subarray(2));
  assert.equal(buffer.available, 0);

  const direct = conn.targets.slice(1);
  assert.equal(direct.length, 2);
  for (const target of direct) assert.equal(target.buffer, into.buffer, "read straight into it");
  assert.equal(direct[0]!.byteOffset, 8, "after the 8 buffered bytes");
});

Deno.test("ReceiveBuffer.readInto() takes only what it needs from the buffer", async () => {
  const conn = new ScriptedConn([pattern(0, 10)]);
  const buffer = new ReceiveBuffer(64, 64);
  await buffer.fill(conn, 10);

  const into = new Uint8Array(4);
  assert.equal(await buffer.readInto(conn, into), true);
  assert.deepEqual(into, pattern(0, 4));
  assert.equal(conn.reads, 1, "no read beyond the first fill");
  assert.equal(buffer.available, 6);
  assert.deepEqual(buffer.take(6), pattern(4, 6));
});

Deno.test("ReceiveBuffer.readInto() returns false when the stream ends early", async () => {
  const conn = new ScriptedConn([pattern(0, 4), pattern(4, 3)]);
  const buffer = new ReceiveBuffer(64, 64);
  await buffer.fill(conn, 2);

  const into = new Uint8Array(10);
  assert.equal(await buffer.readInto(conn, into), false);
  assert.deepEqual(into.subarray(0, 7), pattern(0, 7));
});
