/**
 * Accepting connections for a server of any protocol: one session per connection
 * (handshake, then a RequestLoop), a limit on clients that counts handshaking ones
 * too (so it has no race), a limit per remote address (so one host cannot take every
 * place), and a clean shutdown: stop accepting, let every session finish and answer
 * what it has in flight. An accept that fails for a passing reason (out of file
 * descriptors) is retried with a backoff: only a closed listener ends the loop.
 */

import {
  ACCEPT_RETRY_MS_MAX,
  ACCEPT_RETRY_MS_MIN,
  ADDRESS_BUCKETS,
  ADDRESS_REFUSAL_LOG_MS,
  CLIENTS_PER_ADDRESS_MAX,
} from "../constants.ts";
import { formatHostPort } from "../lib/address.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, systemClock, type Timer } from "../lib/clock.ts";
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
 * Per address, a connection past the limit is not counted: enterAddress() returning
 * false needs no leaveAddress().
 */
export interface ClientSlots {
  readonly max: number;
  readonly perAddressMax: number;
  /** Counts a client in; false when it is past the limit. */
  enter(): boolean;
  leave(): void;
  /** Counts a connection from `address` in; false (and not counted) past the address's limit. */
  enterAddress(address: string): boolean;
  leaveAddress(address: string): void;
}

/** The size of the SharedArrayBuffer that threads share a clientSlots through. */
export const CLIENT_SLOTS_SHARED_BYTES = Int32Array.BYTES_PER_ELEMENT * (1 + ADDRESS_BUCKETS);

/**
 * A limit of `max` clients, and of `perAddressMax` connections from one address. With
 * `shared` (an Int32Array over a SharedArrayBuffer of CLIENT_SLOTS_SHARED_BYTES), every
 * thread given the same array counts against the same limits: the NBD threads of one
 * export hold at most `max` clients together, and the kernel spreads one address's
 * connections over all of them.
 */
export function clientSlots(
  max: number,
  shared?: Int32Array,
  perAddressMax = CLIENTS_PER_ADDRESS_MAX,
): ClientSlots {
  const counts = shared ?? new Int32Array(1 + ADDRESS_BUCKETS);
  assert(counts.length === 1 + ADDRESS_BUCKETS, "client slots need the total and every bucket");
  return {
    max,
    perAddressMax,
    enter: () => Atomics.add(counts, 0, 1) < max,
    leave: () => void Atomics.sub(counts, 0, 1),
    enterAddress(address) {
      const bucket = 1 + addressBucket(address);
      if (Atomics.add(counts, bucket, 1) < perAddressMax) return true;
      Atomics.sub(counts, bucket, 1);
      return false;
    },
    leaveAddress: (address) => void Atomics.sub(counts, 1 + addressBucket(address), 1),
  };
}

/**
 * The bucket an address counts in (FNV-1a). Addresses that share one share a limit:
 * a host with enough addresses to aim at another's bucket could fill all 64 places
 * anyway, so the hash needs no secret.
 */
function addressBucket(address: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < address.length; i++) {
    hash = Math.imul(hash ^ address.charCodeAt(i), 0x01000193);
  }
  return (hash >>> 0) % ADDRESS_BUCKETS;
}

/** The remote IP address of a connection; null for a Unix socket's, which has none. */
export function remoteAddress(conn: AcceptedConn): string | null {
  const remote = conn.remoteAddr;
  return remote.transport === "tcp" || remote.transport === "udp" ? remote.hostname : null;
}

export class AcceptLoop {
  readonly #loops = new Set<RequestLoop>();
  readonly #serving = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;
  /** Resolves at shutdown, so a backoff's wait ends with it. */
  readonly #stopped = Promise.withResolvers<void>();
  #unixClients = 0;
  #stopping = false;
  /** When the last per-address refusal was logged, and how many were not since. */
  #refusalLoggedMs: number | null = null;
  #refusalsUnlogged = 0;

