/**
 * dialExport() against a server that is not a DST export: an NBD server speaks first,
 * "NBDMAGIC" where the DST server hello (or key share) has its magic. The client names
 * the mix-up at once, with and without a key, rather than reporting a short read.
 *
 * A DST export greets as NBD too, but only a connection that sent nothing for 2 s (an
 * NBD client at its DST port): a DST client whose hello came that late hears the
 * greeting, then a server hello of status HELLO_TOO_LATE, and connects again, while a
 * real NBD server is still named at once.
 *
 * And against a host that never answers the connect (down, or behind a firewall that
 * drops packets): the client gives up after CONNECT_TIMEOUT_MS, not the kernel's two
 * minutes of resent SYNs, and says what to check.
 */

import assert from "node:assert/strict";
import { concat } from "../../tests/helpers/bytes.ts";
import { frame, PacedConn, ScriptedConn } from "../../tests/helpers/golden.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { CONNECT_TIMEOUT_MS, HANDSHAKE_TIMEOUT_MS, NBD_GREETING_GRACE_MS } from "../constants.ts";
import { DstError } from "../lib/errors.ts";
import { encodeServerHello } from "../protocol/mod.ts";
import type { ByteConn } from "../transport/byte_conn.ts";
import { Key } from "../lib/key_file.ts";
import { dialExport } from "./dial.ts";

/** An NBD server's greeting (doc/proto.md): NBDMAGIC, IHAVEOPT, handshake flags. */
const NBD_GREETING = frame(
  ["NBDMAGIC", "4e42444d41474943"],
  ["IHAVEOPT", "49484156454f5054"],
  ["handshake flags FIXED_NEWSTYLE|NO_ZEROES", "0003"],
);

const KEY = new Key("site", new Uint8Array(32).fill(7), "0123456789abcdef", 1);

for (const key of [undefined, KEY]) {
  Deno.test(`a DST client ${key ? "with" : "without"} a key that reaches an NBD server says so, naming the port to use`, async () => {
    const conn = new ScriptedConn(NBD_GREETING);
    const error = await dialExport({ hostname: "10.0.0.7", port: 10809 }, {
      dial: () => Promise.resolve(conn),
      key,
    }).then(() => null, (error) => error);
    assert.ok(error instanceof DstError, String(error));
    assert.equal(error.code, "HANDSHAKE");
    assert.equal(
      error.message,
      "10.0.0.7:10809 is an NBD server, not a DST export: point dst at the export's DST " +
        "port (--listen), or use an NBD client there",
    );
    assert.ok(conn.closed, "the connection is closed");
  });
}

/** Lets the dial run as far as it can without more input or time. */
const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

/**
 * `dialing` fails with a DstError of `code` and `message`: not before `ms` of `clock`
 * have passed, and at once then.
 */
async function assertFailsAfter(
  clock: ManualClock,
  dialing: Promise<unknown>,
  ms: number,
  code: string,
  message: string,
): Promise<void> {
  const outcome = dialing.then(() => null, (error: unknown) => error);
  let settled = false;
  void outcome.then(() => settled = true);
  await settle();
  clock.advance(ms - 1);
  await settle();
  assert.equal(settled, false, "it still has time");
  clock.advance(1);
  await settle();
  assert.ok(settled, "it gave up");
  const error = await outcome;
  assert.ok(error instanceof DstError, `a DstError, not ${String(error)}`);
  assert.equal(error.code, code);
  assert.equal(error.message, message);
}

Deno.test("a connect that gets no answer fails after CONNECT_TIMEOUT_MS, saying what to check, and a connection that completes later is closed", async () => {
  const clock = new ManualClock();
  const answer = Promise.withResolvers<ByteConn>();
  let signal: AbortSignal | undefined;
  const dialing = dialExport({ hostname: "10.0.0.7", port: 1025 }, {
    clock,
    dial: (_address, abort?: AbortSignal) => {
      signal = abort;
      return answer.promise;
    },
  });
  await assertFailsAfter(
    clock,
    dialing,
    CONNECT_TIMEOUT_MS,
    "CONNECT",
    "Cannot connect to 10.0.0.7:1025: no answer within 10 s (is the host up, its name resolving, and is a " +
      "firewall dropping its packets?)",
  );
  assert.equal(signal?.aborted, true, "the dial is told to stop");
  // A dialer that ignores the signal and connects anyway: that connection is not leaked.
  const late = new ScriptedConn();
  answer.resolve(late);
  await settle();
  assert.ok(late.closed, "the late connection is closed");
});

