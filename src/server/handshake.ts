/**
 * The export's side of the handshake (protocol README, "Handshake"): read the client
 * hello, pick the version, authentication and protection, answer with the export's
 * geometry. Only version 1 with no authentication and no protection exists yet;
 * the fields are there so a later version adds them without a new frame.
 */

import {
  HANDSHAKE_TIMEOUT_MS,
  IN_FLIGHT_PER_CONNECTION_MAX,
  PAYLOAD_BYTES_MAX,
} from "../constants.ts";
import type { DeviceInfo } from "../device/block_device.ts";
import {
  AUTH_NONE,
  ClientHelloLayout,
  decodeClientHello,
  encodeServerHello,
  ExportFlag,
  HELLO_STATUS_TEXT,
  HelloStatus,
  NONCE_BYTES,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  type ServerHello,
} from "../protocol/mod.ts";
import { type ByteConn, readExact, writeAll } from "../transport/byte_conn.ts";
import { hexToBytes } from "../lib/hex.ts";

/** Runs the handshake; returns null on success, or why the client was turned away. */
export async function acceptHandshake(
  conn: ByteConn,
  info: DeviceInfo,
  admit: () => number,
): Promise<string | null> {
  const helloBytes = new Uint8Array(ClientHelloLayout.SIZE);
  const timer = setTimeout(() => conn.close(), HANDSHAKE_TIMEOUT_MS);
  try {
    await readExact(conn, helloBytes);
  } catch {
    return `no client hello within ${HANDSHAKE_TIMEOUT_MS} ms`;
  } finally {
    clearTimeout(timer);
  }
  const hello = decodeClientHello(helloBytes);
  if (typeof hello === "string") return hello;

  let status: number = admit();
  if (hello.versionMin > PROTOCOL_VERSION || hello.versionMax < PROTOCOL_VERSION) {
    status = HelloStatus.VERSION_UNSUPPORTED;
  } else if ((hello.authMethods & AUTH_NONE) === 0) {
    status = HelloStatus.AUTH_UNSUPPORTED;
  } else if ((hello.protections & PROTECTION_NONE) === 0) {
    status = HelloStatus.PROTECTION_UNSUPPORTED;
  }
  const reply: ServerHello = {
    version: PROTOCOL_VERSION,
    status,
    features: 0,
    authMethod: AUTH_NONE,
    protection: PROTECTION_NONE,
    sizeBytes: info.sizeBytes,
    blockSize: info.blockSize,
    exportFlags: info.readOnly ? ExportFlag.READ_ONLY : 0,
    payloadBytesMax: PAYLOAD_BYTES_MAX,
    inFlightMax: IN_FLIGHT_PER_CONNECTION_MAX,
    exportId: hexToBytes(info.id),
    nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
  };
  await writeAll(conn, encodeServerHello(reply));
  return status === HelloStatus.OK ? null : HELLO_STATUS_TEXT[status]!;
}
