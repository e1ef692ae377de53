/**
 * Time comes in through this seam: reading it, and waiting on it. Only the CLI wires
 * the system's; tests and the simulation (tests/sim/) pass their own, so a minute of
 * timeouts and retries runs in milliseconds and replays exactly.
 */

/** A timer that has been set; cancelling one that already fired does nothing. */
export interface Timer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds on a monotonic scale; only differences mean anything. */
  nowMs(): number;
  /** Runs `fn` once, `ms` from now. */
  after(ms: number, fn: () => void): Timer;
  /** Runs `fn` every `ms` until cancelled. */
  every(ms: number, fn: () => void): Timer;
}

/** Resolves `ms` from now on `clock`. */
export function sleep(clock: Clock, ms: number): Promise<void> {
  return new Promise((resolve) => clock.after(ms, resolve));
}

export const systemClock: Clock = {
  nowMs: () => performance.now(),
  after(ms, fn) {
    const id = setTimeout(fn, ms);
    return { cancel: () => clearTimeout(id) };
  },
  every(ms, fn) {
    const id = setInterval(fn, ms);
    return { cancel: () => clearInterval(id) };
  },
};
