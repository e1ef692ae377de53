/**
 * `dst array` from the command line with local paths as members: a mirror of two
 * image files, written and read through NBD with nbdcopy, shown by `dst status` as a
 * table of legs, and stopped with SIGTERM; both files then hold what was written.
 */

import assert from "node:assert/strict";
import { memberName, startArray, waitForMirror } from "../helpers/array.ts";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { runDst } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

Deno.test({
  name: "a mirror of two local image files: nbdcopy in and out, dst status shows its legs",
  ignore: missing("nbdcopy"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "dst-array-cli-" });
    const [a, b] = [`${dir}/a.img`, `${dir}/b.img`];
    await Deno.writeFile(a, new Uint8Array(8 * MiB));
    await Deno.writeFile(b, new Uint8Array(8 * MiB));
    const source = randomBytes(8 * MiB);
    await Deno.writeFile(`${dir}/source.bin`, source);
    const mirror = await startArray(
      ["mirror", a, b, "--source", a, "--export", "127.0.0.1:0", "--nbd", "127.0.0.1:0"],
    );
    try {
      await toolOk("nbdcopy", [`${dir}/source.bin`, mirror.nbdUri!]);
      await toolOk("nbdcopy", [mirror.nbdUri!, `${dir}/out.bin`]);
      assertSameBytes(await Deno.readFile(`${dir}/out.bin`), source, "read back through NBD");
      await waitForMirror(mirror.address);

      const status = await runDst(["status", memberName(mirror.address)]);
      assert.equal(status.code, 0, status.stderr);
      assert.match(status.stdout, /: mirror, 8\.0 MiB, regions of 1\.0 MiB\n/);
      assert.match(status.stdout, new RegExp(`${a}\\s+in-sync\\s`));
      assert.match(status.stdout, new RegExp(`${b}\\s+in-sync\\s`));

      assert.equal((await mirror.stop()).code, 0, "SIGTERM stops it cleanly");
      assertSameBytes(await Deno.readFile(a), source, "leg a");
      assertSameBytes(await Deno.readFile(b), source, "leg b");
    } finally {
      await mirror.stop("SIGKILL");
      await Deno.remove(dir, { recursive: true });
    }
  },
});
