/**
 * The simulation's only source of randomness: a small seeded generator (mulberry32),
 * so a seed names one run exactly and a failing seed replays the same way every time.
 */

/** Returns a generator of numbers in [0, 1) that depends only on `seed`. */
export function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
