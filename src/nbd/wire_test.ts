/**
 * Pins every number of wire.ts to NBD's protocol document (doc/proto.md, which
 * wire.ts cites): magics, handshake and client flags, option and option reply types,
 * info types, transmission flags, command types and flags, error values, structured
 * reply types and flags, and the header layouts. Each expected value is a literal
 * copied from that document (bits written as the bit number it gives), never a
 * constant of the code.
 *
 * Why: the server's other tests talk to it through the same constants it uses, so a
 * wrong number would pass them while qemu, the kernel and libnbd, which follow the
 * document, could not talk to it. Here a changed constant fails a test. Whole objects
 * are compared, so a name added to the code without its number checked here fails too.
 */

import assert from "node:assert/strict";
import * as limits from "../constants.ts";
import * as wire from "./wire.ts";

Deno.test("the magics are NBD's: NBDMAGIC, IHAVEOPT, option reply, request, simple and structured reply", () => {
  assert.equal(wire.NBDMAGIC, 0x4e42444d41474943n);
  assert.equal(wire.IHAVEOPT, 0x49484156454f5054n);
  assert.equal(wire.OPTION_REPLY_MAGIC, 0x0003e889045565a9n);
  assert.equal(wire.REQUEST_MAGIC, 0x25609513);
  assert.equal(wire.SIMPLE_REPLY_MAGIC, 0x67446698);
  assert.equal(wire.STRUCTURED_REPLY_MAGIC, 0x668e33ef);
});

Deno.test("the two 64-bit magics spell NBDMAGIC and IHAVEOPT in ASCII, big-endian", () => {
  const spell = (magic: bigint) => {
    const view = new DataView(new ArrayBuffer(8));
    view.setBigUint64(0, magic);
    return new TextDecoder("ascii").decode(new Uint8Array(view.buffer));
  };
  assert.equal(spell(wire.NBDMAGIC), "NBDMAGIC");
  assert.equal(spell(wire.IHAVEOPT), "IHAVEOPT");
});

Deno.test("handshake flags and client flags are NBD's: FIXED_NEWSTYLE bit 0, NO_ZEROES bit 1", () => {
  assert.deepEqual({ ...wire.HandshakeFlag }, { FIXED_NEWSTYLE: 2 ** 0, NO_ZEROES: 2 ** 1 });
  assert.deepEqual({ ...wire.ClientFlag }, { FIXED_NEWSTYLE: 2 ** 0, NO_ZEROES: 2 ** 1 });
});

Deno.test("option types are NBD's: EXPORT_NAME 1, ABORT 2, LIST 3, STARTTLS 5, INFO 6, GO 7, STRUCTURED_REPLY 8, meta contexts 9 and 10, EXTENDED_HEADERS 11", () => {
  assert.deepEqual({ ...wire.Option }, {
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
  });
});

Deno.test("option reply types are NBD's: ACK 1, SERVER 2, INFO 3, errors 2^31 + 1, 2, 3, 6, 7, 9", () => {
  assert.deepEqual({ ...wire.OptionReply }, {
    ACK: 1,
    SERVER: 2,
    INFO: 3,
    ERR_UNSUP: 2_147_483_649,
    ERR_POLICY: 2_147_483_650,
    ERR_INVALID: 2_147_483_651,
    ERR_UNKNOWN: 2_147_483_654,
    ERR_SHUTDOWN: 2_147_483_655,
    ERR_TOO_BIG: 2_147_483_657,
  });
});

Deno.test("info types are NBD's: EXPORT 0, NAME 1, DESCRIPTION 2, BLOCK_SIZE 3", () => {
  assert.deepEqual({ ...wire.Info }, { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 });
});

Deno.test("transmission flags are NBD's bits: HAS_FLAGS 0, READ_ONLY 1, SEND_FLUSH 2, SEND_FUA 3, ROTATIONAL 4, SEND_TRIM 5, SEND_WRITE_ZEROES 6, SEND_DF 7, CAN_MULTI_CONN 8, SEND_FAST_ZERO 11", () => {
  assert.deepEqual({ ...wire.TransmissionFlag }, {
    HAS_FLAGS: 2 ** 0,
    READ_ONLY: 2 ** 1,
    SEND_FLUSH: 2 ** 2,
    SEND_FUA: 2 ** 3,
    ROTATIONAL: 2 ** 4,
    SEND_TRIM: 2 ** 5,
    SEND_WRITE_ZEROES: 2 ** 6,
    SEND_DF: 2 ** 7,
    CAN_MULTI_CONN: 2 ** 8,
    SEND_FAST_ZERO: 2 ** 11,
  });
});

Deno.test("command types are NBD's: READ 0, WRITE 1, DISC 2, FLUSH 3, TRIM 4, CACHE 5, WRITE_ZEROES 6, BLOCK_STATUS 7", () => {
  assert.deepEqual({ ...wire.Cmd }, {
    READ: 0,
    WRITE: 1,
    DISC: 2,
    FLUSH: 3,
    TRIM: 4,
    CACHE: 5,
    WRITE_ZEROES: 6,
    BLOCK_STATUS: 7,
  });
});

Deno.test("command flags are NBD's bits: FUA 0, NO_HOLE 1, DF 2, REQ_ONE 3, FAST_ZERO 4", () => {
  assert.deepEqual({ ...wire.CmdFlag }, {
    FUA: 2 ** 0,
    NO_HOLE: 2 ** 1,
    DF: 2 ** 2,
    REQ_ONE: 2 ** 3,
    FAST_ZERO: 2 ** 4,
  });
});

Deno.test("error values are NBD's: EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28, EOVERFLOW 75, ENOTSUP 95, ESHUTDOWN 108", () => {
  assert.deepEqual({ ...wire.NbdError }, {
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

Deno.test("structured reply types are NBD's: NONE 0, OFFSET_DATA 1, ERROR 2^15 + 1; the DONE flag is bit 0", () => {
  assert.deepEqual({ ...wire.ReplyType }, { NONE: 0, OFFSET_DATA: 1, ERROR: 32_769 });
  assert.equal(wire.REPLY_FLAG_DONE, 2 ** 0);
});

Deno.test("the request header is 28 bytes: magic, flags, type, cookie, offset, length", () => {
  assert.deepEqual({ ...wire.RequestLayout }, {
    magic: 0,
    flags: 4,
    type: 6,
    cookie: 8,
    offset: 16,
    length: 24,
    SIZE: 28,
  });
});

Deno.test("the simple reply is 16 bytes: magic, error, cookie", () => {
  assert.deepEqual({ ...wire.SimpleReplyLayout }, { magic: 0, error: 4, cookie: 8, SIZE: 16 });
});

Deno.test("a structured reply chunk header is 20 bytes: magic, flags, type, cookie, length; OFFSET_DATA's payload is an offset, then data at 8", () => {
  assert.deepEqual({ ...wire.StructuredReplyLayout }, {
    magic: 0,
    flags: 4,
    type: 6,
    cookie: 8,
    length: 16,
    SIZE: 20,
  });
  assert.deepEqual({ ...wire.OffsetDataLayout }, { offset: 0, data: 8 });
});

Deno.test("the advertised block sizes are NBD's defaults: minimum 1, preferred 4096, maximum payload 2^25", () => {
  assert.equal(wire.BLOCK_SIZE_MIN, 1);
  assert.equal(wire.BLOCK_SIZE_PREFERRED, 4096);
  assert.equal(wire.BLOCK_SIZE_MAX, 33_554_432);
});

Deno.test("the default NBD port is NBD's registered 10809", () => {
  assert.equal(limits.NBD_PORT_DEFAULT, 10809);
});
