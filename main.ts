#!/usr/bin/env -S deno run -A --unstable-net
/**
 * dst: distributed block storage. This file wires the real world (arguments,
 * stdout, exit codes) to the subcommands; all logic lives under src/.
 *
 * Exit codes: 0 success, 1 an operating error (message on stderr), 2 bad usage,
 * 70 a bug (an assertion failed: please report it).
 */

import { arrayCommand } from "./src/cli/array.ts";
import { attachCommand } from "./src/cli/attach.ts";
import { demoCommand } from "./src/cli/demo.ts";
import { exportCommand } from "./src/cli/export.ts";
import { keygenCommand } from "./src/cli/keygen.ts";
import { statusCommand } from "./src/cli/status.ts";
import { upCommand } from "./src/cli/up.ts";
import { AssertionError } from "./src/lib/assert.ts";
import { nearest } from "./src/lib/edit_distance.ts";
import { DstError, UsageError } from "./src/lib/errors.ts";
import { flushLogWithin, type Logger, logger } from "./src/lib/log.ts";
import { isNbdThread, serveNbdThread } from "./src/server/nbd_threads.ts";

export const VERSION = "0.1.0";

const COMMANDS: Record<string, (argv: string[]) => Promise<number>> = {
  export: exportCommand,
  attach: attachCommand,
  array: arrayCommand,
  status: statusCommand,
  keygen: keygenCommand,
  demo: demoCommand,
  up: upCommand,
};

const HELP = `dst ${VERSION}: distributed block storage

Usage: dst COMMAND [OPTIONS]

Commands:
  export PATH      serve an image file or block device over the network
  attach ADDR      serve a remote export as a local NBD disk
  array KIND ...   join exports and paths into a linear or mirror array, and serve it
  status ADDR...   show what exports are doing
  keygen FILE      add a new random key to a key file (for --key)
  up NODE.yaml     run a node's exports, arrays and attaches from one file
  demo             run the whole job on temporary images and check every byte

Run \`dst COMMAND --help\` for a command's options.`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === "help" || command === "--help" || command === "-h") {
    console.log(HELP);
    return command === undefined ? 2 : 0;
  }
  if (command === "--version" || command === "version") {
    console.log(`dst ${VERSION}`);
    return 0;
  }
  if (!Object.hasOwn(COMMANDS, command)) {
    const meant = nearest(command, Object.keys(COMMANDS));
    throw new UsageError(
      `unknown command "${command}"${meant === undefined ? "" : `; did you mean ${meant}?`}` +
        `\n\n${HELP}`,
    );
  }
  return await COMMANDS[command]!(rest);
}

/**
 * "dst COMMAND: message" for bad usage, the command being the one the error names
 * ("array mirror") or else the one that ran; "dst: message" when there is none.
 */
function usagePrefix(error: UsageError, argv: string[]): string {
  const ran = argv[0] !== undefined && Object.hasOwn(COMMANDS, argv[0]) ? argv[0] : undefined;
  const command = error.command ?? ran;
  return command === undefined ? "dst" : `dst ${command}`;
}

/**
 * Where a failure is logged: by the log like every other stderr line of a command that
 * ran (in its format), under the command's name. Usage errors are not log lines: they
 * answer the command line, before its log options may even be known.
 */
function failureLog(argv: string[]): Logger {
  const ran = argv[0] !== undefined && Object.hasOwn(COMMANDS, argv[0]) ? argv[0] : "dst";
  return logger(ran);
}

if (isNbdThread()) {
  serveNbdThread(); // a worker of `dst export --nbd` (src/server/nbd_threads.ts), not the CLI
} else if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (error) {
    if (error instanceof UsageError) {
      console.error(`${usagePrefix(error, Deno.args)}: ${error.message}`);
      code = 2;
    } else if (error instanceof AssertionError) {
      failureLog(Deno.args).error(`internal error (a bug, please report it): ${error.message}`, {
        stack: error.stack,
      });
      code = 70;
    } else if (error instanceof DstError || error instanceof Error) {
      failureLog(Deno.args).error(error.message);
      code = 1;
    } else {
      failureLog(Deno.args).error(String(error));
      code = 1;
    }
  }
  // The last log lines, queued while the process was busy; not for ever if stderr is stuck.
  await flushLogWithin(1000);
  Deno.exit(code);
}
