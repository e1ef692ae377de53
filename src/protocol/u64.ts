/**
 * u64 fields as JavaScript numbers. Offsets and sizes stay below 2^53 (8 PiB), so a
 * number holds them exactly and the hot path never touches BigInt; a larger value
 * on the wire is reported as invalid rather than silently rounded.
 */

const TWO_32 = 2 ** 32;
const HIGH_MAX = 2 ** 21 - 1; // 2^53 - 1 = HIGH_MAX * 2^32 + (2^32 - 1)

/** Reads a little-endian u64; returns -1 when it is not a safe integer. */
export function getU64(view: DataView, at: number): number {
  const low = view.getUint32(at, true);
  const high = view.getUint32(at + 4, true);
  if (high > HIGH_MAX) return -1;
  return high * TWO_32 + low;
}

export function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, value % TWO_32, true);
  view.setUint32(at + 4, Math.floor(value / TWO_32), true);
}
