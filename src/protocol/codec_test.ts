/**
 * Unit tests of the wire codec: layouts, round trips, and every check of the two
 * levels (framing errors as strings, invalid requests as error codes).
 */

import { pattern } from "../../tests/helpers/bytes.ts";
import assert from "node:assert/strict";
import { PAYLOAD_BYTES_MAX, RANGE_BYTES_MAX, STATUS_PAYLOAD_BYTES_MAX } from "../constants.ts";
import {
  type ClientHello,
  decodeClientHello,
  decodeRefusalReasonLength,
  decodeServerHello,
  encodeClientHello,
  encodeRefusalReason,
  encodeServerHello,
  type ServerHello,
} from "./handshake.ts";
import {
  decodeInfo,
  decodeReplyHeader,
  decodeRequestHeader,
  encodeInfo,
  encodeReplyHeader,
  encodeRequestHeader,
  expectedReplyPayload,
  type ReplyHeader,
  replyPayloadLimit,
  type RequestHeader,
  validateRequest,
} from "./messages.ts";
import { getU64, setU64 } from "./u64.ts";
import {
  AUTH_NONE,
  ClientFeature,
  ClientHelloLayout,
  Command,
  ExportFlag,
  HelloStatus,
  InfoLayout,
  MAGIC_CLIENT_HELLO,
  MAGIC_REPLY,
  MAGIC_REQUEST,
  MAGIC_SERVER_HELLO,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  REFUSAL_REASON_BYTES_MAX,
  ReplyLayout,
  RequestFlag,
  RequestLayout,
  ServerFeature,
  ServerHelloLayout,
  WireError,
} from "./wire.ts";

const SAFE_MAX = Number.MAX_SAFE_INTEGER; // 2^53 - 1
const ABOVE_2_32 = 2 ** 32 + 12345;

function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Writes 2^53 (the first unsafe value) as a raw u64. */
function setUnsafeU64(view: DataView, at: number): void {
  view.setUint32(at, 0, true);
  view.setUint32(at + 4, 2 ** 21, true);
}

// --- wire.ts and u64.ts --------------------------------------------------------------

Deno.test("magics spell DSTC, DSTS, DSTQ, DSTR when their little-endian bytes are read as ASCII", () => {
  const spell = (magic: number) => {
    const view = new DataView(new ArrayBuffer(4));
    view.setUint32(0, magic, true);
    return new TextDecoder("ascii").decode(new Uint8Array(view.buffer));
  };
  assert.equal(spell(MAGIC_CLIENT_HELLO), "DSTC");
  assert.equal(spell(MAGIC_SERVER_HELLO), "DSTS");
  assert.equal(spell(MAGIC_REQUEST), "DSTQ");
  assert.equal(spell(MAGIC_REPLY), "DSTR");
  for (const magic of [MAGIC_CLIENT_HELLO, MAGIC_SERVER_HELLO, MAGIC_REQUEST, MAGIC_REPLY]) {
    assert.ok(magic > 0 && magic < 2 ** 32, "a magic is an unsigned u32");
  }
});

Deno.test("setU64() and getU64() round-trip values across the 32-bit boundary up to 2^53-1", () => {
  const view = new DataView(new ArrayBuffer(11));
  for (const value of [0, 1, 2 ** 32 - 1, 2 ** 32, ABOVE_2_32, SAFE_MAX - 1, SAFE_MAX]) {
    setU64(view, 3, value);
    assert.equal(getU64(view, 3), value);
  }
  setU64(view, 3, SAFE_MAX);
  assert.equal(view.getUint32(3, true), 2 ** 32 - 1, "low word first (little-endian)");
  assert.equal(view.getUint32(7, true), 2 ** 21 - 1);
});

Deno.test("getU64() returns -1 for values of 2^53 and above", () => {
  const view = new DataView(new ArrayBuffer(8));
  setUnsafeU64(view, 0);
  assert.equal(getU64(view, 0), -1);
  view.setUint32(0, 0xffffffff, true);
  view.setUint32(4, 0xffffffff, true);
  assert.equal(getU64(view, 0), -1);
});

