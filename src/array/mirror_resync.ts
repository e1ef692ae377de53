/**
 * Resync (README, "dst array"): bringing an out-of-sync leg level while I/O goes on.
 *
 * Owns: a resync run: which regions it copies (those marked for the leg when it
 * starts), copying them a few at a time from an in-sync leg, flushing the leg and
 * clearing the marks of what it copied, and the progress with its log lines. Does not
 * own: when a leg is resynced (the mirror's supervisor, attach, opening), reading the
 * in-sync legs (mirror.ts, which repairs a leg that fails a read), what a failed leg
 * becomes (mirror.ts's #legFailed), or the leg's modes (mirror_leg.ts, whose
 * transitions it calls).
 */

import { MIRROR_RESYNC_FLUSH_REGIONS, MIRROR_RESYNC_PARALLEL } from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import type { Clock } from "../lib/clock.ts";
import { DeviceError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { formatBytes, formatDuration } from "../lib/units.ts";
import type { DirtyBitmap } from "./dirty_bitmap.ts";
import { finishResync, type Leg, type ResyncRun, startResync, stopResync } from "./mirror_leg.ts";
import type { RegionActivity } from "./region_activity.ts";
import { plural } from "../lib/plural.ts";

export interface ResyncProgress {
  full: boolean;
  regionsDone: number;
  regionsTotal: number;
  bytesCopied: number;
  bytesPerSecond: number;
  etaMs: number | null;
}

/** What a resync needs of its mirror. */
export interface ResyncHost {
  readonly bitmap: DirtyBitmap;
  readonly regions: RegionActivity;
  readonly regionBytes: number;
  readonly sizeBytes: number;
  readonly clock: Clock;
  readonly log: Logger;
  /** Shows progress in place of the log lines (null: that leg's resync ended). */
  readonly showProgress?: (leg: string, progress: ResyncProgress | null) => void;
  closing(): boolean;
  /** Whether an in-sync leg can be read: something to copy from. */
  canCopy(): boolean;
  /** Reads from some in-sync leg (repairing one that fails); resolves whether one answered. */
  readFromSome(offset: number, into: Uint8Array): Promise<boolean>;
  /** A leg failed: it leaves sync (but the last in-sync one, Invariant 2). */
  legFailed(leg: Leg, error: unknown): void;
  /** Runs `flush`, then `clear` at once with the regions written since it began (mirror.ts). */
  flushWatching(
    flush: () => Promise<void>,
    clear: (result: void, touched: ReadonlySet<number>) => void,
  ): Promise<void>;
  /** Counts bytes a resync copied. */
  copied(bytes: number): void;
  /** Saves the state (a leg came in sync). */
  save(): void;
  /** Checks the mirror's invariants (after a mode change). */
  invariants(): void;
  /** A leg ended a task: whoever waits for the legs to quiet looks again. */
  quieted(): void;
}

export class Resyncer {
  readonly #host: ResyncHost;

  constructor(host: ResyncHost) {
    this.#host = host;
  }

  /**
   * Brings an out-of-sync leg level: it starts taking writes, and every region
   * marked for it is copied from an in-sync leg, a few at a time, while I/O goes on.
   */
  async resync(leg: Leg): Promise<void> {
    const host = this.#host;
    const state = leg.state;
    if (leg.busy || state.mode !== "out-of-sync" || state.device === null) return;
    if (host.closing()) return;
    if (!host.canCopy()) return; // nothing to copy from
    const device = state.device;
    leg.busy = true;
    const slot = leg.record.slot;
    const regions = host.bitmap.regions;
    const pending = new Uint8Array(regions);
    let total = 0;
    for (let r = 0; r < regions; r++) {
      if (host.bitmap.has(r, slot)) {
        pending[r] = 1;
        total += 1;
      }
    }
    const run: ResyncRun = {
      unflushed: [],
      full: total === regions,
      regionsTotal: total,
      regionsDone: 0,
      bytesCopied: 0,
      startedMs: host.clock.nowMs(),
    };
    startResync(leg, pending, run);
    host.invariants();
    host.log.info(
      `resync of ${leg.record.name}: ${total} of ${plural(regions, "region")} ` +
        `(${formatBytes(Math.min(total * host.regionBytes, host.sizeBytes))}) to copy`,
    );
    const resyncing = () => leg.state.mode === "resyncing";
    let lastLogMs = host.clock.nowMs();
    let next = 0;
    // Workers share `next`; a copy that fails takes the leg out, which stops the others.
    const worker = async (buffer: Uint8Array) => {
      try {
        for (;;) {
          while (next < regions && pending[next] === 0) next += 1;
          if (next >= regions || !resyncing() || host.closing()) return;
          await this.#copyRegion(leg, device, pending, run, next++, buffer);
          if (!resyncing()) return;
          run.regionsDone += 1;
          if (run.unflushed.length >= MIRROR_RESYNC_FLUSH_REGIONS) {
            await this.#flushCopies(leg, device, run);
          }
          // A bar is redrawn 4 times a second; a log line once a second is plenty.
          const everyMs = host.showProgress === undefined ? 1000 : 250;
          if (host.clock.nowMs() - lastLogMs >= everyMs) {
            lastLogMs = host.clock.nowMs();
            this.#logProgress(leg.record.name, this.progress(run));
          }
        }
      } catch (error) {
        host.legFailed(leg, error);
      }
    };
    try {
      await Promise.all(
        Array.from(
          { length: MIRROR_RESYNC_PARALLEL },
          () => worker(new Uint8Array(host.regionBytes)),
        ),
      );
      if (resyncing() && !host.closing()) {
        await this.#flushCopies(leg, device, run);
        if (resyncing()) {
          finishResync(leg);
          host.save();
          host.showProgress?.(leg.record.name, null); // the bar goes before the line that ends it
          const seconds = (host.clock.nowMs() - run.startedMs) / 1000;
          host.log.info(
            `leg ${leg.record.name} is in sync: copied ${plural(run.regionsDone, "region")}, ` +
              `${formatBytes(run.bytesCopied)} in ${seconds.toFixed(1)} s`,
          );
        }
      }
    } catch (error) {
      host.legFailed(leg, error);
    } finally {
      host.showProgress?.(leg.record.name, null);
      if (resyncing()) stopResync(leg); // stopped by close
      leg.busy = false;
      host.invariants();
      host.quieted();
    }
  }

  progress(run: ResyncRun): ResyncProgress {
    const host = this.#host;
    const seconds = Math.max((host.clock.nowMs() - run.startedMs) / 1000, 0.001);
    const rate = run.bytesCopied / seconds;
    const left = (run.regionsTotal - run.regionsDone) * host.regionBytes;
    return {
      full: run.full,
      regionsDone: run.regionsDone,
      regionsTotal: run.regionsTotal,
      bytesCopied: run.bytesCopied,
      bytesPerSecond: Math.round(rate),
      etaMs: rate > 0 ? Math.round((left / rate) * 1000) : null,
    };
  }

  /**
   * Copies one region from an in-sync leg to `leg` (the resyncing leg's `device`),
   * alone in that region (Invariant 5).
   */
  async #copyRegion(
    leg: Leg,
    device: BlockDevice,
    pending: Uint8Array,
    run: ResyncRun,
    region: number,
    buffer: Uint8Array,
  ): Promise<void> {
    const host = this.#host;
    const start = region * host.regionBytes;
    const length = Math.min(host.regionBytes, host.sizeBytes - start);
    const data = buffer.subarray(0, length);
    await host.regions.lockCopy(region);
    try {
      if (!(await host.readFromSome(start, data))) {
        throw new DeviceError("EIO", "no in-sync leg could be read to copy from");
      }
      if (leg.state.mode !== "resyncing") return;
      await device.write(start, data);
      pending[region] = 0;
      run.unflushed.push(region); // Invariant 1: its mark clears once a flush of the leg covers it
      run.bytesCopied += length;
      host.copied(length);
    } finally {
      host.regions.unlockCopy(region);
    }
  }

  /**
   * Flushes a resyncing leg, then clears the marks of the regions it had copied
   * before the flush began (a throw takes the leg out, marks kept). A copied region
   * written meanwhile keeps its mark; the sweep clears it once it is idle and flushed
   * (Invariant 1; Invariant 6: a flush across a restart vouches for nothing).
   */
  async #flushCopies(leg: Leg, device: BlockDevice, run: ResyncRun): Promise<void> {
    const host = this.#host;
    const copied = run.unflushed.splice(0);
    const quiet = copied.filter((region) => host.regions.writers(region) === 0);
    const connections = leg.connections;
    await host.flushWatching(() => device.flush(), (_, touched) => {
      if (leg.connections !== connections) {
        throw new Error("the leg's export restarted while it flushed its copies");
      }
      // The run was stopped meanwhile (the in-sync leg it copied from restarted, say):
      // its copies may be of bytes that leg has lost since, and marks set for it since
      // must stay (found by review: cleared, a later run copied nothing and the legs
      // differed).
      const state = leg.state;
      if (state.mode !== "resyncing" || state.run !== run) return;
      const slot = 1 << leg.record.slot;
      for (const region of quiet) if (!touched.has(region)) host.bitmap.clear(region, slot);
    });
  }

  #logProgress(name: string, p: ResyncProgress): void {
    if (this.#host.showProgress !== undefined) return this.#host.showProgress(name, p);
    this.#host.log.info(
      `resync of ${name}: ${p.regionsDone}/${plural(p.regionsTotal, "region")}, ` +
        `${formatBytes(p.bytesPerSecond)}/s` +
        (p.etaMs === null ? "" : `, about ${formatDuration(p.etaMs)} left`),
    );
  }
}
