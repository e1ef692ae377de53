/**
 * `dst up NODE.yaml`: runs everything a node has (exports, arrays, attaches) from one
 * file, in this one process. Each item runs the very command it stands for (the same
 * function as `dst export ...` typed by hand, with its own checks, start-up and
 * shutdown), hosted here (command_host.ts): this file says when each stops, prefixes
 * its output lines, and gives it a registry in the node's one /metrics. So `dst up`
 * writes nothing that the same commands by hand would not. This file owns starting
 * items in order and stopping them in reverse; reading the file is src/cli/up_file.ts.
 */

import { describeError, DstError, UsageError } from "../lib/errors.ts";
import { configureLog, logger, withLogFields } from "../lib/log.ts";
import { MetricsServer, NodeMetrics } from "../metrics/mod.ts";
import {
  envLogLevel,
  LOG_OPTIONS_HELP,
  logSettingsOf,
  METRICS_HELP,
  METRICS_OPTION,
  metricsOption,
  parseCommand,
} from "./args.ts";
import { arrayCommand } from "./array.ts";
import { attachCommand } from "./attach.ts";
import type { CommandHost } from "./command_host.ts";
import { exportCommand } from "./export.ts";
import { untilSignal } from "./signals.ts";
import { readUpFile, type UpItem, type UpNode } from "./up_file.ts";
import { plural } from "../lib/plural.ts";

export const UP_HELP = `Usage: dst up NODE.yaml [--check] [--metrics [HOST]:PORT]

Runs every export, array and attach of NODE.yaml in this one process, each exactly as
the command it stands for would run, and stops them all on SIGINT or SIGTERM. The
keys are the flags' own names:

  key: FILE            --key of every item (an item's own key: wins)
  metrics: [HOST]:PORT one /metrics for the whole node, each item's series labelled
                       item="exports[0]" and so on, with the process's own
  log: { level: L, format: F }   the node's --log-level and --log-format (the command
                       line's, then DST_LOG's level, win over the file's)
  exports:             one \`dst export PATH\` each: path, and any of its flags
  arrays:              one \`dst array KIND MEMBER...\` each: kind, members, and its flags
  attaches:            one \`dst attach HOST:PORT\` each: remote, and its flags

A flag without a value (read-only, shared-writers) is true or false. Relative paths
are the file's folder's. Before anything starts, each item's command checks what it
is given, as --check does. Exports start first, then arrays (an array after the array serving one of its members), then
attaches, each once it is serving; if one fails to start, those started are stopped
and dst up exits 1. On SIGINT or SIGTERM they are stopped in reverse order, and dst up
exits 0 when each stopped cleanly; a second signal exits at once. On SIGHUP the items
with a key reread their key files, as each command does; nothing else changes. Their
output lines are printed after each item's name ("exports[0]: "), and their log lines
carry it as the field item.

  --check         only check the file and print the command lines: exit 0, or 2 with
                  every problem as FILE:LINE: KEY: what is wrong
${METRICS_HELP}
                        (the node's one /metrics, over the file's metrics:)
${LOG_OPTIONS_HELP}

Example: dst up /etc/dst/node.yaml`;

/** The commands a node file's items stand for. */
const ITEM_COMMANDS: Record<string, (argv: string[], host: CommandHost) => Promise<number>> = {
  export: exportCommand,
  array: arrayCommand,
  attach: attachCommand,
};

/** A started item: how to stop it, and its end (its exit code, or what it threw). */
interface Running {
  item: UpItem;
  stop(reason: string): void;
  ready: Promise<void>;
  ended: Promise<number>;
}

export async function upCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("up", argv, { check: { type: "boolean" }, ...METRICS_OPTION });
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
    const why = error instanceof Deno.errors.NotFound ? "no such file" : describeError(error);
    throw new UsageError(`Cannot read ${file}: ${why}`, "up");
  }
  const result = readUpFile(file, source);
  // Then each item's own command checks what it is given, before anything starts: a
  // file that --check passes starts, and one it refuses leaves nothing made.
  const messages = result.ok ? await checkItems(file, result.items) : result.messages;
  if (!result.ok || messages.length > 0) {
    for (const message of messages) console.error(message);
    return 2;
  }
  if (parsed.values.check) {
    for (const item of result.items) console.log(`${item.label}: dst ${item.args.join(" ")}`);
    console.log(`dst up: ${file} is valid (${plural(result.items.length, "item")})`);
    return 0;
  }
  // The command line's log options, then DST_LOG's level, win over the file's.
  configureLog(logSettingsOf(parsed, "up", envLogLevel(), result.node.log));
  // --metrics on the command line wins over the file's, as the log options do.
  const metrics = metricsOption(parsed) ?? result.node.metrics;
  return await runItems(
    file,
    { ...result.node, ...(metrics === undefined ? {} : { metrics }) },
    result.items,
  );
}

