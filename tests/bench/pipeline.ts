/** Keeping a number of operations in flight, as a bench's load generator. */

/** Keeps `depth` operations in flight until `next` returns null; returns ops done. */
export async function pipeline(depth: number, next: () => Promise<void> | null): Promise<number> {
  let ops = 0;
  const worker = async () => {
    for (;;) {
      const op = next();
      if (op === null) return;
      await op;
      ops += 1;
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  return ops;
}
