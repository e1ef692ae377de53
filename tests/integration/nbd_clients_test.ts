/**
 * `dst attach` and `dst export --nbd` with real NBD clients: nbdinfo sees the size
 * and exactly the flags advertised (also with --list); nbdcopy copies 64 MiB in and
 * out unchanged; qemu-img compare agrees; nbdsh gets EINVAL for a read past the end,
 * ENOSPC for a write past it and EPERM for a write to a read-only export, and the
 * same connection then reads correctly.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { newDisk, startAttach, withExport } from "../helpers/spawn.ts";
import { assertImagesIdentical, missing, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

async function nbdinfo(uri: string, ...flags: string[]): Promise<Record<string, unknown>> {
  return JSON.parse(await toolOk("nbdinfo", ["--json", ...flags, uri]));
}

Deno.test({
  name:
    "nbdinfo reports the size and exactly the advertised flags, through attach and export --nbd",
  ignore: missing("nbdinfo"),
  fn: () =>
    withExport(
      "dst-nbdinfo-",
      (dir) => [...newDisk("16M")(dir), "--nbd", "127.0.0.1:0"],
      async (server) => {
        const attach = await startAttach([`127.0.0.1:${server.address.port}`, "--name", "disk0"]);
        try {
          assert.ok(server.nbdUri !== null);
          for (const uri of [attach.uri, server.nbdUri]) {
            const info = await nbdinfo(uri);
            const [e] = info.exports as Array<Record<string, unknown>>;
            assert.equal(e!["export-size"], 16 * MiB, uri);
            assert.equal(e!.is_read_only, false);
            assert.equal(e!.can_flush, true);
            assert.equal(e!.can_fua, true);
            assert.equal(e!.can_trim, true);
            assert.equal(e!.can_zero, true);
            assert.equal(e!.can_multi_conn, true);
            assert.equal(e!.can_fast_zero, false);
            assert.equal(e!.can_df, false);
            assert.equal(e!.can_cache, false);
            assert.equal(e!.block_size_minimum, 1);
            assert.equal(e!.block_size_preferred, 4096);
            assert.equal(e!.block_size_maximum, 32 * MiB);
          }
          const listed = await nbdinfo(attach.uri, "--list");
          const names = (listed.exports as Array<Record<string, unknown>>).map((e) =>
            e["export-name"]
          );
          assert.deepEqual(names, ["disk0"]);
          assert.match(attach.uri, /^nbd\+unix:\/\/\/disk0\?socket=/);
        } finally {
          assert.equal((await attach.stop("SIGTERM")).code, 0, attach.log());
        }
      },
    ),
});

Deno.test({
  name:
    "a read-only export shows read-only over NBD and nbdsh gets EPERM for a write, then reads fine",
  ignore: missing("nbdinfo", "nbdsh"),
  fn: () =>
    withExport("dst-nbd-ro-", async (dir) => {
      await Deno.writeFile(`${dir}/disk.img`, randomBytes(MiB));
      return [`${dir}/disk.img`, "--read-only", "--listen", "127.0.0.1:0"];
    }, async (server, dir) => {
      const attach = await startAttach([`127.0.0.1:${server.address.port}`]);
      try {
        const [e] = (await nbdinfo(attach.uri)).exports as Array<Record<string, unknown>>;
        assert.equal(e!.is_read_only, true);
        assert.equal(e!.can_trim, false);
        assert.equal(e!.can_zero, false);
        const out = await toolOk("nbdsh", ["-u", attach.uri, "-c", NBDSH_READ_ONLY]);
        const image = await Deno.readFile(`${dir}/disk.img`);
        assert.equal(out.trim(), `EPERM ok\nread ${image.subarray(0, 4).join(",")}`);
      } finally {
        await attach.stop("SIGTERM");
      }
    }),
});

const NBDSH_READ_ONLY = `
import errno
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
try:
    h.pwrite(b"x" * 512, 0)
    print("write accepted")
except nbd.Error as e:
    print("EPERM ok" if e.errnum == errno.EPERM else "errno %d" % e.errnum)
print("read " + ",".join(str(b) for b in h.pread(4, 0)))
`;

const NBDSH_BOUNDS = `
import errno
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
size = h.get_size()
for what, call, want in [
    ("read", lambda: h.pread(4096, size - 100), errno.EINVAL),
    ("write", lambda: h.pwrite(b"x" * 4096, size - 100), errno.ENOSPC),
]:
    try:
        call()
        print(what + " accepted")
    except nbd.Error as e:
        print(what + (" ok" if e.errnum == want else " errno %d" % e.errnum))
h.pwrite(b"dst!" * 1024, 8192)
print("after " + h.pread(8, 8192).decode())
`;

Deno.test({
  name:
    "nbdsh: a read past the end gets EINVAL, a write past it ENOSPC, and the connection goes on",
  ignore: missing("nbdsh"),
  fn: () =>
    withExport("dst-nbdsh-", newDisk("4M"), async (server) => {
      const attach = await startAttach([`127.0.0.1:${server.address.port}`]);
      try {
        const out = await toolOk("nbdsh", ["-u", attach.uri, "-c", NBDSH_BOUNDS]);
        assert.equal(out.trim(), "read ok\nwrite ok\nafter dst!dst!");
        assert.match(attach.log(), /refused NBD request: READ of 4096 bytes at offset 4194204/);
      } finally {
        await attach.stop("SIGTERM");
      }
    }),
});

Deno.test({
  name:
    "nbdcopy copies 64 MiB into the attached disk and back out unchanged; qemu-img compare agrees",
  ignore: missing("nbdcopy", "qemu-img"),
  fn: () =>
    withExport("dst-nbdcopy-", newDisk("64M"), async (server, dir) => {
      const source = `${dir}/source.bin`;
      const content = randomBytes(64 * MiB);
      await Deno.writeFile(source, content);
      const attach = await startAttach([`127.0.0.1:${server.address.port}`]);
      try {
        await toolOk("nbdcopy", [source, attach.uri]);
        await toolOk("nbdcopy", [attach.uri, `${dir}/back.bin`]);
        assertSameBytes(await Deno.readFile(`${dir}/back.bin`), content, "copied back out");
        await assertImagesIdentical(source, attach.uri);
      } finally {
        assert.equal((await attach.stop("SIGTERM")).code, 0);
      }
      assertSameBytes(await Deno.readFile(`${dir}/disk.img`), content, "the export's image");
    }),
});
