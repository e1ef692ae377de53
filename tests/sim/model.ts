/**
 * What the simulated mirror must read back: a model of the disk, sector by sector,
 * after the contract every block device keeps (and the NBD protocol states):
 *
 * 1. A write that was acknowledged reads back until a later write to the sector.
 * 2. A write that failed, or whose caller never heard back (the array crashed), may
 *    or may not have happened: either value reads back, but then the same one again.
 * 3. What a power loss may take is only what no flush covered: after a taint (see
 *    SimWorld: every copy of the newest value may be gone), a sector may read as its
 *    value at the last acknowledged flush, or as any value written since.
 *
 * Sectors are compared by content digest (a value written is random, so two writes
 * never share one); a read narrows an uncertain sector to what it returned, so a
 * mirror whose legs differ while both serve reads is caught flipping between them.
 */

export const SECTOR = 512;

/** A short digest of a sector's bytes (FNV-1a, 32 bits): values here are random. */
export function digest(bytes: Uint8Array): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < bytes.length; i++) {
    h ^= bytes[i]!;
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

interface Sector {
  /** What may read back now. */
  allowed: Set<number>;
  /** What survives a power loss: the allowed values as of the last flush covering it. */
  durable: Set<number>;
  /** Values written since that flush (acknowledged or not). */
  since: Set<number>;
  /** Writes in flight to it: it is not checked meanwhile. */
  busy: number;
  /** Bumped on every settled write: a flush covers a sector only if nothing settled since it began. */
  version: number;
  /** A leg lost power while values here were unflushed (an array crash then may lose them). */
  lossRisk: boolean;
  /**
   * Legs whose export restarted while values here were unflushed: the mirror cannot
   * tell a restart from a power loss, so it may not count on their copies.
   */
  suspects: Set<number>;
}

export class DiskModel {
  readonly #sectors: Sector[];
  /** Counts flushes begun; a flush covers what settled before it began. */
  #flushStarts = 0;

  constructor(sizeBytes: number) {
    const zero = digest(new Uint8Array(SECTOR));
    this.#sectors = Array.from({ length: sizeBytes / SECTOR }, () => ({
      allowed: new Set([zero]),
      durable: new Set([zero]),
      since: new Set<number>(),
      busy: 0,
      version: 0,
      lossRisk: false,
      suspects: new Set<number>(),
    }));
  }

  get sectors(): number {
    return this.#sectors.length;
  }

  #range(offset: number, length: number): Sector[] {
    return this.#sectors.slice(offset / SECTOR, (offset + length) / SECTOR);
  }

  /** Digests of each sector of `data`. */
  static digests(data: Uint8Array): number[] {
    const out: number[] = [];
    for (let i = 0; i < data.length; i += SECTOR) out.push(digest(data.subarray(i, i + SECTOR)));
    return out;
  }

  writeStarted(offset: number, length: number): void {
    for (const sector of this.#range(offset, length)) sector.busy += 1;
  }

  /**
   * A write settled: `acked` when the caller heard success (then only it reads back),
   * else it may or may not have happened. `fua`: acknowledged durable.
   */
  writeSettled(offset: number, values: number[], acked: boolean, fua: boolean): void {
    this.#range(offset, values.length * SECTOR).forEach((sector, i) => {
      const value = values[i]!;
      sector.busy -= 1;
      sector.version += 1;
      if (acked) sector.allowed = new Set([value]);
      else sector.allowed.add(value);
      if (acked && fua) {
        sector.durable = new Set([value]);
        sector.since.clear();
        sector.lossRisk = false;
        sector.suspects.clear();
      } else {
        sector.since.add(value);
      }
    });
  }

  /** A flush begins: returns a token for flushAcked(). */
  flushStarted(): { versions: number[] } {
    this.#flushStarts += 1;
    return { versions: this.#sectors.map((s) => s.busy > 0 ? -1 : s.version) };
  }

  /** An acknowledged flush makes durable what had settled before it began and not changed since. */
  flushAcked(token: { versions: number[] }): void {
    this.#sectors.forEach((sector, i) => {
      if (token.versions[i] !== sector.version || sector.busy > 0) return;
      sector.durable = new Set(sector.allowed);
      sector.since.clear();
      sector.lossRisk = false;
      sector.suspects.clear();
    });
  }

  /** Sectors whose newest values no flush covered yet (what a power loss may take). */
  unflushed(): number[] {
    const out: number[] = [];
    this.#sectors.forEach((s, i) => {
      if (s.since.size > 0) out.push(i);
    });
    return out;
  }

  /** What may read back in sector `i` now. */
  allowed(i: number): ReadonlySet<number> {
    return this.#sectors[i]!.allowed;
  }

  isBusy(i: number): boolean {
    return this.#sectors[i]!.busy > 0;
  }

  /** Sector `i` may have lost what no flush covered: it may read as any of those values. */
  taint(i: number): void {
    const sector = this.#sectors[i]!;
    for (const value of sector.durable) sector.allowed.add(value);
    for (const value of sector.since) sector.allowed.add(value);
  }

  /** A leg lost power while sector `i` had unflushed values. */
  noteLossRisk(i: number): void {
    this.#sectors[i]!.lossRisk = true;
  }

  /** Leg `leg`'s export restarted while sector `i` had unflushed values. */
  suspect(i: number, leg: number): void {
    this.#sectors[i]!.suspects.add(leg);
  }

  isSuspect(i: number, leg: number): boolean {
    return this.#sectors[i]!.suspects.has(leg);
  }

  hasSuspects(i: number): boolean {
    return this.#sectors[i]!.suspects.size > 0;
  }

  /** Sectors where a leg lost power since their last flush. */
  atRisk(): number[] {
    const out: number[] = [];
    this.#sectors.forEach((s, i) => {
      if (s.lossRisk) out.push(i);
    });
    return out;
  }

  /**
   * A read returned `data` at `offset`: each sector not being written must be one of
   * its allowed values, and is that value from now on. Returns what was wrong, or null.
   */
  readReturned(offset: number, data: Uint8Array): string | null {
    const first = offset / SECTOR;
    const values = DiskModel.digests(data);
    for (let k = 0; k < values.length; k++) {
      const sector = this.#sectors[first + k]!;
      if (sector.busy > 0) continue;
      const value = values[k]!;
      if (!sector.allowed.has(value)) {
        return `sector ${first + k} (byte ${(first + k) * SECTOR}) read ${hex(value)}, ` +
          `allowed ${[...sector.allowed].map(hex).join(" or ")}`;
      }
      sector.allowed = new Set([value]);
    }
    return null;
  }
}

function hex(value: number): string {
  return value.toString(16).padStart(8, "0");
}
