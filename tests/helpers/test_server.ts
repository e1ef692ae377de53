/**
 * A small TCP server for the proxies' own tests: it echoes what it receives, or (as a
 * sink) only keeps it, and shows each connection as the server saw it.
 */

import { closeQuietly, writeAll } from "../../src/transport/byte_conn.ts";
import { concat } from "./bytes.ts";

const KiB = 1024;

/** One connection as the test server sees it: what arrived, and when the peer ended it. */
export class ServerSide {
  private readonly chunks: Uint8Array[] = [];
  private receivedBytes = 0;
  private waiters: { bytes: number; resolve: () => void }[] = [];
  /** Resolves when the peer's side ends (FIN or reset); the server then closes. */
  readonly ended: Promise<void>;

  constructor(readonly conn: Deno.TcpConn, echo: boolean) {
    this.ended = this.serve(echo);
  }

  bytes(): Uint8Array {
    return concat(...this.chunks);
  }

  /** Resolves once at least `bytes` have arrived. */
  whenReceived(bytes: number): Promise<void> {
    return new Promise((resolve) => {
      if (this.receivedBytes >= bytes) resolve();
      else this.waiters.push({ bytes, resolve });
    });
  }

  close(): void {
    closeQuietly(this.conn);
  }

  private async serve(echo: boolean): Promise<void> {
    const buffer = new Uint8Array(64 * KiB);
    try {
      while (true) {
        const n = await this.conn.read(buffer);
        if (n === null) break;
        const chunk = buffer.slice(0, n);
        this.received(chunk);
        if (echo) await writeAll(this.conn, chunk);
      }
    } catch {
      // reset, or closed by the test
    }
    this.close();
  }

  private received(chunk: Uint8Array): void {
    this.chunks.push(chunk);
    this.receivedBytes += chunk.length;
    const waiting = this.waiters;
    this.waiters = waiting.filter((waiter) => waiter.bytes > this.receivedBytes);
    for (const waiter of waiting) if (waiter.bytes <= this.receivedBytes) waiter.resolve();
  }
}

/** Echoes what it receives, or (as a sink) only records it. */
export class TestServer {
  private readonly listener = Deno.listen({ hostname: "127.0.0.1", port: 0, transport: "tcp" });
  readonly sides: ServerSide[] = [];
  private readonly queued: ServerSide[] = [];
  private readonly takers: ((side: ServerSide) => void)[] = [];
  private readonly accepting: Promise<void>;

  constructor(private readonly echo: boolean) {
    this.accepting = this.accept();
  }

  get address(): { hostname: string; port: number } {
    return { hostname: this.listener.addr.hostname, port: this.listener.addr.port };
  }

  /** The next connection the server accepts. */
  nextConnection(): Promise<ServerSide> {
    const side = this.queued.shift();
    if (side !== undefined) return Promise.resolve(side);
    return new Promise((resolve) => this.takers.push(resolve));
  }

  async close(): Promise<void> {
    closeQuietly(this.listener);
    for (const side of this.sides) side.close();
    await this.accepting;
    await Promise.all(this.sides.map((side) => side.ended));
  }

  private async accept(): Promise<void> {
    try {
      while (true) {
        const side = new ServerSide(await this.listener.accept(), this.echo);
        this.sides.push(side);
        const taker = this.takers.shift();
        if (taker !== undefined) taker(side);
        else this.queued.push(side);
      }
    } catch {
      // the listener was closed
    }
  }
}
