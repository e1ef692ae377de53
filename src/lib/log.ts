/**
 * Log lines to stderr: one line per event, with a time, a level and a component.
 * stdout stays free for what a command prints on purpose (addresses, tables, JSON).
 * The level comes from DST_LOG (debug, info, warn, error; default info).
 */

import { printable } from "./printable.ts";

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
type Level = keyof typeof LEVELS;

function levelFromEnv(): number {
  let name: string | undefined;
  try {
    name = Deno.env.get("DST_LOG");
  } catch {
    // Without env permission, fall back to the default level.
  }
  if (name !== undefined && name in LEVELS) return LEVELS[name as Level];
  return LEVELS.info;
}

const threshold = levelFromEnv();
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

function emit(level: Level, component: string, message: string): void {
  if (LEVELS[level] < threshold) return;
  enqueue(
    `${new Date().toISOString()} ${level.toUpperCase().padEnd(5)} ${component}: ${
      printable(message)
    }\n`,
  );
}

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
      enqueue(
        `${new Date().toISOString()} WARN  log: ${count} log lines dropped: stderr was not ` +
          "being read\n",
      );
    }
  }
  writing = null;
}

/** Resolves when every line logged so far is written (before the process exits). */
export function flushLog(): Promise<void> {
  return writing ?? Promise.resolve();
}

export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export function logger(component: string): Logger {
  return {
    debug: (message) => emit("debug", component, message),
    info: (message) => emit("info", component, message),
    warn: (message) => emit("warn", component, message),
    error: (message) => emit("error", component, message),
  };
}

/** A logger that drops every line: for tests, and for code made in code that should say nothing. */
export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
