/**
 * One export's budget for request payloads, shared by all its connections: a READ's
 * reply buffer from dispatch until it has been written to the socket, a WRITE's
 * payload until the device has it. A connection stops dispatching (and reading) while
 * the budget is spent, until another request gives memory back. A request is admitted
 * while anything is left, and a connection with nothing in flight is always admitted
 * one (so its pings, queued behind it, are answered): the budget is exceeded by at most
 * one request per such connection.
 */

import { assert } from "../lib/assert.ts";

export class MemoryBudget {
  #used = 0;
  #peak = 0;
  #waiters: Array<() => void> = [];

  constructor(readonly limitBytes: number) {
    assert(limitBytes > 0, "a memory budget is above 0");
  }

  get usedBytes(): number {
    return this.#used;
  }

  /** The most that was ever spent at once (tests check the bound with it). */
  get peakBytes(): number {
    return this.#peak;
  }

  /** Whether a connection must wait before it dispatches another request. */
  get spent(): boolean {
    return this.#used >= this.limitBytes;
  }

  charge(bytes: number): void {
    this.#used += bytes;
    if (this.#used > this.#peak) this.#peak = this.#used;
  }

  release(bytes: number): void {
    this.#used -= bytes;
    assert(this.#used >= 0, "release() follows charge()");
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  /** Resolves at the next release, by any connection. */
  whenReleased(): Promise<void> {
    return new Promise((resolve) => this.#waiters.push(resolve));
  }
}
