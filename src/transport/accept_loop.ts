/**
 * Accepting connections for a server of any protocol: one session per connection
 * (handshake, then a RequestLoop), a limit on clients that counts handshaking ones
 * too (so it has no race), and a clean shutdown: stop accepting, let every session
 * finish and answer what it has in flight.
 */

import { formatHostPort } from "../lib/address.ts";
import { describeError } from "../lib/errors.ts";
import type { Logger } from "../lib/log.ts";
import { closeQuietly } from "./byte_conn.ts";
import type { RequestLoop } from "./request_loop.ts";

/**
 * Runs a connection's handshake and returns its request loop, or null when the client
 * was turned away (the session logs why). `admitted` is false past the client limit:
 * the session should say "busy" in its protocol's words and return null.
 */
export type Session = (
  conn: Deno.Conn,
  peer: string,
  admitted: boolean,
) => Promise<RequestLoop | null>;

export class AcceptLoop {
  readonly #loops = new Set<RequestLoop>();
  readonly #serving = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;
  #admitted = 0;
  #unixClients = 0;
  #stopping = false;

  constructor(
    readonly listener: Deno.Listener,
    readonly clientsMax: number,
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
      let conn: Deno.Conn;
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

  async #serve(conn: Deno.Conn): Promise<void> {
    const peer = this.#peerName(conn);
    this.#admitted += 1;
    try {
      if ("setNoDelay" in conn) (conn as Deno.TcpConn).setNoDelay(true);
      let loop: RequestLoop | null;
      try {
        loop = await this.session(conn, peer, this.#admitted <= this.clientsMax);
      } catch (error) {
        this.log.warn(`${peer}: handshake failed: ${describeError(error)}`);
        loop = null;
      }
      if (loop === null || this.#stopping) {
        closeQuietly(conn);
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
      this.#admitted -= 1;
    }
  }

  #peerName(conn: Deno.Conn): string {
    const remote = conn.remoteAddr;
    if (remote.transport === "tcp" || remote.transport === "udp") {
      return formatHostPort({ hostname: remote.hostname, port: remote.port });
    }
    this.#unixClients += 1;
    return `unix client ${this.#unixClients}`;
  }
}
