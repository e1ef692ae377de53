/**
 * A Dialer that connects from a chosen source address (127.0.0.N), through node:net,
 * since Deno.connect cannot pick one. The export limits connections per address
 * (16), so a bench of 64 clients on one machine spreads them over loopback addresses
 * as 64 clients on 4 machines would arrive.
 */

import net from "node:net";
import type { Dialer } from "../../src/client/dial.ts";
import type { ByteConn } from "../../src/transport/byte_conn.ts";

class NodeSocketConn implements ByteConn {
  readonly #chunks: Uint8Array[] = [];
  #ended = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;

  constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Uint8Array) => {
      this.#chunks.push(chunk);
      this.#notify();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#notify();
    });
    socket.on("error", (error: Error) => {
      this.#error = error;
      this.#notify();
    });
    socket.on("close", () => {
      this.#ended = true;
      this.#notify();
    });
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  async read(into: Uint8Array): Promise<number | null> {
    while (this.#chunks.length === 0) {
      if (this.#error !== null) throw this.#error;
      if (this.#ended) return null;
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    const chunk = this.#chunks[0]!;
    const n = Math.min(into.length, chunk.length);
    into.set(chunk.subarray(0, n));
    if (n === chunk.length) this.#chunks.shift();
    else this.#chunks[0] = chunk.subarray(n);
    return n;
  }

  write(data: Uint8Array): Promise<number> {
    return new Promise((resolve, reject) => {
      // The socket may keep the buffer until it is written: give it its own copy.
      this.socket.write(data.slice(), (error) => error ? reject(error) : resolve(data.length));
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Dials from `sourceAddress` (a loopback address such as 127.0.0.2). */
export function dialFrom(sourceAddress: string): Dialer {
  return (address) =>
    new Promise((resolve, reject) => {
      const socket = net.createConnection({
        host: address.hostname,
        port: address.port,
        localAddress: sourceAddress,
      });
      socket.setNoDelay(true);
      socket.once("connect", () => resolve(new NodeSocketConn(socket)));
      socket.once("error", reject);
    });
}
