/**
 * Handshake frames: the client hello and the server hello (see README.md, "Handshake").
 * Pure encode and decode; a decoder returns a reason string for a bad frame.
 */

import { PAYLOAD_BYTES_MAX } from "../constants.ts";
import {
  AUTH_NONE,
  CLIENT_ID_BYTES,
  ClientHelloLayout as C,
  EXPORT_ID_BYTES,
  EXPORT_INSTANCE_BYTES,
  MAGIC_CLIENT_HELLO,
  MAGIC_SERVER_HELLO,
  NONCE_BYTES,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  REFUSAL_REASON_BYTES_MAX,
  ServerHelloLayout as S,
  WRITE_EPOCH_BYTES,
} from "./wire.ts";
import { getU64, setU64 } from "./u64.ts";

export interface ClientHello {
  versionMin: number;
  versionMax: number;
  features: number;
  authMethods: number;
  protections: number;
  nonce: Uint8Array;
  /** The client's identity, the same on every connection of one client; all zero: anonymous. */
  clientId: Uint8Array;
}

export interface ServerHello {
  version: number;
  status: number;
  features: number;
  authMethod: number;
  protection: number;
  sizeBytes: number;
  blockSize: number;
  exportFlags: number;
  payloadBytesMax: number;
  inFlightMax: number;
  exportId: Uint8Array;
  nonce: Uint8Array;
  /** Counts the grants of writing to a new writer over the export's life. */
  writeGeneration: number;
  /** The export state's epoch: another epoch is another history of generations. */
  writeEpoch: Uint8Array;
  /**
   * Random per start of the export's process: a reconnect that finds another one knows
   * the export restarted, and may have lost what its disk had not flushed.
   */
  exportInstance: Uint8Array;
}

