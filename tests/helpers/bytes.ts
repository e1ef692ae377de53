/**
 * Byte helpers for tests: patterned buffers, joining buffers, and comparisons that
 * say where two buffers first differ.
 */

/** `length` bytes counting up from `first` (mod 256), so misplaced bytes show. */
export function pattern(first: number, length: number): Uint8Array {
  return Uint8Array.from({ length }, (_, i) => (first + i) & 0xff);
}

/** The parts joined end to end into one new buffer. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const length = Math.min(a.length, b.length);
  for (let i = 0; i < length; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : length;
}

export function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const at = firstDifference(actual, expected);
  if (at >= 0) {
    throw new Error(
      `${what}: differs at byte ${at} (got ${actual[at]}, expected ${
        expected[at]
      }; lengths ${actual.length}, ${expected.length})`,
    );
  }
}

/** Awaits every promise (so none is left running), then throws the first failure. */
export async function settleAll(pending: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(pending);
  const failed = results.find((result) => result.status === "rejected");
  if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
}
