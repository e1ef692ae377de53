/**
 * A TCP proxy on loopback for fault tests: it forwards between clients and a target
 * server and can cut the link (a partition), hold what clients send during the cut,
 * deliver those held bytes late (the retransmission of a connection the client
 * already abandoned, reaching the server after the partition heals), and throttle
 * the link to a rate.
 */

import { closeQuietly } from "../../src/transport/byte_conn.ts";
import { closeWriteQuietly, type Ending, readQuietly, writeQuietly } from "./quiet_io.ts";

const CHUNK_BYTES = 64 * 1024;
/** When throttled, a chunk takes at most this long to cross, so the rate is smooth. */
const THROTTLED_CHUNK_MS = 50;

export interface FaultProxyStats {
  /** Upstream (server) connections open now. */
  connections: number;
  /** Every connection the listener accepted, the refused ones included. */
  accepted: number;
  /** Connections accepted during a cut and closed at once. */
  refusedWhileCut: number;
}

/**
 * One direction of the throttled link, shared by every connection: chunks cross it
 * one after another, like bits on a wire, so N connections share the rate.
 */
class Link {
  private freeAtMs = 0;

  /** How long a chunk of `bytes` must wait until it has crossed. */
  reserve(bytes: number, bytesPerSecond: number): number {
    const nowMs = performance.now();
    this.freeAtMs = Math.max(nowMs, this.freeAtMs) + (bytes * 1000) / bytesPerSecond;
    return this.freeAtMs - nowMs;
  }

  reset(): void {
    this.freeAtMs = 0;
  }
}

/** A client connection and its own upstream connection, with the proxy's view of both. */
class Pair {
  upstream: Deno.TcpConn | null = null;
  /** Resolves with whether the upstream connection was made. */
  ready: Promise<boolean> = Promise.resolve(false);
  /** Set by a cut and never cleared: a partitioned connection does not come back. */
  held = false;
  heldChunks: Uint8Array[] = [];
  clientEnded = false;
  upstreamEnded = false;
  clientClosed = false;
  upstreamClosed = false;
  private upstreamWriteClosed = false;
  /**
   * Upstream writes run one after another, so a late delivery never interleaves with
   * a write that was in flight when the cut came.
   */
  private upstreamWrites: Promise<unknown> = Promise.resolve();

  /** `id` numbers connections from 1 in accept order (refused ones take a number too). */
  constructor(readonly id: number, readonly client: Deno.TcpConn) {}

  get upstreamOpen(): boolean {
    return this.upstream !== null && !this.upstreamClosed;
  }

  /** Bytes the kernel accepted for the server; a failure stops the write (never throws). */
  writeUpstream(bytes: Uint8Array): Promise<number> {
    const run = this.upstreamWrites.then(() =>
      this.upstreamOpen ? writeQuietly(this.upstream!, bytes) : 0
    );
    this.upstreamWrites = run;
    return run;
  }

  /** Sends the server a FIN after every queued write; false when that failed. */
  endUpstreamWrite(): Promise<boolean> {
    const run = this.upstreamWrites.then(async () => {
      if (this.upstreamWriteClosed) return true;
      this.upstreamWriteClosed = true;
      return this.upstreamOpen && await closeWriteQuietly(this.upstream!);
    });
    this.upstreamWrites = run;
    return run;
  }

  closeClient(): void {
    if (this.clientClosed) return;
    this.clientClosed = true;
    closeQuietly(this.client);
  }

  /** Also marks a connection still being dialed, so it is closed as soon as it is made. */
  closeUpstream(): void {
    if (this.upstreamClosed) return;
    this.upstreamClosed = true;
    if (this.upstream !== null) closeQuietly(this.upstream);
  }

  closeBoth(): void {
    this.closeClient();
    this.closeUpstream();
  }
}