// --- client hello ------------------------------------------------------------------------

const clientHello: ClientHello = {
  versionMin: 1,
  versionMax: 3,
  features: 0xdeadbeef,
  authMethods: AUTH_NONE | 4,
  protections: PROTECTION_NONE | 2,
  nonce: pattern(100, 16),
  clientId: pattern(200, 16),
};

Deno.test("encodeClientHello() writes 48 little-endian bytes at the documented offsets", () => {
  const bytes = encodeClientHello(clientHello);
  assert.equal(bytes.length, 48);
  const view = viewOf(bytes);
  assert.equal(view.getUint32(0, true), MAGIC_CLIENT_HELLO);
  assert.equal(view.getUint16(4, true), 1);
  assert.equal(view.getUint16(6, true), 3);
  assert.equal(view.getUint32(8, true), 0xdeadbeef);
  assert.equal(view.getUint16(12, true), 5);
  assert.equal(view.getUint16(14, true), 3);
  assert.deepEqual(bytes.subarray(16, 32), clientHello.nonce);
  assert.deepEqual(bytes.subarray(32, 48), clientHello.clientId);
});

Deno.test("decodeClientHello() round-trips encodeClientHello()", () => {
  assert.deepEqual(decodeClientHello(encodeClientHello(clientHello)), clientHello);
});

Deno.test("decodeClientHello() reads a hello inside a larger buffer (byteOffset respected)", () => {
  const big = new Uint8Array(5 + ClientHelloLayout.SIZE + 3);
  big.set(encodeClientHello(clientHello), 5);
  assert.deepEqual(decodeClientHello(big.subarray(5, 5 + ClientHelloLayout.SIZE)), clientHello);
});

Deno.test("decodeClientHello() rejects a hello of the wrong length", () => {
  const bytes = encodeClientHello(clientHello);
  assert.equal(typeof decodeClientHello(bytes.subarray(0, 47)), "string");
  const longer = new Uint8Array(49);
  longer.set(bytes);
  assert.equal(typeof decodeClientHello(longer), "string");
  assert.equal(typeof decodeClientHello(new Uint8Array(0)), "string");
});

Deno.test("decodeClientHello() rejects a bad magic", () => {
  const bytes = encodeClientHello(clientHello);
  viewOf(bytes).setUint32(0, MAGIC_SERVER_HELLO, true);
  assert.match(decodeClientHello(bytes) as string, /magic/);
});

Deno.test("decodeClientHello() rejects versionMin > versionMax", () => {
  const bytes = encodeClientHello({ ...clientHello, versionMin: 2, versionMax: 1 });
  assert.match(decodeClientHello(bytes) as string, /versionMin > versionMax/);
});

Deno.test("decodeClientHello() accepts versionMin == versionMax", () => {
  const hello = { ...clientHello, versionMin: 1, versionMax: 1 };
  assert.deepEqual(decodeClientHello(encodeClientHello(hello)), hello);
});

// --- server hello ------------------------------------------------------------------------

const serverHello: ServerHello = {
  version: PROTOCOL_VERSION,
  status: HelloStatus.OK,
  features: 0,
  authMethod: AUTH_NONE,
  protection: PROTECTION_NONE,
  sizeBytes: SAFE_MAX,
  blockSize: 4096,
  exportFlags: ExportFlag.READ_ONLY,
  payloadBytesMax: PAYLOAD_BYTES_MAX,
  inFlightMax: 128,
  exportId: pattern(1, 16),
  nonce: pattern(200, 16),
  writeGeneration: ABOVE_2_32 + 7,
  writeEpoch: pattern(77, 16),
  exportInstance: pattern(150, 16),
};

