/**
 * Pins every number of the DST wire format to README.md in this folder: magics,
 * command codes, flag bits, error codes, hello statuses, feature and export bits,
 * frame sizes, field offsets and the limits table. Each expected value is a literal
 * copied from the spec's tables, never a constant of the code.
 *
 * Why: the other codec tests compare encode() with decode(), and both read the same
 * constants, so a wrong number shared by client and export (a command code, an offset,
 * a magic) passes them all while no other implementation of the spec could talk to
 * DST. Here a changed constant fails a test. Golden frames are written out field by
 * field from the spec's layouts; the table tests compare whole objects, so a name
 * added to the code without the spec also fails, which is the reminder to document it.
 */

import assert from "node:assert/strict";
import { assertFrame, type Field, frame } from "../../tests/helpers/golden.ts";
import * as limits from "../constants.ts";
import {
  decodeClientHello,
  decodeRefusalReasonLength,
  decodeServerHello,
  encodeClientHello,
  encodeRefusalReason,
  encodeServerHello,
} from "./handshake.ts";
import {
  decodeInfo,
  decodeReplyHeader,
  decodeRequestHeader,
  encodeInfo,
  encodeReplyHeader,
  encodeRequestHeader,
  expectedReplyPayload,
  type RequestHeader,
  validateRequest,
} from "./messages.ts";
import * as wire from "./wire.ts";

/** `count` bytes counting up from `first`: a field whose every byte shows where it landed. */
function run(first: number, count: number): Uint8Array {
  return Uint8Array.from({ length: count }, (_, i) => first + i);
}

