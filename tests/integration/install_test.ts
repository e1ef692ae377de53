/**
 * The README's install section, as a user runs it with Node.js's npm alone: the
 * repository installs as an npm package whose `dst` command is the bundle itself (run
 * by the deno on PATH through its shebang, in the same process), so `dst` stops on
 * SIGTERM as the export does, with nothing left running.
 */

import assert from "node:assert/strict";
import { freshBundle } from "../helpers/spawn.ts";
import { missing } from "../helpers/tools.ts";
import { waitForLine } from "../../src/cli/self.ts";

const ROOT = new URL("../../", import.meta.url).pathname;

Deno.test({
  name: "npm install -g of the repository puts a dst command on PATH that stops on SIGTERM",
  ignore: missing("npm"),
  fn: async () => {
    await freshBundle();
    const prefix = await Deno.makeTempDir({ prefix: "dst-npm-" });
    try {
      const install = await new Deno.Command("npm", {
        args: ["install", "--global", "--prefix", prefix, "--no-audit", "--no-fund", ROOT],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(install.code, 0, new TextDecoder().decode(install.stderr));
      const dst = `${prefix}/bin/dst`;
      // The deno that runs the tests stands in for the one npm installed globally.
      const env = { PATH: `${Deno.execPath().replace(/\/[^/]*$/, "")}:${Deno.env.get("PATH")}` };
      const version = await new Deno.Command(dst, { args: ["--version"], env }).output();
      assert.equal(new TextDecoder().decode(version.stdout).trim(), "dst 0.1.0");
      const child = new Deno.Command(dst, {
        args: [
          "export",
          `${prefix}/disk.img`,
          "--create",
          "1M",
          "--listen",
          "127.0.0.1:0",
          "--state",
          `${prefix}/state`,
        ],
        env,
        stdout: "piped",
        stderr: "null",
      }).spawn();
      await waitForLine(child.stdout, / on (\S+)$/);
      child.kill("SIGTERM");
      const status = await child.status;
      assert.equal(status.code, 0, "dst stopped cleanly on SIGTERM");
    } finally {
      await Deno.remove(prefix, { recursive: true });
    }
  },
});