Deno.test("encodeServerHello() writes 112 little-endian bytes at the documented offsets", () => {
  const bytes = encodeServerHello({ ...serverHello, sizeBytes: ABOVE_2_32, status: 5 });
  assert.equal(bytes.length, 112);
  const view = viewOf(bytes);
  assert.equal(view.getUint32(0, true), MAGIC_SERVER_HELLO);
  assert.equal(view.getUint16(4, true), 1);
  assert.equal(view.getUint16(6, true), 5);
  assert.equal(view.getUint32(8, true), 0);
  assert.equal(view.getUint16(12, true), AUTH_NONE);
  assert.equal(view.getUint16(14, true), PROTECTION_NONE);
  assert.equal(view.getUint32(16, true), 12345);
  assert.equal(view.getUint32(20, true), 1);
  assert.equal(view.getUint32(24, true), 4096);
  assert.equal(view.getUint32(28, true), ExportFlag.READ_ONLY);
  assert.equal(view.getUint32(32, true), PAYLOAD_BYTES_MAX);
  assert.equal(view.getUint32(36, true), 128);
  assert.deepEqual(bytes.subarray(40, 56), serverHello.exportId);
  assert.deepEqual(bytes.subarray(56, 72), serverHello.nonce);
  assert.equal(view.getUint32(72, true), 12345 + 7, "write generation, low word");
  assert.equal(view.getUint32(76, true), 1, "write generation, high word");
  assert.deepEqual(bytes.subarray(80, 96), serverHello.writeEpoch);
  assert.deepEqual(bytes.subarray(96, 112), serverHello.exportInstance);
});

Deno.test("decodeServerHello() round-trips encodeServerHello(), size 2^53-1 included", () => {
  assert.deepEqual(decodeServerHello(encodeServerHello(serverHello)), serverHello);
});

Deno.test("decodeServerHello() round-trips sizes just above 2^32 and just below 2^53", () => {
  for (const sizeBytes of [0, 2 ** 32, ABOVE_2_32, SAFE_MAX - 4096]) {
    const hello = { ...serverHello, sizeBytes };
    assert.deepEqual(decodeServerHello(encodeServerHello(hello)), hello);
  }
});

Deno.test("decodeServerHello() rejects a hello of the wrong length", () => {
  const bytes = encodeServerHello(serverHello);
  assert.equal(typeof decodeServerHello(bytes.subarray(0, 111)), "string");
  const longer = new Uint8Array(113);
  longer.set(bytes);
  assert.equal(typeof decodeServerHello(longer), "string");
});

Deno.test("decodeServerHello() rejects a bad magic", () => {
  const bytes = encodeServerHello(serverHello);
  viewOf(bytes).setUint32(ServerHelloLayout.magic, MAGIC_CLIENT_HELLO, true);
  assert.match(decodeServerHello(bytes) as string, /magic/);
});

Deno.test("decodeServerHello() rejects a block size that is not a power of two", () => {
  for (const blockSize of [0, 3, 4095, 4097, 0xffffffff]) {
    const result = decodeServerHello(encodeServerHello({ ...serverHello, blockSize }));
    assert.match(result as string, /power of two/, `block size ${blockSize}`);
  }
  for (const blockSize of [1, 512, 4096, 2 ** 31]) {
    assert.equal(
      typeof decodeServerHello(encodeServerHello({ ...serverHello, blockSize })),
      "object",
    );
  }
});

Deno.test("decodeServerHello() rejects payloadBytesMax 0 or above PAYLOAD_BYTES_MAX", () => {
  for (const payloadBytesMax of [0, PAYLOAD_BYTES_MAX + 1, 0xffffffff]) {
    const result = decodeServerHello(encodeServerHello({ ...serverHello, payloadBytesMax }));
    assert.equal(typeof result, "string", `payloadBytesMax ${payloadBytesMax}`);
  }
  for (const payloadBytesMax of [1, PAYLOAD_BYTES_MAX]) {
    const hello = { ...serverHello, payloadBytesMax };
    assert.deepEqual(decodeServerHello(encodeServerHello(hello)), hello);
  }
});

Deno.test("decodeServerHello() rejects inFlightMax 0", () => {
  const result = decodeServerHello(encodeServerHello({ ...serverHello, inFlightMax: 0 }));
  assert.match(result as string, /in flight/);
});