Deno.test("a connect that fails after its time ran out changes nothing", async () => {
  const clock = new ManualClock();
  const answer = Promise.withResolvers<ByteConn>();
  const dialing = dialExport({ hostname: "10.0.0.7", port: 1025 }, {
    clock,
    dial: () => answer.promise,
  });
  await settle();
  clock.advance(CONNECT_TIMEOUT_MS);
  await assert.rejects(dialing, /no answer within 10 s/);
  answer.reject(new Error("aborted")); // unhandled, it would fail this test
  await settle();
});

/** A connection whose pending read fails when it is closed, as a Deno TCP connection's does. */
class CanceledOnClose extends PacedConn {
  override async read(into: Uint8Array): Promise<number | null> {
    const n = await super.read(into);
    if (this.closed) throw new Error("operation canceled");
    return n;
  }
}

for (const key of [undefined, KEY]) {
  Deno.test(`a handshake ${key ? "with" : "without"} a key that gets no answer within HANDSHAKE_TIMEOUT_MS says so, not that the export may not be DST's`, async () => {
    const clock = new ManualClock();
    const conn = new CanceledOnClose(); // connects, then never answers (a stopped export)
    const dialing = dialExport({ hostname: "127.0.0.1", port: 13025 }, {
      clock,
      key,
      dial: () => Promise.resolve(conn),
    });
    await assertFailsAfter(
      clock,
      dialing,
      HANDSHAKE_TIMEOUT_MS,
      "HANDSHAKE",
      "Handshake with 127.0.0.1:13025 failed: no answer within 10 s (is the export stopped " +
        "or overloaded?)",
    );
    assert.ok(conn.closed);
  });
}

Deno.test("a handshake whose connection the other side closes early still asks whether it is a DST export", async () => {
  const conn = new PacedConn();
  conn.feed(new Uint8Array(3));
  conn.end();
  await assert.rejects(
    dialExport({ hostname: "127.0.0.1", port: 13025 }, {
      clock: new ManualClock(),
      dial: () => Promise.resolve(conn),
    }),
    (error: Error) =>
      error.message ===
        "Handshake with 127.0.0.1:13025 failed: connection closed after 3 of 8 bytes (is it " +
          "a DST export, not NBD or another service?)",
  );
});

const NBD_MESSAGE = "10.0.0.7:10809 is an NBD server, not a DST export: point dst at the " +
  "export's DST port (--listen), or use an NBD client there";

Deno.test("a real NBD server is named at once, without waiting for more than its greeting", async () => {
  const conn = new PacedConn();
  conn.feed(NBD_GREETING); // and nothing more, ever: it waits for our client flags
  await assert.rejects(
    dialExport({ hostname: "10.0.0.7", port: 10809 }, {
      clock: new ManualClock(),
      dial: () => Promise.resolve(conn),
    }),
    (error: Error) => error.message === NBD_MESSAGE,
  );
  assert.ok(conn.closed);
});

Deno.test("a greeting that comes only after 2 s and then the server closes is said as it is: an NBD server slow to greet, or an export that took our hello for late", async () => {
  const clock = new ManualClock();
  const conn = new LateConn(clock, NBD_GREETING_GRACE_MS, NBD_GREETING);
  await assert.rejects(
    dialExport({ hostname: "10.0.0.7", port: 10809 }, {
      clock,
      dial: () => Promise.resolve(conn),
    }),
    (error: Error) =>
      error.message ===
        "10.0.0.7:10809 greeted us as an NBD server only 2.0 s after we connected, then " +
          "closed: an NBD server slow to greet, or a DST export that took our hello, late, " +
          "for an NBD client's (a loaded machine, or a slow link?)",
  );
});

Deno.test("a late greeting and then silence until the handshake's time runs out says the time ran out", async () => {
  const clock = new ManualClock();
  const conn = new CanceledOnClose();
  const dialing = dialExport({ hostname: "10.0.0.7", port: 1025 }, {
    clock,
    dial: () => Promise.resolve(conn),
  });
  await settle(); // connected, hello sent
  clock.advance(2_500);
  conn.feed(NBD_GREETING.subarray(0, 8)); // NBDMAGIC 2.5 s in, then nothing
  await assertFailsAfter(
    clock,
    dialing,
    HANDSHAKE_TIMEOUT_MS - 2_500,
    "HANDSHAKE",
    "Handshake with 10.0.0.7:1025 failed: no answer within 10 s (is the export stopped " +
      "or overloaded?)",
  );
});

