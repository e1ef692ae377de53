import assert from "node:assert/strict";
import { DirtyBitmap, LEG_SLOTS_MAX } from "./dirty_bitmap.ts";

Deno.test("DirtyBitmap: marks are on disk when mark() resolves; clears reach it on flush", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/bitmap`;
    const bitmap = DirtyBitmap.open(path, 100, true);
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

    const again = DirtyBitmap.open(path, 100, false);
    assert.equal(again.count(1), 3);
    assert.ok(again.has(12, 0) && !again.has(11, 0));
    await again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("DirtyBitmap: concurrent marks share flushes, and a repeated mark waits for the first one's", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const bitmap = DirtyBitmap.open(`${dir}/bitmap`, 8, true);
    const first = bitmap.mark(0, 0, 1);
    let secondDone = false;
    const second = bitmap.mark(0, 0, 1).then(() => (secondDone = true));
    assert.equal(secondDone, false, "an already-set bit is not durable before the first flush");
    await Promise.all([first, second]);
    assert.equal((await Deno.readFile(`${dir}/bitmap`))[0], 1);
    await bitmap.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("DirtyBitmap: a bitmap file of the wrong size is refused with what to do", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/bitmap`, new Uint8Array(5));
    assert.throws(() => DirtyBitmap.open(`${dir}/bitmap`, 8, false), /--source/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
