/**
 * What the fast-check property tests share: the data a write carries, made from its
 * seed, and the options that replay a failure from the seed and path fast-check prints.
 */

/** `length` bytes of an xorshift stream from `seed`: distinct writes carry distinct data. */
export function seededBytes(seed: number, length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

/** fc.assert options: `numRuns`, or the one run DST_SEED (and DST_PATH) name, to replay it. */
export function replayOptions(numRuns: number): { numRuns: number; seed?: number; path?: string } {
  const seedText = Deno.env.get("DST_SEED");
  const pathText = Deno.env.get("DST_PATH");
  return {
    numRuns,
    ...(seedText ? { seed: Number(seedText) } : {}),
    ...(pathText ? { path: pathText } : {}),
  };
}