Deno.test("decodeServerHello() rejects an export size of 2^53 or more", () => {
  const bytes = encodeServerHello(serverHello);
  setUnsafeU64(viewOf(bytes), ServerHelloLayout.size);
  assert.match(decodeServerHello(bytes) as string, /2\^53/);
});

Deno.test("decodeServerHello() passes a non-OK status through without checking geometry", () => {
  for (const status of [HelloStatus.VERSION_UNSUPPORTED, HelloStatus.BUSY, 999]) {
    const hello = { ...serverHello, status, blockSize: 0, payloadBytesMax: 0, inFlightMax: 0 };
    const result = decodeServerHello(encodeServerHello(hello));
    assert.equal(typeof result, "object");
    assert.equal((result as ServerHello).status, status);
  }
});

// --- request header ----------------------------------------------------------------------

const request: RequestHeader = {
  command: Command.WRITE,
  flags: RequestFlag.FUA | RequestFlag.PREFLUSH,
  txId: SAFE_MAX,
  offset: ABOVE_2_32,
  length: 65536,
  payloadLength: 65536,
};

function encodedRequest(header: RequestHeader = request): DataView {
  const view = new DataView(new ArrayBuffer(RequestLayout.SIZE));
  encodeRequestHeader(view, 0, header);
  return view;
}

Deno.test("encodeRequestHeader() writes at the given offset and touches nothing else", () => {
  const at = 7; // unaligned on purpose
  const bytes = new Uint8Array(at + RequestLayout.SIZE + 5).fill(0xaa);
  const view = new DataView(bytes.buffer);
  encodeRequestHeader(view, at, request);
  assert.ok(bytes.subarray(0, at).every((b) => b === 0xaa), "bytes before untouched");
  assert.ok(
    bytes.subarray(at + RequestLayout.SIZE).every((b) => b === 0xaa),
    "bytes after untouched",
  );
  assert.equal(view.getUint32(at + 0, true), MAGIC_REQUEST);
  assert.equal(view.getUint16(at + 4, true), Command.WRITE);
  assert.equal(view.getUint16(at + 6, true), 3);
  assert.equal(getU64(view, at + 8), SAFE_MAX);
  assert.equal(getU64(view, at + 16), ABOVE_2_32);
  assert.equal(view.getUint32(at + 24, true), 65536);
  assert.equal(view.getUint32(at + 28, true), 65536);
  assert.deepEqual(decodeRequestHeader(view, at), request);
});

Deno.test("decodeRequestHeader() round-trips txId and offset near 2^53-1 and above 2^32", () => {
  for (const [txId, offset] of [[0, 0], [1, 2 ** 32], [ABOVE_2_32, SAFE_MAX], [SAFE_MAX, 1]]) {
    const header = { ...request, txId: txId!, offset: offset! };
    assert.deepEqual(decodeRequestHeader(encodedRequest(header), 0), header);
  }
});

Deno.test("decodeRequestHeader() rejects a bad magic", () => {
  const view = encodedRequest();
  view.setUint32(RequestLayout.magic, MAGIC_REPLY, true);
  assert.match(decodeRequestHeader(view, 0) as string, /bad request magic 0x52545344/);
});

Deno.test("decodeRequestHeader() rejects payloadLength above PAYLOAD_BYTES_MAX", () => {
  const view = encodedRequest({ ...request, payloadLength: PAYLOAD_BYTES_MAX + 1 });
  assert.equal(typeof decodeRequestHeader(view, 0), "string");
  const atMax = encodedRequest({ ...request, payloadLength: PAYLOAD_BYTES_MAX });
  assert.equal(typeof decodeRequestHeader(atMax, 0), "object");
});

Deno.test("decodeRequestHeader() rejects a txId of 2^53 or more", () => {
  const view = encodedRequest();
  setUnsafeU64(view, RequestLayout.txId);
  assert.match(decodeRequestHeader(view, 0) as string, /transaction id/);
});

Deno.test("decodeRequestHeader() decodes an offset of 2^53 or more as -1, not as a framing error", () => {
  const view = encodedRequest();
  setUnsafeU64(view, RequestLayout.offset);
  const header = decodeRequestHeader(view, 0);
  assert.equal(typeof header, "object");
  assert.equal((header as RequestHeader).offset, -1);
});

