/** Command-line parsing shared by the subcommands: node:util's parseArgs, with errors that say what to do. */

import { parseArgs } from "node:util";
import {
  CLIENT_PING_MS_DEFAULT,
  CLIENT_PING_MS_MAX,
  CLIENT_RETRIES_DEFAULT,
  CLIENT_TIMEOUT_MS_DEFAULT,
} from "../constants.ts";
import { nearest } from "../lib/edit_distance.ts";
import { UsageError } from "../lib/errors.ts";
import {
  colourWanted,
  configureLog,
  LOG_FORMATS,
  LOG_LEVELS,
  type LogFormat,
  type LogLevel,
  type LogSettings,
} from "../lib/log.ts";
import { parseCount } from "../lib/units.ts";
import type { RemoteDeviceOptions } from "../client/remote_device.ts";
import { type HostPort, parseHostPort } from "../lib/address.ts";
import { CLIENT_KEY_HELP, CLIENT_KEY_OPTIONS, clientKey } from "./key_options.ts";
import type { CommandHost } from "./command_host.ts";

export type OptionSpec = Record<
  string,
  { type: "string" | "boolean"; short?: string; multiple?: boolean }
>;

export interface Parsed {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
}

/** The log options every command accepts; parseCommand adds them and applies them. */
const LOG_OPTIONS: OptionSpec = {
  "log-format": { type: "string" },
  "log-level": { type: "string" },
};

/** The help text of LOG_OPTIONS, which every command's --help ends with. */
export const LOG_OPTIONS_HELP =
  `  --log-format F  log lines on stderr as text (default) or json: one object a line with
                  time, level, component, message and fields
  --log-level L   debug, info (default), warn or error; DST_LOG=L sets it too, and the
                  option wins. Colour only on a terminal, never with NO_COLOR set`;

/**
 * Parses `argv` with `options`, --help and the log options, and applies the log
 * options at once, so every line after this has the asked form (unless `host` set up
 * the log for every command it runs).
 */
export function parseCommand(
  command: string,
  argv: string[],
  options: OptionSpec,
  host?: CommandHost,
): Parsed {
  const parsed = parseOptions(command, argv, options);
  const settings = logSettingsOf(parsed, command, envLogLevel());
  if (host?.logConfigured !== true) configureLog(settings);
  return parsed;
}

function parseOptions(command: string, argv: string[], options: OptionSpec): Parsed {
  const all: OptionSpec = { ...options, ...LOG_OPTIONS, help: { type: "boolean", short: "h" } };
  const seeHelp = `(see \`dst ${command} --help\`)`;
  const unknown = unknownLongOption(argv, all);
  if (unknown !== undefined) {
    const meant = nearest(unknown, Object.keys(all));
    throw new UsageError(
      `unknown option --${unknown}${meant === undefined ? "" : `; did you mean --${meant}?`} ` +
        seeHelp,
      command,
    );
  }
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      options: all,
      allowPositionals: true,
      strict: true,
    });
    return { values: values as Parsed["values"], positionals };
  } catch (error) {
    const message = error instanceof Error
      ? error.message.replace(/\. To specify.*$/s, "")
      : String(error);
    throw new UsageError(`${message} ${seeHelp}`, command);
  }
}

/** DST_LOG's level, or undefined when it is unset or empty. */
export function envLogLevel(): string | undefined {
  try {
    return Deno.env.get("DST_LOG") || undefined; // set but empty: as if unset
  } catch {
    return undefined; // without env permission, as if unset
  }
}

/**
 * The log settings `parsed` and DST_LOG (`envLevel`) ask for: --log-level wins over
 * DST_LOG, and both over `file` (dst up's node file), in any case ("WARN" is warn); an
 * unknown level in either is a usage error naming the known ones.
 */
export function logSettingsOf(
  parsed: Parsed,
  command: string,
  envLevel: string | undefined,
  file: { level?: LogLevel; format?: LogFormat } = {},
): LogSettings {
  const format = oneOf(stringOption(parsed, "log-format"), "--log-format", LOG_FORMATS, command);
  const fromEnv = oneOf(envLevel, "DST_LOG", LOG_LEVELS, command);
  const level = oneOf(stringOption(parsed, "log-level"), "--log-level", LOG_LEVELS, command);
  return {
    format: (format ?? file.format ?? "text") as LogFormat,
    level: (level ?? fromEnv ?? file.level ?? "info") as LogLevel,
    colour: colourWanted(),
  };
}