  constructor(
    readonly listener: ConnListener,
    readonly slots: ClientSlots,
    readonly session: Session,
    readonly log: Logger,
    readonly clock: Clock = systemClock,
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
    this.#stopped.resolve();
    closeQuietly(this.listener);
    await this.#accepting;
    await Promise.all([...this.#loops].map((loop) => loop.stop()));
    await Promise.all(this.#serving);
  }

  async #accept(): Promise<void> {
    let retryMs = 0; // 0: the last accept worked
    for (;;) {
      let conn: AcceptedConn;
      try {
        conn = await this.listener.accept();
      } catch (error) {
        if (this.#stopping) return;
        if (error instanceof Deno.errors.BadResource) {
          this.log.error(`accept failed, no longer listening: ${describeError(error)}`);
          return;
        }
        // Anything else may pass (EMFILE, ENFILE, ENOMEM, ECONNABORTED...): ending the
        // loop would leave a server that runs and never serves again, and retrying a
        // listener that is broken for good costs one accept a second.
        retryMs = this.#nextRetryMs(retryMs, error);
        await this.#pause(retryMs);
        continue;
      }
      retryMs = 0;
      if (this.#stopping) {
        closeQuietly(conn);
        return;
      }
      const serving = this.#serve(conn);
      this.#serving.add(serving);
      void serving.finally(() => this.#serving.delete(serving));
    }
  }

  /** The delay before the next accept; the first of an episode logs it (its retries do not). */
  #nextRetryMs(previousMs: number, error: unknown): number {
    if (previousMs > 0) return Math.min(previousMs * 2, ACCEPT_RETRY_MS_MAX);
    this.log.warn(
      `accept failed: ${describeError(error)}; retrying from ${ACCEPT_RETRY_MS_MIN} ms,` +
        ` doubling to every ${ACCEPT_RETRY_MS_MAX} ms, until one works`,
    );
    return ACCEPT_RETRY_MS_MIN;
  }

  /** Waits `ms` on the clock, or until shutdown, whichever comes first. */
  async #pause(ms: number): Promise<void> {
    let timer: Timer | undefined;
    const elapsed = new Promise<void>((resolve) => timer = this.clock.after(ms, resolve));
    await Promise.race([elapsed, this.#stopped.promise]);
    timer?.cancel();
  }

  /** Counts the connection against its address's limit, or closes it at once past it. */
  async #serve(conn: AcceptedConn): Promise<void> {
    const address = remoteAddress(conn);
    if (address !== null && !this.slots.enterAddress(address)) {
      closeQuietly(conn);
      this.#logRefusal(address);
      return;
    }
    try {
      await this.#run(conn);
    } finally {
      if (address !== null) this.slots.leaveAddress(address);
    }
  }

  /**
   * One line per ADDRESS_REFUSAL_LOG_MS at most: a host that keeps reconnecting past
   * its limit must not flood the log.
   */
  #logRefusal(address: string): void {
    const now = this.clock.nowMs();
    if (this.#refusalLoggedMs !== null && now - this.#refusalLoggedMs < ADDRESS_REFUSAL_LOG_MS) {
      this.#refusalsUnlogged += 1;
      return;
    }
    const unlogged = this.#refusalsUnlogged === 0
      ? ""
      : ` (and ${this.#refusalsUnlogged} more refused, from any address, since the last such line)`;
    this.log.warn(
      `${address}: connection refused, ${this.slots.perAddressMax} already open from that address${unlogged}`,
    );
    this.#refusalLoggedMs = now;
    this.#refusalsUnlogged = 0;
  }

  async #run(conn: AcceptedConn): Promise<void> {
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
      // A client is news once it asks for something other than status, which comes
      // soon (a client pings when idle); one that only asks for status, as `dst
      // status` does, is logged at debug when it leaves. See Asked.
      let announced = false;
      const announce = () => {
        if (announced) return;
        announced = true;
        this.log.info(`${peer}: client connected (${this.#loops.size} now)`);
      };
      void loop.working.then(() => {
        if (this.#loops.has(loop)) announce();
      });
      try {
        await loop.serve();
      } finally {
        const statusOnly = loop.asked === "status";
        if (!statusOnly) announce();
        this.#loops.delete(loop);
        if (statusOnly) {
          this.log.debug(`${peer}: answered a status query; left (${this.#loops.size} now)`);
        } else {
          this.log.info(`${peer}: client left (${this.#loops.size} now)`);
        }
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