// --- validateRequest ---------------------------------------------------------------------

function req(fields: Partial<RequestHeader> & { command: number }): RequestHeader {
  return { flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 0, ...fields };
}

function rejection(header: RequestHeader): number | undefined {
  return validateRequest(header)?.error;
}

Deno.test("validateRequest() accepts a valid request of each command", () => {
  const valid = [
    req({ command: Command.READ, offset: ABOVE_2_32, length: 4096 }),
    req({ command: Command.READ, offset: SAFE_MAX, length: PAYLOAD_BYTES_MAX }),
    req({ command: Command.WRITE, offset: 512, length: 1, payloadLength: 1 }),
    req({
      command: Command.WRITE,
      flags: RequestFlag.FUA | RequestFlag.PREFLUSH,
      length: PAYLOAD_BYTES_MAX,
      payloadLength: PAYLOAD_BYTES_MAX,
    }),
    req({ command: Command.FLUSH }),
    req({ command: Command.DISCARD, flags: RequestFlag.FUA, length: RANGE_BYTES_MAX }),
    req({ command: Command.WRITE_ZEROES, flags: RequestFlag.PREFLUSH, offset: 4096, length: 8192 }),
    req({ command: Command.INFO }),
    req({ command: Command.PING }),
    req({ command: Command.STATUS }),
  ];
  for (const header of valid) assert.equal(validateRequest(header), null, JSON.stringify(header));
});

Deno.test("validateRequest() takes a CONTROL payload of 1 to 4096 bytes and nothing else", () => {
  assert.equal(validateRequest(req({ command: Command.CONTROL, payloadLength: 1 })), null);
  assert.equal(validateRequest(req({ command: Command.CONTROL, payloadLength: 4096 })), null);
  for (const payloadLength of [0, 4097]) {
    assert.equal(rejection(req({ command: Command.CONTROL, payloadLength })), WireError.EINVAL);
  }
  const ranged = req({ command: Command.CONTROL, payloadLength: 10, offset: 4096, length: 1 });
  assert.equal(rejection(ranged), WireError.EINVAL);
});

Deno.test("validateRequest() answers an unknown command with ENOTSUP", () => {
  for (const command of [0, 10, 0xffff]) {
    assert.equal(rejection(req({ command })), WireError.ENOTSUP, `command ${command}`);
  }
  // ENOTSUP comes first, whatever else is wrong with the request
  const messy = req({ command: 42, flags: 0xffff, offset: -1, length: 7, payloadLength: 3 });
  assert.equal(rejection(messy), WireError.ENOTSUP);
});

Deno.test("validateRequest() answers flags the command does not accept with EINVAL", () => {
  const bad = [
    req({ command: Command.READ, flags: RequestFlag.FUA, length: 4096 }),
    req({ command: Command.READ, flags: RequestFlag.PREFLUSH, length: 4096 }),
    req({ command: Command.FLUSH, flags: RequestFlag.FUA }),
    req({ command: Command.INFO, flags: RequestFlag.PREFLUSH }),
    req({ command: Command.PING, flags: RequestFlag.FUA }),
    req({ command: Command.STATUS, flags: RequestFlag.FUA }),
    req({ command: Command.WRITE, flags: 4, length: 1, payloadLength: 1 }),
    req({ command: Command.WRITE, flags: 0x8000 | RequestFlag.FUA, length: 1, payloadLength: 1 }),
    req({ command: Command.DISCARD, flags: 4, length: 1 }),
    req({ command: Command.WRITE_ZEROES, flags: 0xfffc, length: 1 }),
  ];
  for (const header of bad) {
    const result = validateRequest(header);
    assert.equal(result?.error, WireError.EINVAL, JSON.stringify(header));
    assert.match(result!.reason, /flags/);
  }
});

