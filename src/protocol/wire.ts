/**
 * The DST wire format's numbers: magics, commands, flags, error codes and header
 * layouts. Everything is little-endian. README.md in this folder is the spec;
 * this file is its single source in code, and the layout is checked at load.
 */

import { assert } from "../lib/assert.ts";
import { Errno } from "../lib/errno.ts";

export const PROTOCOL_VERSION = 1;
/**
 * Version 2 is version 1 behind an authenticated, protected channel (README.md,
 * "Version 2: keys"): a client with a key speaks only 2, one without only 1.
 */
export const PROTOCOL_VERSION_KEYED = 2;

/** Magics are four ASCII letters, read as a little-endian u32 ("DSTC" etc.). */
const magic = (text: string) =>
  text.charCodeAt(0) | text.charCodeAt(1) << 8 | text.charCodeAt(2) << 16 |
  (text.charCodeAt(3) << 24 >>> 0);
export const MAGIC_CLIENT_HELLO = magic("DSTC") >>> 0;
export const MAGIC_SERVER_HELLO = magic("DSTS") >>> 0;
export const MAGIC_REQUEST = magic("DSTQ") >>> 0;
export const MAGIC_REPLY = magic("DSTR") >>> 0;
export const MAGIC_CLIENT_KEY_SHARE = magic("DSTK") >>> 0;
export const MAGIC_SERVER_KEY_SHARE = magic("DSTA") >>> 0;
export const MAGIC_CLIENT_PROOF = magic("DSTF") >>> 0;

export const Command = {
  READ: 1,
  WRITE: 2,
  FLUSH: 3,
  DISCARD: 4,
  WRITE_ZEROES: 5,
  INFO: 6,
  PING: 7,
  STATUS: 8,
  /** Asks the export's owner to act (an array: detach or attach a leg); JSON both ways. */
  CONTROL: 9,
} as const;
export type Command = typeof Command[keyof typeof Command];

export const COMMAND_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Command).map(([name, code]) => [code, name]),
);

export const RequestFlag = {
  /** Force unit access: the data is on stable storage before the reply. */
  FUA: 1,
  /** Barrier: every write completed before this request is on stable storage first. */
  PREFLUSH: 2,
} as const;

/** The flags each command accepts; any other bit is EINVAL. */
export const FLAGS_ALLOWED: Record<number, number> = {
  [Command.READ]: 0,
  [Command.WRITE]: RequestFlag.FUA | RequestFlag.PREFLUSH,
  [Command.FLUSH]: 0,
  [Command.DISCARD]: RequestFlag.FUA | RequestFlag.PREFLUSH,
  [Command.WRITE_ZEROES]: RequestFlag.FUA | RequestFlag.PREFLUSH,
  [Command.INFO]: 0,
  [Command.PING]: 0,
  [Command.STATUS]: 0,
  [Command.CONTROL]: 0,
};

/** Error codes carry Linux errno values, so NBD (which uses the same) maps one to one. */
export const WireError = { OK: 0, ...Errno } as const;
export type WireError = typeof WireError[keyof typeof WireError];

export const WIRE_ERROR_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(WireError).map(([name, code]) => [code, name]),
);

/** Handshake status in the server hello; anything but OK is followed by a close. */
export const HelloStatus = {
  OK: 0,
  VERSION_UNSUPPORTED: 1,
  AUTH_UNSUPPORTED: 2,
  PROTECTION_UNSUPPORTED: 3,
  ACCESS_DENIED: 4,
  BUSY: 5,
  /** Another client holds the export's writer lease (a reason names it). */
  WRITE_LEASE_HELD: 6,
  /**
   * The hello came after the export had taken the connection for an NBD client's and
   * greeted it as such (README, "Negotiation"); sent after that greeting. Connect again.
   */
  HELLO_TOO_LATE: 7,
} as const;

