import assert from "node:assert/strict";
import { MemoryDevice } from "../device/memory_device.ts";
import { LinearDevice } from "./linear.ts";

const KiB = 1024;

async function twoMembers() {
  const a = new MemoryDevice(8 * KiB, { id: "a".repeat(32), name: "a" });
  const b = new MemoryDevice(12 * KiB, { id: "b".repeat(32), name: "b" });
  return { a, b, linear: await LinearDevice.create([a, b]) };
}

Deno.test("LinearDevice: the size is the sum, and the id depends on the members", async () => {
  const { linear } = await twoMembers();
  assert.equal(linear.info.sizeBytes, 20 * KiB);
  const other = await LinearDevice.create([
    new MemoryDevice(12 * KiB, { id: "b".repeat(32), name: "b" }),
    new MemoryDevice(8 * KiB, { id: "a".repeat(32), name: "a" }),
  ]);
  assert.notEqual(linear.info.id, other.info.id);
  assert.match(linear.info.id, /^[0-9a-f]{32}$/);
});

Deno.test("LinearDevice: a write across the boundary is split between the members", async () => {
  const { a, b, linear } = await twoMembers();
  const data = new Uint8Array(4 * KiB).map((_, i) => (i * 7 + 1) & 0xff);
  await linear.write(6 * KiB, data);
  const inA = new Uint8Array(2 * KiB);
  const inB = new Uint8Array(2 * KiB);
  await a.read(6 * KiB, inA);
  await b.read(0, inB);
  assert.deepEqual(inA, data.subarray(0, 2 * KiB));
  assert.deepEqual(inB, data.subarray(2 * KiB));
  const back = new Uint8Array(4 * KiB);
  await linear.read(6 * KiB, back);
  assert.deepEqual(back, data);
});

Deno.test("LinearDevice: the last byte is the second member's last byte; past the end fails", async () => {
  const { b, linear } = await twoMembers();
  await linear.write(20 * KiB - 1, new Uint8Array([0xab]));
  const last = new Uint8Array(1);
  await b.read(12 * KiB - 1, last);
  assert.equal(last[0], 0xab);
  await assert.rejects(linear.read(20 * KiB - 1, new Uint8Array(2)));
  await assert.rejects(linear.write(20 * KiB, new Uint8Array(1)));
});

Deno.test("LinearDevice: discard and write-zeroes reach every member they cover", async () => {
  const { a, b, linear } = await twoMembers();
  await linear.write(0, new Uint8Array(20 * KiB).fill(9));
  await linear.writeZeroes(7 * KiB, 2 * KiB);
  const around = new Uint8Array(4 * KiB);
  await linear.read(6 * KiB, around);
  assert.deepEqual([...around.subarray(0, KiB)], new Array(KiB).fill(9));
  assert.deepEqual([...around.subarray(KiB, 3 * KiB)], new Array(2 * KiB).fill(0));
  assert.deepEqual([...around.subarray(3 * KiB)], new Array(KiB).fill(9));
  const firstOfB = new Uint8Array(KiB);
  await b.read(0, firstOfB);
  assert.deepEqual([...firstOfB], new Array(KiB).fill(0));
  const lastOfA = new Uint8Array(KiB);
  await a.read(7 * KiB, lastOfA);
  assert.deepEqual([...lastOfA], new Array(KiB).fill(0));
});