Deno.test("validateRequest() answers a WRITE whose payload is not its length with EINVAL", () => {
  for (const payloadLength of [0, 4095, 4097]) {
    const header = req({ command: Command.WRITE, length: 4096, payloadLength });
    assert.equal(rejection(header), WireError.EINVAL, `payload ${payloadLength}`);
  }
});

Deno.test("validateRequest() answers a payload on any command but WRITE with EINVAL", () => {
  const bad = [
    req({ command: Command.READ, length: 4096, payloadLength: 4096 }),
    req({ command: Command.FLUSH, payloadLength: 1 }),
    req({ command: Command.DISCARD, length: 4096, payloadLength: 4096 }),
    req({ command: Command.WRITE_ZEROES, length: 4096, payloadLength: 1 }),
    req({ command: Command.INFO, payloadLength: 16 }),
    req({ command: Command.PING, payloadLength: 1 }),
    req({ command: Command.STATUS, payloadLength: 1 }),
  ];
  for (const header of bad) {
    assert.equal(rejection(header), WireError.EINVAL, JSON.stringify(header));
  }
});

Deno.test("validateRequest() answers a ranged command of length 0 with EINVAL", () => {
  for (const command of [Command.READ, Command.WRITE, Command.DISCARD, Command.WRITE_ZEROES]) {
    assert.equal(rejection(req({ command, offset: 4096, length: 0 })), WireError.EINVAL);
  }
});

Deno.test("validateRequest() answers READ or WRITE longer than PAYLOAD_BYTES_MAX with EINVAL", () => {
  const length = PAYLOAD_BYTES_MAX + 1;
  assert.equal(rejection(req({ command: Command.READ, length })), WireError.EINVAL);
  assert.equal(
    rejection(req({ command: Command.WRITE, length, payloadLength: length })),
    WireError.EINVAL,
  );
});

Deno.test("validateRequest() answers DISCARD or WRITE_ZEROES longer than RANGE_BYTES_MAX with EINVAL", () => {
  for (const command of [Command.DISCARD, Command.WRITE_ZEROES]) {
    assert.equal(rejection(req({ command, length: RANGE_BYTES_MAX + 1 })), WireError.EINVAL);
    assert.equal(rejection(req({ command, length: 0xffffffff })), WireError.EINVAL);
    assert.equal(rejection(req({ command, length: RANGE_BYTES_MAX })), undefined);
  }
});

Deno.test("validateRequest() answers an offset of 2^53 or more (decoded as -1) with EINVAL", () => {
  const view = encodedRequest(req({ command: Command.READ, length: 4096 }));
  setUnsafeU64(view, RequestLayout.offset);
  const header = decodeRequestHeader(view, 0) as RequestHeader;
  assert.equal(header.offset, -1);
  assert.match(validateRequest(header)!.reason, /offset/);
  assert.equal(rejection(header), WireError.EINVAL);
  for (const command of [Command.WRITE, Command.DISCARD, Command.WRITE_ZEROES]) {
    const payloadLength = command === Command.WRITE ? 4096 : 0;
    assert.equal(
      rejection(req({ command, offset: -1, length: 4096, payloadLength })),
      WireError.EINVAL,
    );
  }
});

Deno.test("validateRequest() answers FLUSH, PING, INFO or STATUS with a nonzero offset or length with EINVAL", () => {
  for (const command of [Command.FLUSH, Command.PING, Command.INFO, Command.STATUS]) {
    assert.equal(rejection(req({ command, offset: 4096 })), WireError.EINVAL);
    assert.equal(rejection(req({ command, offset: -1 })), WireError.EINVAL);
    assert.equal(rejection(req({ command, length: 1 })), WireError.EINVAL);
    assert.equal(rejection(req({ command })), undefined);
  }
});

// --- reply header ------------------------------------------------------------------------

const reply: ReplyHeader = {
  command: Command.READ,
  txId: SAFE_MAX,
  error: WireError.OK,
  payloadLength: 4096,
};

function encodedReply(header: ReplyHeader = reply): DataView {
  const view = new DataView(new ArrayBuffer(ReplyLayout.SIZE));
  encodeReplyHeader(view, 0, header);
  return view;
}