/** `value` as the one of `allowed` it names, in any case ("WARN" is warn); undefined stays so. */
function oneOf(
  value: string | undefined,
  name: string,
  allowed: readonly string[],
  command: string,
): string | undefined {
  if (value === undefined) return undefined;
  const lower = value.toLowerCase();
  if (allowed.includes(lower)) return lower;
  const known = `${allowed.slice(0, -1).join(", ")} or ${allowed.at(-1)}`;
  throw new UsageError(`${name} is ${JSON.stringify(value)}; it must be ${known}`, command);
}

/** The name of the first long option in `argv` that `options` lacks (the strict parse says the rest). */
function unknownLongOption(argv: string[], options: OptionSpec): string | undefined {
  const { tokens } = parseArgs({
    args: argv,
    options,
    allowPositionals: true,
    strict: false,
    tokens: true,
  });
  for (const token of tokens) {
    if (
      token.kind === "option" && token.rawName.startsWith("--") &&
      !Object.hasOwn(options, token.name)
    ) {
      return token.name;
    }
  }
  return undefined;
}

export function stringOption(parsed: Parsed, name: string): string | undefined {
  const value = parsed.values[name];
  return typeof value === "string" ? value : undefined;
}

/** The client options that every command talking to an export accepts. */
export const CLIENT_OPTIONS: OptionSpec = {
  timeout: { type: "string" },
  retries: { type: "string" },
  ping: { type: "string" },
  ...CLIENT_KEY_OPTIONS,
};

export const CLIENT_OPTIONS_HELP =
  `  --timeout MS    a connection is dead when the export sent nothing for MS while requests
                  were outstanding and a ping went unanswered; a slow but live export is
                  never dead (default ${CLIENT_TIMEOUT_MS_DEFAULT})
  --retries N     dead connections (or MS without one) a request survives before it
                  fails: an outage shorter than MS x N is ridden out; a request fails after
                  MS x N to MS x (N + 1) of one (default ${CLIENT_RETRIES_DEFAULT})
  --ping MS       ping when nothing was sent for MS, so the export knows this client is
                  alive (default ${CLIENT_PING_MS_DEFAULT}, at most ${CLIENT_PING_MS_MAX})
${CLIENT_KEY_HELP}`;

/** The client options given, the key file loaded (a bad one throws, saying what to run). */
export async function clientOptions(parsed: Parsed, command: string): Promise<RemoteDeviceOptions> {
  const options: RemoteDeviceOptions = {};
  const key = await clientKey(parsed, command);
  if (key !== undefined) options.key = key;
  const timeout = stringOption(parsed, "timeout");
  const retries = stringOption(parsed, "retries");
  const ping = stringOption(parsed, "ping");
  if (timeout !== undefined) options.timeoutMs = parseCount(timeout, "--timeout", 100, 3_600_000);
  if (retries !== undefined) options.retries = parseCount(retries, "--retries", 0, 1_000);
  // A silent lease holder loses its lease (LEASE_IDLE_MS): pings must come well before.
  if (ping !== undefined) options.pingMs = parseCount(ping, "--ping", 100, CLIENT_PING_MS_MAX);
  return options;
}

/** `--metrics [HOST]:PORT`, which `dst export`, `dst array` and `dst attach` take. */
export const METRICS_OPTION: OptionSpec = { metrics: { type: "string" } };

export const METRICS_HELP =
  `  --metrics [HOST]:PORT  serve Prometheus metrics at http://HOST:PORT/metrics (default host
                        127.0.0.1; port 0 picks a free one, printed at start)`;

/** The --metrics address given (its host 127.0.0.1 when left out), or undefined. */
export function metricsOption(parsed: Parsed): HostPort | undefined {
  const text = stringOption(parsed, "metrics");
  return text === undefined ? undefined : parseHostPort(text, "127.0.0.1");
}
