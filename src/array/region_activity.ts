/**
 * Who is using each region of a mirror right now: user writes (many at once) or a
 * resync copy (alone). A copy must not overlap a write, or the copy could put old
 * data over the write on the leg being brought back. A copy that wants a region
 * holds off new writes to it, so it is not starved by a busy region.
 *
 * It also tells the mirror when a region has gone idle, so its dirty bits can be
 * cleared (lazily, dirty_bitmap.ts).
 */

interface Region {
  writers: number;
  /** Set while a copy wants or holds the region: new writers wait on it. */
  copy: Promise<void> | null;
  releaseCopy: (() => void) | null;
  /** Resolves the copy's wait for writers to finish. */
  drained: (() => void) | null;
}

export class RegionActivity {
  readonly #regions = new Map<number, Region>();

  constructor(readonly onIdle: (region: number) => void) {}

  writers(region: number): number {
    return this.#regions.get(region)?.writers ?? 0;
  }

  /** Waits until no copy holds a region in first..last, then counts a writer in each. */
  async enterWrite(first: number, last: number): Promise<void> {
    for (;;) {
      let blocked: Promise<void> | null = null;
      for (let r = first; r <= last && blocked === null; r++) {
        blocked = this.#regions.get(r)?.copy ?? null;
      }
      if (blocked === null) break;
      await blocked;
    }
    for (let r = first; r <= last; r++) this.#region(r).writers += 1;
  }

  exitWrite(first: number, last: number): void {
    for (let r = first; r <= last; r++) {
      const region = this.#regions.get(r)!;
      region.writers -= 1;
      if (region.writers > 0) continue;
      if (region.drained !== null) {
        region.drained();
        region.drained = null;
      } else if (region.copy === null) {
        this.#regions.delete(r);
      }
      this.onIdle(r);
    }
  }

  /** Takes `region` for a copy: new writers wait, and this waits for the current ones. */
  async lockCopy(region: number): Promise<void> {
    for (;;) {
      const held = this.#regions.get(region)?.copy ?? null;
      if (held === null) break;
      await held; // another leg's copy of the same region
    }
    const entry = this.#region(region);
    entry.copy = new Promise((resolve) => (entry.releaseCopy = resolve));
    if (entry.writers > 0) await new Promise<void>((resolve) => (entry.drained = resolve));
  }

  unlockCopy(region: number): void {
    const entry = this.#regions.get(region)!;
    const release = entry.releaseCopy!;
    entry.copy = null;
    entry.releaseCopy = null;
    if (entry.writers === 0) this.#regions.delete(region);
    release();
  }

  #region(r: number): Region {
    let region = this.#regions.get(r);
    if (region === undefined) {
      region = { writers: 0, copy: null, releaseCopy: null, drained: null };
      this.#regions.set(r, region);
    }
    return region;
  }
}