Deno.test("encodeReplyHeader() writes at the given offset with a zero reserved field", () => {
  const at = 13;
  const bytes = new Uint8Array(at + ReplyLayout.SIZE + 3).fill(0x55);
  const view = new DataView(bytes.buffer);
  encodeReplyHeader(view, at, { ...reply, txId: ABOVE_2_32 });
  assert.ok(bytes.subarray(0, at).every((b) => b === 0x55), "bytes before untouched");
  assert.ok(
    bytes.subarray(at + ReplyLayout.SIZE).every((b) => b === 0x55),
    "bytes after untouched",
  );
  assert.equal(view.getUint32(at + 0, true), MAGIC_REPLY);
  assert.equal(view.getUint16(at + 4, true), Command.READ);
  assert.equal(view.getUint16(at + 6, true), 0);
  assert.equal(getU64(view, at + 8), ABOVE_2_32);
  assert.equal(view.getUint32(at + 16, true), 0);
  assert.equal(view.getUint32(at + 20, true), 4096);
  assert.deepEqual(decodeReplyHeader(view, at), { ...reply, txId: ABOVE_2_32 });
});

Deno.test("decodeReplyHeader() round-trips success and error replies", () => {
  for (
    const header of [
      reply,
      { command: Command.STATUS, txId: 0, error: 0, payloadLength: STATUS_PAYLOAD_BYTES_MAX },
      { command: Command.WRITE, txId: 2 ** 32, error: WireError.ENOSPC, payloadLength: 0 },
      { command: 77, txId: 5, error: WireError.ENOTSUP, payloadLength: 0 },
    ]
  ) {
    assert.deepEqual(decodeReplyHeader(encodedReply(header), 0), header);
  }
});

Deno.test("decodeReplyHeader() rejects a bad magic", () => {
  const view = encodedReply();
  view.setUint32(ReplyLayout.magic, MAGIC_REQUEST, true);
  assert.match(decodeReplyHeader(view, 0) as string, /bad reply magic/);
});

Deno.test("decodeReplyHeader() rejects an error reply that carries a payload", () => {
  const view = encodedReply({ ...reply, error: WireError.EIO, payloadLength: 1 });
  assert.match(decodeReplyHeader(view, 0) as string, /error reply carries a payload/);
});

Deno.test("decodeReplyHeader() rejects payloadLength above PAYLOAD_BYTES_MAX", () => {
  const view = encodedReply({ ...reply, payloadLength: PAYLOAD_BYTES_MAX + 1 });
  assert.equal(typeof decodeReplyHeader(view, 0), "string");
  const atMax = encodedReply({ ...reply, payloadLength: PAYLOAD_BYTES_MAX });
  assert.equal(typeof decodeReplyHeader(atMax, 0), "object");
});

Deno.test("decodeReplyHeader() rejects a txId of 2^53 or more", () => {
  const view = encodedReply();
  setUnsafeU64(view, ReplyLayout.txId);
  assert.match(decodeReplyHeader(view, 0) as string, /transaction id/);
});

Deno.test("expectedReplyPayload() is the read length for READ, 16 for INFO, -1 for STATUS, else 0", () => {
  assert.equal(expectedReplyPayload(Command.READ, 4096), 4096);
  assert.equal(expectedReplyPayload(Command.READ, PAYLOAD_BYTES_MAX), PAYLOAD_BYTES_MAX);
  assert.equal(expectedReplyPayload(Command.INFO, 0), InfoLayout.SIZE);
  assert.equal(expectedReplyPayload(Command.STATUS, 0), -1);
  for (
    const command of [
      Command.WRITE,
      Command.FLUSH,
      Command.DISCARD,
      Command.WRITE_ZEROES,
      Command.PING,
    ]
  ) {
    assert.equal(expectedReplyPayload(command, 4096), 0, `command ${command}`);
  }
});

