/**
 * Accepting connections for a server of any protocol: one session per connection
 * (handshake, then a RequestLoop), a limit on clients that counts handshaking ones
 * too (so it has no race), and a clean shutdown: stop accepting, let every session
 * finish and answer what it has in flight.
 */

import { formatHostPort } from "../lib/address.ts";
import { describeError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { type ByteConn, closeQuietly } from "./byte_conn.ts";
import type { RequestLoop } from "./request_loop.ts";

/** A connection as a server accepts it: its bytes, and who is on the other end. */
export interface AcceptedConn extends ByteConn {
  readonly remoteAddr: Deno.Addr;
}

/** Where a server accepts from: a Deno.Listener, or the simulation's network (tests/sim/). */
export interface ConnListener {
  accept(): Promise<AcceptedConn>;
  close(): void;
  readonly addr: Deno.Addr;
}

/**
 * Runs a connection's handshake and returns its request loop, or null when the client
 * was turned away (the session logs why). `admitted` is false past the client limit:
 * the session should say "busy" in its protocol's words and return null.
 */
export type Session = (
  conn: AcceptedConn,
  peer: string,
  admitted: boolean,
) => Promise<RequestLoop | null>;

/**
 * The client limit's count. Handshaking clients count too, and a client past the limit
 * holds a place while it is told "busy", so enter() and leave() always pair.
 */
export interface ClientSlots {
  readonly max: number;
  /** Counts a client in; false when it is past the limit. */
  enter(): boolean;
  leave(): void;
}

/**
 * A limit of `max` clients. With `shared` (an Int32Array of one over a
 * SharedArrayBuffer), every thread given the same array counts against one limit:
 * the NBD threads of one export hold at most `max` clients together.
 */
export function clientSlots(max: number, shared?: Int32Array): ClientSlots {
  const count = shared ?? new Int32Array(1);
  return {
    max,
    enter: () => Atomics.add(count, 0, 1) < max,
    leave: () => void Atomics.sub(count, 0, 1),
  };
}

export class AcceptLoop {
  readonly #loops = new Set<RequestLoop>();
  readonly #serving = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;
  #unixClients = 0;
  #stopping = false;

  constructor(
    readonly listener: ConnListener,
    readonly slots: ClientSlots,
    readonly session: Session,
    readonly log: Logger,
  ) {
    this.#accepting = this.#accept();
  }

  get clients(): number {
    return this.#loops.size;
  }

  get inFlight(): number {
    let total = 0;
    for (const loop of this.#loops) total += loop.inFlight;
    return total;
  }

  async shutdown(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    closeQuietly(this.listener);
    await this.#accepting;
    await Promise.all([...this.#loops].map((loop) => loop.stop()));
    await Promise.all(this.#serving);
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: AcceptedConn;
      try {
        conn = await this.listener.accept();
      } catch (error) {
        if (!this.#stopping) {
          this.log.error(`accept failed, no longer listening: ${describeError(error)}`);
        }
        return;
      }
      if (this.#stopping) {
        closeQuietly(conn);
        return;
      }
      const serving = this.#serve(conn);
      this.#serving.add(serving);
      void serving.finally(() => this.#serving.delete(serving));
    }
  }

  async #serve(conn: AcceptedConn): Promise<void> {
    const peer = this.#peerName(conn);
    const admitted = this.slots.enter();
    try {
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      let loop: RequestLoop | null;
      try {
        loop = await this.session(conn, peer, admitted);
      } catch (error) {
        this.log.warn(`${peer}: handshake failed: ${describeError(error)}`);
        loop = null;
      }
      if (loop === null) {
        closeQuietly(conn);
        return;
      }
      if (this.#stopping) {
        await loop.stop(); // closes it, and releases what its handshake took
        return;
      }
      this.#loops.add(loop);
      this.log.info(`${peer}: client connected (${this.#loops.size} now)`);
      try {
        await loop.serve();
      } finally {
        this.#loops.delete(loop);
        this.log.info(`${peer}: client left (${this.#loops.size} now)`);
      }
    } finally {
      this.slots.leave();
    }
  }

  #peerName(conn: AcceptedConn): string {
    const remote = conn.remoteAddr;
    if (remote.transport === "tcp" || remote.transport === "udp") {
      return formatHostPort({ hostname: remote.hostname, port: remote.port });
    }
    this.#unixClients += 1;
    return `unix client ${this.#unixClients}`;
  }
}
