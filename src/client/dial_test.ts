/**
 * dialExport() against a server that is not a DST export: an NBD server speaks first,
 * "NBDMAGIC" where the DST server hello (or key share) has its magic. The client names
 * the mix-up at once, with and without a key, rather than reporting a short read.
 *
 * And against a host that never answers the connect (down, or behind a firewall that
 * drops packets): the client gives up after CONNECT_TIMEOUT_MS, not the kernel's two
 * minutes of resent SYNs, and says what to check.
 */

import assert from "node:assert/strict";
import { frame, ScriptedConn } from "../../tests/helpers/golden.ts";
import { ManualClock } from "../../tests/helpers/manual_clock.ts";
import { CONNECT_TIMEOUT_MS } from "../constants.ts";
import { DstError } from "../lib/errors.ts";
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
  }).then(() => null, (error: unknown) => error);
  let settled = false;
  void dialing.then(() => settled = true);
  await settle();
  clock.advance(CONNECT_TIMEOUT_MS - 1);
  await settle();
  assert.equal(settled, false, "the connect still has time");
  clock.advance(1);
  await settle();
  assert.ok(settled, "the connect gave up");
  const error = await dialing;
  assert.ok(error instanceof DstError, `a DstError, not ${String(error)}`);
  assert.equal(error.code, "CONNECT");
  assert.equal(
    error.message,
    "Cannot connect to 10.0.0.7:1025: no answer within 10 s (is the host up, and is a " +
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
