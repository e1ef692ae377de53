/**
 * An outage under a real NBD client: the export is killed with SIGKILL in the middle
 * of an nbdcopy into the attached disk and restarted within the resend window; the
 * copy finishes without an error and the disk compares equal to the source.
 */

import assert from "node:assert/strict";
import { assertSameBytes } from "../helpers/bytes.ts";
import { randomBytes } from "../helpers/random_bytes.ts";
import { startAttach, startExport } from "../helpers/spawn.ts";
import { assertImagesIdentical, missing, spawnTool } from "../helpers/tools.ts";

const MiB = 1024 * 1024;

Deno.test({
  name: "kill -9 of the export in the middle of an nbdcopy: the copy finishes and compares equal",
  ignore: missing("nbdcopy", "qemu-img"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ dir: "/dev/shm", prefix: "dst-nbd-outage-" });
    const image = `${dir}/disk.img`;
    const source = `${dir}/source.bin`;
    const content = randomBytes(256 * MiB);
    await Deno.writeFile(source, content);
    let server = await startExport([image, "--create", "256M", "--listen", "127.0.0.1:0"]);
    const target = `127.0.0.1:${server.address.port}`;
    const attach = await startAttach([target]);
    try {
      // Small requests, few in flight: slow enough that the kill lands mid-copy.
      const copy = spawnTool("nbdcopy", [
        "--connections=1",
        "--requests=2",
        "--request-size=65536",
        source,
        attach.uri,
      ]);
      let copyDone = false;
      const copyStatus = copy.status.then((status) => {
        copyDone = true;
        return status;
      });
      await new Promise((resolve) => setTimeout(resolve, 150));
      await server.stop("SIGKILL");
      assert.equal(copyDone, false, "the copy was still running when the export died");
      await new Promise((resolve) => setTimeout(resolve, 1500));
      server = await startExport([image, "--listen", target]);
      const status = await copyStatus;
      const stderr = new TextDecoder().decode(await new Response(copy.stderr).arrayBuffer());
      assert.equal(status.code, 0, `nbdcopy failed: ${stderr}`);
      assert.match(attach.log(), /reconnected to 127\.0\.0\.1/);

      await assertImagesIdentical(source, attach.uri);
      assert.equal((await attach.stop("SIGTERM")).code, 0);
      assert.equal((await server.stop("SIGTERM")).code, 0);
      assertSameBytes(await Deno.readFile(image), content, "the image after the outage");
    } finally {
      await attach.stop("SIGKILL");
      await server.stop("SIGKILL");
      await Deno.remove(dir, { recursive: true });
    }
  },
});