export const HELLO_STATUS_TEXT: Record<number, string> = {
  [HelloStatus.OK]: "ok",
  [HelloStatus.VERSION_UNSUPPORTED]: "no protocol version in common",
  [HelloStatus.AUTH_UNSUPPORTED]: "no authentication method in common",
  [HelloStatus.PROTECTION_UNSUPPORTED]: "no channel protection in common",
  [HelloStatus.ACCESS_DENIED]: "access denied",
  [HelloStatus.BUSY]: "the export has too many clients",
  [HelloStatus.WRITE_LEASE_HELD]: "another client holds the write lease",
  [HelloStatus.HELLO_TOO_LATE]: "the hello came after the export had taken the connection " +
    "for an NBD client's",
};

/** Bit masks of authentication methods and frame protections; only NONE exists in v1. */
export const AUTH_NONE = 1;
export const PROTECTION_NONE = 1;
/** v2: both sides prove a pre-shared key, bound to ephemeral X25519 keys and both nonces. */
export const AUTH_PSK = 2;
/** v2: every record carries an HMAC-SHA-256 tag; the bytes travel in the clear. */
export const PROTECTION_MAC = 2;
/** v2: every record is sealed with AES-256-GCM. */
export const PROTECTION_ENCRYPT = 4;

/** Client hello feature bits. */
export const ClientFeature = {
  /**
   * The client means to write: the export starts a new write generation for this
   * connection before the handshake ends and reports it in the server hello.
   */
  WRITER: 1,
} as const;

/** Server hello feature bits. */
export const ServerFeature = {
  /**
   * The export runs with --shared-writers: it grants writes to every client that asks,
   * so a jump in the write generation is other writers, not a sign of being fenced.
   */
  SHARED_WRITERS: 1,
} as const;

/** Export flags in the server hello and INFO reply. */
export const ExportFlag = {
  READ_ONLY: 1,
} as const;

export const EXPORT_ID_BYTES = 16;
export const NONCE_BYTES = 16;
/** A client's identity: random, kept across its reconnects (README.md, "Fencing"). */
export const CLIENT_ID_BYTES = 16;
/** An export state's epoch: random, made with the state, so a lost state never repeats one. */
export const WRITE_EPOCH_BYTES = 16;
export const EXPORT_INSTANCE_BYTES = 16;

/** Client hello: 48 bytes. */
export const ClientHelloLayout = {
  magic: 0, // u32
  versionMin: 4, // u16
  versionMax: 6, // u16
  features: 8, // u32
  authMethods: 12, // u16 mask
  protections: 14, // u16 mask
  nonce: 16, // 16 bytes
  clientId: 32, // 16 bytes
  SIZE: 48,
} as const;

/**
 * A refused server hello is followed by a reason: a u16 byte count, then that many
 * bytes of UTF-8 text for the user ("the write lease is held by ...").
 */
export const REFUSAL_REASON_BYTES_MAX = 512;

/** Server hello: 112 bytes. */
export const ServerHelloLayout = {
  magic: 0, // u32
  version: 4, // u16
  status: 6, // u16
  features: 8, // u32
  authMethod: 12, // u16
  protection: 14, // u16
  size: 16, // u64
  blockSize: 24, // u32
  exportFlags: 28, // u32
  payloadBytesMax: 32, // u32
  inFlightMax: 36, // u32
  exportId: 40, // 16 bytes
  nonce: 56, // 16 bytes
  writeGeneration: 72, // u64
  writeEpoch: 80, // 16 bytes
  exportInstance: 96, // 16 bytes
  SIZE: 112,
} as const;

/** X25519 public keys, HMAC-SHA-256 proofs and keys are 32 bytes. */
export const PUBLIC_KEY_BYTES = 32;
export const PROOF_BYTES = 32;
/** A key name on the wire: 1 to 64 bytes, zero-padded (the key file's own limit). */
export const KEY_NAME_BYTES_MAX = 64;

/** v2 client key share: 104 bytes, right after a client hello that offers AUTH_PSK. */
export const ClientKeyShareLayout = {
  magic: 0, // u32 "DSTK"
  publicKey: 4, // 32 bytes, X25519
  keyNameLength: 36, // u16, 1..64
  reserved: 38, // u16, zero
  keyName: 40, // 64 bytes, UTF-8, zero-padded
  SIZE: 104,
} as const;

