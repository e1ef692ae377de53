/**
 * `--allow` through real processes: an address no rule lets in is refused before
 * the handshake, with the reason; a read-only rule lets a client read and never
 * write; a rule naming a key applies to that key only; CONTROL (array detach)
 * needs admin; a bad rule is a usage error that shows the form. Every case checks
 * the image's bytes.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import {
  exportImage,
  runDst,
  scenario,
  startAttach,
  startDst,
  stopClean,
} from "../helpers/spawn.ts";
import { missing, tool, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

async function keygen(path: string, name: string): Promise<void> {
  const made = await runDst(["keygen", path, "--name", name]);
  assert.equal(made.code, 0, made.stderr);
}

function allZero(bytes: Uint8Array): boolean {
  return bytes.every((byte) => byte === 0);
}

Deno.test("allow: an address no rule lets in is refused with the reason, and writes nothing", () =>
  scenario("dst-allow-", async (dir, track) => {
    const server = track(await exportImage(dir, "disk.img", "8M", "--allow", "10.9.9.0/24"));
    const at = `127.0.0.1:${server.address.port}`;
    const attach = await runDst(["attach", at, "--listen", "127.0.0.1:0"]);
    assert.equal(attach.code, 1);
    assert.match(
      attach.stderr,
      /refused the connection: no --allow rule of this export lets 127\.0\.0\.1 in/,
    );
    const status = await runDst(["status", at]);
    assert.equal(status.code, 1);
    assert.match(status.stdout, /no --allow rule/);
    await stopClean(server, "export");
    assert.match(server.log(), /rule 1: .*10\.9\.9\.0\/24/);
    assert.match(server.log(), /refused: no --allow rule of this export lets 127\.0\.0\.1 in/);
    assert.ok(allZero(await Deno.readFile(`${dir}/disk.img`)));
  }));

Deno.test({
  name:
    "allow: a read-only rule reads but never writes; a rule naming a key applies to that key only",
  ignore: missing("nbdcopy", "nbdinfo"),
  fn: () =>
    scenario("dst-allow-", async (dir, track) => {
      const keys = `${dir}/site.keys`;
      await keygen(keys, "reader");
      await keygen(keys, "writer");
      const server = track(
        await exportImage(
          dir,
          "disk.img",
          "8M",
          "--key",
          keys,
          "--allow",
          "reader@127.0.0.1=ro",
          "--allow",
          "127.0.0.0/8",
        ),
      );
      const at = `127.0.0.1:${server.address.port}`;
      const writer = track(
        await startAttach([at, "--key", keys, "--key-name", "writer", "--listen", "127.0.0.1:0"]),
      );
      const data = randomBytes(MiB);
      await Deno.writeFile(`${dir}/data.bin`, data);
      await toolOk("nbdcopy", [`${dir}/data.bin`, writer.uri]);
      await stopClean(writer, "writer attach");

      const reader = track(
        await startAttach([at, "--key", keys, "--key-name", "reader", "--listen", "127.0.0.1:0"]),
      );
      const info = JSON.parse(await toolOk("nbdinfo", ["--json", reader.uri]));
      assert.equal(info.exports[0]["is_read_only"], true, "served read-only to the ro key");
      await toolOk("nbdcopy", [reader.uri, `${dir}/back.bin`]);
      assertSameBytes((await Deno.readFile(`${dir}/back.bin`)).subarray(0, MiB), data, "it reads");
      await Deno.writeFile(`${dir}/other.bin`, randomBytes(MiB));
      const write = await tool("nbdcopy", [`${dir}/other.bin`, reader.uri]);
      assert.notEqual(write.code, 0, "a write through the ro key fails");
      await stopClean(reader, "reader attach");
      const status =
        JSON.parse((await runDst(["status", at, "--key", keys, "--json"])).stdout)[0].status;
      assert.equal(status.writeGeneration, 1, "only the writer was ever granted writing");
      await stopClean(server, "export");
      assertSameBytes((await Deno.readFile(`${dir}/disk.img`)).subarray(0, MiB), data, "the image");
    }),
});

Deno.test("allow: CONTROL needs admin (array detach without it is refused, saying so); a bad rule shows the form", () =>
  scenario("dst-allow-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await exportImage(dir, "b.img", "4M"));
    const legs = [`127.0.0.1:${a.address.port}`, `127.0.0.1:${b.address.port}`];
    const mirror = track(
      await startDst(
        [
          "array",
          "mirror",
          ...legs,
          "--export",
          "127.0.0.1:0",
          "--state",
          `${dir}/state`,
          "--allow",
          "127.0.0.1=rw",
        ],
        / on (\S+)\n/,
      ),
    );
    const at = mirror.ready[1]!;
    const detach = await runDst(["array", "detach", at, legs[1]!]);
    assert.equal(detach.code, 1);
    assert.match(detach.stderr, /refused "detach": it needs admin access/);
    const status = JSON.parse((await runDst(["status", at, "--json"])).stdout)[0].status;
    assert.ok(
      status.array.members.every((leg: { state: string }) => leg.state !== "detached"),
      "no leg was detached",
    );
    await stopClean(mirror, "mirror");

    const bad = await runDst(["export", `${dir}/a.img`, "--allow", "10.0.0.0/33"]);
    assert.equal(bad.code, 2);
    assert.match(
      bad.stderr,
      /--allow "10\.0\.0\.0\/33": prefix length 33 is not in 0-32; write \[KEYNAME@\]CIDR/,
    );
  }));
