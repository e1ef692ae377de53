/**
 * The export's side of the handshake (protocol README, "Handshake"): read the client
 * hello, pick the version, authentication and protection, answer with the export's
 * geometry, or refuse with a reason. Only version 1 with no authentication and no
 * protection exists yet; the fields are there so a later version adds them without a
 * new frame.
 */

import {
  HANDSHAKE_TIMEOUT_MS,
  IN_FLIGHT_PER_CONNECTION_MAX,
  PAYLOAD_BYTES_MAX,
} from "../constants.ts";
import type { DeviceInfo } from "../device/block_device.ts";
import {
  AUTH_NONE,
  type ClientHello,
  ClientHelloLayout,
  decodeClientHello,
  encodeRefusalReason,
  encodeServerHello,
  EXPORT_ID_BYTES,
  EXPORT_INSTANCE_BYTES,
  ExportFlag,
  HELLO_STATUS_TEXT,
  HelloStatus,
  MAGIC_CLIENT_HELLO,
  NONCE_BYTES,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  type ServerHello,
  WRITE_EPOCH_BYTES,
} from "../protocol/mod.ts";
import { type ByteConn, readExact, writeAll } from "../transport/byte_conn.ts";
import { hexToBytes } from "../lib/hex.ts";
import { type Clock, systemClock } from "../lib/clock.ts";

/** What the export decided about a client whose hello it could accept. */
export type Admission =
  | {
    ok: true;
    features: number;
    writeGeneration: number;
    writeEpoch: string;
    exportInstance: string;
  }
  | { ok: false; status: number; reason: string };

/**
 * Runs the handshake; returns null on success, or why the client was turned away.
 * `admit(hello)` decides about a client that speaks this version (busy, lease, fencing
 * happen there) and runs before the server hello is sent: whatever it waits for is
 * done before the client can send its first request.
 */
export async function acceptHandshake(
  conn: ByteConn,
  info: DeviceInfo,
  admit: (hello: ClientHello) => Promise<Admission>,
  clock: Clock = systemClock,
): Promise<string | null> {
  const helloBytes = new Uint8Array(ClientHelloLayout.SIZE);
  const timer = clock.after(HANDSHAKE_TIMEOUT_MS, () => conn.close());
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
    timer.cancel();
  }
  const hello = decodeClientHello(helloBytes);
  if (typeof hello === "string") return hello;

  let admission: Admission;
  if (hello.versionMin > PROTOCOL_VERSION || hello.versionMax < PROTOCOL_VERSION) {
    admission = refuse(HelloStatus.VERSION_UNSUPPORTED);
  } else if ((hello.authMethods & AUTH_NONE) === 0) {
    admission = refuse(HelloStatus.AUTH_UNSUPPORTED);
  } else if ((hello.protections & PROTECTION_NONE) === 0) {
    admission = refuse(HelloStatus.PROTECTION_UNSUPPORTED);
  } else {
    admission = await admit(hello);
  }
  const ok = admission.ok;
  // A refused client learns why, and nothing about the export.
  const reply: ServerHello = {
    version: PROTOCOL_VERSION,
    status: admission.ok ? HelloStatus.OK : admission.status,
    features: admission.ok ? admission.features : 0,
    authMethod: AUTH_NONE,
    protection: PROTECTION_NONE,
    sizeBytes: ok ? info.sizeBytes : 0,
    blockSize: ok ? info.blockSize : 0,
    exportFlags: ok && info.readOnly ? ExportFlag.READ_ONLY : 0,
    payloadBytesMax: ok ? PAYLOAD_BYTES_MAX : 0,
    inFlightMax: ok ? IN_FLIGHT_PER_CONNECTION_MAX : 0,
    exportId: ok ? hexToBytes(info.id) : new Uint8Array(EXPORT_ID_BYTES),
    nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
    writeGeneration: admission.ok ? admission.writeGeneration : 0,
    writeEpoch: admission.ok ? hexToBytes(admission.writeEpoch) : new Uint8Array(WRITE_EPOCH_BYTES),
    exportInstance: admission.ok
      ? hexToBytes(admission.exportInstance)
      : new Uint8Array(EXPORT_INSTANCE_BYTES),
  };
  const helloOut = encodeServerHello(reply);
  if (admission.ok) {
    await writeAll(conn, helloOut);
    return null;
  }
  const reason = admission.reason;
  const reasonOut = encodeRefusalReason(reason);
  const both = new Uint8Array(helloOut.length + reasonOut.length);
  both.set(helloOut);
  both.set(reasonOut, helloOut.length);
  await writeAll(conn, both);
  return reason;
}

/** A refusal whose reason is the status's own text. */
export function refuse(status: number): Admission {
  return { ok: false, status, reason: HELLO_STATUS_TEXT[status] ?? `status ${status}` };
}