/** v2 server key share: 88 bytes, the export's answer to a client key share. */
export const ServerKeyShareLayout = {
  magic: 0, // u32 "DSTA"
  version: 4, // u16, 2
  protection: 6, // u16, one bit: PROTECTION_MAC or PROTECTION_ENCRYPT
  nonce: 8, // 16 bytes
  publicKey: 24, // 32 bytes, X25519
  proof: 56, // 32 bytes, HMAC over the transcript with the server's proof key
  SIZE: 88,
} as const;

/** v2 client proof: 36 bytes, the client's answer to a server key share it verified. */
export const ClientProofLayout = {
  magic: 0, // u32 "DSTF"
  proof: 4, // 32 bytes
  SIZE: 36,
} as const;

/**
 * v2 record: a u32 count of the sealed bytes that follow (plaintext + tag). A record
 * holds 1 to RECORD_PLAINTEXT_BYTES_MAX bytes of the v1 byte stream.
 */
export const RECORD_HEADER_BYTES = 4;
export const RECORD_PLAINTEXT_BYTES_MAX = 1024 * 1024;
export const GCM_TAG_BYTES = 16;
export const MAC_TAG_BYTES = 32;

/** Request header: 32 bytes, followed by `payloadLength` bytes. */
export const RequestLayout = {
  magic: 0, // u32
  command: 4, // u16
  flags: 6, // u16
  txId: 8, // u64
  offset: 16, // u64
  length: 24, // u32
  payloadLength: 28, // u32
  SIZE: 32,
} as const;

/** Reply header: 24 bytes, followed by `payloadLength` bytes. */
export const ReplyLayout = {
  magic: 0, // u32
  command: 4, // u16
  reserved: 6, // u16, zero
  txId: 8, // u64
  error: 16, // u32
  payloadLength: 20, // u32
  SIZE: 24,
} as const;

/** INFO reply payload: 16 bytes. */
export const InfoLayout = {
  size: 0, // u64
  blockSize: 8, // u32
  exportFlags: 12, // u32
  SIZE: 16,
} as const;

assert(ClientHelloLayout.nonce + NONCE_BYTES === ClientHelloLayout.clientId, "hello layout");
assert(
  ClientHelloLayout.clientId + CLIENT_ID_BYTES === ClientHelloLayout.SIZE,
  "client hello is 48 bytes",
);
assert(ServerHelloLayout.exportId + EXPORT_ID_BYTES === ServerHelloLayout.nonce, "hello layout");
assert(ServerHelloLayout.writeGeneration + 8 === ServerHelloLayout.writeEpoch, "hello layout");
assert(
  ServerHelloLayout.writeEpoch + WRITE_EPOCH_BYTES === ServerHelloLayout.exportInstance,
  "server hello is 96 bytes",
);
assert(
  ServerHelloLayout.exportInstance + EXPORT_INSTANCE_BYTES === ServerHelloLayout.SIZE,
  "hello layout",
);
assert(
  ClientKeyShareLayout.keyName + KEY_NAME_BYTES_MAX === ClientKeyShareLayout.SIZE,
  "client key share is 104 bytes",
);
assert(
  ServerKeyShareLayout.proof + PROOF_BYTES === ServerKeyShareLayout.SIZE,
  "server key share is 88 bytes",
);
assert(ClientProofLayout.proof + PROOF_BYTES === ClientProofLayout.SIZE, "client proof: 36 bytes");
assert(RequestLayout.payloadLength + 4 === RequestLayout.SIZE, "request header is 32 bytes");
assert(ReplyLayout.payloadLength + 4 === ReplyLayout.SIZE, "reply header is 24 bytes");
assert(InfoLayout.exportFlags + 4 === InfoLayout.SIZE, "info payload is 16 bytes");
assert(MAGIC_REQUEST !== MAGIC_REPLY, "request and reply magics differ");
