/**
 * Simulated time and processes for the simulation. Time moves only when the test
 * calls advance() or runUntil(), and timers fire in one fixed order (by time, then by
 * the order they were set), so the same calls always give the same run. A process
 * owns the timers set through its clock; killing it cancels them, as a crashed
 * program's timers die with it.
 */

import { setImmediate } from "node:timers";
import type { Clock, Timer } from "../../src/lib/clock.ts";

/** A simulated program: it lives until killed, and then its timers and connections go. */
export class SimProcess {
  #alive = true;
  #onKill: (() => void)[] = [];

  constructor(readonly name: string) {}

  get alive(): boolean {
    return this.#alive;
  }

  /** Kills the process; the kill hooks run once, in the order they were added. */
  kill(): void {
    if (!this.#alive) return;
    this.#alive = false;
    const hooks = this.#onKill;
    this.#onKill = [];
    for (const fn of hooks) fn();
  }

  /** Runs `fn` when the process is killed; at once when it is already dead. */
  onKill(fn: () => void): void {
    if (this.#alive) this.#onKill.push(fn);
    else fn();
  }
}

/** A timer in the queue; `every` timers are the same entry pushed again with a new time. */
interface Entry {
  time: number;
  seq: number;
  readonly fn: () => void;
  /** The period of an `every` timer, null for a one-shot timer. */
  readonly interval: number | null;
  readonly owner: SimProcess | null;
  /** False once fired (one-shot) or cancelled; dead entries are skipped when they surface. */
  live: boolean;
}

const deadTimer: Timer = { cancel() {} };

/** Runs callbacks at simulated times, in an order that depends only on the calls made. */
export class Scheduler {
  #now = 0;
  #seq = 0;
  /** A binary min-heap on (time, seq); cancelled entries stay until they surface. */
  #heap: Entry[] = [];
  #live = 0;
  #running = false;
  readonly #owned = new Map<SimProcess, Set<Entry>>();

  nowMs(): number {
    return this.#now;
  }

  get pendingTimers(): number {
    return this.#live;
  }

  /** A new live process. */
  process(name: string): SimProcess {
    const process = new SimProcess(name);
    const timers = new Set<Entry>();
    this.#owned.set(process, timers);
    process.onKill(() => {
      for (const entry of timers) this.#cancel(entry);
      this.#owned.delete(process);
    });
    return process;
  }

  /** The time seen by `process`: its timers are cancelled when it is killed. */
  clock(process: SimProcess): Clock {
    return {
      nowMs: () => this.#now,
      after: (ms, fn) => this.#schedule(ms, fn, null, process),
      every: (ms, fn) => this.#schedule(ms, fn, ms, process),
    };
  }

  /** A world event, owned by no process (the network's deliveries, a test's faults). */
  at(delayMs: number, fn: () => void): Timer {
    return this.#schedule(delayMs, fn, null, null);
  }

  /**
   * Lets every pending promise job run. One macrotask turn drains the microtask queue;
   * setImmediate costs microseconds where setTimeout(0) would be clamped to ~2 ms.
   */
  settle(): Promise<void> {
    return new Promise((resolve) => setImmediate(resolve));
  }

  /** Moves time forward by `ms`, firing every timer due on the way. */
  async advance(ms: number): Promise<void> {
    await this.#run(() => false, ms);
  }

  /** Like advance, but stops as soon as `done()` holds; returns whether it did within `maxMs`. */
  runUntil(done: () => boolean, maxMs: number): Promise<boolean> {
    return this.#run(done, maxMs);
  }

  async #run(done: () => boolean, ms: number): Promise<boolean> {
    // Two runs at once would interleave their timers in an order neither asked for.
    if (this.#running) throw new Error("Scheduler: advance or runUntil is already running");
    this.#running = true;
    try {
      const end = this.#now + Math.max(ms, 0);
      await this.settle();
      if (done()) return true;
      for (;;) {
        const entry = this.#peek();
        if (entry === null || entry.time > end) break;
        this.#fire(entry);
        await this.settle();
        if (done()) return true;
      }
      this.#now = end;
      return done();
    } finally {
      this.#running = false;
    }
  }

  #schedule(ms: number, fn: () => void, interval: number | null, owner: SimProcess | null): Timer {
    // A dead process's timers never fire: it would be a program acting after its crash.
    if (owner !== null && !owner.alive) return deadTimer;
    const entry: Entry = {
      time: this.#now + Math.max(ms, 0),
      seq: this.#seq++,
      fn,
      // A period of 0 would fire forever without time moving; like setInterval, take 1 ms.
      interval: interval === null ? null : Math.max(interval, 1),
      owner,
      live: true,
    };
    this.#live += 1;
    if (owner !== null) this.#owned.get(owner)?.add(entry);
    this.#push(entry);
    return { cancel: () => this.#cancel(entry) };
  }

  #cancel(entry: Entry): void {
    if (!entry.live) return;
    entry.live = false;
    this.#live -= 1;
    if (entry.owner !== null) this.#owned.get(entry.owner)?.delete(entry);
    // Many cancelled timeouts would otherwise pile up in the heap; rebuild it now and then.
    const dead = this.#heap.length - this.#live;
    if (dead > 1024 && dead > this.#live) {
      this.#heap = this.#heap.filter((e) => e.live);
      for (let i = (this.#heap.length >> 1) - 1; i >= 0; i--) this.#down(i);
    }
  }

  #fire(entry: Entry): void {
    this.#pop();
    this.#now = entry.time;
    if (entry.interval === null) {
      entry.live = false;
      this.#live -= 1;
      if (entry.owner !== null) this.#owned.get(entry.owner)?.delete(entry);
    } else {
      // Rescheduled before it runs, so the callback may cancel it.
      entry.time += entry.interval;
      entry.seq = this.#seq++;
      this.#push(entry);
    }
    entry.fn();
  }

  /** The earliest live entry, dropping cancelled ones from the top. */
  #peek(): Entry | null {
    while (this.#heap.length > 0) {
      const top = this.#heap[0]!;
      if (top.live) return top;
      this.#pop();
    }
    return null;
  }

  #push(entry: Entry): void {
    const heap = this.#heap;
    heap.push(entry);
    let i = heap.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!before(entry, heap[parent]!)) break;
      heap[i] = heap[parent]!;
      i = parent;
    }
    heap[i] = entry;
  }

  #pop(): void {
    const heap = this.#heap;
    const last = heap.pop()!;
    if (heap.length === 0) return;
    heap[0] = last;
    this.#down(0);
  }

  #down(start: number): void {
    const heap = this.#heap;
    const entry = heap[start]!;
    let i = start;
    for (;;) {
      const left = 2 * i + 1;
      if (left >= heap.length) break;
      const right = left + 1;
      const child = right < heap.length && before(heap[right]!, heap[left]!) ? right : left;
      if (!before(heap[child]!, entry)) break;
      heap[i] = heap[child]!;
      i = child;
    }
    heap[i] = entry;
  }
}

function before(a: Entry, b: Entry): boolean {
  return a.time < b.time || (a.time === b.time && a.seq < b.seq);
}
