import assert from "node:assert/strict";
import { AssertionError } from "./assert.ts";
import { BufferPool } from "./buffer_pool.ts";

Deno.test("BufferPool.take() returns a view of exactly the length asked for", () => {
  const pool = new BufferPool(1 << 20);
  for (const length of [0, 1, 100, 4096, 4097, 65536, 100_000]) {
    const view = pool.take(length);
    assert.equal(view.length, length);
    assert.equal(view.byteOffset, 0);
    assert.ok(view.buffer.byteLength >= Math.max(length, 4096), "a power-of-two class");
  }
});

Deno.test("BufferPool.take() rounds up to power-of-two size classes of at least 4 KiB", () => {
  const pool = new BufferPool(0);
  assert.equal(pool.take(1).buffer.byteLength, 4096);
  assert.equal(pool.take(4096).buffer.byteLength, 4096);
  assert.equal(pool.take(4097).buffer.byteLength, 8192);
  assert.equal(pool.take(65_536).buffer.byteLength, 65_536);
  assert.equal(pool.take(65_537).buffer.byteLength, 131_072);
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
