/**
 * A deliberately dumb DST client for tests: it performs the handshake and then sends
 * whatever bytes a test asks, so malformed and hostile frames can be tried.
 */

import { dialExport, type DialOptions } from "../../src/client/dial.ts";
import type { HostPort } from "../../src/lib/address.ts";
import {
  decodeReplyHeader,
  encodeRequestHeader,
  type ReplyHeader,
  ReplyLayout,
  type RequestHeader,
  RequestLayout,
  type ServerHello,
} from "../../src/protocol/mod.ts";
import { type ByteConn, closeQuietly, readExact, writeAll } from "../../src/transport/byte_conn.ts";

export class RawClient {
  private constructor(readonly conn: ByteConn, readonly hello: ServerHello) {}

  static async connect(address: HostPort, options?: DialOptions): Promise<RawClient> {
    const { conn, hello } = await dialExport(address, options);
    return new RawClient(conn, hello);
  }

  static frame(header: RequestHeader, payload?: Uint8Array): Uint8Array {
    const bytes = new Uint8Array(RequestLayout.SIZE + (payload?.length ?? 0));
    encodeRequestHeader(new DataView(bytes.buffer), 0, header);
    if (payload !== undefined) bytes.set(payload, RequestLayout.SIZE);
    return bytes;
  }

  async send(bytes: Uint8Array): Promise<void> {
    await writeAll(this.conn, bytes);
  }

  /** Reads one reply header and its payload. */
  async reply(): Promise<{ header: ReplyHeader; payload: Uint8Array }> {
    const bytes = new Uint8Array(ReplyLayout.SIZE);
    await readExact(this.conn, bytes);
    const header = decodeReplyHeader(new DataView(bytes.buffer), 0);
    if (typeof header === "string") throw new Error(header);
    const payload = new Uint8Array(header.payloadLength);
    await readExact(this.conn, payload);
    return { header, payload };
  }

  /** True when the export closed the connection (reads end) within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const timer = setTimeout(() => this.conn.close(), ms);
    try {
      const n = await this.conn.read(new Uint8Array(1024));
      return n === null;
    } catch {
      return false; // closed by our own timer
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    closeQuietly(this.conn);
  }
}