Deno.test("replyPayloadLimit() caps STATUS at STATUS_PAYLOAD_BYTES_MAX and is exact otherwise", () => {
  assert.equal(replyPayloadLimit(Command.STATUS, 0), STATUS_PAYLOAD_BYTES_MAX);
  assert.equal(replyPayloadLimit(Command.READ, 512), 512);
  assert.equal(replyPayloadLimit(Command.INFO, 0), 16);
  assert.equal(replyPayloadLimit(Command.WRITE, 512), 0);
});

// --- INFO payload ------------------------------------------------------------------------

Deno.test("encodeInfo() writes 16 little-endian bytes at the documented offsets", () => {
  const bytes = encodeInfo({ sizeBytes: ABOVE_2_32, blockSize: 512, exportFlags: 1 });
  assert.equal(bytes.length, 16);
  const view = viewOf(bytes);
  assert.equal(view.getUint32(0, true), 12345);
  assert.equal(view.getUint32(4, true), 1);
  assert.equal(view.getUint32(8, true), 512);
  assert.equal(view.getUint32(12, true), 1);
});

Deno.test("decodeInfo() round-trips encodeInfo() for sizes above 2^32 and up to 2^53-1", () => {
  for (const sizeBytes of [0, 2 ** 32, ABOVE_2_32, SAFE_MAX - 1, SAFE_MAX]) {
    const info = { sizeBytes, blockSize: 4096, exportFlags: ExportFlag.READ_ONLY };
    assert.deepEqual(decodeInfo(encodeInfo(info)), info);
  }
});

Deno.test("decodeInfo() reads a payload inside a larger buffer (byteOffset respected)", () => {
  const info = { sizeBytes: ABOVE_2_32, blockSize: 4096, exportFlags: 0 };
  const big = new Uint8Array(3 + 16 + 9).fill(0xff);
  big.set(encodeInfo(info), 3);
  assert.deepEqual(decodeInfo(big.subarray(3, 19)), info);
});

Deno.test("decodeInfo() rejects a payload of the wrong length", () => {
  const bytes = encodeInfo({ sizeBytes: 1, blockSize: 4096, exportFlags: 0 });
  assert.equal(typeof decodeInfo(bytes.subarray(0, 15)), "string");
  assert.equal(typeof decodeInfo(new Uint8Array(17)), "string");
});

Deno.test("decodeInfo() rejects a size of 2^53 or more", () => {
  const bytes = encodeInfo({ sizeBytes: 1, blockSize: 4096, exportFlags: 0 });
  setUnsafeU64(viewOf(bytes), InfoLayout.size);
  assert.match(decodeInfo(bytes) as string, /2\^53/);
});

// --- fencing and the writer lease: numbers pinned to the spec's tables -------------------

Deno.test("the spec's numbers for identity, lease and refusal are the code's", () => {
  assert.equal(ClientHelloLayout.clientId, 32);
  assert.equal(ClientHelloLayout.SIZE, 48);
  assert.equal(ClientFeature.WRITER, 1);
  assert.equal(ServerFeature.SHARED_WRITERS, 1);
  assert.equal(HelloStatus.WRITE_LEASE_HELD, 6);
  assert.equal(REFUSAL_REASON_BYTES_MAX, 512);
});

Deno.test("encodeRefusalReason() writes a u16 length and UTF-8 text, cut to the limit", () => {
  const bytes = encodeRefusalReason("held by 10.0.0.1:4000 – stop it");
  const length = decodeRefusalReasonLength(bytes);
  assert.equal(length, bytes.length - 2);
  assert.equal(new TextDecoder().decode(bytes.subarray(2)), "held by 10.0.0.1:4000 – stop it");
  const long = encodeRefusalReason("x".repeat(2000));
  assert.equal(long.length, 2 + REFUSAL_REASON_BYTES_MAX);
  assert.equal(decodeRefusalReasonLength(long), REFUSAL_REASON_BYTES_MAX);
});

Deno.test("decodeRefusalReasonLength() refuses a length over the limit", () => {
  const bytes = new Uint8Array(2);
  viewOf(bytes).setUint16(0, REFUSAL_REASON_BYTES_MAX + 1, true);
  assert.match(decodeRefusalReasonLength(bytes) as string, /> 512/);
});
