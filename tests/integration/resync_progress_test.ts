/**
 * A mirror's resync shows on a terminal as a bar redrawn in place below the log lines
 * (not a log line a second), and the bar is cleared when the leg is in sync. The
 * terminal is a real pseudo-terminal, made by script(1).
 */

import assert from "node:assert/strict";
import { formatHostPort } from "../../src/lib/address.ts";
import { DENO_RUN_ARGS } from "../../src/cli/self.ts";
import { BUNDLE, exportImage, freshBundle, scenario, TEST_STATE_HOME } from "../helpers/spawn.ts";
import { missing } from "../helpers/tools.ts";

const CLEAR_LINE = "\r\x1b[K";

Deno.test({
  name:
    "on a terminal, a mirror's resync is a bar redrawn in place, cleared once the leg is in sync",
  ignore: missing("script"),
  fn: () =>
    scenario("dst-resync-bar-", async (dir, track) => {
      await freshBundle();
      // Big enough that the copy takes more than the bar's quarter second on loopback.
      const a = track(await exportImage(dir, "a.img", "512M"));
      const b = track(await exportImage(dir, "b.img", "512M"));
      const legB = formatHostPort(b.address);
      const array = [
        Deno.execPath(),
        ...DENO_RUN_ARGS,
        BUNDLE,
        "array",
        "mirror",
        formatHostPort(a.address),
        legB,
        "--export",
        "127.0.0.1:0",
        "--state",
        `${dir}/m`,
      ];
      const quoted = array.map((arg) => `'${arg.replaceAll("'", "'\\''")}'`).join(" ");
      const terminal = new Deno.Command("script", {
        args: ["-qefc", `exec ${quoted}`, "/dev/null"],
        env: { XDG_STATE_HOME: TEST_STATE_HOME, TERM: "xterm" },
        stdin: "piped", // script's own input; nothing is typed
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      let output = "";
      try {
        const reader = terminal.stdout.pipeThrough(new TextDecoderStream()).getReader();
        while (!/is in sync: copied[^\n]*\n/.test(output)) {
          const { value, done } = await reader.read();
          if (done) break;
          output += value;
        }
        reader.releaseLock();
      } finally {
        await new Deno.Command("pkill", { args: ["-TERM", "-f", `${dir}/m`] }).output();
        await terminal.stdin.close();
        await terminal.status;
      }
      assert.match(output, /is in sync: copied/, output);
      const bar = new RegExp(
        `\\r\\x1b\\[Kresync of ${legB.replaceAll(".", "\\.")} \\[[#.]{10}\\] \\d+% ` +
          `\\d+/\\d+ regions, .*/s`,
      );
      assert.match(output, bar, "the bar is drawn in place");
      assert.doesNotMatch(
        output,
        new RegExp(`resync of ${legB.replaceAll(".", "\\.")}: \\d+/\\d+ regions`),
        "no progress log lines on a terminal",
      );
      // The bar is cleared, then the line that says the leg is in sync, with no bar after.
      const end = output.lastIndexOf("is in sync: copied");
      const line = output.slice(output.lastIndexOf(CLEAR_LINE, end), output.indexOf("\n", end));
      assert.ok(line.startsWith(CLEAR_LINE), `the bar is cleared first: ${JSON.stringify(line)}`);
      assert.doesNotMatch(
        line,
        /\[[#.]{10}\]/,
        `no bar after the leg is in sync: ${JSON.stringify(line)}`,
      );
    }),
});
