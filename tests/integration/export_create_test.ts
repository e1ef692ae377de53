/**
 * `dst export PATH` and `--create SIZE` as a new user first meets them: a PATH that
 * does not exist says to use --create, a size without a unit is not taken for bytes,
 * an image larger than --create is kept and the user is told, and a port that cannot
 * be listened on leaves no new image behind.
 */

import assert from "node:assert/strict";
import { eventually } from "../helpers/frame_fuzz.ts";
import { runDst, startExport, stopClean } from "../helpers/spawn.ts";

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** Runs `body` in a fresh temp dir, removed afterwards. */
async function inTempDir(prefix: string, body: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("export of a PATH that does not exist, without --create, says to use --create SIZE and creates nothing", async () => {
  await inTempDir("dst-export-missing-", async (dir) => {
    const path = `${dir}/new.img`;
    const result = await runDst(["export", path, "--listen", "127.0.0.1:0"]);
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /new\.img does not exist; use --create SIZE to make it/);
    assert.equal(await exists(path), false);
  });
});

Deno.test("--create with a bare number below 1 MiB is refused with an example, not taken for a tiny image", async () => {
  await inTempDir("dst-export-bare-size-", async (dir) => {
    const path = `${dir}/new.img`;
    const result = await runDst(["export", path, "--create", "10", "--listen", "127.0.0.1:0"]);
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, /--create 10 .*10 bytes.*e\.g\. --create 10G/);
    assert.equal(await exists(path), false);
  });
});

Deno.test("--create on a larger existing image keeps it and says so on stderr", async () => {
  await inTempDir("dst-export-keep-", async (dir) => {
    const path = `${dir}/disk.img`;
    await Deno.writeFile(path, new Uint8Array());
    await Deno.truncate(path, 2 * 1024 * 1024);
    const server = await startExport([path, "--create", "1M", "--listen", "127.0.0.1:0"]);
    try {
      await eventually(
        5000,
        "the export to say it kept the image",
        () => server.log().includes("kept the existing 2.0 MiB image; --create 1M never shrinks"),
      );
    } finally {
      await stopClean(server, "dst export");
    }
    assert.equal((await Deno.stat(path)).size, 2 * 1024 * 1024);
  });
});

Deno.test("export --create on a port it cannot listen on (DST, NBD or metrics) fails and leaves no new image; an existing one is untouched", async () => {
  await inTempDir("dst-export-taken-", async (dir) => {
    const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    try {
      const listen = `127.0.0.1:${taken.addr.port}`;
      const path = `${dir}/new.img`;
      const result = await runDst(["export", path, "--create", "1G", "--listen", listen]);
      assert.equal(result.code, 1, result.stderr);
      assert.match(
        result.stderr,
        new RegExp(`Cannot listen on ${listen}.*pick another with --listen`),
      );
      assert.equal(await exists(path), false, "no image is left behind");

      // The NBD and metrics ports too are listened on before the image is made.
      for (const flag of ["--nbd", "--metrics"]) {
        const args = ["export", path, "--create", "1G", "--listen", "127.0.0.1:0", flag, listen];
        const result = await runDst(args);
        assert.equal(result.code, 1, result.stderr);
        assert.match(result.stderr, new RegExp(`Cannot listen on ${listen}.*${flag}`));
        assert.equal(await exists(path), false, `no image is left behind by ${flag} either`);
      }

      const old = `${dir}/old.img`;
      await Deno.writeFile(old, new Uint8Array(4096).fill(7));
      const kept = await runDst(["export", old, "--create", "1G", "--listen", listen]);
      assert.equal(kept.code, 1, kept.stderr);
      assert.deepEqual(await Deno.readFile(old), new Uint8Array(4096).fill(7));
    } finally {
      taken.close();
    }
  });
});
