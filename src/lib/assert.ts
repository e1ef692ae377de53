/**
 * The project's own assertion: stays on in release builds, one condition per call.
 * A failed assertion is a programmer error, never an operating error: it crashes.
 */

export class AssertionError extends Error {
  override name = "AssertionError";
}

export function assert(condition: unknown, why: string): asserts condition {
  if (!condition) throw new AssertionError(why);
}
