/**
 * How the bench measures one thing against another: run by run, alternating which of
 * the two goes first. Whatever favours a position (a warm cache, the CPU's clock
 * ramping up, a neighbour's load that comes and goes) then falls on both sides alike
 * instead of always on the same one. Every pairing in the bench goes through here.
 */

/** The medians of both sides of a pairing, and every run's value, in run order. */
export interface Paired {
  a: number;
  b: number;
  aRuns: number[];
  bRuns: number[];
}

/**
 * `runs` runs of `a` and of `b`: run i measures `a` then `b` when i is even, `b` then
 * `a` when it is odd (so A B, B A, A B, ...). With an odd number of runs `a` goes
 * first once more than `b`; the median of each side is reported.
 */
export async function alternating(
  runs: number,
  a: () => Promise<number>,
  b: () => Promise<number>,
): Promise<Paired> {
  const aRuns: number[] = [];
  const bRuns: number[] = [];
  for (let i = 0; i < runs; i++) {
    if (aGoesFirst(i)) {
      aRuns.push(await a());
      bRuns.push(await b());
    } else {
      bRuns.push(await b());
      aRuns.push(await a());
    }
  }
  return { a: median(aRuns), b: median(bRuns), aRuns, bRuns };
}

/** Whether run `i` (from 0) of a pairing measures its first side first. */
function aGoesFirst(i: number): boolean {
  return i % 2 === 0;
}

/** The middle value; with an even count, the mean of the two middle ones. NaN when empty. */
export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((x, y) => x - y);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}
