/**
 * dialExport() against a server that is not a DST export: an NBD server speaks first,
 * "NBDMAGIC" where the DST server hello (or key share) has its magic. The client names
 * the mix-up at once, with and without a key, rather than reporting a short read.
 */

import assert from "node:assert/strict";
import { frame, ScriptedConn } from "../../tests/helpers/golden.ts";
import { DstError } from "../lib/errors.ts";
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
