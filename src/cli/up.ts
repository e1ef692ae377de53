/**
 * `dst up NODE.yaml`: runs everything a node has (exports, arrays, attaches) from one
 * file. Each item runs as a child process of this same program with the command line
 * it stands for, so every command keeps its own checks, start-up and shutdown, and
 * `dst up` writes nothing that the same commands typed by hand would not. This file
 * owns starting them in order, relaying their output, and stopping them in reverse;
 * reading the file is src/cli/up_file.ts.
 */

import { DstError, UsageError } from "../lib/errors.ts";
import { logger } from "../lib/log.ts";
import { LOG_OPTIONS_HELP, parseCommand } from "./args.ts";
import { selfCommand, waitForLine } from "./self.ts";
import { untilSignal } from "./signals.ts";
import { readUpFile, type UpItem } from "./up_file.ts";

export const UP_HELP = `Usage: dst up NODE.yaml [--check]

Runs every export, array and attach of NODE.yaml, each as its own \`dst\` process with
the command line the item stands for, and stops them all on SIGINT or SIGTERM. The
keys are the flags' own names:

  key: FILE            --key of every item (an item's own key wins)
  log: { level: L, format: F }   --log-level and --log-format of every item (likewise)
  exports:             one \`dst export PATH\` each: path, and any of its flags
  arrays:              one \`dst array KIND MEMBER...\` each: kind, members, and its flags
  attaches:            one \`dst attach HOST:PORT\` each: remote, and its flags

A flag without a value (read-only, force) is true or false. metrics is per item: each
item is its own process, with its own port. Exports start first, then arrays (an array
after the array serving one of its members), then attaches, each once it is serving;
if one fails to start, those started are stopped and dst up exits 1. On SIGINT or
SIGTERM they are stopped in reverse order; dst up exits 0 when they all did.
Their stdout and stderr lines are relayed, each after its item's name ("exports[0]: ").

  --check         only check the file and print the command lines: exit 0, or 2 with
                  every problem as FILE:LINE: KEY: what is wrong
${LOG_OPTIONS_HELP}

Example: dst up /etc/dst/node.yaml`;

/** A started item: its process, and its stderr relayed until the process ends. */
interface Running {
  item: UpItem;
  child: Deno.ChildProcess;
  relayed: Promise<void>;
}

export async function upCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("up", argv, { check: { type: "boolean" } });
  if (parsed.values.help) {
    console.log(UP_HELP);
    return 0;
  }
  if (parsed.positionals.length !== 1) {
    throw new UsageError(
      `takes one NODE.yaml, got ${parsed.positionals.length}\n\n${UP_HELP}`,
      "up",
    );
  }
  const file = parsed.positionals[0]!;
  let source: string;
  try {
    source = await Deno.readTextFile(file);
  } catch (error) {
    throw new UsageError(`Cannot read ${file}: ${error instanceof Error ? error.message : error}`);
  }
  const result = readUpFile(file, source);
  if (!result.ok) {
    for (const message of result.messages) console.error(message);
    return 2;
  }
  if (parsed.values.check) {
    for (const item of result.items) console.log(`${item.label}: dst ${item.args.join(" ")}`);
    console.log(`dst up: ${file} is valid (${result.items.length} items)`);
    return 0;
  }
  return await runItems(file, result.items);
}

async function runItems(file: string, items: UpItem[]): Promise<number> {
  const log = logger("up");
  // Listening from the start: a signal while items start stops those started, not only us.
  let signalled: Deno.Signal | null = null;
  const running: Running[] = [];
  // A second signal stops every item at once (they run in their own process groups, so
  // nothing else would reach them), as a second signal stops one command at once. SIGHUP
  // (the terminal closed) stops them too.
  const stopping = untilSignal(
    ["SIGINT", "SIGTERM", "SIGHUP"],
    () => killAll(running),
  ).then((signal) => (signalled = signal));
  for (const item of items) {
    let started: Running;
    try {
      started = start(item);
    } catch (error) {
      await stopAll(running, log);
      throw error;
    }
    running.push(started);
    const ready = waitForLine(
      started.child.stdout,
      item.ready,
      (line) => {
        try {
          console.log(`${item.label}: ${line}`);
        } catch {
          // stdout is gone (a closed pipe): the item is ready all the same
        }
      },
    ).then(() => true, () => false);
    const outcome = await Promise.race([ready, stopping.then(() => "signal" as const)]);
    if (outcome === true) continue;
    if (outcome === "signal") {
      log.info(`${signalled}: stopping the ${running.length} items started`);
      return await stopAll(running, log);
    }
    const status = await started.child.status;
    await started.relayed;
    running.pop();
    await stopAll(running, log);
    throw new DstError(
      "ECHILD",
      `${item.label} (dst ${item.args.join(" ")}) exited ${status.code} before it was ready` +
        (running.length === 0 ? "" : `; stopped the ${running.length} items started before it`),
    );
  }
  console.log(`dst up: running ${running.length} items of ${file}`);
  const ended = Promise.race(
    running.map((one) => one.child.status.then((status) => ({ one, status }))),
  );
  const first = await Promise.race([stopping.then(() => null), ended]);
  if (first === null) {
    log.info(`${signalled}: stopping ${running.length} items in reverse order`);
    return await stopAll(running, log);
  }
  log.error(
    `${first.one.item.label} exited ${first.status.code} while running; stopping the others`,
  );
  await stopAll(running, log);
  return 1;
}

function start(item: UpItem): Running {
  const self = selfCommand();
  const child = new Deno.Command(self.command, {
    args: [...self.args, ...item.args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    // Its own process group: a terminal's Ctrl-C reaches dst up alone, which then stops
    // the items in reverse order (attaches before the arrays and exports they use).
    detached: true,
  }).spawn();
  return { item, child, relayed: relayLines(child.stderr, item.label) };
}

async function relayLines(stream: ReadableStream<Uint8Array>, label: string): Promise<void> {
  const encoder = new TextEncoder();
  let buffered = "";
  const write = async (line: string) => {
    const bytes = encoder.encode(`${label}: ${line}\n`);
    for (let done = 0; done < bytes.length;) done += await Deno.stderr.write(bytes.subarray(done));
  };
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    buffered += chunk;
    let newline: number;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      await write(buffered.slice(0, newline));
      buffered = buffered.slice(newline + 1);
    }
  }
  if (buffered !== "") await write(buffered);
}

/** SIGKILL to every item still running: the user insisted, and nothing may be left behind. */
function killAll(running: Running[]): void {
  for (const one of running) {
    try {
      one.child.kill("SIGKILL");
    } catch {
      // it has already exited
    }
  }
}

/** SIGTERM to each in reverse order, waiting for each: 0 when every one exited 0. */
async function stopAll(running: Running[], log: ReturnType<typeof logger>): Promise<number> {
  let code = 0;
  for (const one of [...running].reverse()) {
    try {
      one.child.kill("SIGTERM");
    } catch {
      // it has already exited
    }
    const status = await one.child.status;
    await one.relayed;
    if (status.code !== 0) {
      log.error(`${one.item.label} exited ${status.code}`);
      code = 1;
    }
  }
  return code;
}
