/**
 * A connection's data-changing calls wait until it holds a write grant
 * (writer_lease.ts): the first such call asks for one, later ones wait on that same
 * request, and once granted they run without waiting. A refused request fails the
 * calls that waited on it (EPERM, naming the lease holder), and the next write asks
 * again, so a writer can go on once the lease is free. Reads never pass here. Both
 * servers use it: a write over NBD is as much "someone else wrote" to a mirror as
 * one over DST, and the export's NBD port is a writer like any other.
 */

import type { WriteGrant } from "./writer_lease.ts";

export class FirstWriteGate {
  /** Resolves once writes may go ahead; null until a write asks (or after a refusal). */
  #asking: Promise<void> | null = null;
  #grant: WriteGrant | null;
  #released = false;

  /**
   * `acquire` is null when the connection needs no grant (it cannot write, or its
   * server keeps no lease); `grant` is one the handshake obtained already.
   */
  constructor(
    private readonly acquire: (() => Promise<WriteGrant>) | null,
    grant: WriteGrant | null = null,
  ) {
    this.#grant = grant;
  }

  get holdsGrant(): boolean {
    return this.#grant !== null;
  }

  /** Runs `call` once writes may go ahead; rejects as the grant was refused. */
  run(call: () => Promise<void>): Promise<void> {
    if (this.acquire === null || this.#grant !== null) return call();
    this.#asking ??= this.acquire().then(
      (grant) => {
        if (this.#released) {
          grant.release(); // the connection ended while it was asking
          throw new Error("the connection ended before its write grant came");
        }
        this.#grant = grant;
      },
      (error) => {
        this.#asking = null;
        throw error;
      },
    );
    return this.#asking.then(call);
  }

  /** The connection ended: its grant (if any) goes back. */
  release(): void {
    this.#released = true;
    this.#grant?.release();
    this.#grant = null;
  }
}