export function encodeClientHello(hello: ClientHello): Uint8Array {
  const bytes = new Uint8Array(C.SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(C.magic, MAGIC_CLIENT_HELLO, true);
  view.setUint16(C.versionMin, hello.versionMin, true);
  view.setUint16(C.versionMax, hello.versionMax, true);
  view.setUint32(C.features, hello.features, true);
  view.setUint16(C.authMethods, hello.authMethods, true);
  view.setUint16(C.protections, hello.protections, true);
  bytes.set(hello.nonce.subarray(0, NONCE_BYTES), C.nonce);
  bytes.set(hello.clientId.subarray(0, CLIENT_ID_BYTES), C.clientId);
  return bytes;
}

export function decodeClientHello(bytes: Uint8Array): ClientHello | string {
  if (bytes.length !== C.SIZE) return `client hello is ${bytes.length} bytes, not ${C.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(C.magic, true) !== MAGIC_CLIENT_HELLO) {
    return "not a DST client (bad client hello magic)";
  }
  const hello = {
    versionMin: view.getUint16(C.versionMin, true),
    versionMax: view.getUint16(C.versionMax, true),
    features: view.getUint32(C.features, true),
    authMethods: view.getUint16(C.authMethods, true),
    protections: view.getUint16(C.protections, true),
    nonce: bytes.slice(C.nonce, C.nonce + NONCE_BYTES),
    clientId: bytes.slice(C.clientId, C.clientId + CLIENT_ID_BYTES),
  };
  if (hello.versionMin > hello.versionMax) return "client hello: versionMin > versionMax";
  return hello;
}

export function encodeServerHello(hello: ServerHello): Uint8Array {
  const bytes = new Uint8Array(S.SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint32(S.magic, MAGIC_SERVER_HELLO, true);
  view.setUint16(S.version, hello.version, true);
  view.setUint16(S.status, hello.status, true);
  view.setUint32(S.features, hello.features, true);
  view.setUint16(S.authMethod, hello.authMethod, true);
  view.setUint16(S.protection, hello.protection, true);
  setU64(view, S.size, hello.sizeBytes);
  view.setUint32(S.blockSize, hello.blockSize, true);
  view.setUint32(S.exportFlags, hello.exportFlags, true);
  view.setUint32(S.payloadBytesMax, hello.payloadBytesMax, true);
  view.setUint32(S.inFlightMax, hello.inFlightMax, true);
  bytes.set(hello.exportId.subarray(0, EXPORT_ID_BYTES), S.exportId);
  bytes.set(hello.nonce.subarray(0, NONCE_BYTES), S.nonce);
  setU64(view, S.writeGeneration, hello.writeGeneration);
  bytes.set(hello.writeEpoch.subarray(0, WRITE_EPOCH_BYTES), S.writeEpoch);
  bytes.set(hello.exportInstance.subarray(0, EXPORT_INSTANCE_BYTES), S.exportInstance);
  return bytes;
}

/** What the client offered, so what a server hello may choose. */
export interface HelloExpectation {
  version: number;
  authMethod: number;
  /** A mask: the protection chosen must be one of these bits. */
  protections: number;
}

const V1_EXPECTATION: HelloExpectation = {
  version: PROTOCOL_VERSION,
  authMethod: AUTH_NONE,
  protections: PROTECTION_NONE,
};

export function decodeServerHello(
  bytes: Uint8Array,
  expect: HelloExpectation = V1_EXPECTATION,
): ServerHello | string {
  if (bytes.length !== S.SIZE) return `server hello is ${bytes.length} bytes, not ${S.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(S.magic, true) !== MAGIC_SERVER_HELLO) {
    return "not a DST export (bad server hello magic)";
  }
  const hello: ServerHello = {
    version: view.getUint16(S.version, true),
    status: view.getUint16(S.status, true),
    features: view.getUint32(S.features, true),
    authMethod: view.getUint16(S.authMethod, true),
    protection: view.getUint16(S.protection, true),
    sizeBytes: getU64(view, S.size),
    blockSize: view.getUint32(S.blockSize, true),
    exportFlags: view.getUint32(S.exportFlags, true),
    payloadBytesMax: view.getUint32(S.payloadBytesMax, true),
    inFlightMax: view.getUint32(S.inFlightMax, true),
    exportId: bytes.slice(S.exportId, S.exportId + EXPORT_ID_BYTES),
    nonce: bytes.slice(S.nonce, S.nonce + NONCE_BYTES),
    writeGeneration: getU64(view, S.writeGeneration),
    writeEpoch: bytes.slice(S.writeEpoch, S.writeEpoch + WRITE_EPOCH_BYTES),
    exportInstance: bytes.slice(S.exportInstance, S.exportInstance + EXPORT_INSTANCE_BYTES),
  };
  if (hello.status !== 0) return hello; // the other fields mean nothing; the caller reports status
  if (hello.version !== expect.version) {
    return `server hello: chose protocol version ${hello.version}, not the ${expect.version} offered`;
  }
  if (
    hello.authMethod !== expect.authMethod ||
    (hello.protection & expect.protections) === 0 ||
    (hello.protection & (hello.protection - 1)) !== 0
  ) {
    return "server hello: chose an authentication or protection this dst did not offer";
  }
  if (hello.sizeBytes < 0) return "server hello: export size is not below 2^53";
  if (hello.writeGeneration < 0) return "server hello: write generation is not below 2^53";
  if (hello.blockSize === 0 || (hello.blockSize & (hello.blockSize - 1)) !== 0) {
    return `server hello: block size ${hello.blockSize} is not a power of two`;
  }
  if (hello.payloadBytesMax === 0 || hello.payloadBytesMax > PAYLOAD_BYTES_MAX) {
    return `server hello: largest payload ${hello.payloadBytesMax} is not in 1..${PAYLOAD_BYTES_MAX}`;
  }
  if (hello.inFlightMax === 0) return "server hello: no transaction may be in flight";
  return hello;
}

/** The reason that follows a refused server hello: u16 byte count, then UTF-8 text (cut to fit). */
export function encodeRefusalReason(text: string): Uint8Array {
  let body = new TextEncoder().encode(text);
  if (body.length > REFUSAL_REASON_BYTES_MAX) body = body.subarray(0, REFUSAL_REASON_BYTES_MAX);
  const bytes = new Uint8Array(2 + body.length);
  new DataView(bytes.buffer).setUint16(0, body.length, true);
  bytes.set(body, 2);
  return bytes;
}

/** The byte count at the front of a refusal reason, or a string when it is over the limit. */
export function decodeRefusalReasonLength(bytes: Uint8Array): number | string {
  const length = new DataView(bytes.buffer, bytes.byteOffset, 2).getUint16(0, true);
  if (length > REFUSAL_REASON_BYTES_MAX) {
    return `refusal reason of ${length} bytes > ${REFUSAL_REASON_BYTES_MAX}`;
  }
  return length;
}
