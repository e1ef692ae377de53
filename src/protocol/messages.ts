/**
 * Transmission frames: request and reply headers and the INFO payload
 * (README.md, "Transmission"). Pure encode and decode on a DataView at an offset,
 * so frames are parsed in place in a receive buffer with no copy.
 *
 * Checks come in two levels, as the caller needs to act differently:
 * - decode*Header returns a string when the frame itself cannot be trusted (bad
 *   magic, absurd payload length): the stream has lost framing and must close.
 * - validateRequest returns an error code when the frame is well formed but the
 *   request is not (unknown command, bad flags): answer it, drain, go on.
 */

import {
  CONTROL_PAYLOAD_BYTES_MAX,
  PAYLOAD_BYTES_MAX,
  RANGE_BYTES_MAX,
  STATUS_PAYLOAD_BYTES_MAX,
} from "../constants.ts";
import {
  Command,
  COMMAND_NAMES,
  FLAGS_ALLOWED,
  InfoLayout as I,
  MAGIC_REPLY,
  MAGIC_REQUEST,
  ReplyLayout as P,
  RequestLayout as R,
  WireError,
} from "./wire.ts";
import { getU64, setU64 } from "./u64.ts";

export interface RequestHeader {
  command: number;
  flags: number;
  txId: number;
  offset: number;
  length: number;
  payloadLength: number;
}

export interface ReplyHeader {
  command: number;
  txId: number;
  error: number;
  payloadLength: number;
}

export interface RequestRejection {
  error: WireError;
  reason: string;
}

export interface ExportInfo {
  sizeBytes: number;
  blockSize: number;
  exportFlags: number;
}

export function encodeRequestHeader(view: DataView, at: number, header: RequestHeader): void {
  view.setUint32(at + R.magic, MAGIC_REQUEST, true);
  view.setUint16(at + R.command, header.command, true);
  view.setUint16(at + R.flags, header.flags, true);
  setU64(view, at + R.txId, header.txId);
  setU64(view, at + R.offset, header.offset);
  view.setUint32(at + R.length, header.length, true);
  view.setUint32(at + R.payloadLength, header.payloadLength, true);
}

/** Decodes a request header; a string means framing is lost and the connection must close. */
export function decodeRequestHeader(view: DataView, at: number): RequestHeader | string {
  const magic = view.getUint32(at + R.magic, true);
  if (magic !== MAGIC_REQUEST) {
    return `bad request magic 0x${magic.toString(16).padStart(8, "0")}`;
  }
  const payloadLength = view.getUint32(at + R.payloadLength, true);
  if (payloadLength > PAYLOAD_BYTES_MAX) {
    return `payload length ${payloadLength} > ${PAYLOAD_BYTES_MAX}`;
  }
  const txId = getU64(view, at + R.txId);
  if (txId < 0) return "transaction id is not below 2^53";
  return {
    command: view.getUint16(at + R.command, true),
    flags: view.getUint16(at + R.flags, true),
    txId,
    offset: getU64(view, at + R.offset),
    length: view.getUint32(at + R.length, true),
    payloadLength,
  };
}

/**
 * Checks everything about a request that does not depend on the export (its size
 * and read-only bit are checked by the server). Returns null when it is valid.
 */
/** The payload a request may carry: WRITE its `length`, CONTROL a JSON command, the rest none. */
function requestPayloadRange(h: RequestHeader): [number, number] {
  if (h.command === Command.WRITE) return [h.length, h.length];
  if (h.command === Command.CONTROL) return [1, CONTROL_PAYLOAD_BYTES_MAX];
  return [0, 0];
}

