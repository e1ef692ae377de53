/**
 * Log lines to stderr: one line per event, with a time, a level, a component, a
 * message and fields. stdout stays free for what a command prints on purpose
 * (addresses, tables, JSON).
 *
 * What this file owns: the two line formats (text and JSON), the level, colour, and
 * the writer that gets lines to stderr without ever blocking. What it does not: which
 * options set them (src/cli/args.ts reads --log-format, --log-level and DST_LOG).
 *
 * Records are routed by LogTape (@logtape/logtape): each component is a category
 * under "dst", and the level is the "dst" logger's lowest level. Its sinks are not
 * used: getStreamSink without `nonBlocking` queues every record with no bound, and
 * with it keeps a count of records (not bytes), flushes on a timer and writes one
 * record per call. The sink here keeps what this file always did: a bounded queue of
 * bytes, one writer that coalesces lines, and a count of what was dropped.
 */

import {
  configureSync,
  getLogger,
  type Logger as LogTapeLogger,
  type LogLevel as LogTapeLevel,
  type LogRecord,
} from "@logtape/logtape";
import { AsyncLocalStorage } from "node:async_hooks";
import { printable } from "./printable.ts";
import { plural } from "./plural.ts";

export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;
export type LogLevel = typeof LOG_LEVELS[number];
export const LOG_FORMATS = ["text", "json"] as const;
export type LogFormat = typeof LOG_FORMATS[number];

export interface LogSettings {
  level: LogLevel;
  format: LogFormat;
  /** Colour the level (text format only): only on a terminal, and never with NO_COLOR. */
  colour: boolean;
}

/** Extra facts about an event, kept apart from its message (JSON's `fields`). */
export type LogFields = Record<string, unknown>;

/** One event, as the formats see it. */
export interface LogLine {
  timeMs: number;
  level: LogLevel;
  component: string;
  message: string;
  fields: LogFields;
}

const TO_LOGTAPE: Record<LogLevel, LogTapeLevel> = {
  debug: "debug",
  info: "info",
  warn: "warning",
  error: "error",
};

function fromLogTape(level: LogTapeLevel): LogLevel {
  if (level === "trace") return "debug";
  if (level === "warning") return "warn";
  if (level === "fatal") return "error";
  return level;
}

const COLOURS: Record<LogLevel, string> = {
  debug: "\x1b[2m",
  info: "\x1b[32m",
  warn: "\x1b[33m",
  error: "\x1b[31m",
};

/**
 * `line` as one line of text: `TIME LEVEL component: message key=value...`, every
 * piece that may hold network text escaped, the level coloured when `colour`.
 */
export function formatText(line: LogLine, colour: boolean): string {
  const level = line.level.toUpperCase().padEnd(5);
  const fields = Object.entries(line.fields)
    .map(([key, value]) => ` ${printable(key)}=${printable(fieldText(value))}`)
    .join("");
  return `${new Date(line.timeMs).toISOString()} ${
    colour ? `${COLOURS[line.level]}${level}\x1b[0m` : level
  } ${printable(line.component)}: ${printable(line.message)}${fields}\n`;
}

/**
 * `line` as one JSON object on one line: time (ISO), level, component, message,
 * fields. JSON escapes control characters by itself; line separators and the bidi
 * overrides are escaped too, so the line reads as it parses.
 */
export function formatJson(line: LogLine): string {
  const text = JSON.stringify({
    time: new Date(line.timeMs).toISOString(),
    level: line.level,
    component: line.component,
    message: line.message,
    fields: line.fields,
  }, jsonSafe);
  return `${
    text.replace(UNSAFE_IN_JSON, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)
  }\n`;
}

const UNSAFE_IN_JSON = /[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** Values JSON cannot hold (bigint, errors) as text. */
function jsonSafe(_key: string, value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return value.message;
  return value;
}

function fieldText(value: unknown): string {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, jsonSafe) ?? String(value);
  } catch {
    return String(value);
  }
}

