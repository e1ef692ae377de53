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
  ClientFeature,
  ClientHelloLayout,
  decodeClientHello,
  encodeServerHello,
  EXPORT_ID_BYTES,
  ExportFlag,
  HELLO_STATUS_TEXT,
  HelloStatus,
  MAGIC_CLIENT_HELLO,
  NONCE_BYTES,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  type ServerHello,
} from "../protocol/mod.ts";
import { type ByteConn, readExact, writeAll } from "../transport/byte_conn.ts";
import { hexToBytes } from "../lib/hex.ts";

/**
 * Runs the handshake; returns null on success, or why the client was turned away.
 * `generation(writer)` gives the write generation to report, once the client is
 * admitted: `writer` says the client set the WRITER feature bit.
 */
export async function acceptHandshake(
  conn: ByteConn,
  info: DeviceInfo,
  admit: () => number,
  generation: (writer: boolean) => Promise<number>,
): Promise<string | null> {
  const helloBytes = new Uint8Array(ClientHelloLayout.SIZE);
  const timer = setTimeout(() => conn.close(), HANDSHAKE_TIMEOUT_MS);
  try {
    // The magic first: a client speaking something else is told so at once, not after a timeout.
    await readExact(conn, helloBytes.subarray(0, 4));
    const magic = new DataView(helloBytes.buffer).getUint32(ClientHelloLayout.magic, true);
    if (magic !== MAGIC_CLIENT_HELLO) {
      return "not a DST client (bad client hello magic)";
    }
    await readExact(conn, helloBytes.subarray(4));
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
  const ok = status === HelloStatus.OK;
  const writeGeneration = ok ? await generation((hello.features & ClientFeature.WRITER) !== 0) : 0;
  // A refused client learns why, and nothing about the export.
  const reply: ServerHello = {
    version: PROTOCOL_VERSION,
    status,
    features: 0,
    authMethod: AUTH_NONE,
    protection: PROTECTION_NONE,
    sizeBytes: ok ? info.sizeBytes : 0,
    blockSize: ok ? info.blockSize : 0,
    exportFlags: ok && info.readOnly ? ExportFlag.READ_ONLY : 0,
    payloadBytesMax: ok ? PAYLOAD_BYTES_MAX : 0,
    inFlightMax: ok ? IN_FLIGHT_PER_CONNECTION_MAX : 0,
    exportId: ok ? hexToBytes(info.id) : new Uint8Array(EXPORT_ID_BYTES),
    nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
    writeGeneration,
  };
  await writeAll(conn, encodeServerHello(reply));
  return ok ? null : HELLO_STATUS_TEXT[status]!;
}
