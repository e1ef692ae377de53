import assert from "node:assert/strict";
import { RegionActivity } from "./region_activity.ts";
import { manyTurns } from "../../tests/helpers/turns.ts";

Deno.test("RegionActivity: a copy waits for the writers of its region, and new writers wait for it", async () => {
  const idle: number[] = [];
  const regions = new RegionActivity((r) => idle.push(r));
  await regions.enterWrite(3, 4);
  let copying = false;
  const copy = regions.lockCopy(4).then(() => (copying = true));
  await manyTurns();
  assert.equal(copying, false, "the copy waits for the writer");
  let secondWriter = false;
  const writer = regions.enterWrite(4, 4).then(() => (secondWriter = true));
  await manyTurns();
  assert.equal(secondWriter, false, "a new writer waits behind the copy");
  regions.exitWrite(3, 4);
  await copy;
  assert.equal(copying, true);
  assert.deepEqual(idle, [3, 4]);
  await manyTurns();
  assert.equal(secondWriter, false, "still held by the copy");
  regions.unlockCopy(4);
  await writer;
  assert.equal(regions.writers(4), 1);
  regions.exitWrite(4, 4);
  assert.equal(regions.writers(4), 0);
});

Deno.test("RegionActivity: writers of other regions are not held by a copy", async () => {
  const regions = new RegionActivity(() => {});
  await regions.lockCopy(1);
  await regions.enterWrite(2, 2);
  assert.equal(regions.writers(2), 1);
  regions.exitWrite(2, 2);
  regions.unlockCopy(1);
});