export function validateRequest(h: RequestHeader): RequestRejection | null {
  const name = COMMAND_NAMES[h.command];
  if (name === undefined) {
    return { error: WireError.ENOTSUP, reason: `unknown command ${h.command}` };
  }
  const badFlags = h.flags & ~FLAGS_ALLOWED[h.command]!;
  if (badFlags !== 0) {
    return {
      error: WireError.EINVAL,
      reason: `${name}: flags 0x${badFlags.toString(16)} not allowed`,
    };
  }
  const [payloadMin, payloadMax] = requestPayloadRange(h);
  if (h.payloadLength < payloadMin || h.payloadLength > payloadMax) {
    const expected = payloadMin === payloadMax ? `${payloadMin}` : `${payloadMin}..${payloadMax}`;
    return {
      error: WireError.EINVAL,
      reason: `${name}: payload length ${h.payloadLength}, expected ${expected}`,
    };
  }
  switch (h.command) {
    case Command.READ:
    case Command.WRITE:
    case Command.DISCARD:
    case Command.WRITE_ZEROES: {
      if (h.offset < 0) return { error: WireError.EINVAL, reason: `${name}: offset >= 2^53` };
      if (h.length === 0) return { error: WireError.EINVAL, reason: `${name}: length is 0` };
      const lengthMax = h.command === Command.READ || h.command === Command.WRITE
        ? PAYLOAD_BYTES_MAX
        : RANGE_BYTES_MAX;
      if (h.length > lengthMax) {
        return { error: WireError.EINVAL, reason: `${name}: length ${h.length} > ${lengthMax}` };
      }
      return null;
    }
    default:
      if (h.offset !== 0 || h.length !== 0) {
        return { error: WireError.EINVAL, reason: `${name}: offset and length must be 0` };
      }
      return null;
  }
}

export function encodeReplyHeader(view: DataView, at: number, header: ReplyHeader): void {
  view.setUint32(at + P.magic, MAGIC_REPLY, true);
  view.setUint16(at + P.command, header.command, true);
  view.setUint16(at + P.reserved, 0, true);
  setU64(view, at + P.txId, header.txId);
  view.setUint32(at + P.error, header.error, true);
  view.setUint32(at + P.payloadLength, header.payloadLength, true);
}

/** Decodes a reply header; a string means framing is lost and the connection must close. */
export function decodeReplyHeader(view: DataView, at: number): ReplyHeader | string {
  const magic = view.getUint32(at + P.magic, true);
  if (magic !== MAGIC_REPLY) return `bad reply magic 0x${magic.toString(16).padStart(8, "0")}`;
  const payloadLength = view.getUint32(at + P.payloadLength, true);
  if (payloadLength > PAYLOAD_BYTES_MAX) {
    return `reply payload length ${payloadLength} > ${PAYLOAD_BYTES_MAX}`;
  }
  const txId = getU64(view, at + P.txId);
  if (txId < 0) return "reply transaction id is not below 2^53";
  const error = view.getUint32(at + P.error, true);
  if (error !== 0 && payloadLength !== 0) return "an error reply carries a payload";
  return { command: view.getUint16(at + P.command, true), txId, error, payloadLength };
}

/** The payload a successful reply to `command` must carry, or -1 for "any up to the limit". */
export function expectedReplyPayload(command: number, requestLength: number): number {
  switch (command) {
    case Command.READ:
      return requestLength;
    case Command.INFO:
      return I.SIZE;
    case Command.STATUS:
    case Command.CONTROL:
      return -1;
    default:
      return 0;
  }
}

export function replyPayloadLimit(command: number, requestLength: number): number {
  const expected = expectedReplyPayload(command, requestLength);
  return expected >= 0 ? expected : STATUS_PAYLOAD_BYTES_MAX;
}

export function encodeInfo(info: ExportInfo): Uint8Array {
  const bytes = new Uint8Array(I.SIZE);
  const view = new DataView(bytes.buffer);
  setU64(view, I.size, info.sizeBytes);
  view.setUint32(I.blockSize, info.blockSize, true);
  view.setUint32(I.exportFlags, info.exportFlags, true);
  return bytes;
}

export function decodeInfo(bytes: Uint8Array): ExportInfo | string {
  if (bytes.length !== I.SIZE) return `INFO payload is ${bytes.length} bytes, not ${I.SIZE}`;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const sizeBytes = getU64(view, I.size);
  if (sizeBytes < 0) return "INFO: size is not below 2^53";
  return {
    sizeBytes,
    blockSize: view.getUint32(I.blockSize, true),
    exportFlags: view.getUint32(I.exportFlags, true),
  };
}
