import assert from "node:assert/strict";
import { AssertionError } from "./assert.ts";
import { BufferPool, sizeClass } from "./buffer_pool.ts";

Deno.test("BufferPool.take() returns a view of exactly the length asked for", () => {
  const pool = new BufferPool(1 << 20);
  for (const length of [0, 1, 100, 4096, 4097, 65536, 100_000]) {
    const view = pool.take(length);
    assert.equal(view.length, length);
    assert.equal(view.byteOffset, 0);
    assert.ok(view.buffer.byteLength >= Math.max(length, 4096), "a power-of-two class");
  }
});

Deno.test("BufferPool.take() rounds up to a size class of at least 4 KiB", () => {
  const pool = new BufferPool(0);
  assert.equal(pool.take(1).buffer.byteLength, 4096);
  assert.equal(pool.take(4096).buffer.byteLength, 4096);
  assert.equal(pool.take(4097).buffer.byteLength, 8192);
  assert.equal(pool.take(65_536).buffer.byteLength, 65_536);
  assert.equal(pool.take(65_537).buffer.byteLength, 65_536 + 4096);
  assert.equal(pool.take(65_536 + 4097).buffer.byteLength, 131_072);
});

Deno.test("BufferPool.take() after give() reuses the same ArrayBuffer for the same size class", () => {
  const pool = new BufferPool(1 << 20);
  const first = pool.take(5000);
  pool.give(first);
  assert.equal(pool.retainedBytes, 8192);
  const again = pool.take(6000); // same 8 KiB class, another length
  assert.equal(again.buffer, first.buffer);
  assert.equal(again.length, 6000);
  assert.equal(pool.retainedBytes, 0);
});

Deno.test("BufferPool.take() does not hand out a buffer of another size class", () => {
  const pool = new BufferPool(1 << 20);
  const small = pool.take(100);
  pool.give(small);
  const large = pool.take(5000);
  assert.notEqual(large.buffer, small.buffer);
  assert.equal(pool.take(100).buffer, small.buffer);
});

Deno.test("BufferPool keeps no more than retainedBytesMax of idle buffers", () => {
  const pool = new BufferPool(3 * 4096);
  const buffers = Array.from({ length: 5 }, () => pool.take(4096));
  for (const buffer of buffers) pool.give(buffer);
  assert.equal(pool.retainedBytes, 3 * 4096);

  const big = pool.take(8192);
  pool.give(big);
  assert.equal(pool.retainedBytes, 3 * 4096, "8 KiB more would pass the cap");

  const reused = new Set([pool.take(1).buffer, pool.take(1).buffer, pool.take(1).buffer]);
  assert.equal(reused.size, 3);
  for (const buffer of reused) assert.ok(buffers.some((b) => b.buffer === buffer));
  assert.equal(pool.retainedBytes, 0);
});

Deno.test("BufferPool with a zero cap keeps nothing", () => {
  const pool = new BufferPool(0);
  const view = pool.take(10);
  pool.give(view);
  assert.equal(pool.retainedBytes, 0);
  assert.notEqual(pool.take(10).buffer, view.buffer);
});

Deno.test("BufferPool.give() ignores buffers that are not the pool's shape", () => {
  const pool = new BufferPool(1 << 20);
  pool.give(new Uint8Array(5000)); // not a size class
  pool.give(new Uint8Array(8192).subarray(4096)); // not at offset 0
  assert.equal(pool.retainedBytes, 0);
});

Deno.test("BufferPool refuses negative and fractional lengths", () => {
  const pool = new BufferPool(0);
  assert.throws(() => pool.take(-1), AssertionError);
  assert.throws(() => pool.take(1.5), AssertionError);
  assert.throws(() => new BufferPool(-1), AssertionError);
});

Deno.test("BufferPool: a large read's reply (payload plus header) costs a page more than the payload, not double", () => {
  const MiB = 1024 * 1024;
  assert.equal(sizeClass(32 * MiB + 24), 32 * MiB + 4096);
  assert.equal(sizeClass(32 * MiB), 32 * MiB);
  assert.equal(sizeClass(32 * MiB + 4097), 64 * MiB);
  assert.equal(sizeClass(4096 + 24), 8192);
  assert.equal(sizeClass(1), 4096);
  for (let length = 1; length < 300_000; length += 997) {
    const size = sizeClass(length);
    assert.ok(size >= length, `${length} fits its class`);
    assert.equal(sizeClass(size), size, `the class of ${length} is a class`);
  }
  const pool = new BufferPool(64 * MiB);
  const reply = pool.take(MiB + 24);
  assert.equal(reply.buffer.byteLength, MiB + 4096);
  pool.give(reply);
  assert.equal(pool.take(MiB + 100).buffer, reply.buffer, "reused for the same class");
});
