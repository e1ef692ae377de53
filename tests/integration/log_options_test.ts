/**
 * The log options of every command, through the real CLI: an unknown level in
 * DST_LOG is bad usage, not silently the default.
 */

import assert from "node:assert/strict";
import { runDst } from "../helpers/spawn.ts";

Deno.test("an unknown level in DST_LOG is bad usage naming the levels", async () => {
  const env = await runDst(["export", "/nonexistent/x.img"], { DST_LOG: "verbose" });
  assert.equal(env.code, 2, env.stderr);
  assert.match(
    env.stderr,
    /^dst export: DST_LOG is "verbose"; it must be debug, info, warn or error/,
  );
});
