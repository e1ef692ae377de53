/**
 * NBD's wire numbers, from doc/proto.md of the NetworkBlockDevice/nbd project. NBD is
 * big-endian throughout (DST's own protocol is little-endian; the two never mix).
 * Only what this server speaks is here: fixed newstyle negotiation, simple and
 * structured replies.
 */

import { assert } from "../lib/assert.ts";
import { Errno } from "../lib/errno.ts";

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const OPTION_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Option).map(([name, code]) => [code, name]),
);

const ERR = 2 ** 31;
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_TOO_BIG: ERR + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags, sent with the export's size. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CMD_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Cmd).map(([name, code]) => [code, name]),
);

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Errors NBD carries are Linux errno values. */
export const NbdError = { OK: 0, ...Errno } as const;

export const ReplyType = { NONE: 0, OFFSET_DATA: 1, ERROR: 2 ** 15 + 1 } as const;
export const REPLY_FLAG_DONE = 1;

/** Request: magic u32, flags u16, type u16, cookie u64, offset u64, length u32. */
export const RequestLayout = {
  magic: 0,
  flags: 4,
  type: 6,
  cookie: 8,
  offset: 16,
  length: 24,
  SIZE: 28,
} as const;
/** Simple reply: magic u32, error u32, cookie u64. */
export const SimpleReplyLayout = { magic: 0, error: 4, cookie: 8, SIZE: 16 } as const;
/** Structured reply chunk: magic u32, flags u16, type u16, cookie u64, length u32. */
export const StructuredReplyLayout = {
  magic: 0,
  flags: 4,
  type: 6,
  cookie: 8,
  length: 16,
  SIZE: 20,
} as const;

/** An OFFSET_DATA chunk's payload: offset u64, then the data. */
export const OffsetDataLayout = { offset: 0, data: 8 } as const;

/** The greeting's layout: NBDMAGIC u64, IHAVEOPT u64, handshake flags u16. */
export const GreetingLayout = { nbdMagic: 0, ihaveopt: 8, flags: 16, SIZE: 18 } as const;
/** An option reply's header: magic u64, option u32, reply type u32, length u32; then the data. */
export const OptionReplyLayout = { magic: 0, option: 8, type: 12, length: 16, SIZE: 20 } as const;

/** The fixed newstyle greeting a server opens with: it offers NO_ZEROES too. */
export function encodeGreeting(): Uint8Array {
  const bytes = new Uint8Array(GreetingLayout.SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(GreetingLayout.nbdMagic, NBDMAGIC);
  view.setBigUint64(GreetingLayout.ihaveopt, IHAVEOPT);
  view.setUint16(GreetingLayout.flags, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES);
  return bytes;
}

/** One reply to `option` of `type` (OptionReply), carrying `payload`. */
export function encodeOptionReply(option: number, type: number, payload: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(OptionReplyLayout.SIZE + payload.length);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(OptionReplyLayout.magic, OPTION_REPLY_MAGIC);
  view.setUint32(OptionReplyLayout.option, option);
  view.setUint32(OptionReplyLayout.type, type);
  view.setUint32(OptionReplyLayout.length, payload.length);
  bytes.set(payload, OptionReplyLayout.SIZE);
  return bytes;
}

/** The block sizes this server advertises: any alignment works, 4 KiB is best, 32 MiB at most. */
export const BLOCK_SIZE_MIN = 1;
export const BLOCK_SIZE_PREFERRED = 4096;
export const BLOCK_SIZE_MAX = 32 * 1024 * 1024;

assert(GreetingLayout.flags + 2 === GreetingLayout.SIZE, "the greeting is 18 bytes");
assert(
  OptionReplyLayout.length + 4 === OptionReplyLayout.SIZE,
  "an option reply header is 20 bytes",
);
assert(RequestLayout.length + 4 === RequestLayout.SIZE, "an NBD request header is 28 bytes");
assert(SimpleReplyLayout.cookie + 8 === SimpleReplyLayout.SIZE, "a simple reply is 16 bytes");
assert(
  StructuredReplyLayout.length + 4 === StructuredReplyLayout.SIZE,
  "a chunk header is 20 bytes",
);
