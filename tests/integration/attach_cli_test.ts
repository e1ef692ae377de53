/**
 * `dst attach` as a user meets it: TCP instead of the default Unix socket, a clean
 * exit on SIGTERM that removes its socket, a clear message where the kernel has no
 * nbd driver for --device, and usage errors that say what to do.
 */

import assert from "node:assert/strict";
import { newDisk, runDst, startAttach, withExport } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

Deno.test({
  name: "attach serves on TCP with --listen, and on a private Unix socket it removes on SIGTERM",
  ignore: missing("nbdinfo"),
  fn: () =>
    withExport("dst-attach-cli-", newDisk("8M"), async (server, dir) => {
      const target = `127.0.0.1:${server.address.port}`;
      const tcp = await startAttach([target, "--listen", "127.0.0.1:0"]);
      try {
        assert.match(tcp.uri, /^nbd:\/\/127\.0\.0\.1:\d+\/$/);
        const info = JSON.parse(await toolOk("nbdinfo", ["--json", tcp.uri]));
        assert.equal(info.exports[0]["export-size"], 8 * 1024 * 1024);
      } finally {
        assert.equal((await tcp.stop("SIGTERM")).code, 0, tcp.log());
      }

      const socket = `${dir}/attach.sock`;
      const unix = await startAttach([target, "--socket", socket]);
      const stat = await Deno.stat(socket);
      assert.equal((stat.mode ?? 0) & 0o777, 0o600, "the socket is private");
      assert.equal((await unix.stop("SIGTERM")).code, 0, unix.log());
      await assert.rejects(
        Deno.stat(socket),
        Deno.errors.NotFound,
        "the socket is removed on exit",
      );
    }),
});

Deno.test("attach explains a missing kernel nbd driver, bad options and an unreachable export", async () => {
  const hasNbd = await Deno.stat("/sys/module/nbd").then(() => true, () => false);
  if (!hasNbd) {
    const device = await runDst(["attach", "127.0.0.1:1", "--device", "/dev/nbd0"]);
    assert.equal(device.code, 1);
    assert.match(device.stderr, /no nbd driver loaded here.*modprobe nbd/);
  }
  const notNbd = await runDst(["attach", "127.0.0.1:1", "--device", "/dev/sda"]);
  assert.equal(notNbd.code, 1);
  assert.match(notNbd.stderr, /--device must name an NBD device such as \/dev\/nbd0/);

  const both = await runDst([
    "attach",
    "127.0.0.1:1",
    "--socket",
    "/tmp/x.sock",
    "--listen",
    ":10809",
  ]);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /give --socket or --listen, not both/);

  const none = await runDst(["attach"]);
  assert.equal(none.code, 2);
  assert.match(none.stderr, /takes one HOST:PORT/);

  const unreachable = await runDst(["attach", "127.0.0.1:1"]);
  assert.equal(unreachable.code, 1);
  assert.match(
    unreachable.stderr,
    /Cannot connect to 127\.0\.0\.1:1: .*is `dst export` running there\?/,
  );
});
