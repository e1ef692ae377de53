/**
 * Time that moves only when a test says so: advance() runs every timer it passes, in
 * order, each at its own time. Tests of timeouts that are minutes long run in
 * milliseconds this way, and a check "not yet" is exact, not a race.
 */

import type { Clock, Timer } from "../../src/lib/clock.ts";

export class ManualClock implements Clock {
  #now = 0;
  readonly #timers = new Set<{ at: number; every: number | null; fn: () => void }>();

  nowMs(): number {
    return this.#now;
  }

  after(ms: number, fn: () => void): Timer {
    return this.#add(ms, null, fn);
  }

  every(ms: number, fn: () => void): Timer {
    return this.#add(ms, ms, fn);
  }

  advance(ms: number): void {
    const until = this.#now + ms;
    for (;;) {
      const due = [...this.#timers].filter((t) => t.at <= until).sort((x, y) => x.at - y.at)[0];
      if (due === undefined) break;
      this.#now = due.at;
      if (due.every === null) this.#timers.delete(due);
      else due.at += due.every;
      due.fn();
    }
    this.#now = until;
  }

  #add(ms: number, every: number | null, fn: () => void): Timer {
    const timer = { at: this.#now + ms, every, fn };
    this.#timers.add(timer);
    return { cancel: () => this.#timers.delete(timer) };
  }
}
