/**
 * Opening a connection to an export: TCP connect and the client's side of the
 * handshake. Errors say which address failed and what to check.
 */

import { HANDSHAKE_TIMEOUT_MS } from "../constants.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { describeError, DstError } from "../lib/errors.ts";
import {
  AUTH_NONE,
  ClientFeature,
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

/**
 * Connects and runs the handshake; the returned hello has status OK. A `writer`
 * declares it will write, so the export starts a write generation for it at once.
 */
export async function dialExport(
  address: HostPort,
  dial: Dialer = tcpDialer,
  writer = false,
): Promise<Link> {
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
  const timer = setTimeout(() => closeQuietly(conn), HANDSHAKE_TIMEOUT_MS);
  try {
    await writeAll(
      conn,
      encodeClientHello({
        versionMin: PROTOCOL_VERSION,
        versionMax: PROTOCOL_VERSION,
        features: writer ? ClientFeature.WRITER : 0,
        authMethods: AUTH_NONE,
        protections: PROTECTION_NONE,
        nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
      }),
    );
    const bytes = new Uint8Array(ServerHelloLayout.SIZE);
    await readExact(conn, bytes);
    const hello = decodeServerHello(bytes);
    if (typeof hello === "string") throw new DstError("HANDSHAKE", `${where}: ${hello}`);
    if (hello.status !== HelloStatus.OK) {
      const why = HELLO_STATUS_TEXT[hello.status] ?? `status ${hello.status}`;
      throw new DstError("HANDSHAKE", `${where} refused the connection: ${why}`);
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
    clearTimeout(timer);
  }
}
