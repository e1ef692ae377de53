/**
 * The README's five-host tree (examples/five-hosts/run.ts) as a test: five network
 * namespaces on shaped links, `dst up` in each, a mirror of two linear arrays written
 * and read through NBD, one host cut off and brought back, the resync finished, and
 * the data the same through NBD and in both legs' images. Where namespaces cannot be
 * made (not root, no iproute2 or nbdcopy, a container that refuses `ip netns add`),
 * it is skipped and its name says why.
 */

import assert from "node:assert/strict";
import { cannotRun, main } from "../../examples/five-hosts/run.ts";
import { freshBundle } from "../helpers/fresh_bundle.ts";

const why = await cannotRun();

Deno.test({
  name: why === null
    ? "five-host tree: a mirror of linear arrays keeps the data through a host cut off and back"
    : `five-host tree (skipped: ${why})`,
  ignore: why !== null,
  fn: async () => {
    const workDir = await Deno.makeTempDir({ prefix: "dst-five-hosts-" });
    const lines: string[] = [];
    try {
      const result = await main({
        program: await freshBundle(),
        workDir,
        print: (line) => lines.push(line),
      });
      assert.deepEqual(result, {
        readBackBeforeCut: true,
        readBackDuringCut: true,
        readBackAfterResync: true,
        legOutDuringCut: true,
        legBCEqual: true,
        legDEEqual: true,
      }, lines.join("\n"));
      assert.match(lines.join("\n"), /resync finished in .*1032 in-sync/);
    } finally {
      await Deno.remove(workDir, { recursive: true });
    }
  },
});