function hexRun(first: number, count: number): string {
  return Array.from(run(first, count), (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- the spec's tables, value by value ----------------------------------------------------

Deno.test("the magics are the spec's four letters read as little-endian u32s", () => {
  assert.equal(wire.MAGIC_CLIENT_HELLO, 0x43545344, "DSTC");
  assert.equal(wire.MAGIC_SERVER_HELLO, 0x53545344, "DSTS");
  assert.equal(wire.MAGIC_REQUEST, 0x51545344, "DSTQ");
  assert.equal(wire.MAGIC_REPLY, 0x52545344, "DSTR");
});

Deno.test("the protocol version is 1", () => {
  assert.equal(wire.PROTOCOL_VERSION, 1);
});

Deno.test("command codes are the spec's: READ 1 through CONTROL 9", () => {
  assert.deepEqual({ ...wire.Command }, {
    READ: 1,
    WRITE: 2,
    FLUSH: 3,
    DISCARD: 4,
    WRITE_ZEROES: 5,
    INFO: 6,
    PING: 7,
    STATUS: 8,
    CONTROL: 9,
  });
});

Deno.test("request flag bits are the spec's: FUA 1, PREFLUSH 2, accepted only by WRITE, DISCARD and WRITE_ZEROES", () => {
  assert.deepEqual({ ...wire.RequestFlag }, { FUA: 1, PREFLUSH: 2 });
  assert.deepEqual({ ...wire.FLAGS_ALLOWED }, {
    1: 0,
    2: 3,
    3: 0,
    4: 3,
    5: 3,
    6: 0,
    7: 0,
    8: 0,
    9: 0,
  });
});

Deno.test("error codes are the spec's Linux errno values", () => {
  assert.deepEqual({ ...wire.WireError }, {
    OK: 0,
    EPERM: 1,
    EIO: 5,
    ENOMEM: 12,
    EINVAL: 22,
    ENOSPC: 28,
    EOVERFLOW: 75,
    ENOTSUP: 95,
    ESHUTDOWN: 108,
  });
});

Deno.test("hello statuses are the spec's: OK 0 through HELLO_TOO_LATE 7", () => {
  assert.deepEqual({ ...wire.HelloStatus }, {
    OK: 0,
    VERSION_UNSUPPORTED: 1,
    AUTH_UNSUPPORTED: 2,
    PROTECTION_UNSUPPORTED: 3,
    ACCESS_DENIED: 4,
    BUSY: 5,
    WRITE_LEASE_HELD: 6,
    HELLO_TOO_LATE: 7,
  });
});

Deno.test("the hello's masks and bits are the spec's: AUTH_NONE, PROTECTION_NONE, WRITER, SHARED_WRITERS and READ_ONLY are each 1", () => {
  assert.equal(wire.AUTH_NONE, 1);
  assert.equal(wire.PROTECTION_NONE, 1);
  assert.deepEqual({ ...wire.ClientFeature }, { WRITER: 1 });
  assert.deepEqual({ ...wire.ServerFeature }, { SHARED_WRITERS: 1 });
  assert.deepEqual({ ...wire.ExportFlag }, { READ_ONLY: 1 });
});

Deno.test("the client hello is 48 bytes laid out as the spec's table", () => {
  assert.deepEqual({ ...wire.ClientHelloLayout }, {
    magic: 0,
    versionMin: 4,
    versionMax: 6,
    features: 8,
    authMethods: 12,
    protections: 14,
    nonce: 16,
    clientId: 32,
    SIZE: 48,
  });
  assert.equal(wire.NONCE_BYTES, 16);
  assert.equal(wire.CLIENT_ID_BYTES, 16);
});

Deno.test("the server hello is 112 bytes laid out as the spec's table, exportInstance at 96", () => {
  assert.deepEqual({ ...wire.ServerHelloLayout }, {
    magic: 0,
    version: 4,
    status: 6,
    features: 8,
    authMethod: 12,
    protection: 14,
    size: 16,
    blockSize: 24,
    exportFlags: 28,
    payloadBytesMax: 32,
    inFlightMax: 36,
    exportId: 40,
    nonce: 56,
    writeGeneration: 72,
    writeEpoch: 80,
    exportInstance: 96,
    SIZE: 112,
  });
  assert.equal(wire.EXPORT_ID_BYTES, 16);
  assert.equal(wire.WRITE_EPOCH_BYTES, 16);
  assert.equal(wire.EXPORT_INSTANCE_BYTES, 16);
});

Deno.test("the request header is 32 bytes laid out as the spec's table", () => {
  assert.deepEqual({ ...wire.RequestLayout }, {
    magic: 0,
    command: 4,
    flags: 6,
    txId: 8,
    offset: 16,
    length: 24,
    payloadLength: 28,
    SIZE: 32,
  });
});

Deno.test("the reply header is 24 bytes laid out as the spec's table", () => {
  assert.deepEqual({ ...wire.ReplyLayout }, {
    magic: 0,
    command: 4,
    reserved: 6,
    txId: 8,
    error: 16,
    payloadLength: 20,
    SIZE: 24,
  });
});

Deno.test("the INFO payload is 16 bytes laid out as the spec's table", () => {
  assert.deepEqual({ ...wire.InfoLayout }, { size: 0, blockSize: 8, exportFlags: 12, SIZE: 16 });
});

Deno.test("the limits are the spec's table: 32 MiB payload, 1 GiB range, 64 KiB STATUS, 4 KiB CONTROL, 64 MiB and 128 in flight, 64 clients, 10 s handshake, 2 s of silence before an NBD greeting, 512 B reason, 30 s lease", () => {
  assert.equal(limits.PAYLOAD_BYTES_MAX, 33_554_432);
  assert.equal(limits.RANGE_BYTES_MAX, 1_073_741_824);
  assert.equal(limits.STATUS_PAYLOAD_BYTES_MAX, 65_536);
  assert.equal(limits.CONTROL_PAYLOAD_BYTES_MAX, 4_096);
  assert.equal(limits.IN_FLIGHT_BYTES_PER_CONNECTION_MAX, 67_108_864);
  assert.equal(limits.IN_FLIGHT_PER_CONNECTION_MAX, 128);
  assert.equal(limits.CLIENTS_PER_EXPORT_MAX, 64);
  assert.equal(limits.HANDSHAKE_TIMEOUT_MS, 10_000);
  assert.equal(limits.NBD_GREETING_GRACE_MS, 2_000);
  assert.equal(wire.REFUSAL_REASON_BYTES_MAX, 512);
  assert.equal(limits.LEASE_IDLE_MS, 30_000);
});

Deno.test("the connection time limits are the spec's table: 60 s idle, 150 s per frame, 30 s of replies not read", () => {
  assert.equal(limits.CONNECTION_IDLE_MS, 60_000);
  assert.equal(limits.FRAME_TIMEOUT_MS, 150_000);
  assert.equal(limits.SEND_STALL_MS, 30_000);
});

Deno.test("the other numbers the spec's text names are the code's: port 1025, block size 4096, 16 MiB send queue, 10 s longest ping, a 64-request 48 MiB client window", () => {
  assert.equal(limits.EXPORT_PORT_DEFAULT, 1025);
  assert.equal(limits.BLOCK_SIZE_DEFAULT, 4096);
  assert.equal(limits.SEND_QUEUE_BYTES_MAX, 16_777_216);
  assert.equal(limits.CLIENT_PING_MS_MAX, 10_000);
  assert.equal(limits.CLIENT_WINDOW_DEFAULT, 64);
  assert.equal(limits.CLIENT_WINDOW_BYTES_MAX, 50_331_648);
});

// --- golden frames: the spec's layouts written out byte by byte ---------------------------

/** A v1 writer's hello: every field holds a value whose bytes show where it landed. */
const CLIENT_HELLO: readonly Field[] = [
  ["magic DSTC", "44535443"],
  ["versionMin 1", "0100"],
  ["versionMax 1", "0100"],
  ["features WRITER", "01000000"],
  ["authMethods AUTH_NONE", "0100"],
  ["protections PROTECTION_NONE", "0100"],
  ["nonce", hexRun(0x10, 16)],
  ["clientId", hexRun(0x20, 16)],
];

const clientHelloFields = {
  versionMin: 1,
  versionMax: 1,
  features: 1,
  authMethods: 1,
  protections: 1,
  nonce: run(0x10, 16),
  clientId: run(0x20, 16),
};

Deno.test("a client hello encodes to the spec's 48 bytes, field by field", () => {
  assertFrame(encodeClientHello(clientHelloFields), CLIENT_HELLO, "client hello");
});

Deno.test("the spec's 48 client hello bytes decode to their fields", () => {
  assert.deepEqual(decodeClientHello(frame(...CLIENT_HELLO)), clientHelloFields);
});

/**
 * An accepting server hello. The size and write generation are above 2^32, so the
 * u64 word order shows; both stay below 2^53.
 */
const SERVER_HELLO: readonly Field[] = [
  ["magic DSTS", "44535453"],
  ["version 1", "0100"],
  ["status OK", "0000"],
  ["features SHARED_WRITERS", "01000000"],
  ["authMethod AUTH_NONE", "0100"],
  ["protection PROTECTION_NONE", "0100"],
  ["size 0x123456789ab000", "00b09a7856341200"],
  ["blockSize 4096", "00100000"],
  ["exportFlags READ_ONLY", "01000000"],
  ["payloadBytesMax 32 MiB", "00000002"],
  ["inFlightMax 128", "80000000"],
  ["exportId", hexRun(0xa0, 16)],
  ["nonce", hexRun(0xb0, 16)],
  ["writeGeneration 7 * 2^32 + 9", "0900000007000000"],
  ["writeEpoch", hexRun(0xc0, 16)],
  ["exportInstance", hexRun(0xd0, 16)],
];

const serverHelloFields = {
  version: 1,
  status: 0,
  features: 1,
  authMethod: 1,
  protection: 1,
  sizeBytes: 0x123456789ab000,
  blockSize: 4096,
  exportFlags: 1,
  payloadBytesMax: 33_554_432,
  inFlightMax: 128,
  exportId: run(0xa0, 16),
  nonce: run(0xb0, 16),
  writeGeneration: 7 * 2 ** 32 + 9,
  writeEpoch: run(0xc0, 16),
  exportInstance: run(0xd0, 16),
};

Deno.test("a server hello encodes to the spec's 112 bytes, field by field", () => {
  assertFrame(encodeServerHello(serverHelloFields), SERVER_HELLO, "server hello");
});

Deno.test("the spec's 112 server hello bytes decode to their fields", () => {
  assert.deepEqual(decodeServerHello(frame(...SERVER_HELLO)), serverHelloFields);
});

Deno.test("a refused server hello carries the spec's status code, and the reason after it is a little-endian u16 count and UTF-8", () => {
  const busy = frame(
    ["magic DSTS", "44535453"],
    ["version 1", "0100"],
    ["status BUSY", "0500"],
    ["the rest, meaningless when refused", "00".repeat(104)],
  );
  assert.equal((decodeServerHello(busy) as { status: number }).status, 5);
  assertFrame(encodeRefusalReason("held"), [["count 4", "0400"], ["text", "68656c64"]], "reason");
  assert.equal(decodeRefusalReasonLength(frame(["count 512", "0002"])), 512);
  assert.equal(typeof decodeRefusalReasonLength(frame(["count 513", "0102"])), "string");
});

/** A WRITE with FUA and PREFLUSH; txId and offset above 2^32 (and below 2^53). */
const WRITE_REQUEST: readonly Field[] = [
  ["magic DSTQ", "44535451"],
  ["command WRITE", "0200"],
  ["flags FUA|PREFLUSH", "0300"],
  ["txId 0x1020304050607", "0706050403020100"],
  ["offset 0x11121314151617", "1716151413121100"],
  ["length 65536", "00000100"],
  ["payloadLength 65536", "00000100"],
];

const writeRequestFields: RequestHeader = {
  command: 2,
  flags: 3,
  txId: 0x1020304050607,
  offset: 0x11121314151617,
  length: 65_536,
  payloadLength: 65_536,
};

Deno.test("a request header encodes to the spec's 32 bytes, field by field", () => {
  const bytes = new Uint8Array(32);
  encodeRequestHeader(new DataView(bytes.buffer), 0, writeRequestFields);
  assertFrame(bytes, WRITE_REQUEST, "WRITE request");
});

Deno.test("the spec's 32 request header bytes decode to their fields, and the next frame starts at byte 32", () => {
  const flush: Field[] = [
    ["magic DSTQ", "44535451"],
    ["command FLUSH", "0300"],
    ["flags", "0000"],
    ["txId 2", "0200000000000000"],
    ["offset", "0000000000000000"],
    ["length", "00000000"],
    ["payloadLength", "00000000"],
  ];
  const bytes = frame(...WRITE_REQUEST, ...flush);
  const view = new DataView(bytes.buffer);
  assert.deepEqual(decodeRequestHeader(view, 0), writeRequestFields);
  assert.deepEqual(decodeRequestHeader(view, 32), {
    command: 3,
    flags: 0,
    txId: 2,
    offset: 0,
    length: 0,
    payloadLength: 0,
  });
});

const READ_REPLY: readonly Field[] = [
  ["magic DSTR", "44535452"],
  ["command READ", "0100"],
  ["reserved", "0000"],
  ["txId 0x1020304050607", "0706050403020100"],
  ["error OK", "00000000"],
  ["payloadLength 4096", "00100000"],
];

const ENOSPC_REPLY: readonly Field[] = [
  ["magic DSTR", "44535452"],
  ["command WRITE", "0200"],
  ["reserved", "0000"],
  ["txId 1", "0100000000000000"],
  ["error ENOSPC", "1c000000"],
  ["payloadLength", "00000000"],
];

Deno.test("a reply header encodes to the spec's 24 bytes, field by field", () => {
  const bytes = new Uint8Array(24).fill(0xee);
  const view = new DataView(bytes.buffer);
  encodeReplyHeader(view, 0, { command: 1, txId: 0x1020304050607, error: 0, payloadLength: 4096 });
  assertFrame(bytes, READ_REPLY, "READ reply");
  encodeReplyHeader(view, 0, { command: 2, txId: 1, error: 28, payloadLength: 0 });
  assertFrame(bytes, ENOSPC_REPLY, "ENOSPC reply");
});

Deno.test("the spec's 24 reply header bytes decode to their fields", () => {
  const read = frame(...READ_REPLY);
  assert.deepEqual(decodeReplyHeader(new DataView(read.buffer), 0), {
    command: 1,
    txId: 0x1020304050607,
    error: 0,
    payloadLength: 4096,
  });
  const enospc = frame(...ENOSPC_REPLY);
  assert.deepEqual(decodeReplyHeader(new DataView(enospc.buffer), 0), {
    command: 2,
    txId: 1,
    error: 28,
    payloadLength: 0,
  });
});

const INFO_PAYLOAD: readonly Field[] = [
  ["size 0x123456789ab000", "00b09a7856341200"],
  ["blockSize 512", "00020000"],
  ["exportFlags READ_ONLY", "01000000"],
];

Deno.test("an INFO payload encodes to the spec's 16 bytes and decodes back from them", () => {
  const info = { sizeBytes: 0x123456789ab000, blockSize: 512, exportFlags: 1 };
  assertFrame(encodeInfo(info), INFO_PAYLOAD, "INFO payload");
  assert.deepEqual(decodeInfo(frame(...INFO_PAYLOAD)), info);
});

Deno.test("a u64 of 2^53 (high word 0x00200000) is refused where the spec says: framing in txId, invalid in sizes", () => {
  const request = frame(...WRITE_REQUEST);
  request.set(frame(["txId 2^53", "0000000000002000"]), 8);
  assert.equal(typeof decodeRequestHeader(new DataView(request.buffer), 0), "string");
  const hello = frame(...SERVER_HELLO);
  hello.set(frame(["size 2^53", "0000000000002000"]), 16);
  assert.equal(typeof decodeServerHello(hello), "string");
  const info = frame(...INFO_PAYLOAD);
  info.set(frame(["size 2^53", "0000000000002000"]), 0);
  assert.equal(typeof decodeInfo(info), "string");
  // 2^53 - 1 is the largest that passes.
  info.set(frame(["size 2^53 - 1", "ffffffffffff1f00"]), 0);
  assert.equal((decodeInfo(info) as { sizeBytes: number }).sizeBytes, 2 ** 53 - 1);
});

// --- the commands table, through validateRequest with literal codes -------------------------

/** A valid request of each command code, as the spec's commands table allows. */
const VALID: Record<number, RequestHeader> = {
  1: { command: 1, flags: 0, txId: 1, offset: 4096, length: 4096, payloadLength: 0 },
  2: { command: 2, flags: 0, txId: 1, offset: 4096, length: 4096, payloadLength: 4096 },
  3: { command: 3, flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 0 },
  4: { command: 4, flags: 0, txId: 1, offset: 4096, length: 4096, payloadLength: 0 },
  5: { command: 5, flags: 0, txId: 1, offset: 4096, length: 4096, payloadLength: 0 },
  6: { command: 6, flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 0 },
  7: { command: 7, flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 0 },
  8: { command: 8, flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 0 },
  9: { command: 9, flags: 0, txId: 1, offset: 0, length: 0, payloadLength: 2 },
};

const errorOf = (header: RequestHeader) => validateRequest(header)?.error ?? 0;

Deno.test("command codes 1 to 9 are known and 0 and 10 answer ENOTSUP (95)", () => {
  for (const header of Object.values(VALID)) {
    assert.equal(errorOf(header), 0, `command ${header.command}`);
  }
  for (const command of [0, 10]) assert.equal(errorOf({ ...VALID[3]!, command }), 95);
});

Deno.test("FUA (1) and PREFLUSH (2) are accepted by commands 2, 4 and 5 only; any other bit is EINVAL (22)", () => {
  for (const [code, header] of Object.entries(VALID)) {
    const takesFlags = code === "2" || code === "4" || code === "5";
    for (const flags of [1, 2, 3]) {
      assert.equal(errorOf({ ...header, flags }), takesFlags ? 0 : 22, `command ${code} ${flags}`);
    }
    assert.equal(errorOf({ ...header, flags: 4 }), 22, `command ${code} flag 4`);
  }
});

Deno.test("ranged commands 1, 2, 4, 5 need a length; the others need offset and length 0 (else EINVAL 22)", () => {
  for (const [code, header] of Object.entries(VALID)) {
    const ranged = code === "1" || code === "2" || code === "4" || code === "5";
    if (ranged) {
      assert.equal(errorOf({ ...header, length: 0, payloadLength: 0 }), 22, `command ${code}`);
    } else {
      assert.equal(errorOf({ ...header, offset: 4096 }), 22, `command ${code} offset`);
      assert.equal(errorOf({ ...header, length: 1 }), 22, `command ${code} length`);
    }
  }
});

Deno.test("length maxima are the spec's: READ and WRITE 32 MiB, DISCARD and WRITE_ZEROES 1 GiB, CONTROL payload 1 to 4096", () => {
  const cases: Array<[command: number, lengthMax: number]> = [
    [1, 33_554_432],
    [2, 33_554_432],
    [4, 1_073_741_824],
    [5, 1_073_741_824],
  ];
  for (const [command, lengthMax] of cases) {
    const at = (length: number) => ({
      ...VALID[command]!,
      length,
      payloadLength: command === 2 ? length : 0,
    });
    assert.equal(errorOf(at(lengthMax)), 0, `command ${command} at ${lengthMax}`);
    assert.equal(errorOf(at(lengthMax + 1)), 22, `command ${command} past ${lengthMax}`);
  }
  assert.equal(errorOf({ ...VALID[9]!, payloadLength: 1 }), 0);
  assert.equal(errorOf({ ...VALID[9]!, payloadLength: 4096 }), 0);
  assert.equal(errorOf({ ...VALID[9]!, payloadLength: 0 }), 22);
  assert.equal(errorOf({ ...VALID[9]!, payloadLength: 4097 }), 22);
});

Deno.test("payloads follow the spec: WRITE carries its length, the others but CONTROL none (else EINVAL 22)", () => {
  assert.equal(errorOf({ ...VALID[2]!, payloadLength: 4095 }), 22);
  for (const code of [1, 3, 4, 5, 6, 7, 8]) {
    assert.equal(errorOf({ ...VALID[code]!, payloadLength: 1 }), 22, `command ${code}`);
  }
});

Deno.test("a successful reply carries the spec's payload: READ its length, INFO 16 bytes, STATUS and CONTROL up to 64 KiB, the rest none", () => {
  assert.equal(expectedReplyPayload(1, 4096), 4096);
  assert.equal(expectedReplyPayload(6, 0), 16);
  for (const code of [8, 9]) assert.equal(expectedReplyPayload(code, 0), -1, `command ${code}`);
  for (const code of [2, 3, 4, 5, 7]) {
    assert.equal(expectedReplyPayload(code, 4096), 0, `command ${code}`);
  }
});
