/**
 * A client pointed at the other protocol's port, as a new user does it: `dst export`
 * serves DST on --listen and NBD on --nbd, and each port answers the other protocol's
 * client at once with a message that names the right port, instead of a 10 s hang or
 * "connection closed after 18 of 112 bytes".
 *
 * - nbdinfo at the DST port: the NBD client waits for the server to speak, so after
 *   a short grace of silence the export greets it as an NBD server and refuses
 *   its options with the message, which nbdinfo prints.
 * - `dst status` and `dst attach` at the NBD port: the DST client reads "NBDMAGIC" where
 *   the server hello's magic belongs and fails at once, naming the mix-up.
 * Each export logs one line naming it.
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
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

Deno.test({
  name: "nbdinfo at a DST port is told at once that it is a DST port, and which port to use",
  ignore: missing("nbdinfo"),
  fn: () =>
    withExport("dst-mixup-nbdinfo-", newDisk("8M"), async (server) => {
      const target = `nbd://127.0.0.1:${server.address.port}/`;
      const started = performance.now();
      const result = await tool("nbdinfo", [target]);
      const elapsedMs = performance.now() - started;
      assert.notEqual(result.code, 0, result.stdout);
      assert.ok(elapsedMs < FAST_MS, `nbdinfo took ${Math.round(elapsedMs)} ms`);
      assert.match(result.stderr, /this is a DST port \(dst export --listen\)/);
      assert.match(result.stderr, /NBD clients connect to the export's --nbd port/);
      assert.match(result.stderr, /dst attach HOST:PORT/);
      await eventually(FAST_MS, "the export's log line", () => /NBD client/.test(server.log()));
      assert.equal(server.log().match(/NBD client/g)?.length, 1, server.log());

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
        assert.equal(result.code, 1, `dst ${args[0]}: ${result.stdout}${result.stderr}`);
        assert.match(result.stderr, message, `dst ${args[0]}`);
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
