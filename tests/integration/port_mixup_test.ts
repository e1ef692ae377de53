/**
 * A client pointed at the other protocol's port, as a new user does it: `dst export`
 * serves DST on --listen and NBD on --nbd, and each port answers the other protocol's
 * client at once with a message that names the right port, instead of a 10 s hang or
 * "connection closed after 18 of 112 bytes".
 *
 * - nbdinfo and qemu-img at the DST port: an NBD client waits for the server to speak,
 *   so after a short grace of silence the export greets it as an NBD server and refuses
 *   its options with the message, which the client prints (qemu-img as "server
 *   reported: ...", libnbd in its debug output or, in later versions, its error).
 * - `dst status` and `dst attach` at the NBD port: the DST client reads "NBDMAGIC" where
 *   the server hello's magic belongs and fails at once, naming the mix-up.
 * Each export logs one line naming it.
 *
 * And a DST client whose hello comes after that grace (a loaded machine, a slow link),
 * greeted as NBD's: the export then answers its hello with HELLO_TOO_LATE, so the client
 * is not told it reached an NBD server, and connects again.
 */

import assert from "node:assert/strict";
import type { Dialer } from "../../src/client/dial.ts";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { NBD_GREETING_GRACE_MS } from "../../src/constants.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { eventually } from "../helpers/frame_fuzz.ts";
import { newDisk, runDst, withExport } from "../helpers/spawn.ts";
import { missing, tool } from "../helpers/tools.ts";

/** Far below the 10 s a side waits for a handshake before giving up. */
const FAST_MS = 5_000;

/** `HOST:PORT` of an `nbd://HOST:PORT/` URI. */
function hostPort(uri: string): string {
  const match = uri.match(/^nbd:\/\/([^/]+)\/?$/);
  assert.ok(match !== null, `an NBD URI: ${uri}`);
  return match[1]!;
}

/** What the export tells an NBD client at its DST port, in the NBD option error. */
const WRONG_PORT = "this is a DST port (dst export --listen); NBD clients connect to the " +
  "export's --nbd port, or run dst attach HOST:PORT on the client machine";

Deno.test({
  name:
    "nbdinfo and qemu-img at a DST port are told at once that it is a DST port, and which port to use",
  ignore: missing("nbdinfo", "qemu-img"),
  fn: () =>
    withExport("dst-mixup-nbdinfo-", newDisk("8M"), async (server) => {
      const target = `nbd://127.0.0.1:${server.address.port}/`;
      const clients: Array<[string, string[]]> = [
        // libnbd 1.14 keeps a server's error text for its debug output (LIBNBD_DEBUG=1);
        // later versions print it in the error as well.
        ["env", ["LIBNBD_DEBUG=1", "nbdinfo", target]],
        // qemu prints it as a hint: "server reported: ...".
        ["qemu-img", ["info", target]],
      ];
      for (const [command, args] of clients) {
        const started = performance.now();
        const result = await tool(command, args);
        const elapsedMs = performance.now() - started;
        const what = `${command} ${args.join(" ")}`;
        assert.notEqual(result.code, 0, `${what}: ${result.stdout}`);
        assert.ok(elapsedMs < FAST_MS, `${what} took ${Math.round(elapsedMs)} ms`);
        assert.ok(result.stderr.includes(WRONG_PORT), `${what}:\n${result.stderr}`);
      }
      await eventually(
        FAST_MS,
        "the export's log lines",
        () => (server.log().match(/NBD client at the DST port/g)?.length ?? 0) >= 2,
      );
      assert.equal(server.log().match(/NBD client at the DST port/g)?.length, 2, server.log());

      // A DST client, which sends its hello at once, is served as ever.
      const client = await RemoteDevice.connect(server.address, { log: quiet });
      assert.equal(client.info.sizeBytes, 8 * 1024 * 1024);
      await client.close();
    }),
});

Deno.test("dst status and dst attach at an NBD port fail at once, naming the mix-up", async () => {
  await withExport(
    "dst-mixup-status-",
    (dir) => [...newDisk("8M")(dir), "--nbd", "127.0.0.1:0"],
    async (server) => {
      assert.ok(server.nbdUri !== null);
      const nbd = hostPort(server.nbdUri);
      const message = new RegExp(
        `${nbd} is an NBD server, not a DST export: point dst at the export's DST port ` +
          `\\(--listen\\), or use an NBD client there`,
      );
      for (const args of [["status", nbd], ["attach", nbd, "--listen", "127.0.0.1:0"]]) {
        const started = performance.now();
        const result = await runDst(args);
        const elapsedMs = performance.now() - started;
        // status lists an export it cannot reach under "unreachable:"; attach reports on stderr.
        const output = result.stdout + result.stderr;
        assert.equal(result.code, 1, `dst ${args[0]}: ${output}`);
        assert.match(output, message, `dst ${args[0]}`);
        // The time to start a CLI is in it; a hang would be the 10 s handshake timeout.
        assert.ok(elapsedMs < FAST_MS, `dst ${args[0]} took ${Math.round(elapsedMs)} ms`);
      }
      await eventually(
        FAST_MS,
        "the export's log lines",
        () => (server.log().match(/a DST client at the NBD port/g)?.length ?? 0) >= 2,
      );
      assert.match(server.log(), /DST clients connect to the export's --listen port/);
    },
  );
});

Deno.test("a DST client whose hello comes after the grace is not taken for an NBD client's: it connects again", async () => {
  await withExport("dst-mixup-late-", newDisk("8M"), async (server) => {
    let dials = 0;
    // The first connection's hello goes out 500 ms after the export greeted it as NBD's.
    const dial: Dialer = async (address) => {
      dials += 1;
      const conn = await Deno.connect({ hostname: address.hostname, port: address.port });
      if (dials === 1) {
        await new Promise((resolve) => setTimeout(resolve, NBD_GREETING_GRACE_MS + 500));
      }
      return conn;
    };
    const client = await RemoteDevice.connect(server.address, { dial, log: quiet });
    try {
      assert.equal(dials, 2, "connected on the second try");
      assert.equal(client.info.sizeBytes, 8 * 1024 * 1024);
    } finally {
      await client.close();
    }
    await eventually(
      FAST_MS,
      "the export's log line",
      () => /a DST client's hello came after/.test(server.log()),
    );
    assert.doesNotMatch(server.log(), /NBD client at the DST port/);
  });
});