async function runItems(file: string, node: UpNode, items: UpItem[]): Promise<number> {
  const log = logger("up");
  // Listening from the start: a signal while items start stops those started. A second
  // signal exits at once (untilSignal), leaving what is stuck.
  let signalled: Deno.Signal | null = null;
  const stopping = untilSignal().then((signal) => (signalled = signal));
  // SIGHUP: the items with a key reread it (each listens, as the command does); the
  // node goes on. Listened for here too, so a node without keys is not killed by it.
  const hangup = () => log.info("SIGHUP: items with a key reread their key files");
  Deno.addSignalListener("SIGHUP", hangup);
  const metrics = node.metrics === undefined ? undefined : new NodeMetrics();
  const server = node.metrics === undefined || metrics === undefined
    ? null
    : MetricsServer.start(node.metrics, metrics);
  const running: Running[] = [];
  try {
    if (server !== null) print(`dst up: metrics at ${server.url}`);
    for (const item of items) {
      const started = start(item, metrics);
      running.push(started);
      const outcome = await Promise.race([
        started.ready.then(() => "ready" as const),
        started.ended.then(() => "ended" as const, () => "ended" as const),
        stopping.then(() => "signal" as const),
      ]);
      if (outcome === "ready") continue;
      if (outcome === "signal") {
        // Not waited for: a start can take long (a leg that does not answer), and a
        // signal stops a command that is starting at once. It is told to stop, should it
        // get to serving, and the process's exit ends it, as a crash would end it.
        running.pop();
        started.stop(`${signalled}`);
        log.info(
          `${signalled}: ${item.label} was still starting: left to the exit; stopping the ` +
            `${plural(running.length, "item")} serving`,
        );
        return await stopAll(running, log);
      }
      running.pop();
      const error = await started.ended.then(
        (code) => new DstError("START", `exited ${code} before it was serving`),
        (error) => error,
      );
      const stopped = running.length === 0
        ? ""
        : `; stopped the ${plural(running.length, "item")} started before it`;
      await stopAll(running, log);
      const message = `${file}: ${item.label} (dst ${item.args.join(" ")}): ` +
        `${describeError(error)}${stopped}`;
      // A usage error stays one (exit 2): the file asks for what the command refuses.
      if (error instanceof UsageError) throw new UsageError(message, "up");
      throw new DstError("START", message, { cause: error });
    }
    print(`dst up: running ${plural(running.length, "item")} of ${file}`);
    const ended = Promise.race(
      running.map((one) =>
        one.ended.then(
          (code) => ({ one, why: `exited ${code}` }),
          (error) => ({ one, why: `failed: ${describeError(error)}` }),
        )
      ),
    );
    const first = await Promise.race([stopping.then(() => null), ended]);
    if (first === null) {
      log.info(`${signalled}: stopping ${plural(running.length, "item")} in reverse order`);
      const code = await stopAll(running, log);
      if (code === 0) log.info(`stopped ${plural(running.length, "item")} cleanly`);
      return code;
    }
    log.error(`${first.one.item.label} ${first.why} while serving; stopping the others`);
    await stopAll(running.filter((one) => one !== first.one), log);
    return 1;
  } finally {
    Deno.removeSignalListener("SIGHUP", hangup);
    await server?.shutdown();
  }
}

/**
 * Runs each item's command to check what it is given, as --check and as the start
 * does: every problem, as FILE:LINE: ITEM.KEY: what (the line of the key whose flag
 * the message names, else the item's).
 */
async function checkItems(file: string, items: UpItem[]): Promise<string[]> {
  const messages: string[] = [];
  for (const item of items) {
    const host: CommandHost = {
      untilStop: () => new Promise(() => {}),
      print: () => {},
      ready: () => {},
      logConfigured: true,
      onlyCheck: true,
    };
    const [command, ...argv] = item.args;
    try {
      await ITEM_COMMANDS[command!]!(argv, host);
    } catch (error) {
      const message = describeError(error).replace(/\n\n[^]*$/, ""); // without the help text
      const flag = [...message.matchAll(/--([a-z][a-z-]*)/g)]
        .map((match) => match[1]!)
        .find((name) => Object.hasOwn(item.keyLines, name));
      const where = flag === undefined
        ? `${item.line}: ${item.label}`
        : `${item.keyLines[flag]}: ${item.label}.${flag}`;
      messages.push(`${file}:${where}: ${message}`);
    }
  }
  return messages;
}

/** Starts `item`'s command, hosted: it stops when told, and says when it is serving. */
function start(item: UpItem, metrics: NodeMetrics | undefined): Running {
  let stop!: (reason: string) => void;
  const stopRequested = new Promise<string>((resolve) => stop = resolve);
  let serving!: () => void;
  const ready = new Promise<void>((resolve) => serving = resolve);
  const host: CommandHost = {
    untilStop: () => stopRequested,
    print: (line) => print(`${item.label}: ${line}`),
    ready: () => serving(),
    logConfigured: true,
    onlyCheck: false,
    ...(metrics === undefined ? {} : { metrics: metrics.registryFor(item.label) }),
  };
  const [command, ...argv] = item.args;
  const run = ITEM_COMMANDS[command!]!;
  const ended = withLogFields({ item: item.label }, () => run(argv, host));
  ended.catch(() => {}); // seen by whoever awaits it; never an unhandled rejection
  return { item, stop, ready, ended };
}

/** A line of output; a closed stdout (a pipe nobody reads now) is no reason to stop. */
function print(line: string): void {
  try {
    console.log(line);
  } catch {
    // nobody to tell
  }
}

/** Stops each in reverse order, waiting for each: 0 when every one stopped cleanly. */
async function stopAll(running: Running[], log: ReturnType<typeof logger>): Promise<number> {
  let code = 0;
  for (const one of [...running].reverse()) {
    one.stop("dst up is stopping");
    try {
      const exit = await one.ended;
      if (exit !== 0) {
        log.error(`${one.item.label} exited ${exit}`);
        code = 1;
      }
    } catch (error) {
      log.error(`${one.item.label} did not stop cleanly: ${describeError(error)}`);
      code = 1;
    }
  }
  return code;
}
