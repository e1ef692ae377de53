/**
 * The bench's pairing helper: which side it measures first, run by run, and the
 * medians it reports.
 */

import assert from "node:assert/strict";
import { alternating, median } from "./alternate.ts";

/** Two sides that record the order they were called in and return the given values. */
function recorder(aValues: number[], bValues: number[]) {
  const calls: string[] = [];
  const side = (name: string, values: number[]) => () => {
    calls.push(name);
    return Promise.resolve(values[calls.filter((call) => call === name).length - 1]!);
  };
  return { calls, a: side("A", aValues), b: side("B", bValues) };
}

Deno.test("alternating: run i measures A first when i is even, B first when odd", async () => {
  const { calls, a, b } = recorder([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]);
  await alternating(6, a, b);
  assert.equal(calls.join(""), "ABBAABBAABBA");
});

Deno.test("alternating: an odd number of runs ends with A first", async () => {
  const { calls, a, b } = recorder([1, 2, 3], [1, 2, 3]);
  await alternating(3, a, b);
  assert.equal(calls.join(""), "ABBAAB");
});

Deno.test("alternating: each side's values stay its own, in run order, with their medians", async () => {
  const { a, b } = recorder([30, 10, 20, 50, 40], [7, 9, 8, 1, 100]);
  const paired = await alternating(5, a, b);
  assert.deepEqual(paired.aRuns, [30, 10, 20, 50, 40]);
  assert.deepEqual(paired.bRuns, [7, 9, 8, 1, 100]);
  assert.equal(paired.a, 30);
  assert.equal(paired.b, 8);
});

Deno.test("alternating: no runs, no calls, NaN medians", async () => {
  const { calls, a, b } = recorder([], []);
  const paired = await alternating(0, a, b);
  assert.deepEqual(calls, []);
  assert.ok(Number.isNaN(paired.a) && Number.isNaN(paired.b));
});

Deno.test("median: the middle value, the mean of the two middle ones for an even count", () => {
  assert.equal(median([3, 1, 2]), 2);
  assert.equal(median([4, 1, 3, 2]), 2.5);
  assert.equal(median([5]), 5);
  const values = [3, 1, 2];
  median(values);
  assert.deepEqual(values, [3, 1, 2], "the input is not sorted in place");
});
