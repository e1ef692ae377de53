import assert from "node:assert/strict";
import { type Gated, OverlapGate } from "./overlap_gate.ts";

function item(start: number, end: number, writes: boolean): Gated {
  return { start, end, writes, blockers: 0, dependents: null };
}

const read = (start: number, end: number) => item(start, end, false);
const write = (start: number, end: number) => item(start, end, true);

/** Finishes `done` and returns the items it released, in the order `ready` saw them. */
function finish(gate: OverlapGate, done: Gated): Gated[] {
  const released: Gated[] = [];
  gate.finish(done, (next) => released.push(next));
  return released;
}

Deno.test("OverlapGate lets items that do not overlap pass at once", () => {
  const gate = new OverlapGate();
  assert.equal(gate.enter(write(0, 4096)), true);
  assert.equal(gate.enter(write(8192, 12288)), true);
  assert.equal(gate.enter(read(4096, 8192)), true);
  assert.equal(gate.enter(read(100_000, 100_001)), true);
  assert.equal(gate.size, 4);
});

Deno.test("OverlapGate treats adjacent ranges (end == start) as not overlapping", () => {
  const gate = new OverlapGate();
  assert.equal(gate.enter(write(0, 10)), true);
  assert.equal(gate.enter(write(10, 20)), true);
  assert.equal(gate.enter(write(20, 30)), true);
  assert.equal(gate.enter(read(30, 40)), true);
});

Deno.test("OverlapGate makes an overlapping write wait for the earlier write until finish()", () => {
  const gate = new OverlapGate();
  const first = write(0, 100);
  const second = write(99, 200);
  assert.equal(gate.enter(first), true);
  assert.equal(gate.enter(second), false);
  assert.equal(second.blockers, 1);

  assert.deepEqual(finish(gate, first), [second]);
  assert.equal(second.blockers, 0);
  assert.equal(gate.size, 1);
  assert.deepEqual(finish(gate, second), []);
  assert.equal(gate.size, 0);
});

Deno.test("OverlapGate makes a read wait for an overlapping write, and a write for a read", () => {
  const gate = new OverlapGate();
  const w = write(0, 100);
  const r = read(50, 60);
  assert.equal(gate.enter(w), true);
  assert.equal(gate.enter(r), false);
  assert.deepEqual(finish(gate, w), [r]);

  const w2 = write(55, 56);
  assert.equal(gate.enter(w2), false, "the read is still unfinished");
  assert.deepEqual(finish(gate, r), [w2]);
});

Deno.test("OverlapGate lets overlapping reads run together", () => {
  const gate = new OverlapGate();
  const a = read(0, 100);
  const b = read(50, 150);
  const c = read(0, 150);
  assert.equal(gate.enter(a), true);
  assert.equal(gate.enter(b), true);
  assert.equal(gate.enter(c), true);
  assert.deepEqual(finish(gate, a), []);
  assert.equal(a.dependents, null);
});

Deno.test("OverlapGate releases a chain of overlapping writes in order", () => {
  const gate = new OverlapGate();
  const w1 = write(0, 10);
  const w2 = write(0, 10);
  const w3 = write(0, 10);
  assert.equal(gate.enter(w1), true);
  assert.equal(gate.enter(w2), false);
  assert.equal(gate.enter(w3), false);
  assert.equal(w3.blockers, 2, "w3 waits for w1 and for w2");

  assert.deepEqual(finish(gate, w1), [w2], "w3 still waits for w2");
  assert.equal(w3.blockers, 1);
  assert.deepEqual(finish(gate, w2), [w3]);
  assert.deepEqual(finish(gate, w3), []);
  assert.equal(gate.size, 0);
});

Deno.test("OverlapGate releases waiters of one item in the order they entered", () => {
  const gate = new OverlapGate();
  const w = write(0, 100);
  const readers = [read(0, 10), read(20, 30), read(90, 100)];
  gate.enter(w);
  for (const r of readers) assert.equal(gate.enter(r), false);
  assert.deepEqual(finish(gate, w), readers);
});

Deno.test("OverlapGate holds an item blocked by two until both finish", () => {
  const gate = new OverlapGate();
  const left = write(0, 50);
  const right = read(50, 100);
  const spanning = write(40, 60);
  assert.equal(gate.enter(left), true);
  assert.equal(gate.enter(right), true);
  assert.equal(gate.enter(spanning), false);
  assert.equal(spanning.blockers, 2);

  assert.deepEqual(finish(gate, right), [], "left still unfinished");
  assert.equal(spanning.blockers, 1);
  assert.deepEqual(finish(gate, left), [spanning]);
});

Deno.test("OverlapGate lets a later item pass when the item it overlapped has finished", () => {
  const gate = new OverlapGate();
  const w = write(0, 10);
  gate.enter(w);
  finish(gate, w);
  assert.equal(gate.enter(write(0, 10)), true);
});
