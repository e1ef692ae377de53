/**
 * Makes the bundle a program: a shebang line and the executable bit. `deno bundle`
 * writes neither (main.ts's own shebang is dropped by the bundler).
 */

import { DENO_RUN_ARGS } from "../../src/cli/self.ts";

const path = Deno.args[0];
if (path === undefined) throw new Error("usage: finish_bundle.ts dist/dst.js");
const SHEBANG = `#!/usr/bin/env -S deno ${DENO_RUN_ARGS.join(" ")}\n`;
let text = await Deno.readTextFile(path);
text = text.replace(/^#!.*\n/, "");
await Deno.writeTextFile(path, SHEBANG + text);
await Deno.chmod(path, 0o755);
