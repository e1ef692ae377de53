/**
 * A filesystem on a DST disk: nbdfuse exposes the attached export as a file,
 * mkfs.ext4 formats it, debugfs writes files into it; then the attach process and
 * the export are both stopped and started again, and e2fsck -fn finds the
 * filesystem clean and every file reads back identical.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { withFuseDisk } from "../helpers/fuse_disk.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { startAttach, startExport } from "../helpers/spawn.ts";
import { missing, tool, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

Deno.test({
  name:
    "ext4 on an attached export survives a restart of attach and export: e2fsck clean, files identical",
  ignore: missing("nbdfuse", "mkfs.ext4", "e2fsck", "debugfs"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "dst-ext4-" });
    const image = `${dir}/disk.img`;
    const files = new Map([["small.txt", new TextEncoder().encode("hello from dst\n")], [
      "big.bin",
      randomBytes(3 * MiB + 17),
    ]]);
    for (const [name, bytes] of files) await Deno.writeFile(`${dir}/${name}`, bytes);
    let server = await startExport([image, "--create", "64M", "--listen", "127.0.0.1:0"]);
    const target = `127.0.0.1:${server.address.port}`;
    let attach = await startAttach([target, "--socket", `${dir}/nbd.sock`]);
    try {
      await withFuseDisk(attach.uri, `${dir}/mnt`, async (disk) => {
        await toolOk("mkfs.ext4", ["-q", "-F", disk]);
        for (const name of files.keys()) {
          await toolOk("debugfs", ["-w", "-R", `write ${dir}/${name} ${name}`, disk]);
        }
      });
      assert.equal((await attach.stop("SIGTERM")).code, 0, attach.log());
      assert.equal((await server.stop("SIGTERM")).code, 0, server.log());

      server = await startExport([image, "--listen", target]);
      attach = await startAttach([target, "--socket", `${dir}/nbd.sock`]);
      await withFuseDisk(attach.uri, `${dir}/mnt`, async (disk) => {
        const check = await tool("e2fsck", ["-fn", disk]);
        assert.equal(check.code, 0, check.stdout + check.stderr);
        for (const [name, bytes] of files) {
          await toolOk("debugfs", ["-R", `dump ${name} ${dir}/out-${name}`, disk]);
          assertSameBytes(await Deno.readFile(`${dir}/out-${name}`), bytes, name);
        }
      });
    } finally {
      await attach.stop("SIGKILL");
      await server.stop("SIGKILL");
      await Deno.remove(dir, { recursive: true });
    }
  },
});
