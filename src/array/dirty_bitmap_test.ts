import assert from "node:assert/strict";
import { DirtyBitmap, LEG_SLOTS_MAX } from "./dirty_bitmap.ts";
import { MemoryMirrorStore } from "./memory_mirror_store.ts";
import { openBitmapFile } from "./mirror_store.ts";
import { manyTurns } from "../../tests/helpers/turns.ts";

Deno.test("DirtyBitmap: marks are on disk when mark() resolves; clears reach it on flush", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/bitmap`;
    const bitmap = DirtyBitmap.open(await openBitmapFile(path, 100, true), 100);
    await bitmap.mark(10, 12, 0b11);
    assert.deepEqual([...(await Deno.readFile(path)).subarray(9, 14)], [0, 3, 3, 3, 0]);
    bitmap.clear(11, 0b01);
    const slots = [...Array(LEG_SLOTS_MAX).keys()];
    assert.deepEqual(slots.filter((slot) => bitmap.has(11, slot)), [1]);
    assert.equal((await Deno.readFile(path))[11], 3, "a clear is lazy");
    await bitmap.flush();
    assert.equal((await Deno.readFile(path))[11], 2);
    assert.equal(bitmap.count(0), 2);
    assert.equal(bitmap.count(1), 3);
    await bitmap.close();

    const again = DirtyBitmap.open(await openBitmapFile(path, 100, false), 100);
    assert.equal(again.count(1), 3);
    assert.ok(again.has(12, 0) && !again.has(11, 0));
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("DirtyBitmap: a repeated mark waits for the first one's sync, and marks share syncs", async () => {
  const store = new MemoryMirrorStore();
  const bitmap = DirtyBitmap.open(await store.openBitmap(8, true), 8);
  const held = Promise.withResolvers<void>();
  store.holdSyncs = held.promise;
  const settled: string[] = [];
  const first = bitmap.mark(0, 0, 1).then(() => settled.push("first"));
  const second = bitmap.mark(0, 0, 1).then(() => settled.push("second"));
  const other = bitmap.mark(1, 1, 1).then(() => settled.push("other"));
  await manyTurns(); // nothing may resolve while the sync is held
  assert.deepEqual(settled, [], "no mark is durable before its sync completed");
  assert.equal(store.durableBitmap()![0], 0);
  store.holdSyncs = null;
  held.resolve();
  await Promise.all([first, second, other]);
  assert.deepEqual(settled.sort(), ["first", "other", "second"]);
  assert.deepEqual([...store.durableBitmap()!.subarray(0, 3)], [1, 1, 0]);
  await bitmap.close();
});

Deno.test("DirtyBitmap: a failed sync fails the mark, and the next mark syncs it again", async () => {
  const store = new MemoryMirrorStore();
  const bitmap = DirtyBitmap.open(await store.openBitmap(8, true), 8);
  store.failSyncs = true;
  await assert.rejects(bitmap.mark(2, 2, 1), /sync/);
  store.failSyncs = false;
  await bitmap.mark(2, 2, 1); // already set in memory: still not durable, so it syncs
  assert.equal(store.durableBitmap()![2], 1);
  await bitmap.close();
});

Deno.test("DirtyBitmap: a bitmap file of the wrong size is refused with what to do", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/bitmap`, new Uint8Array(5));
    await assert.rejects(
      async () => DirtyBitmap.open(await openBitmapFile(`${dir}/bitmap`, 8, false), 8),
      /--source/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("DirtyBitmap: after a failed sync and a later good one, marking a durable region again resolves", async () => {
  const store = new MemoryMirrorStore();
  const bitmap = DirtyBitmap.open(await store.openBitmap(8, true), 8);
  store.failSyncs = true;
  await assert.rejects(bitmap.mark(2, 2, 1), /sync/);
  store.failSyncs = false;
  await bitmap.flush(); // the sweep's flush makes region 2's mark durable
  assert.equal(store.durableBitmap()![2], 1);
  await bitmap.mark(2, 2, 1); // set and durable: nothing to wait for, and no stale failure
  await bitmap.close();
});

Deno.test("DirtyBitmap: the write a failed sync covered is written again before the next sync (the kernel may have dropped it)", async () => {
  const store = new MemoryMirrorStore();
  const bitmap = DirtyBitmap.open(await store.openBitmap(8, true), 8);
  store.failSyncs = true;
  await assert.rejects(bitmap.mark(4, 5, 1), /sync/);
  store.failSyncs = false;
  await bitmap.mark(6, 6, 1); // another region: the next sync must cover 4 and 5 again
  assert.deepEqual([...store.durableBitmap()!.subarray(4, 7)], [1, 1, 1]);
  await bitmap.close();
});
