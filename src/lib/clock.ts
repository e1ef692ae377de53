/** Time comes in through this seam, so tests and simulations can drive it. */

export interface Clock {
  /** Milliseconds on a monotonic scale; only differences mean anything. */
  nowMs(): number;
}

export const systemClock: Clock = { nowMs: () => performance.now() };
