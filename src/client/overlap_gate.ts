/**
 * Orders overlapping requests (protocol README, "Ordering"). Two requests in flight
 * at once may run in either order on the export, and a resend after a reconnect may
 * run a write again; if an overlapping write could be in flight beside it, the older
 * data could land last. So a request that overlaps an earlier unfinished one, where
 * either writes, waits until that one is finished.
 *
 * Invariant 1: no two admitted, unfinished items overlap where either writes.
 */

export interface Gated {
  /** Byte range [start, end). */
  readonly start: number;
  readonly end: number;
  readonly writes: boolean;
  /** Earlier overlapping items not yet finished. */
  blockers: number;
  dependents: Gated[] | null;
}

export class OverlapGate {
  readonly #unfinished = new Set<Gated>();

  get size(): number {
    return this.#unfinished.size;
  }

  /** The unfinished items, for the rare paths that must look at all of them. */
  items(): Iterable<Gated> {
    return this.#unfinished;
  }

  /** Registers `item`; returns true when it may go at once, else it waits for finish() of others. */
  enter(item: Gated): boolean {
    for (const other of this.#unfinished) {
      if ((item.writes || other.writes) && item.start < other.end && other.start < item.end) {
        (other.dependents ??= []).push(item);
        item.blockers += 1;
      }
    }
    this.#unfinished.add(item);
    return item.blockers === 0;
  }

  /** `item` is finished; `ready` is called for each waiter that may now go. */
  finish(item: Gated, ready: (next: Gated) => void): void {
    this.#unfinished.delete(item);
    const dependents = item.dependents;
    item.dependents = null;
    if (dependents === null) return;
    for (const next of dependents) {
      next.blockers -= 1;
      if (next.blockers === 0) ready(next);
    }
  }
}
