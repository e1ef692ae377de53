/**
 * A connection's data-changing calls wait until its write generation has started
 * (write_generation.ts): the first such call starts it, later ones wait on that same
 * start, and once it is durable they run without waiting. Reads never pass here.
 * Both servers use it: a write over NBD is as much "someone else wrote" to a mirror
 * as one over DST.
 */
export class FirstWriteGate {
  /** Resolves once writes may go ahead; null until the first write asks. */
  #starting: Promise<void> | null = null;
  #open: boolean;

  /** `start` is null when this connection's generation started already (or it cannot write). */
  constructor(private readonly start: (() => Promise<void>) | null) {
    this.#open = start === null;
  }

  /** Runs `call` once writes may go ahead. */
  run(call: () => Promise<void>): Promise<void> {
    if (this.#open) return call();
    this.#starting ??= this.start!().then(() => {
      this.#open = true;
    });
    return this.#starting.then(call);
  }
}