/** A scripted connection whose answer comes `ms` after the connect: its first read advances the clock. */
class LateConn extends ScriptedConn {
  #waited = false;
  constructor(
    private readonly clock: ManualClock,
    private readonly ms: number,
    ...input: Uint8Array[]
  ) {
    super(...input);
  }

  override read(into: Uint8Array): Promise<number | null> {
    if (!this.#waited) {
      this.#waited = true;
      this.clock.advance(this.ms);
    }
    return super.read(into);
  }
}

/** What a DST export sends a DST client whose hello came after the grace (protocol README, "Negotiation"). */
const TOO_LATE_ANSWER = concat(
  NBD_GREETING,
  frame(
    ["magic DSTS", "44535453"],
    ["version 1", "0100"],
    ["status HELLO_TOO_LATE", "0700"],
    ["features", "00000000"],
    ["authMethod, protection", "0100 0100"],
    ["size .. exportInstance", "00".repeat(96)],
    ["reason count 4", "0400"],
    ["reason", "6c617465"],
  ),
);

const OK_HELLO = encodeServerHello({
  version: 1,
  status: 0,
  features: 0,
  authMethod: 1,
  protection: 1,
  sizeBytes: 1 << 20,
  blockSize: 4096,
  exportFlags: 0,
  payloadBytesMax: 1 << 20,
  inFlightMax: 8,
  exportId: new Uint8Array(16).fill(1),
  nonce: new Uint8Array(16),
  writeGeneration: 1,
  writeEpoch: new Uint8Array(16).fill(2),
  exportInstance: new Uint8Array(16).fill(3),
});

/**
 * A dialer whose first `late` connections are answered only after the grace (our hello
 * was late: a loaded machine), as the export answers a late hello; then OK_HELLO.
 */
function slowFirst(clock: ManualClock, late: number) {
  const conns: ScriptedConn[] = [];
  const dial = () => {
    const tooLate = conns.length < late;
    const conn = tooLate
      ? new LateConn(clock, NBD_GREETING_GRACE_MS, TOO_LATE_ANSWER)
      : new ScriptedConn(OK_HELLO);
    conns.push(conn);
    return Promise.resolve(conn);
  };
  return { dial, conns };
}

Deno.test("a DST client that the export took for NBD's, its hello being late, connects again", async () => {
  const clock = new ManualClock();
  const { dial, conns } = slowFirst(clock, 1);
  const link = await dialExport({ hostname: "10.0.0.7", port: 1025 }, { clock, dial });
  assert.equal(link.hello.status, 0);
  assert.equal(conns.length, 2, "a second connection");
  assert.ok(conns[0]!.closed, "the first is closed");
});

Deno.test("a keyed DST client that the export took for NBD's tells it from an NBD server too", async () => {
  const clock = new ManualClock();
  const { dial, conns } = slowFirst(clock, 2);
  const error = await dialExport({ hostname: "10.0.0.7", port: 1025 }, { clock, dial, key: KEY })
    .then(() => null, (error) => error);
  assert.ok(error instanceof DstError, String(error));
  assert.equal(error.code, "HELLO_TOO_LATE");
  assert.equal(conns.length, 2);
});

Deno.test("a DST client whose hello is late on a second connection too gives up, saying why", async () => {
  const clock = new ManualClock();
  const { dial, conns } = slowFirst(clock, 2);
  const error = await dialExport({ hostname: "10.0.0.7", port: 1025 }, { clock, dial })
    .then(() => null, (error) => error);
  assert.ok(error instanceof DstError, String(error));
  assert.equal(error.code, "HELLO_TOO_LATE");
  assert.equal(
    error.message,
    "10.0.0.7:1025 is a DST export, but took our connection for an NBD client's, twice: our " +
      "hello reached it more than 2 s after connecting (a loaded machine, or a slow link?)",
  );
  assert.equal(conns.length, 2, "no third try");
  assert.ok(conns.every((conn) => conn.closed));
});
