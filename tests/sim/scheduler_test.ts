/**
 * The simulation's scheduler: timers fire by time and then by the order they were set,
 * every() keeps its period, a killed process's timers never fire, and advance() and
 * runUntil() let promise chains run between timers.
 */

import assert from "node:assert/strict";
import { sleep } from "../../src/lib/clock.ts";
import { prng } from "./prng.ts";
import { Scheduler } from "./scheduler.ts";

Deno.test("timers fire by time, ties in the order they were set, ms <= 0 after those already due", async () => {
  const sched = new Scheduler();
  const trace: string[] = [];
  const note = (what: string) => () => trace.push(`${sched.nowMs()} ${what}`);
  sched.at(20, note("b"));
  sched.at(10, note("a1"));
  sched.at(10, () => {
    trace.push(`${sched.nowMs()} a2`);
    sched.at(0, note("a2 then zero"));
    sched.at(-5, note("a2 then negative"));
  });
  sched.at(10, note("a3"));
  sched.at(30, note("beyond"));
  assert.equal(sched.pendingTimers, 5);
  await sched.advance(25);
  assert.deepEqual(trace, [
    "10 a1",
    "10 a2",
    "10 a3",
    "10 a2 then zero",
    "10 a2 then negative",
    "20 b",
  ]);
  assert.equal(sched.nowMs(), 25);
  assert.equal(sched.pendingTimers, 1);
});

Deno.test("every() fires at each period from its last firing until cancelled", async () => {
  const sched = new Scheduler();
  const clock = sched.clock(sched.process("p"));
  const times: number[] = [];
  const timer = clock.every(7, () => {
    times.push(sched.nowMs());
    if (times.length === 4) timer.cancel();
  });
  await sched.advance(100);
  assert.deepEqual(times, [7, 14, 21, 28]);
  assert.equal(sched.pendingTimers, 0);
});

Deno.test("a cancelled timer never fires, and cancelling twice or after firing is harmless", async () => {
  const sched = new Scheduler();
  const fired: string[] = [];
  const a = sched.at(5, () => fired.push("a"));
  const b = sched.at(5, () => fired.push("b"));
  a.cancel();
  a.cancel();
  await sched.advance(10);
  b.cancel();
  assert.deepEqual(fired, ["b"]);
  assert.equal(sched.pendingTimers, 0);
});

Deno.test("killing a process cancels its timers; timers it sets after death never fire", async () => {
  const sched = new Scheduler();
  const doomed = sched.process("doomed");
  const other = sched.process("other");
  const clock = sched.clock(doomed);
  const fired: string[] = [];
  clock.after(10, () => fired.push("doomed after"));
  clock.every(3, () => fired.push(`doomed every ${sched.nowMs()}`));
  sched.clock(other).after(10, () => fired.push("other after"));
  sched.at(7, () => doomed.kill());
  sched.at(10, () => fired.push("world"));
  let killed = 0;
  doomed.onKill(() => killed++);
  await sched.advance(20);
  assert.deepEqual(fired, ["doomed every 3", "doomed every 6", "other after", "world"]);
  assert.equal(killed, 1);
  assert.equal(doomed.alive, false);
  assert.equal(other.alive, true);
  clock.after(1, () => fired.push("after death"));
  clock.every(1, () => fired.push("after death"));
  assert.equal(sched.pendingTimers, 0);
  await sched.advance(5);
  assert.equal(fired.length, 4);
  doomed.kill(); // a second kill does nothing
  assert.equal(killed, 1);
  let late = 0;
  doomed.onKill(() => late++); // a hook added after death runs at once
  assert.equal(late, 1);
});

Deno.test("advance() runs promise chains between timers and ends at start + ms", async () => {
  const sched = new Scheduler();
  const clock = sched.clock(sched.process("p"));
  const steps: number[] = [];
  const work = (async () => {
    for (let i = 0; i < 3; i++) {
      await sleep(clock, 10);
      await Promise.resolve();
      steps.push(clock.nowMs());
    }
  })();
  await sched.advance(25);
  assert.deepEqual(steps, [10, 20]);
  assert.equal(sched.nowMs(), 25);
  await sched.advance(5);
  await work;
  assert.deepEqual(steps, [10, 20, 30]);
});

Deno.test("runUntil() stops when the condition holds, or gives up at maxMs", async () => {
  const sched = new Scheduler();
  const clock = sched.clock(sched.process("p"));
  let done = false;
  void sleep(clock, 40).then(() => done = true);
  sched.at(60, () => {});
  assert.equal(await sched.runUntil(() => done, 100), true);
  assert.equal(sched.nowMs(), 40);
  assert.equal(sched.pendingTimers, 1);
  assert.equal(await sched.runUntil(() => false, 15), false);
  assert.equal(sched.nowMs(), 55);
  assert.equal(await sched.runUntil(() => true, 1000), true);
  assert.equal(sched.nowMs(), 55);
});

Deno.test("two advances at once are refused", async () => {
  const sched = new Scheduler();
  const first = sched.advance(10);
  await assert.rejects(sched.advance(10), /already running/);
  await first;
  assert.equal(sched.nowMs(), 10);
});

Deno.test("thousands of timers, most cancelled, fire in (time, set order)", async () => {
  const sched = new Scheduler();
  const random = prng(42);
  const fired: [number, number][] = [];
  const expected: [number, number][] = [];
  const timers = [];
  for (let i = 0; i < 10_000; i++) {
    const delay = Math.floor(random() * 500);
    timers.push(sched.at(delay, () => fired.push([sched.nowMs(), i])));
    if (i % 4 === 0) expected.push([delay, i]);
  }
  for (let i = 0; i < timers.length; i++) if (i % 4 !== 0) timers[i]!.cancel();
  assert.equal(sched.pendingTimers, 2_500);
  expected.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  await sched.advance(500);
  assert.deepEqual(fired, expected);
  assert.equal(sched.pendingTimers, 0);
});