export class FaultProxy {
  private readonly pairs = new Set<Pair>();
  /** Every loop and dial still running; close() awaits them all. */
  private readonly tasks = new Set<Promise<unknown>>();
  /** Wakes every throttled loop that is waiting for its chunk to cross. */
  private readonly sleepers = new Set<() => void>();
  private heldWaiters: { bytes: number; resolve: () => void; reject: (error: Error) => void }[] =
    [];
  private readonly uplink = new Link();
  private readonly downlink = new Link();
  private isCut = false;
  private bytesPerSecond: number | null = null;
  private heldTotal = 0;
  private acceptedCount = 0;
  private refusedCount = 0;
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly listener: Deno.TcpListener,
    private readonly target: { hostname: string; port: number },
  ) {
    this.track(this.acceptLoop());
  }

  /** A proxy to `target`, listening on a free port of 127.0.0.1. */
  static start(target: { hostname: string; port: number }): FaultProxy {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0, transport: "tcp" });
    return new FaultProxy(listener, { hostname: target.hostname, port: target.port });
  }

  get address(): { hostname: string; port: number } {
    return { hostname: this.listener.addr.hostname, port: this.listener.addr.port };
  }

  /**
   * A partition: every connection open now is held (what its client sends is kept,
   * what its server sends is dropped, neither side hears of the other closing), and
   * new connections are closed as soon as they are accepted.
   */
  cut(): void {
    this.isCut = true;
    for (const pair of this.pairs) pair.held = true;
  }

  /** New connections are forwarded again; held ones stay held until deliverHeld(). */
  heal(): void {
    this.isCut = false;
  }

  /** Bytes sent by clients on held connections and not yet delivered. */
  heldBytes(): number {
    return this.heldTotal;
  }

  /** Resolves once at least `bytes` are held; rejects if the proxy is closed first. */
  whenHeldBytes(bytes: number): Promise<void> {
    const waiting = new Promise<void>((resolve, reject) => {
      if (this.heldTotal >= bytes) resolve();
      else if (this.closing !== null) reject(new Error("FaultProxy is closed"));
      else this.heldWaiters.push({ bytes, resolve, reject });
    });
    // Marked handled, so a waiter nobody awaits cannot fail a test at close().
    waiting.catch(() => {});
    return waiting;
  }

  /**
   * The late delivery: each held connection's bytes go to its server, in order; a
   * connection whose client has closed then gets its FIN, the others stay held and
   * open. Returns the bytes written (0 for a connection the server already closed).
   */
  async deliverHeld(): Promise<number> {
    const held = [...this.pairs].filter((pair) => pair.held);
    const written = await Promise.all(held.map((pair) => this.deliver(pair)));
    return written.reduce((sum, bytes) => sum + bytes, 0);
  }

  /**
   * Limits both directions of every forwarded connection to `bytesPerSecond` each
   * (null: no limit). A chunk waits before it is forwarded, and its connection is not
   * read meanwhile, so the sender is slowed by its own full socket buffers.
   */
  throttle(bytesPerSecond: number | null): void {
    if (bytesPerSecond !== null && !(bytesPerSecond > 0)) {
      throw new RangeError(`throttle: bytesPerSecond must be positive, got ${bytesPerSecond}`);
    }
    this.bytesPerSecond = bytesPerSecond;
    this.uplink.reset();
    this.downlink.reset();
    // A chunk waiting under the old rate goes now, rather than hours later.
    for (const wake of [...this.sleepers]) wake();
  }

  stats(): FaultProxyStats {
    let connections = 0;
    for (const pair of this.pairs) if (pair.upstreamOpen) connections++;
    return { connections, accepted: this.acceptedCount, refusedWhileCut: this.refusedCount };
  }

  /** Closes the listener and both sides of every connection; safe to call again. */
  close(): Promise<void> {
    return this.closing ??= this.shutdown();
  }

  private async shutdown(): Promise<void> {
    closeQuietly(this.listener);
    for (const pair of this.pairs) pair.closeBoth();
    for (const wake of [...this.sleepers]) wake();
    for (const waiter of this.heldWaiters) waiter.reject(new Error("FaultProxy is closed"));
    this.heldWaiters = [];
    // A loop can start a dial or a wait while others end: wait until none is left.
    while (this.tasks.size > 0) await Promise.all(this.tasks);
    this.pairs.clear();
    this.heldTotal = 0;
  }

  private track(task: Promise<unknown>): void {
    const settled = task.catch(() => {}).finally(() => this.tasks.delete(settled));
    this.tasks.add(settled);
  }

  private async acceptLoop(): Promise<void> {
    while (true) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.listener.accept();
      } catch {
        return; // the listener was closed
      }
      this.acceptedCount++;
      if (this.closing !== null || this.isCut) {
        if (this.isCut) this.refusedCount++;
        closeQuietly(conn);
        continue;
      }
      this.open(new Pair(this.acceptedCount, conn));
    }
  }

  private open(pair: Pair): void {
    this.pairs.add(pair);
    pair.ready = this.dial(pair);
    this.track(pair.ready);
    this.track(this.forwardFromClient(pair));
    this.track(pair.ready.then((ready) => ready ? this.forwardFromServer(pair) : undefined));
  }

  private async dial(pair: Pair): Promise<boolean> {
    let conn: Deno.TcpConn;
    try {
      conn = await Deno.connect({ ...this.target, transport: "tcp" });
    } catch {
      await this.upstreamGone(pair, "broken");
      return false;
    }
    if (pair.upstreamClosed) {
      closeQuietly(conn); // the pair ended (or the proxy closed) while dialing
      return false;
    }
    pair.upstream = conn;
    return true;
  }

  private async forwardFromClient(pair: Pair): Promise<void> {
    const buffer = new Uint8Array(CHUNK_BYTES);
    while (true) {
      const read = await readQuietly(pair.client, buffer.subarray(0, this.chunkBytes()));
      if (typeof read !== "number") return await this.clientGone(pair, read);
      const chunk = buffer.subarray(0, read);
      if (!pair.held) await this.cross(this.uplink, read);
      // Checked again after the wait: a chunk the cut caught on the wire is held too.
      if (pair.held) {
        this.hold(pair, chunk.slice());
        continue;
      }
      if (!(await pair.ready)) continue; // the dial failed: the next read ends the loop
      const written = await pair.writeUpstream(chunk);
      if (written < chunk.length) await this.upstreamGone(pair, "broken");
    }
  }

  private async forwardFromServer(pair: Pair): Promise<void> {
    const buffer = new Uint8Array(CHUNK_BYTES);
    while (true) {
      const read = await readQuietly(pair.upstream!, buffer.subarray(0, this.chunkBytes()));
      if (typeof read !== "number") return await this.upstreamGone(pair, read);
      // During a partition the client hears nothing: what the server says is lost.
      if (pair.held) continue;
      await this.cross(this.downlink, read);
      if (pair.held) continue;
      const chunk = buffer.subarray(0, read);
      const written = await writeQuietly(pair.client, chunk);
      if (written < chunk.length) await this.clientGone(pair, "broken");
    }
  }

  /**
   * The client's side ended. Forwarded, the server gets the FIN (or both sides close
   * when it broke); held, the server must not learn that the client gave up, so its
   * side stays open for deliverHeld(), and the client's stays open so nothing is
   * ever sent back on it.
   */
  private async clientGone(pair: Pair, ending: Ending): Promise<void> {
    if (pair.clientEnded) return;
    pair.clientEnded = true;
    if (!pair.held) {
      const ended = ending === "fin" && await pair.ready && await pair.endUpstreamWrite();
      if (!ended) pair.closeBoth();
    }
    if (pair.upstreamEnded) pair.closeBoth();
    this.forget(pair);
  }

  /**
   * The server's side ended. Forwarded, the client gets the FIN (or both close);
   * held, the client hears nothing, and the server's side is closed: bytes held for
   * it can no longer be delivered.
   */
  private async upstreamGone(pair: Pair, ending: Ending): Promise<void> {
    if (pair.upstreamEnded) return;
    pair.upstreamEnded = true;
    if (pair.held) {
      pair.closeUpstream();
    } else if (ending === "broken" || !(await closeWriteQuietly(pair.client))) {
      pair.closeBoth();
    }
    if (pair.clientEnded) pair.closeBoth();
    this.forget(pair);
  }

  /** A pair is dropped once both its sides are closed and it holds nothing to deliver. */
  private forget(pair: Pair): void {
    if (pair.clientClosed && pair.upstreamClosed && pair.heldChunks.length === 0) {
      this.pairs.delete(pair);
    }
  }

  private hold(pair: Pair, chunk: Uint8Array): void {
    pair.heldChunks.push(chunk);
    this.heldTotal += chunk.length;
    const waiting = this.heldWaiters;
    this.heldWaiters = waiting.filter((waiter) => waiter.bytes > this.heldTotal);
    for (const waiter of waiting) if (waiter.bytes <= this.heldTotal) waiter.resolve();
  }

  private async deliver(pair: Pair): Promise<number> {
    const chunks = pair.heldChunks;
    pair.heldChunks = [];
    for (const chunk of chunks) this.heldTotal -= chunk.length;
    let written = 0;
    if (await pair.ready) {
      for (const chunk of chunks) {
        const bytes = await pair.writeUpstream(chunk);
        written += bytes;
        if (bytes < chunk.length) {
          await this.upstreamGone(pair, "broken");
          break;
        }
      }
      if (pair.clientEnded && pair.upstreamOpen && !(await pair.endUpstreamWrite())) {
        await this.upstreamGone(pair, "broken");
      }
    }
    this.forget(pair);
    return written;
  }

  /** Reads are this small when throttled, so a chunk crosses in THROTTLED_CHUNK_MS. */
  private chunkBytes(): number {
    if (this.bytesPerSecond === null) return CHUNK_BYTES;
    const bytes = Math.floor((this.bytesPerSecond * THROTTLED_CHUNK_MS) / 1000);
    return Math.max(1, Math.min(CHUNK_BYTES, bytes));
  }

  /** Waits while a chunk of `bytes` crosses the throttled `link` (no wait unthrottled). */
  private async cross(link: Link, bytes: number): Promise<void> {
    if (this.bytesPerSecond === null) return;
    const waitMs = link.reserve(bytes, this.bytesPerSecond);
    if (waitMs > 0) await this.pause(waitMs);
  }

  /** A wait that throttle() and close() cut short, so no timer outlives the proxy. */
  private pause(delayMs: number): Promise<void> {
    if (this.closing !== null) return Promise.resolve();
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.sleepers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, delayMs);
      this.sleepers.add(wake);
    });
  }
}
