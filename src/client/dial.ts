/**
 * Opening a connection to an export: TCP connect and the client's side of the
 * handshake. Errors say which address failed and what to check.
 */

import { HANDSHAKE_TIMEOUT_MS } from "../constants.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { describeError, DstError } from "../lib/errors.ts";
import {
  AUTH_NONE,
  CLIENT_ID_BYTES,
  ClientFeature,
  decodeRefusalReasonLength,
  decodeServerHello,
  encodeClientHello,
  HELLO_STATUS_TEXT,
  HelloStatus,
  NONCE_BYTES,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  type ServerHello,
  ServerHelloLayout,
} from "../protocol/mod.ts";
import { type ByteConn, closeQuietly, readExact, writeAll } from "../transport/byte_conn.ts";
import { printable } from "../lib/printable.ts";

export type Dialer = (address: HostPort) => Promise<ByteConn>;

export const tcpDialer: Dialer = async (address) => {
  const conn = await Deno.connect({ hostname: address.hostname, port: address.port });
  conn.setNoDelay(true);
  return conn;
};

export interface Link {
  conn: ByteConn;
  hello: ServerHello;
}

export interface DialOptions {
  dial?: Dialer;
  /** Where the handshake's time limit runs (default the system's clock). */
  clock?: Clock;
  /**
   * Declares the client a writer: the export grants it the writer lease (or refuses)
   * and starts a write generation for it at once, reported in the hello.
   */
  writer?: boolean;
  /** The client's identity, the same on each of its connections (default: anonymous, zeros). */
  clientId?: Uint8Array;
}

/** The export refused the handshake; `status` is its HelloStatus, the message its reason. */
export class HandshakeRefused extends DstError {
  override name = "HandshakeRefused";
  constructor(readonly status: number, message: string) {
    super(status === HelloStatus.WRITE_LEASE_HELD ? "WRITE_LEASE_HELD" : "HANDSHAKE", message);
  }
}

/**
 * Connects and runs the handshake; the returned hello has status OK. A refusal
 * throws HandshakeRefused with the export's own reason.
 */
export async function dialExport(address: HostPort, options: DialOptions = {}): Promise<Link> {
  const dial = options.dial ?? tcpDialer;
  const where = formatHostPort(address);
  let conn: ByteConn;
  try {
    conn = await dial(address);
  } catch (error) {
    throw new DstError(
      "CONNECT",
      `Cannot connect to ${where}: ${describeError(error)} (is \`dst export\` running there?)`,
      { cause: error },
    );
  }
  const timer = (options.clock ?? systemClock).after(
    HANDSHAKE_TIMEOUT_MS,
    () => closeQuietly(conn),
  );
  try {
    await writeAll(
      conn,
      encodeClientHello({
        versionMin: PROTOCOL_VERSION,
        versionMax: PROTOCOL_VERSION,
        features: options.writer ? ClientFeature.WRITER : 0,
        authMethods: AUTH_NONE,
        protections: PROTECTION_NONE,
        nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
        clientId: options.clientId ?? new Uint8Array(CLIENT_ID_BYTES),
      }),
    );
    const bytes = new Uint8Array(ServerHelloLayout.SIZE);
    await readExact(conn, bytes);
    const hello = decodeServerHello(bytes);
    if (typeof hello === "string") throw new DstError("HANDSHAKE", `${where}: ${hello}`);
    if (hello.status !== HelloStatus.OK) {
      const why = await readRefusalReason(conn) ??
        HELLO_STATUS_TEXT[hello.status] ?? `status ${hello.status}`;
      throw new HandshakeRefused(
        hello.status,
        `${where} refused the connection: ${printable(why)}`,
      );
    }
    return { conn, hello };
  } catch (error) {
    closeQuietly(conn);
    if (error instanceof DstError) throw error;
    throw new DstError(
      "HANDSHAKE",
      `Handshake with ${where} failed: ${
        describeError(error)
      } (is it a DST export, not NBD or another service?)`,
      { cause: error },
    );
  } finally {
    timer.cancel();
  }
}

/** The reason after a refused hello, or null when the export sent none (it closed). */
async function readRefusalReason(conn: ByteConn): Promise<string | null> {
  try {
    const lengthBytes = new Uint8Array(2);
    await readExact(conn, lengthBytes);
    const length = decodeRefusalReasonLength(lengthBytes);
    if (typeof length === "string") return null;
    const text = new Uint8Array(length);
    await readExact(conn, text);
    return new TextDecoder().decode(text);
  } catch {
    return null;
  }
}
