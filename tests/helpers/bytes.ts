/** Byte comparisons that say where two buffers first differ. */

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