/** DST_LOG, NO_COLOR and the terminal: what a program gets before its options are read. */
export function defaultLogSettings(): LogSettings {
  const level = envVar("DST_LOG");
  return {
    level: (LOG_LEVELS as readonly string[]).includes(level ?? "") ? level as LogLevel : "info",
    format: "text",
    colour: colourWanted(),
  };
}

/** Colour only on a terminal, and never when NO_COLOR is set to anything but "" (no-color.org). */
export function colourWanted(): boolean {
  const noColour = envVar("NO_COLOR");
  if (noColour !== undefined && noColour !== "") return false;
  return stderrIsTerminal();
}

function stderrIsTerminal(): boolean {
  try {
    return Deno.stderr.isTerminal();
  } catch {
    return false;
  }
}

function envVar(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined; // without env permission: the defaults
  }
}

let settings: LogSettings | null = null;

/**
 * Sets the level, format and colour from now on. The CLI calls it once its options are
 * parsed; until then (and in code run without the CLI) defaultLogSettings() holds.
 */
export function configureLog(next: LogSettings): void {
  settings = { ...next };
  configureSync({
    reset: true,
    sinks: { stderr: sink },
    loggers: [
      { category: ["dst"], lowestLevel: TO_LOGTAPE[next.level], sinks: ["stderr"] },
      // LogTape's own diagnostics (a sink that threw): its warnings, in the same form.
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/** The settings in force: what a worker thread is started with, so its lines match. */
export function logSettings(): LogSettings {
  if (settings === null) configureLog(defaultLogSettings());
  return { ...settings! };
}

function sink(record: LogRecord): void {
  const [root, ...rest] = record.category;
  const line: LogLine = {
    timeMs: record.timestamp,
    level: fromLogTape(record.level),
    component: root === "dst" && rest.length > 0 ? rest.join(".") : record.category.join("."),
    message: record.message.map((part) => fieldText(part)).join(""),
    fields: record.properties,
  };
  write(line);
}

function write(line: LogLine): void {
  const current = settings ?? defaultLogSettings();
  const text = current.format === "json" ? formatJson(line) : formatText(line, current.colour);
  // Above the status line: it is cleared, the line written, and it is drawn again below.
  enqueue(statusLines.size === 0 ? text : `${CLEAR_LINE}${text}${statusLine()}`);
}

/** Back to the line's start, and clear it. */
const CLEAR_LINE = "\r\x1b[K";

/** What stays at the bottom of a terminal, by key (a resync's bar per leg). */
const statusLines = new Map<string, string>();

function statusLine(): string {
  return [...statusLines.values()].join("  ");
}

/**
 * Whether stderr can keep a line at its bottom, redrawn in place: a terminal (not a
 * "dumb" one), with text lines. Otherwise progress is logged as lines.
 */
export function statusLineShown(): boolean {
  const text = (settings ?? defaultLogSettings()).format === "text";
  return text && envVar("TERM") !== "dumb" && stderrIsTerminal();
}

/**
 * Sets (or, with null, removes) the part `key` of the line kept at the bottom of the
 * terminal, below the log lines, and redraws it. Only where statusLineShown().
 */
export function setStatusLine(key: string, text: string | null): void {
  if (text === null && !statusLines.has(key)) return;
  if (text === null) statusLines.delete(key);
  else statusLines.set(key, printable(text));
  enqueue(`${CLEAR_LINE}${statusLine()}`);
}

const encoder = new TextEncoder();

/**
 * Lines wait here for stderr, written by one asynchronous writer: a synchronous write
 * to a pipe nobody reads would stop the event loop, and with it every client. Past
 * QUEUE_BYTES_MAX lines are dropped and counted, and a line says how many.
 */
const QUEUE_BYTES_MAX = 1024 * 1024;
let queue: Uint8Array[] = [];
let queuedBytes = 0;
let dropped = 0;
let writing: Promise<void> | null = null;

function enqueue(line: string): void {
  const bytes = encoder.encode(line);
  if (queuedBytes + bytes.length > QUEUE_BYTES_MAX) {
    dropped += 1;
    return;
  }
  queue.push(bytes);
  queuedBytes += bytes.length;
  writing ??= drain();
}

async function drain(): Promise<void> {
  while (queue.length > 0) {
    const lines = queue;
    queue = [];
    const chunk = new Uint8Array(lines.reduce((sum, line) => sum + line.length, 0));
    let at = 0;
    for (const line of lines) {
      chunk.set(line, at);
      at += line.length;
    }
    try {
      for (let done = 0; done < chunk.length;) {
        done += await Deno.stderr.write(chunk.subarray(done));
      }
    } catch {
      // stderr is gone: nothing to tell, and nobody to tell it to.
    }
    queuedBytes -= chunk.length;
    if (dropped > 0 && queuedBytes === 0) {
      const count = dropped;
      dropped = 0;
      // Written whatever the level: lines went missing, and the reader should know.
      write({
        timeMs: Date.now(),
        level: "warn",
        component: "log",
        message: `${plural(count, "log line")} dropped: stderr was not being read`,
        fields: { dropped: count },
      });
    }
  }
  writing = null;
}

/** Resolves when every line logged so far is written (before the process exits). */
export function flushLog(): Promise<void> {
  return writing ?? Promise.resolve();
}

/**
 * flushLog(), waiting no longer than `ms`: before an exit, the last lines are written,
 * but not for ever if stderr is stuck (a full pipe nobody reads).
 */
export async function flushLogWithin(ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await Promise.race([flushLog(), new Promise((resolve) => timer = setTimeout(resolve, ms))]);
  } finally {
    clearTimeout(timer);
  }
}

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

/**
 * The logger of one component ("export", "nbd#2"): its lines name it.
 *
 * @example (not run by `deno test --doc`: it would have to use every export of this file)
 * ```ts ignore
 * import { logger } from "./log.ts";
 * logger("export").debug("a status query", { peer: "127.0.0.1:40000" });
 * ```
 */
export function logger(component: string): Logger {
  let routed: LogTapeLogger | null = null;
  const emit = (level: LogLevel, message: string, own: LogFields = {}): void => {
    const around = contextFields.getStore();
    const fields = around === undefined ? own : { ...around, ...own };
    if (settings === null) configureLog(defaultLogSettings());
    routed ??= getLogger(["dst", component]);
    const to = TO_LOGTAPE[level];
    if (!routed.isEnabledFor(to)) return;
    // emit(), not info(message): a message is text, never a template with {placeholders}.
    routed.emit({
      timestamp: Date.now(),
      level: to,
      message: [message],
      rawMessage: message,
      properties: fields,
    });
  };
  return {
    debug: (message, fields) => emit("debug", message, fields),
    info: (message, fields) => emit("info", message, fields),
    warn: (message, fields) => emit("warn", message, fields),
    error: (message, fields) => emit("error", message, fields),
  };
}

/**
 * Fields added to every line logged by `run` and whatever it starts (its timers,
 * connections and promises): `dst up` runs each item of a node file in one, so every
 * line says which item it came from ({ item: "exports[0]" }).
 */
export function withLogFields<T>(fields: LogFields, run: () => T): T {
  return contextFields.run({ ...contextFields.getStore(), ...fields }, run);
}

/** The fields withLogFields has in force here (none: {}), to pass to a worker thread. */
export function logFieldsNow(): LogFields {
  return { ...contextFields.getStore() };
}

/**
 * `run`, made to log with the fields in force where it was made: for callbacks that
 * something outside any context calls, such as a signal listener.
 */
export function keepLogFields<A extends unknown[]>(
  run: (...args: A) => void,
): (...args: A) => void {
  const fields = contextFields.getStore();
  return fields === undefined ? run : (...args) => contextFields.run(fields, () => run(...args));
}

const contextFields = new AsyncLocalStorage<LogFields>();

/** A logger that drops every line: for tests, and for code made in code that should say nothing. */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
